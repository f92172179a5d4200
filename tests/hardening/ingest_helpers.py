"""Helpers for the ingest hardening tests (tests/hardening/test_ingest_*.py): a data dir
with a user, the ingest as a real ``mailtally ingest`` subprocess, and small mails."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import cli
import config
import store
from store import users
from tests.support import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
CORPORA = ROOT.parent / "shared" / "corpora"
USER = "alice@acme.io"


def make_settings(directory: Path) -> config.Settings:
    """A fresh data dir whose config.toml names a free ingest port, with USER as a user."""
    settings = cli.initialise(directory)
    port = free_port()
    settings.ingest.listen = f"127.0.0.1:{port}"
    text = settings.config_path.read_text()
    settings.config_path.write_text(
        text.replace("[ingest]", f'[ingest]\nlisten = "127.0.0.1:{port}"', 1)
    )
    db = store.connect(settings.db_path)
    users.add_user(db, USER, "Alice", None)
    db.close()
    return settings


def port_of(settings: config.Settings) -> int:
    return int(settings.ingest.listen.rsplit(":", 1)[1])


def small_mail(n: int | str, *, sender: str = USER, size: int = 0) -> bytes:
    """A BCC'd mail To one customer with Message-ID ``<n@hardening.test>``."""
    body = b"Hello,\r\nthe quote.\r\n" + (b"x" * 76 + b"\r\n") * (size // 78)
    return (
        f"From: {sender}\r\nTo: Bob <bob@customer.example>\r\nSubject: mail {n}\r\n"
        f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{n}@hardening.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode() + body


class IngestProcess:
    """``mailtally ingest`` run as its own process (so it can be SIGKILLed or limited)."""

    def __init__(self, settings: config.Settings, log: Path, preexec=None) -> None:
        self.settings = settings
        self.log = log
        self.preexec = preexec
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        env = dict(os.environ, MAILTALLY_CONFIG=str(self.settings.config_path))
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "ingest"],
            cwd=ROOT,
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            preexec_fn=self.preexec,
        )
        port = port_of(self.settings)

        def listening() -> bool:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        await wait_for(listening, timeout=60, interval=0.05)

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a power cut of the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
