"""The submission server with a real SMTP client: AUTH/TLS matrix, sender checks, SIZE."""

from __future__ import annotations

import asyncio
import smtplib

import pytest

from tests.relay.conftest import PASSWORD, html_message, maildir_messages, parse, wait_for

pytestmark = pytest.mark.usefixtures("relay")


def client(settings) -> smtplib.SMTP:
    host, port = settings.relay.listen.split(":")
    s = smtplib.SMTP(host, int(port), timeout=10)
    s.ehlo("client.test")
    return s


async def test_send_to_maildir_with_tracking(settings, db):
    msg = html_message(
        '<html><body><p>Hi <a href="https://example.com/x?a=1&amp;b=2">offer</a></p></body></html>'
    )

    def send():
        with client(settings) as s:
            s.login("alice@corp.test", PASSWORD)
            s.sendmail("alice@corp.test", ["carol@client.test"], msg)

    await asyncio.to_thread(send)
    got = await wait_for(lambda: maildir_messages(settings))
    assert len(got) == 1
    m = parse(got[0])
    html = m.get_body(("html",)).get_content()
    assert "https://t.example/c/" in html and "https://t.example/o/" in html
    assert "example.com/x" not in html
