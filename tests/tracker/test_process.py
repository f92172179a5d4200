"""A `mailtally tracker` subprocess: no loss on SIGTERM, `mailtally watch`; webhooks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import aiohttp
from aiohttp import web

from store import events as store_events
from tests.support import wait_for, wait_healthy
from tracker import notify, service, tokens

CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"


def env_for(settings):
    env = dict(os.environ)
    env["MAILTALLY_CONFIG"] = str(settings.config_path)
    env["MAILTALLY_TRACKER_LISTEN"] = settings.tracker.listen
    env["MAILTALLY_TRACKER_BASE_URL"] = settings.tracker.base_url
    return env


async def run_cli(settings, *args: str, **options) -> asyncio.subprocess.Process:
    """`python -m cli <args>` with the test's settings (stdout and stderr piped unless
    ``options`` say otherwise)."""
    options.setdefault("stdout", subprocess.PIPE)
    options.setdefault("stderr", subprocess.PIPE)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args, env=env_for(settings), **options
    )


async def start_tracker(settings):
    proc = await run_cli(settings, "tracker")
    return await wait_healthy(settings.tracker.base_url, proc)


async def test_sigterm_flushes_every_hit(settings, sent, db):
    made = sent(recipients=[f"r{i}@acme.example" for i in range(20)])
    signer = tokens.Signer(settings.tracker.secrets)
    proc = await start_tracker(settings)
    n = 400
    urls = [
        tokens.open_url(settings.tracker.base_url, signer, made["deliveries"][i % 20])
        for i in range(n)
    ]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:

        async def hit(u):
            async with s.get(u, headers={"User-Agent": CHROME}) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(hit(u) for u in urls))
    assert statuses == [200] * n
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert store_events.count_events(db) == n


async def test_watch_prints_one_line_per_event(settings, sent, db):
    made = sent(links=("https://pricing.example.com/plans?x=1",))
    signer = tokens.Signer(settings.tracker.secrets)
    proc = await start_tracker(settings)
    watcher = await run_cli(settings, "watch", "--user", "alice@seller.example")
    try:
        await asyncio.wait_for(watcher.stderr.readline(), 20)  # "Watching..."
        await asyncio.sleep(0.5)  # let it subscribe
        d = made["deliveries"][0]
        async with aiohttp.ClientSession() as s:
            for url in (
                tokens.open_url(settings.tracker.base_url, signer, d),
                tokens.open_url(settings.tracker.base_url, signer, d),
                tokens.click_url(
                    settings.tracker.base_url, signer, d, 0, "https://pricing.example.com/plans?x=1"
                ),
            ):
                async with s.get(url, headers={"User-Agent": CHROME}, allow_redirects=False) as r:
                    await r.read()
        lines = [
            (await asyncio.wait_for(watcher.stdout.readline(), 20)).decode().rstrip()
            for _ in range(3)
        ]
    finally:
        watcher.terminate()
        await watcher.wait()
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    assert lines[0].endswith("bob@acme.example opened “Proposal”")
    assert lines[1].endswith("bob@acme.example opened “Proposal” (2nd open)")
    assert lines[2].endswith("bob@acme.example clicked pricing.example.com/plans in “Proposal”")
    assert all(line[2] == ":" and line[5:7] == "  " for line in lines)


async def test_webhook_signed_and_retried_after_500(settings, sent, db):
    received = []

    async def receiver(request):
        body = await request.read()
        received.append((dict(request.headers), body))
        return web.Response(status=500 if len(received) == 1 else 200)

    app = web.Application()
    app.router.add_post("/hook", receiver)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    settings.webhooks.urls = [f"http://127.0.0.1:{port}/hook"]
    settings.webhooks.backoff_seconds = 0.2
    other = sent(user_id=None)  # alice's email
    svc = await service.start(settings)
    try:
        signer = tokens.Signer(settings.tracker.secrets)
        async with aiohttp.ClientSession() as s:
            async with s.get(
                tokens.open_url(settings.tracker.base_url, signer, other["deliveries"][0]),
                headers={"User-Agent": CHROME},
            ) as r:
                await r.read()
        await wait_for(lambda: len(received) >= 2, timeout=20)
    finally:
        await svc.stop()
        await runner.cleanup()
    (h1, b1), (h2, b2) = received[:2]
    assert b1 == b2
    secret = settings.webhooks.secret
    for headers, body in received[:2]:
        assert notify.verify_signature(
            secret, headers[notify.TIMESTAMP_HEADER], body, headers[notify.SIGNATURE_HEADER]
        )
        assert not notify.verify_signature(
            "wrong", headers[notify.TIMESTAMP_HEADER], body, headers[notify.SIGNATURE_HEADER]
        )
    payload = json.loads(b1)
    assert payload["user"] == "alice@seller.example" and payload["kind"] == "open"
    assert payload["recipient"] == "bob@acme.example" and payload["verdict"] == "human"
