"""`mailtally run` as a user starts it: fresh directory, banner, clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cli
from tests.support import free_port


def test_run_initialises_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("RELAY", "INGEST", "TRACKER")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILTALLY_")}
    env.update({f"MAILTALLY_{n}_LISTEN": f"127.0.0.1:{p}" for n, p in ports.items()})
    env["MAILTALLY_TRACKER_BASE_URL"] = f"http://127.0.0.1:{ports['TRACKER']}"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import cli; cli.main()", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "mailtally is running" in line:
                break
        output = "".join(lines)
        assert "initialising ./mailtally-data" in output, output
        assert (tmp_path / "mailtally-data" / "config.toml").exists()
        assert (tmp_path / "mailtally-data" / "mailtally.db").exists()
        for name in cli.available_services():
            port = ports[name.upper()]
            assert f"127.0.0.1:{port}" in output, (name, output)
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output + rest
        assert "Traceback" not in output + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
