"""Hostile clients and faults against the relay's accept path (issue #9, relay side).

AUTH brute force is limited per client address and per user name (454, no scrypt); a client
that trickles bytes is cut off by the session timeout while others are served; a spool that
cannot be written answers 451 and queues nothing; a database locked by another process makes
clients wait (or 4xx), never lose a 250; an untrusted address cannot relay or AUTH in clear.
Clients are real (aiosmtplib or raw sockets), bound to 127.0.0.1 or 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import shutil
import time
from contextlib import asynccontextmanager

import aiosmtplib
import pytest

import cli
import store
from relay import outbox
from relay import service as relay_service
from store import outbox as store_outbox
from store import users as store_users
from tests.relay.conftest import Upstream
from tests.support import free_port, hold_lock, wait_for

ALICE_PW, BOB_PW = "correct horse battery", "bobs own password"
LIMITED = 454


def mail(n: int, sender: str = "alice@corp.test") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: carol@client.test\r\nSubject: m{n}\r\n"
        f"Message-ID: <abuse-{n}-{time.time_ns()}@corp.test>\r\n\r\nHello {n}\r\n"
    ).encode()


@asynccontextmanager
async def running(tmp_path, **relay_settings):
    """A relay (alice and bob as users) delivering to a real upstream SMTP server."""
    s = cli.initialise(tmp_path / "data")
    port = free_port()
    s.relay.listen = f"127.0.0.1:{port}"
    s.tracker.base_url = "https://t.example"
    s.relay.retry_schedule = [1]
    for key, value in relay_settings.items():
        setattr(s.relay, key, value)
    up = Upstream()
    await up.start()
    s.relay.upstream = f"smtp://127.0.0.1:{up.port}"
    db = store.connect(s.db_path)
    store_users.add_user(db, "alice@corp.test", "Alice", ALICE_PW)
    store_users.add_user(db, "bob@corp.test", "Bob", BOB_PW)
    svc = await relay_service.start(s)
    try:
        yield s, port, up, db, svc
    finally:
        await svc.stop()
        await up.stop()
        db.close()


def client(port: int, source: str = "127.0.0.1") -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, source_address=(source, 0), timeout=60
    )


async def login_code(port: int, user: str, password: str, source: str = "127.0.0.1") -> int:
    """The reply code to AUTH PLAIN from ``source`` on a fresh connection."""
    c = client(port, source)
    await c.connect()
    try:
        await c.ehlo()
        await c.auth_plain(user, password)  # one mechanism (login() would try LOGIN too)
        return 235
    except aiosmtplib.SMTPAuthenticationError as exc:
        return exc.code
    finally:
        c.close()


@pytest.fixture
def scrypt_calls(monkeypatch):
    """Counts scrypt runs in this process (the relay runs in it), passing every call on."""
    calls = []
    real = hashlib.scrypt

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    return calls


# ------------------------------------------------------------------ AUTH brute force


async def test_auth_failures_are_limited_per_address_and_per_user(tmp_path, scrypt_calls):
    async with running(tmp_path) as (s, port, up, db, svc):
        assert s.relay.auth_max_failures == 5
        for _ in range(5):
            assert await login_code(port, "alice@corp.test", "guess") == 535
        before = len(scrypt_calls)
        # Past the limit: 454 even for the right password, and scrypt does not run.
        assert await login_code(port, "alice@corp.test", ALICE_PW) == LIMITED
        assert await login_code(port, "nobody@corp.test", "x") == LIMITED  # same address
        assert await login_code(port, "bob@corp.test", BOB_PW) == LIMITED  # same address
        assert await login_code(port, "alice@corp.test", ALICE_PW, "127.0.0.2") == LIMITED
        assert len(scrypt_calls) == before
        # Another user from another address is not affected, and can send mail.
        c = client(port, "127.0.0.2")
        await c.connect()
        await c.login("bob@corp.test", BOB_PW)
        errors, reply = await c.sendmail(
            "bob@corp.test", ["carol@client.test"], mail(1, "bob@corp.test")
        )
        assert errors == {} and reply.startswith("2.0.0 OK queued")
        await c.quit()
        await wait_for(lambda: len(up.messages) == 1, timeout=60)


async def test_auth_limit_ends_when_the_window_passes(tmp_path):
    async with running(tmp_path, auth_max_failures=2, auth_window_seconds=2.0) as ctx:
        port = ctx[1]
        assert await login_code(port, "alice@corp.test", "guess") == 535
        assert await login_code(port, "alice@corp.test", "guess") == 535
        assert await login_code(port, "alice@corp.test", ALICE_PW) == LIMITED
        started = time.monotonic()
        while await login_code(port, "alice@corp.test", ALICE_PW) != 235:
            assert time.monotonic() - started < 60, "still limited long after the window"
            await asyncio.sleep(0.5)


async def test_verified_password_is_cached_but_failures_and_changes_are_not(tmp_path, scrypt_calls):
    async with running(tmp_path) as (s, port, up, db, svc):
        assert await login_code(port, "alice@corp.test", ALICE_PW) == 235
        first = len(scrypt_calls)
        assert first >= 1
        for _ in range(3):  # reconnecting clients: no scrypt
            assert await login_code(port, "alice@corp.test", ALICE_PW) == 235
        assert len(scrypt_calls) == first
        assert await login_code(port, "alice@corp.test", ALICE_PW + "x") == 535
        assert await login_code(port, "alice@corp.test", ALICE_PW + "x") == 535
        assert len(scrypt_calls) == first + 2  # failures are checked every time
        # The password changes (another process, e.g. the CLI): the cached one stops working.
        store_users.set_password(db, "alice@corp.test", "new password")
        assert await login_code(port, "alice@corp.test", ALICE_PW) == 535
        assert await login_code(port, "alice@corp.test", "new password") == 235


# ------------------------------------------------------------------ slow clients


async def test_trickling_client_is_cut_off_while_others_are_served(tmp_path):
    async with running(tmp_path, smtp_timeout_seconds=2.0) as (s, port, up, db, svc):

        async def trickle(lines: list[bytes], slow: bytes) -> float:
            """Send ``lines`` at once, then ``slow`` one byte a second; seconds until closed."""
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert (await reader.readline()).startswith(b"220")
            writer.write(b"".join(lines))
            started = time.monotonic()
            for byte in slow:
                if reader.at_eof():
                    break
                writer.write(bytes([byte]))
                try:
                    await writer.drain()
                except (ConnectionResetError, BrokenPipeError):
                    break
                try:
                    while await asyncio.wait_for(reader.readline(), 1.0):
                        pass  # replies to the lines sent at once; b"" once closed
                    break
                except TimeoutError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    break
            else:
                raise AssertionError("the trickling client was never cut off")
            writer.close()
            return time.monotonic() - started

        token = base64.b64encode(f"\0alice@corp.test\0{ALICE_PW}".encode())
        in_command = trickle([b"EHLO slow.test\r\n"], b"MAIL FROM:<alice@corp.test>" * 4)
        in_data = trickle(
            [
                b"EHLO slow.test\r\n",
                b"AUTH PLAIN " + token + b"\r\n",
                b"MAIL FROM:<alice@corp.test>\r\n",
                b"RCPT TO:<carol@client.test>\r\n",
                b"DATA\r\n",
            ],
            mail(99) * 4,
        )
        tasks = [asyncio.create_task(in_command), asyncio.create_task(in_data)]
        # A well-behaved client is served while both trickle.
        c = client(port)
        await c.connect()
        await c.login("alice@corp.test", ALICE_PW)
        errors, _ = await c.sendmail("alice@corp.test", ["carol@client.test"], mail(1))
        assert errors == {}
        await c.quit()
        assert not any(t.done() for t in tasks)  # they were still connected meanwhile
        elapsed = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert all(e < 30 for e in elapsed), elapsed
        await wait_for(lambda: len(up.messages) == 1, timeout=60)
        await asyncio.sleep(0.5)
        assert len(up.messages) == 1  # the unfinished DATA was never queued
        assert len(store_outbox.listing(db, ["pending", "retrying", "failed", "sent"])) == 1


# ------------------------------------------------------------------ disk and database faults


async def test_spool_write_error_answers_451_and_queues_nothing(tmp_path):
    async with running(tmp_path) as (s, port, up, db, svc):
        root = outbox.spool_dir(s)
        c = client(port)
        await c.connect()
        await c.login("alice@corp.test", ALICE_PW)
        errors, _ = await c.sendmail("alice@corp.test", ["carol@client.test"], mail(1))
        await wait_for(lambda: len(up.messages) == 1, timeout=60)
        # The spool directory becomes unusable (a regular file where the directory was).
        shutil.rmtree(root)
        root.write_bytes(b"not a directory")
        deliveries_before = db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
        with pytest.raises(aiosmtplib.SMTPDataError) as err:
            await c.sendmail("alice@corp.test", ["carol@client.test", "dave@client.test"], mail(2))
        assert err.value.code == 451
        # Nothing half-queued: no row, no spool file, no delivery rows for the refused mail.
        assert [
            r["status"] for r in store_outbox.listing(db, ["pending", "retrying", "failed", "sent"])
        ] == ["sent"]
        assert db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == deliveries_before
        assert root.read_bytes() == b"not a directory"
        # The fault clears; the same session is served again and the mail goes out.
        root.unlink()
        errors, _ = await c.sendmail(
            "alice@corp.test", ["carol@client.test", "dave@client.test"], mail(3)
        )
        assert errors == {}
        await c.quit()
        await wait_for(lambda: len(up.messages) == 3, timeout=60)
        assert sorted(m[1][0] for m in up.messages[1:]) == ["carol@client.test", "dave@client.test"]


async def test_database_locked_by_another_process_loses_no_mail(tmp_path):
    async with running(tmp_path) as (s, port, up, db, svc):
        locker = hold_lock(s.db_path, 4)
        try:
            locked_at = time.monotonic()

            async def send(n: int) -> tuple[int, str]:
                c = client(port)
                await c.connect()
                await c.login("alice@corp.test", ALICE_PW)
                data = mail(n)
                try:
                    await c.sendmail("alice@corp.test", [f"r{n}@client.test"], data)
                    code = 250
                except aiosmtplib.SMTPResponseException as exc:
                    code = exc.code
                c.close()
                return code, data.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode()

            results = await asyncio.wait_for(asyncio.gather(*(send(n) for n in range(6))), 120)
            sent_during_lock = time.monotonic() - locked_at
        finally:
            locker.wait(30)
        assert sent_during_lock > 2  # the clients really waited for the lock
        assert all(code == 250 or 400 <= code < 500 for code, _ in results), results
        accepted = {mid for code, mid in results if code == 250}
        assert accepted  # the lock was shorter than the store's wait: they were served
        await wait_for(lambda: len(up.messages) >= len(accepted), timeout=60)
        delivered = {
            line.split(b": ", 1)[1].decode()
            for _, _, data in up.messages
            for line in data.split(b"\r\n")
            if line.startswith(b"Message-ID: ")
        }
        assert accepted <= delivered


# ------------------------------------------------------------------ open relay


async def test_untrusted_address_cannot_relay_or_auth_in_clear(tmp_path):
    async with running(tmp_path, trusted_networks=["127.0.0.1/32"]) as (s, port, up, db, svc):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=("127.0.0.2", 0)
        )

        async def cmd(line: str) -> int:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()
            while True:
                reply = await asyncio.wait_for(reader.readline(), 20)
                assert reply, f"closed after {line!r}"
                if reply[3:4] == b" ":
                    return int(reply[:3])

        assert (await reader.readline()).startswith(b"220")
        assert await cmd("EHLO outsider.test") == 250
        token = base64.b64encode(f"\0alice@corp.test\0{ALICE_PW}".encode()).decode()
        assert await cmd(f"AUTH PLAIN {token}") == 538  # no AUTH over plaintext from here
        assert await cmd("MAIL FROM:<alice@corp.test>") == 530
        assert await cmd("RCPT TO:<victim@elsewhere.test>") in (503, 530, 554)
        assert await cmd("DATA") in (503, 530, 554)
        assert await cmd("MAIL FROM:<>") == 530
        assert await cmd("QUIT") == 221
        writer.close()
        # From the trusted address the same credentials work (the refusal was the address).
        assert await login_code(port, "alice@corp.test", ALICE_PW) == 235
        await asyncio.sleep(0.5)
        assert store_outbox.listing(db, ["pending", "retrying", "failed", "sent"]) == []
        assert up.messages == []
