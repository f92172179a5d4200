"""A test run killed with SIGKILL leaves its private Postfix running; the next run reaps it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.net import free_port
from tests.e2e.postfix import Postfix, _alive

ROOT = Path(__file__).resolve().parents[2]
OWNER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.e2e.postfix import Postfix
p = Postfix(int(sys.argv[2]))
p.start()
print(p.base, p.master_pid(), flush=True)
time.sleep(600)
"""


def test_postfix_of_a_killed_run_is_reaped_by_the_next(debian_packages: None) -> None:
    port = free_port()
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(ROOT), str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        base, master = owner.stdout.readline().split()
        assert _alive(int(master))
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
    assert Path(base).is_dir() and _alive(int(master)), "the orphan should still be running"

    mine = Postfix(free_port())
    mine.start()
    try:
        deadline = time.monotonic() + 20
        while _alive(int(master)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(int(master)), "the abandoned Postfix master is still running"
        assert not Path(base).exists()
        assert mine.master_pid() and _alive(mine.master_pid())
    finally:
        mine.stop()
