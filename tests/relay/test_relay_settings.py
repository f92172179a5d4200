"""The relay settings added for speed are really used: ``relay.auth_cache_seconds`` (0 turns
the verified-password cache off) and ``relay.delivery_connections`` (upstream connections
delivering at once)."""

from __future__ import annotations

import asyncio
import hashlib

import aiosmtplib

from tests.relay.conftest import PASSWORD, Upstream, html_message, running_relay, submit_all
from tests.support import wait_for


def port_of(settings) -> int:
    return int(settings.relay.listen.rsplit(":", 1)[1])


async def login(settings) -> None:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port_of(settings), start_tls=False)
    await c.connect()
    try:
        await c.ehlo()
        await c.auth_plain("alice@corp.test", PASSWORD)
    finally:
        c.close()


async def test_auth_cache_off_checks_the_password_every_time(settings, alice, monkeypatch):
    calls = []
    real = hashlib.scrypt
    monkeypatch.setattr(hashlib, "scrypt", lambda *a, **k: calls.append(1) or real(*a, **k))
    settings.relay.auth_cache_seconds = 0
    async with running_relay(settings):
        for _ in range(3):
            await login(settings)
    assert len(calls) == 3  # with the default 120 s cache this is 1


class SlowUpstream(Upstream):
    """Holds each DATA for a moment and records how many were open at once."""

    def __init__(self) -> None:
        super().__init__()
        self.open = self.most = 0

    async def handle_DATA(self, server, session, envelope):
        self.open += 1
        self.most = max(self.most, self.open)
        try:
            await asyncio.sleep(0.3)
            return await super().handle_DATA(server, session, envelope)
        finally:
            self.open -= 1


async def test_delivery_uses_as_many_upstream_connections_as_configured(settings, alice):
    up = SlowUpstream()
    await up.start()
    settings.relay.upstream = f"smtp://127.0.0.1:{up.port}"
    settings.relay.upstream_starttls = False
    settings.relay.delivery_connections = 2
    # eight recipients: nothing holds one back for another
    rcpts = [f"r{i}@client.test" for i in range(8)]
    try:
        async with running_relay(settings):
            mails = [(r, html_message("<p>hi</p>", to=r)) for r in rcpts]
            await asyncio.to_thread(submit_all, settings, mails)
            await wait_for(lambda: len(up.messages) == 8, timeout=60)
    finally:
        await up.stop()
    assert up.most == 2  # the default (8) would have had more open at once
