"""Hostile SMTP clients against a running relay and ingest: each gets a refusal or a closed
connection, a well-behaved client is served at the same time, and the server answers after."""

from __future__ import annotations

import asyncio
import base64
import os

import aiosmtplib
import pytest

import cli
import config
import store
from ingest import service as ingest_service
from relay import service as relay_service
from store import users as store_users
from tests.hardening.conftest import RawSMTP
from tests.relay.conftest import Upstream
from tests.support import free_port

PASSWORD = "correct horse battery"
GOOD = (
    b"From: Alice <alice@corp.test>\r\nTo: carol@client.test\r\nSubject: hi\r\n"
    b"Message-ID: <good-%d@corp.test>\r\n\r\nHello\r\n"
)


@pytest.fixture
async def relay(tmp_path):
    s = cli.initialise(tmp_path / "relay")
    port = free_port()
    s.relay.listen = f"127.0.0.1:{port}"
    s.tracker.base_url = "https://t.example"
    up = Upstream()
    await up.start()
    s.relay.upstream = f"smtp://127.0.0.1:{up.port}"
    db = store.connect(s.db_path)
    store_users.add_user(db, "alice@corp.test", "Alice", PASSWORD)
    db.close()
    svc = await relay_service.start(s)
    yield s, port
    await svc.stop()
    await up.stop()


@pytest.fixture
async def ingest(tmp_path):
    s = cli.initialise(tmp_path / "ingest")
    s.ingest.listen = f"127.0.0.1:{free_port()}"
    svc = await ingest_service.start(s)
    yield s, svc.port
    await svc.stop()


async def relay_login(port: int) -> RawSMTP:
    c = await RawSMTP.connect(port)
    assert await c.cmd("EHLO hostile.test") == 250
    token = base64.b64encode(f"\0alice@corp.test\0{PASSWORD}".encode()).decode()
    assert await c.cmd(f"AUTH PLAIN {token}") == 235
    return c


async def good_relay_client(port: int, n: int = 3) -> None:
    """A normal client, served while the hostile ones run."""
    for i in range(n):
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=20) as smtp:
            await smtp.login("alice@corp.test", PASSWORD)
            errors, resp = await smtp.sendmail("alice@corp.test", ["carol@client.test"], GOOD % i)
        assert errors == {} and "queued" in resp, resp


async def good_ingest_client(settings: config.Settings, port: int, n: int = 3) -> None:
    for i in range(n):
        errors, _ = await aiosmtplib.send(
            GOOD % i,
            sender="alice@corp.test",
            recipients=[settings.ingest.bcc_address],
            hostname="127.0.0.1",
            port=port,
            timeout=20,
        )
        assert errors == {}


async def still_answers(port: int) -> None:
    c = await RawSMTP.connect(port)
    assert await c.cmd("EHLO after.test") == 250
    assert await c.cmd("NOOP") == 250
    assert await c.cmd("QUIT") == 221
    await c.close()


async def long_command(port: int) -> None:
    c = await RawSMTP.connect(port)
    assert await c.cmd(b"EHLO " + b"a" * (1024 * 1024)) == 500  # Command line too long
    assert await c.cmd("NOOP") == 250  # and the session goes on
    await c.close()


async def garbage(port: int) -> None:
    c = await RawSMTP.connect(port)
    rnd = os.urandom(4000).replace(b"\r", b"").replace(b"\n", b"")
    lines = [rnd[i : i + 80] for i in range(0, 4000, 80)] + [b"\x00\xff\xfe", b"MAIL", b"RCPT TO"]
    await c.send(b"".join(line + b"\r\n" for line in lines))
    codes = [await c.reply() for _ in lines]
    for code in codes:
        assert code is None or 500 <= code < 600 or code == 503, codes
    await c.close()


async def unfinished_data(port: int, login, mail_from: str, rcpt: str) -> None:
    c = await login(port)
    assert await c.cmd(f"MAIL FROM:<{mail_from}>") == 250
    assert await c.cmd(f"RCPT TO:<{rcpt}>") == 250
    assert await c.cmd("DATA") == 354
    await c.send(b"Subject: never ends\r\n\r\n" + b"x" * 1000 + b"\r\n")
    await c.close()  # disconnect without the final "."


def files_under(path) -> list:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


