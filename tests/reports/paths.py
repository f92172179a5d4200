"""Helpers for the report tests that go through the real servers: free ports, waiting for
a condition, SMTP submission to the relay and the ingest, the maildir upstream, the CLI."""

from __future__ import annotations

import email
import json
import smtplib
from email import policy
from pathlib import Path

from click.testing import CliRunner

import cli

PASSWORD = "report tests password"


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
