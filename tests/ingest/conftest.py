"""Shared fixtures for the ingest tests: real config + SQLite, a real ingest service on a
free loopback port, and an SMTP client to talk to it."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import aiosmtplib
import pytest

import cli
import store
from ingest import service as ingest_service
from store import inbound as store_inbound
from store import users
from tests.support import free_port, wait_for

CORPORA = Path(__file__).resolve().parents[2].parent / "shared" / "corpora"


@pytest.fixture
def settings(tmp_path: Path):
    s = cli.initialise(tmp_path / "data")
    s.ingest.listen = f"127.0.0.1:{free_port()}"
    return s


@pytest.fixture
def db(settings):
    conn = store.connect(settings.db_path)
    yield conn
    conn.close()


@pytest.fixture
def alice(db):
    """A user with an account email and a connected personal inbox."""
    user = users.add_user(db, "alice@acme.io", "Alice", None)
    users.add_address(db, "alice@acme.io", "alice.personal@gmail.com", "personal")
    return user


@pytest.fixture
async def ingest(settings, db):
    svc = await ingest_service.start(settings)
    yield svc
    await svc.stop()


def message(
    *,
    sender: str = "alice@acme.io",
    to: str = "Bob <bob@customer.com>",
    cc: str | None = None,
    subject: str = "Proposal",
    text: str | None = "Hello Bob,\nthe proposal is attached.\n",
    html: str | None = None,
    message_id: str | None = None,
    attachments: list[tuple[str, bytes]] = (),
    headers: dict | None = None,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = message_id or make_msgid(domain="acme.io")
    for k, v in (headers or {}).items():
        msg[k] = v
    if text is not None:
        msg.set_content(text)
    if html is not None:
        if text is None:
            msg.set_content(html, subtype="html")
        else:
            msg.add_alternative(html, subtype="html")
    for name, data in attachments:
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return msg


async def send(svc, mail_from: str, rcpts: list[str], msg) -> None:
    data = msg if isinstance(msg, bytes) else msg.as_bytes()
    await aiosmtplib.send(
        data, sender=mail_from, recipients=rcpts, hostname="127.0.0.1", port=svc.port, timeout=60
    )


async def entry_for(db, message_id: str, timeout: float = 30.0) -> dict:
    """The (single) inbound-log entry for a Message-ID, once the worker has filed it."""
    found = await wait_for(lambda: store_inbound.inbound_by_message_id(db, message_id), timeout)
    assert len(found) == 1, found
    return found[0]


async def deliver(svc, db, msg, *, to_forward: bool = False, mail_from: str | None = None):
    """Send ``msg`` to the BCC (or forwarding) address and return its inbound-log entry."""
    rcpt = svc.settings.ingest.forward_address if to_forward else svc.settings.ingest.bcc_address
    await send(svc, mail_from if mail_from is not None else msg["From"], [rcpt], msg)
    return await entry_for(db, msg["Message-ID"])
