"""The writer's CPU priority (tracker.priority): SCHED_IDLE while its backlog is short, the
ordinary policy past HURRY_ABOVE hits waiting, back at CALM_BELOW; never the idle policy
where the process could not leave it again."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from store import events as store_events
from tests.support import hold_lock, wait_for
from tracker import priority

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling")


def policy(tid: int) -> int:
    return os.sched_getscheduler(tid)


@pytest.fixture
def thread_id():
    """A live thread's kernel id (it ends with the test)."""
    done = threading.Event()
    started: list[int] = []

    def run() -> None:
        started.append(threading.get_native_id())
        done.wait(30)

    t = threading.Thread(target=run)
    t.start()
    while not started:
        time.sleep(0.001)
    yield started[0]
    done.set()
    t.join()


def test_idle_until_the_backlog_passes_hurry_then_ordinary_until_it_falls_below_calm(
    thread_id,
):
    if not priority.can_leave_idle():
        pytest.skip("this process may not leave SCHED_IDLE (no CAP_SYS_NICE, RLIMIT_NICE 0)")
    p = priority.WriterPriority(thread_id, hurry_above=100, calm_below=10)
    assert p.enabled and p.idle and policy(thread_id) == os.SCHED_IDLE
    p.follow(100)  # not past the mark
    assert policy(thread_id) == os.SCHED_IDLE
    p.follow(101)
    assert not p.idle and policy(thread_id) == os.SCHED_OTHER
    p.follow(50)  # between the marks: stays as it is
    assert policy(thread_id) == os.SCHED_OTHER
    p.follow(10)
    assert policy(thread_id) == os.SCHED_OTHER
    p.follow(9)
    assert p.idle and policy(thread_id) == os.SCHED_IDLE
    assert p.switches == 3
    p.hurry()  # stopping: ordinary, and stays so
    p.follow(0)
    assert policy(thread_id) == os.SCHED_OTHER and not p.enabled


UNPRIVILEGED = r"""
import os, resource, sys, threading
from tracker import priority  # imported first: nobody may not read this Python's files
resource.setrlimit(resource.RLIMIT_NICE, (0, 0))
os.setgid(65534); os.setuid(65534)  # nobody: no CAP_SYS_NICE
tid = []
done = threading.Event()
t = threading.Thread(target=lambda: (tid.append(threading.get_native_id()), done.wait(10)))
t.start()
while not tid: pass
os.nice(5)  # as the writer process is, before the check
p = priority.WriterPriority(tid[0])
p.follow(0); p.follow(10**9)
print(priority.can_leave_idle(), p.enabled, os.sched_getscheduler(tid[0]) == os.SCHED_OTHER)
done.set()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_process_that_could_not_leave_idle_never_enters_it():
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", UNPRIVILEGED],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(root)),
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True"]


def _threads(pid: int) -> dict[int, int]:
    """tid -> scheduling policy of each thread of ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = policy(int(task.name))
        except OSError:
            pass
    return out


async def test_the_tracker_writer_thread_hurries_with_a_backlog_and_calms_after(
    tracker, sent, db, settings
):
    if not priority.can_leave_idle():
        pytest.skip("this process may not leave SCHED_IDLE")
    svc, _, _ = tracker
    made = sent(recipients=[f"r{i}@acme.example" for i in range(10)])
    pid = svc.writer.proc.pid

    def writer_policy() -> int:
        """SCHED_IDLE if the writer thread is (the only one that may be), else SCHED_OTHER.
        The child's main thread reads the frames and keeps the ordinary policy."""
        threads = _threads(pid)
        assert threads[pid] == os.SCHED_OTHER
        idle = [t for t, p in threads.items() if p == os.SCHED_IDLE]
        assert len(idle) <= 1, threads
        return os.SCHED_IDLE if idle else os.SCHED_OTHER

    assert await wait_for(lambda: writer_policy() == os.SCHED_IDLE)
    d = made["deliveries"][0]
    now = time.time()
    hit = ("open", d, None, "", "GET", "Mozilla/5.0", "127.0.0.1", now, {})
    many = priority.HURRY_ABOVE + 500
    locker = hold_lock(settings.db_path, 3.0)  # nothing is written meanwhile
    for i in range(many):
        svc.writer.enqueue((*hit[:7], now + i * 1e-4, {}))
    await wait_for(lambda: writer_policy() == os.SCHED_OTHER, timeout=10)
    assert locker.wait(timeout=10) == 0
    await wait_for(lambda: svc.writer.pending == 0, timeout=60)
    assert writer_policy() == os.SCHED_OTHER  # no frame since: nothing to write anyway
    svc.writer.enqueue(hit)  # the next frame tells of a short backlog
    await wait_for(lambda: writer_policy() == os.SCHED_IDLE, timeout=10)
    await wait_for(lambda: svc.writer.pending == 0, timeout=30)
    assert store_events.count_hits(db) == many + 1
