"""Shared fixtures for the relay tests: fresh data directory, users, a running relay, and a
real upstream SMTP server (aiosmtpd) whose replies a test can script."""

from __future__ import annotations

import asyncio
import email
import smtplib
import time
from email import policy
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP as AioSMTP

import cli
import store
from store import users as store_users
from tests.support import free_port

PASSWORD = "correct horse battery"


@pytest.fixture
def settings(tmp_path: Path):
    """Fresh settings (real config file, real SQLite database) in a tmp dir."""
    s = cli.initialise(tmp_path / "data")
    s.relay.listen = f"127.0.0.1:{free_port()}"
    s.tracker.base_url = "https://t.example"
    s.relay.retry_schedule = [1]
    return s


@pytest.fixture
def db(settings):
    conn = store.connect(settings.db_path)
    yield conn
    conn.close()


@pytest.fixture
def alice(db):
    """A user with a relay password, a personal inbox and an alias."""
    user = store_users.add_user(db, "alice@corp.test", "Alice", PASSWORD)
    store_users.add_address(db, "alice@corp.test", "alice.private@gmail.test", "personal")
    store_users.add_address(db, "alice@corp.test", "sales@corp.test", "alias")
    store_users.add_user(db, "bob@corp.test", "Bob", "bobs password")
    return user


class Upstream:
    """A real SMTP server standing in for the mail provider; ``replies`` scripts RCPT/DATA."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.data_replies: list[str] = []  # popped per DATA; empty → 250
        self.rcpt_replies: dict[str, str] = {}
        self.port = free_port()
        self.server = None

    async def handle_RCPT(self, server, session, envelope, address, options):
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_replies:
            reply = self.data_replies.pop(0)
            if not reply.startswith("250"):
                return reply
        self.messages.append(
            (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        return "250 OK"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: AioSMTP(self, hostname="upstream.test", decode_data=False),
            "127.0.0.1",
            self.port,
        )

    async def stop(self) -> None:
        self.server.close()


@pytest.fixture
async def upstream(settings):
    up = Upstream()
    await up.start()
    settings.relay.upstream = f"smtp://127.0.0.1:{up.port}"
    yield up
    await up.stop()


@pytest.fixture
async def relay(settings, alice):
    from relay import service

    svc = await service.start(settings)
    yield svc
    await svc.stop()


def maildir_messages(settings) -> list[bytes]:
    path = Path(settings.relay.upstream[len("maildir:") :]) / "new"
    if not path.is_dir():
        return []
    return [p.read_bytes() for p in sorted(path.iterdir())]


def parse(data: bytes):
    return email.message_from_bytes(data, policy=policy.default)


def html_message(
    html: str,
    *,
    frm: str = "alice@corp.test",
    to: str = "carol@client.test",
    cc: str | None = None,
    extra: str = "",
    charset: str = "utf-8",
    cte: str = "8bit",
) -> bytes:
    """A multipart/alternative message with a text and an HTML part."""
    head = f"From: Alice <{frm}>\r\nTo: {to}\r\n" + (f"Cc: {cc}\r\n" if cc else "")
    head += "Subject: Proposal\r\nMessage-ID: <m-" + str(time.time_ns()) + "@corp.test>\r\n"
    head += extra + "MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=XX\r\n\r\n"
    body = (
        "--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello\r\n"
        f"--XX\r\nContent-Type: text/html; charset={charset}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n"
    )
    return head.encode() + body.encode() + html.encode(charset) + b"\r\n--XX--\r\n"


def submit_all(settings, mails: list[tuple[str, bytes]], timeout: float = 60) -> None:
    """Send each (recipient, message) as alice over one authenticated smtplib session
    (blocking: call it with ``asyncio.to_thread``)."""
    host, port = settings.relay.listen.split(":")
    with smtplib.SMTP(host, int(port), timeout=timeout) as s:
        s.login("alice@corp.test", PASSWORD)
        for rcpt, data in mails:
            s.sendmail("alice@corp.test", [rcpt], data)


class running_relay:
    """``async with running_relay(settings) as svc:`` — the relay service for one test."""

    def __init__(self, settings) -> None:
        self.settings = settings

    async def __aenter__(self):
        from relay import service

        self.svc = await service.start(self.settings)
        return self.svc

    async def __aexit__(self, *exc) -> None:
        await self.svc.stop()
