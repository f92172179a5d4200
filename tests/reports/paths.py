"""Helpers for the report tests that go through the real servers: free ports, waiting for
a condition, SMTP submission to the relay and the ingest, the maildir upstream, the CLI."""

from __future__ import annotations

import asyncio
import email
import json
import smtplib
import socket
import time
from email import policy
from pathlib import Path

from click.testing import CliRunner

import cli

PASSWORD = "report tests password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
    return value


def report(settings, *args: str):
    result = CliRunner().invoke(
        cli.main, ["--config", str(settings.config_path), "report", *args, "--format", "json"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.output)


def delivered(settings) -> list[email.message.EmailMessage]:
    path = Path(settings.relay.upstream[len("maildir:") :]) / "new"
    files = sorted(path.iterdir()) if path.is_dir() else []
    return [email.message_from_bytes(p.read_bytes(), policy=policy.default) for p in files]


def submit(settings, raw: str, rcpts: list[str]) -> None:
    host, port = settings.relay.listen.split(":")
    with smtplib.SMTP(host, int(port), timeout=10) as smtp:
        smtp.login("alice@seller.test", PASSWORD)
        smtp.sendmail("alice@seller.test", rcpts, raw.encode())


def bcc(settings, raw: str, rcpts: list[str]) -> None:
    host, port = settings.ingest.listen.split(":")
    with smtplib.SMTP(host, int(port), timeout=10) as smtp:
        smtp.sendmail("alice@seller.test", rcpts, raw.encode())


def report_contact(settings, address: str) -> dict:
    result = CliRunner().invoke(
        cli.main,
        ["--config", str(settings.config_path), "contacts", "show", address, "--format", "json"],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.output)
