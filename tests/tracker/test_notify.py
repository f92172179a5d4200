"""Webhooks go to the sending user only, signed with that endpoint's secret, retried after a 500.

(The watch and SIGTERM tests are in test_process.py.)"""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web

from store import users as store_users
from store import webhooks as store_webhooks
from tests.support import free_port, wait_for
from tracker import notify, service, tokens

from .test_http import get


async def start_receiver(fail_first: int):
    """A real local webhook receiver that answers 500 to the first ``fail_first`` posts."""
    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        received.append({"headers": dict(request.headers), "body": body, "path": request.path})
        return web.Response(status=500 if len(received) <= fail_first else 200)

    app = web.Application()
    app.router.add_post("/{name}", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}", received


async def test_webhook_signed_retried_and_only_for_the_sender(settings, sent, db) -> None:
    runner, url, received = await start_receiver(fail_first=1)
    settings.webhooks.backoff_seconds = 0.2
    try:
        made = sent()
        other = store_users.add_user(db, "carol@seller.example", "Carol", None)
        hook = store_webhooks.add_webhook(db, "alice@seller.example", f"{url}/alice", False)
        store_webhooks.add_webhook(db, "carol@seller.example", f"{url}/carol", False)
        svc = await service.start(settings)
        try:
            base, signer = settings.tracker.base_url, tokens.Signer(settings.tracker.secrets)
            async with aiohttp.ClientSession() as s:
                status, _, _ = await get(s, tokens.open_url(base, signer, made["deliveries"][0]))
                assert status == 200
            # First attempt answered 500, the retry 200: two posts of the same payload.
            await wait_for(lambda: len(received) >= 2, timeout=15)
        finally:
            await svc.stop()
    finally:
        await runner.cleanup()
    assert {r["path"] for r in received} == {"/alice"}  # never to another user's hook
    assert other["email"] == "carol@seller.example"
    first, second = received[0], received[1]
    assert first["body"] == second["body"]
    for r in received[:2]:
        h = r["headers"]
        assert h["Content-Type"].startswith("application/json")
        assert notify.verify_signature(
            hook["secret"],  # a per-user webhook signs with its own secret
            h[notify.TIMESTAMP_HEADER],
            r["body"],
            h[notify.SIGNATURE_HEADER],
        )
        assert not notify.verify_signature(
            "wrong-secret", h[notify.TIMESTAMP_HEADER], r["body"], h[notify.SIGNATURE_HEADER]
        )
    payload = json.loads(first["body"])
    assert payload["type"] == "event" and payload["kind"] == "open"
    assert payload["user"] == "alice@seller.example" and payload["subject"] == "Proposal"
    assert payload["recipient"] == "bob@acme.example" and payload["verdict"] == "human"
    assert "user_id" not in payload  # internal ids stay out of what leaves the tracker