async def test_relay_survives_hostile_clients(relay):
    settings, port = relay

    async def many_rcpts() -> None:
        c = await relay_login(port)
        assert await c.cmd("MAIL FROM:<alice@corp.test>") == 250
        await c.send(b"".join(b"RCPT TO:<r%d@client.test>\r\n" % i for i in range(10_000)))
        codes = [await c.reply() for _ in range(10_000)]
        limit = settings.relay.max_recipients
        assert codes[:limit] == [250] * limit
        assert set(codes[limit:]) == {452}
        assert await c.cmd("RSET") == 250
        await c.close()

    async def unauth_rcpt() -> None:
        c = await RawSMTP.connect(port)
        assert await c.cmd("EHLO open-relay.test") == 250
        assert await c.cmd("MAIL FROM:<spam@evil.example>") == 530
        await c.close()

    await asyncio.wait_for(
        asyncio.gather(
            good_relay_client(port),
            long_command(port),
            garbage(port),
            many_rcpts(),
            unauth_rcpt(),
            unfinished_data(port, relay_login, "alice@corp.test", "carol@client.test"),
        ),
        50,
    )
    await still_answers(port)
    db = store.connect(settings.db_path)
    try:
        subjects = [r["subject"] for r in db.query("select subject from emails")]
    finally:
        db.close()
    assert "never ends" not in subjects
    assert len(subjects) == 3  # only the well-behaved client's messages


async def test_ingest_survives_hostile_clients(ingest):
    settings, port = ingest
    from ingest import spool

    async def login(p: int) -> RawSMTP:
        c = await RawSMTP.connect(p)
        assert await c.cmd("EHLO hostile.test") == 250
        return c

    async def many_rcpts() -> None:
        c = await login(port)
        assert await c.cmd("MAIL FROM:<x@evil.example>") == 250
        await c.send(b"".join(b"RCPT TO:<r%d@client.test>\r\n" % i for i in range(10_000)))
        codes = [await c.reply() for _ in range(10_000)]
        assert set(codes) == {550}  # not a logging address: never relayed
        assert await c.cmd("RSET") == 250
        await c.close()

    async def oversized() -> None:
        # the SIZE limit (ingest.max_message_size) is enforced by aiosmtpd: 552
        c = await login(port)
        assert await c.cmd("MAIL FROM:<x@evil.example> SIZE=999999999999") == 552
        await c.close()

    await asyncio.wait_for(
        asyncio.gather(
            good_ingest_client(settings, port),
            long_command(port),
            garbage(port),
            many_rcpts(),
            oversized(),
            unfinished_data(port, login, "x@evil.example", settings.ingest.bcc_address),
        ),
        50,
    )
    await still_answers(port)
    # Only the three good messages were ever spooled/logged; the unfinished one left nothing.
    root = spool.spool_dir(settings)
    db = store.connect(settings.db_path)
    try:

        def logged():
            return db.execute("select count(*) from inbound_log").fetchone()[0] >= 3

        from tests.support import wait_for

        await wait_for(logged, 30)
        count = db.execute("select count(*) from inbound_log").fetchone()[0]
    finally:
        db.close()
    assert count == 3
    leftovers = [p for p in files_under(root) if "never ends" in p.read_bytes().decode("latin-1")]
    assert leftovers == []


async def test_relay_refuses_plaintext_auth_from_untrusted_networks(tmp_path):
    """With loopback not trusted, AUTH without TLS is refused and nothing can be relayed."""
    s = cli.initialise(tmp_path / "relay")
    port = free_port()
    s.relay.listen = f"127.0.0.1:{port}"
    s.relay.trusted_networks = []
    s.relay.upstream = f"maildir:{tmp_path / 'out'}"
    db = store.connect(s.db_path)
    store_users.add_user(db, "alice@corp.test", "Alice", PASSWORD)
    db.close()
    svc = await relay_service.start(s)
    try:
        c = await RawSMTP.connect(port)
        assert await c.cmd("EHLO untrusted.test") == 250
        token = base64.b64encode(f"\0alice@corp.test\0{PASSWORD}".encode()).decode()
        assert await c.cmd(f"AUTH PLAIN {token}") == 538  # encryption required
        assert await c.cmd("MAIL FROM:<alice@corp.test>") == 530
        assert await c.cmd("RCPT TO:<victim@elsewhere.example>") in (503, 530)
        await c.close()
    finally:
        await svc.stop()
