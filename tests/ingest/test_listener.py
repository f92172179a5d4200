"""SPEC ingest 1: RCPT only for the logging addresses, SIZE/552, spool before 250,
a restart resumes (SIGKILL between 250 and processing → logged once after restart)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest

from ingest import spool
from store import inbound as store_inbound
from tests.ingest.conftest import entry_for, message, send
from tests.support import wait_for


async def test_rcpt_only_logging_addresses(ingest, settings):
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=ingest.port, timeout=30)
    await smtp.connect()
    try:
        await smtp.ehlo()
        await smtp.mail("alice@acme.io")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await smtp.rcpt("someone@localhost")
        assert refused.value.code == 550
        assert "5.1.1" in refused.value.message
        # The look-alike of a logging address is refused too; the real ones (any case) pass.
        with pytest.raises(aiosmtplib.SMTPRecipientRefused):
            await smtp.rcpt("x" + settings.ingest.bcc_address)
        code, _ = await smtp.rcpt(settings.ingest.bcc_address.upper())
        assert code == 250
        code, _ = await smtp.rcpt(settings.ingest.forward_address)
        assert code == 250
    finally:
        await smtp.quit()


async def test_size_advertised_and_552_over_it(settings, db, alice):
    from ingest import service

    settings.ingest.max_message_size = 20_000
    svc = await service.start(settings)
    try:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=svc.port, timeout=30)
        await smtp.connect()
        await smtp.ehlo()
        assert smtp.supports_extension("size")
        assert smtp.esmtp_extensions["size"] == "20000"
        await smtp.quit()
        big = message(text="x" * 30_000)
        with pytest.raises(aiosmtplib.SMTPResponseException) as too_big:
            await send(svc, "alice@acme.io", [settings.ingest.bcc_address], big)
        assert too_big.value.code == 552
        small = message(text="fits")
        await send(svc, "alice@acme.io", [settings.ingest.bcc_address], small)
        assert (await entry_for(db, small["Message-ID"]))["decision"] == "logged"
        assert store_inbound.inbound_by_message_id(db, big["Message-ID"]) == []
    finally:
        await svc.stop()


async def test_accepted_message_is_on_disk_before_250(settings, db, alice):
    """With the worker unable to write (database locked), a 250 still means the message is
    in the spool, fsync'd; once the lock goes, it is logged."""
    from ingest import service

    svc = await service.start(settings)
    blocker = sqlite3.connect(settings.db_path, timeout=1)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        msg = message(subject="held")
        await send(svc, "alice@acme.io", [settings.ingest.bcc_address], msg)
        entries = spool.pending(spool.spool_dir(settings))
        assert any(msg["Message-ID"].encode() in p.read_bytes() for p in entries)
    finally:
        blocker.rollback()
        blocker.close()
    try:
        assert (await entry_for(db, msg["Message-ID"], timeout=60))["decision"] == "logged"
        await wait_for(lambda: not spool.pending(spool.spool_dir(settings)))
    finally:
        await svc.stop()


def _start_ingest(config_path: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, MAILTALLY_CONFIG=str(config_path), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "ingest"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


async def _wait_listening(port: int, proc: subprocess.Popen) -> None:
    def up() -> bool:
        assert proc.poll() is None, "mailtally ingest exited"
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    await wait_for(up, timeout=60)


async def test_sigkill_after_250_logged_once_after_restart(settings, db, alice, tmp_path):
    """`mailtally ingest` accepts a message (250) while the database is locked so it cannot
    be filed, is SIGKILLed, and after a restart the message is logged exactly once."""
    config_path = settings.config_path
    text = config_path.read_text()
    config_path.write_text(
        text.replace("[ingest]", f'[ingest]\nlisten = "{settings.ingest.listen}"', 1)
    )
    log = tmp_path / "ingest.log"
    proc = _start_ingest(config_path, log)
    try:
        await _wait_listening(ingest_port := int(settings.ingest.listen.rsplit(":", 1)[1]), proc)
        blocker = sqlite3.connect(settings.db_path, timeout=1)
        blocker.execute("BEGIN IMMEDIATE")
        msg = message(subject="survives SIGKILL")
        try:
            await aiosmtplib.send(
                msg.as_bytes(),
                sender="alice@acme.io",
                recipients=[settings.ingest.bcc_address],
                hostname="127.0.0.1",
                port=ingest_port,
                timeout=30,
            )  # 250 received here
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            blocker.rollback()
            blocker.close()
        assert store_inbound.inbound_by_message_id(db, msg["Message-ID"]) == []
        assert len(spool.pending(spool.spool_dir(settings))) == 1

        proc = _start_ingest(config_path, log)
        await _wait_listening(ingest_port, proc)
        entry = await entry_for(db, msg["Message-ID"], timeout=60)
        assert entry["decision"] == "logged"
        await wait_for(lambda: not spool.pending(spool.spool_dir(settings)))
        # A second restart finds nothing left to do: still exactly one entry, one email.
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        proc = _start_ingest(config_path, log)
        await _wait_listening(ingest_port, proc)
        await asyncio.sleep(0.5)  # give a (wrong) second processing the chance to happen
        assert len(store_inbound.inbound_by_message_id(db, msg["Message-ID"])) == 1
        assert db.execute("SELECT COUNT(*) FROM emails").fetchone()[0] == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_mailtally_run_includes_the_ingest():
    import cli

    assert "ingest" in cli.available_services()
