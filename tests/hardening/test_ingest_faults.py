"""Faults around the ingest listener (SPEC "Bad input, faults"): a database locked by
another process, disk errors while spooling, and clients that trickle one byte a second.

A 250 from the ingest means "spooled with fsync"; it must never be given for a message
that is not safely on disk (451 4.3.0 then), and a message it was given for is logged
once the fault is gone."""

from __future__ import annotations

import asyncio
import resource
import time

import aiosmtplib
import pytest

import store
from ingest import service as ingest_service
from ingest import spool
from store import inbound as store_inbound
from tests.hardening.conftest import RawSMTP
from tests.hardening.ingest_helpers import (
    USER,
    IngestProcess,
    make_settings,
    port_of,
    small_mail,
)
from tests.support import hold_lock, wait_for


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path / "data")


@pytest.fixture
def db(settings):
    conn = store.connect(settings.db_path)
    yield conn
    conn.close()


async def send(port: int, rcpt: str, data: bytes, timeout: float = 30) -> tuple[int, str]:
    """One message on its own connection: the reply to DATA (code, text)."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=timeout)
    await smtp.connect()
    try:
        await smtp.ehlo()
        await smtp.mail(USER)
        await smtp.rcpt(rcpt)
        reply = await smtp.data(data)
        return reply.code, reply.message
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    finally:
        try:
            await smtp.quit()
        except aiosmtplib.SMTPException:
            pass


def spool_files(settings) -> list:
    """Every file under the spool (new/ and tmp/): nothing half-spooled may stay."""
    root = spool.spool_dir(settings)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def logged(db, n) -> list[dict]:
    return store_inbound.inbound_by_message_id(db, f"<{n}@hardening.test>")


# --- the database locked by another process ---------------------------------------------------


async def test_database_locked_for_seconds_accepts_and_logs_everything_after(settings, db):
    svc = await ingest_service.start(settings)
    locker = hold_lock(settings.db_path, 4)
    try:
        locked_at = time.monotonic()
        rcpt = settings.ingest.bcc_address

        async def client(c: int) -> list[tuple[str, int, float]]:
            out = []
            for i in range(8):
                n = f"locked-{c}-{i}"
                code, _ = await send(svc.port, rcpt, small_mail(n))
                out.append((n, code, time.monotonic() - locked_at))
            return out

        replies = [r for rs in await asyncio.gather(*(client(c) for c in range(4))) for r in rs]
        still_locked = locker.poll() is None
        # The spool is a file: accepting needs no database, so 250s come while it is locked.
        assert all(code == 250 or 400 <= code < 500 for _, code, _ in replies), replies
        accepted = [n for n, code, _ in replies if code == 250]
        assert accepted, replies
        if still_locked:
            assert len(accepted) == len(replies), replies
        assert locker.wait(timeout=60) == 0
        # Nothing is lost: once the lock goes, every accepted mail is logged exactly once.
        await wait_for(lambda: all(logged(db, n) for n in accepted), timeout=60)
        await wait_for(lambda: not spool.pending(spool.spool_dir(settings)), timeout=60)
        for n in accepted:
            (entry,) = logged(db, n)
            assert entry["decision"] == "logged", entry
        assert db.execute("SELECT COUNT(*) FROM emails").fetchone()[0] == len(accepted)
    finally:
        if locker.poll() is None:
            locker.kill()
        await svc.stop()


# --- disk errors while spooling -------------------------------------------------------------


async def test_spool_dir_unusable_gives_451_then_serves_again(settings, db):
    """The spool directory replaced by a regular file (root ignores chmod, not this):
    451 4.3.0, nothing spooled or logged; once the directory is back, 250 and logged."""
    svc = await ingest_service.start(settings)
    root = spool.spool_dir(settings)
    rcpt = settings.ingest.bcc_address
    try:
        for p in sorted(root.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        root.rmdir()
        root.write_bytes(b"not a directory")
        code, text = await send(svc.port, rcpt, small_mail("disk-fault"))
        assert code == 451 and "4.3.0" in text, (code, text)
        assert root.read_bytes() == b"not a directory"
        # The session is not broken by the fault: the same client can go on (and is told 451
        # again while the fault lasts).
        code, _ = await send(svc.port, rcpt, small_mail("disk-fault-2"))
        assert code == 451
        root.unlink()
        code, _ = await send(svc.port, rcpt, small_mail("after-fault"))
        assert code == 250
        (entry,) = await wait_for(lambda: logged(db, "after-fault"), timeout=30)
        assert entry["decision"] == "logged"
        await asyncio.sleep(0.3)
        assert logged(db, "disk-fault") == [] and logged(db, "disk-fault-2") == []
        assert store_inbound.count_emails(db) == 1
    finally:
        await svc.stop()


def _limit_file_size() -> None:
    # Files the server writes may not grow past 2 MB: a bigger spool entry fails with EFBIG
    # (Python ignores SIGXFSZ, so the write raises instead of killing the process).
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))


async def test_write_failing_mid_message_gives_451_and_leaves_nothing(settings, db, tmp_path):
    """A real write error in the middle of DATA (RLIMIT_FSIZE: EFBIG) on `mailtally ingest`:
    451, no partial entry in the spool, and the next (small) message is served and logged."""
    server = IngestProcess(settings, tmp_path / "ingest.log", preexec=_limit_file_size)
    await server.start()
    port, rcpt = port_of(settings), settings.ingest.bcc_address
    try:
        code, text = await send(port, rcpt, small_mail("too-big-for-disk", size=3_000_000))
        assert code == 451 and "4.3.0" in text, (code, text)
        assert spool_files(settings) == []
        code, _ = await send(port, rcpt, small_mail("fits-on-disk", size=10_000))
        assert code == 250
        (entry,) = await wait_for(lambda: logged(db, "fits-on-disk"), timeout=30)
        assert entry["decision"] == "logged"
        assert logged(db, "too-big-for-disk") == []
        assert server.proc.poll() is None
        await wait_for(lambda: spool_files(settings) == [], timeout=30)
    finally:
        server.stop()
    assert "Traceback" not in (tmp_path / "ingest.log").read_text()


# --- clients that trickle ------------------------------------------------------------------


async def _trickle(conn: RawSMTP, data: bytes, give_up: float = 12.0) -> float | None:
    """Send one byte a second; the seconds until the server hung up, None if it did not
    within ``give_up`` seconds."""
    start = time.monotonic()
    for b in data:
        if time.monotonic() - start > give_up:
            return None
        await conn.send(bytes([b]))
        try:
            line = await asyncio.wait_for(conn.reader.readline(), 1.0)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        if not line:
            return time.monotonic() - start
    return None


async def test_one_byte_a_second_is_dropped_while_others_are_served(settings, db):
    settings.ingest.smtp_timeout_seconds = 2.0
    svc = await ingest_service.start(settings)
    rcpt = settings.ingest.bcc_address
    try:
        in_command = await RawSMTP.connect(svc.port)
        in_data = await RawSMTP.connect(svc.port)
        for line, code in (
            ("EHLO slow", 250),
            (f"MAIL FROM:<{USER}>", 250),
            (f"RCPT TO:<{rcpt}>", 250),
            ("DATA", 354),
        ):
            assert await in_data.cmd(line) == code, line
        tricklers = asyncio.gather(
            _trickle(in_command, b"EHLO trickling.client.example\r\n"),
            _trickle(in_data, small_mail("trickled") + b"\r\n.\r\n"),
        )

        async def well_behaved():
            codes = []
            for i in range(3):
                codes.append((await send(svc.port, rcpt, small_mail(f"prompt-{i}")))[0])
                await asyncio.sleep(0.5)
            return codes

        dropped, codes = await asyncio.gather(tricklers, well_behaved())
        # Dropped after about the 2 s timeout (far before the 30+ s the bytes would take).
        assert all(d is not None for d in dropped), dropped
        assert codes == [250, 250, 250]
        for i in range(3):
            await wait_for(lambda i=i: logged(db, f"prompt-{i}"), timeout=30)
        assert logged(db, "trickled") == []
        assert spool_files(settings) == []
        await in_command.close()
        await in_data.close()
    finally:
        await svc.stop()


async def test_disk_error_while_filing_is_retried_not_lost(settings, db):
    """After the 250, the worker cannot write (its scratch directory is a regular file for a
    moment): the message stays spooled and is logged once the fault is gone, not recorded
    as an error and dropped."""
    from ingest import process

    scratch = process.attachments_dir(settings) / "tmp"
    scratch.parent.mkdir(parents=True, exist_ok=True)
    scratch.write_bytes(b"not a directory")
    svc = await ingest_service.start(settings)
    try:
        code, _ = await send(svc.port, settings.ingest.bcc_address, small_mail("filing-fault"))
        assert code == 250
        await asyncio.sleep(0.8)  # the worker tries (and fails) at least once meanwhile
        assert logged(db, "filing-fault") == []
        assert len(spool.pending(spool.spool_dir(settings))) == 1
        scratch.unlink()
        (entry,) = await wait_for(lambda: logged(db, "filing-fault"), timeout=30)
        assert entry["decision"] == "logged", entry
        assert db.execute("SELECT COUNT(*) FROM inbound_log").fetchone()[0] == 1
    finally:
        await svc.stop()
