"""Notifications and shutdown: signed, retried webhooks to the sending user only; the live
feed that `mailtally watch` follows; SIGTERM loses no recorded hit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import aiohttp
from aiohttp import web

import store
from store import events as store_events
from store import users as store_users
from store import webhooks as store_webhooks
from tracker import notify, service, tokens

from .conftest import free_port, wait_for
from .test_http import CHROME, get


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
    flat = json.dumps(payload)
    assert "open" in flat and "bob@acme.example" in flat and "Proposal" in flat
    assert payload.get("verdict") == "human"


async def test_watch_prints_live_events_from_a_running_tracker(settings, sent, db, tracker) -> None:
    made = sent()
    _, base, signer = tracker
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import cli; cli.main()",
        "--config",
        str(settings.config_path),
        "watch",
        env={**os.environ, "MAILTALLY_TRACKER_LISTEN": settings.tracker.listen},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        # The banner on stderr means the command started; then wait for the subscription.
        await asyncio.wait_for(proc.stderr.readline(), 20)
        lines: list[str] = []

        async def read_line() -> str:
            return (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()

        async with aiohttp.ClientSession() as s:
            # Hit until the watcher is subscribed and prints the first open.
            async def first_open() -> str:
                while True:
                    await get(s, tokens.open_url(base, signer, made["deliveries"][0]))
                    try:
                        return (
                            (await asyncio.wait_for(proc.stdout.readline(), 1.0)).decode().strip()
                        )
                    except TimeoutError:
                        continue

            lines.append(await asyncio.wait_for(first_open(), 30))
            await get(
                s,
                tokens.click_url(
                    base,
                    signer,
                    made["deliveries"][0],
                    0,
                    "https://pricing.example.com/plans?a=1&b=2#top",
                ),
            )
            # A machine hit (HEAD) is not shown without --all-hits.
            await get(s, tokens.open_url(base, signer, made["deliveries"][0]), "HEAD")
            while not any("clicked" in line for line in lines):
                lines.append(await read_line())
    finally:
        proc.terminate()
        await proc.wait()
    assert "bob@acme.example opened" in lines[0] and "Proposal" in lines[0]
    click = next(line for line in lines if "clicked" in line)
    assert "bob@acme.example clicked pricing.example.com/plans" in click and "Proposal" in click
    assert not any("head_request" in line or "machine" in line for line in lines)


async def test_sigterm_loses_no_recorded_hit(settings, sent, db) -> None:
    made = sent(recipients=[f"r{i}@acme.example" for i in range(20)])
    n = 400
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import cli; cli.main()",
        "--config",
        str(settings.config_path),
        "tracker",
        env={**os.environ, "MAILTALLY_TRACKER_LISTEN": settings.tracker.listen},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    base, signer = settings.tracker.base_url, tokens.Signer(settings.tracker.secrets)
    urls = [tokens.open_url(base, signer, made["deliveries"][i % 20]) for i in range(n)]
    try:
        async with aiohttp.ClientSession() as s:
            await wait_for_http(s, f"{base}/healthz")
            sem = asyncio.Semaphore(64)

            async def hit(url: str) -> int:
                async with sem:
                    status, _, _ = await get(s, url, "GET", **{"User-Agent": CHROME})
                    return status

            statuses = await asyncio.gather(*(hit(u) for u in urls))
        assert statuses == [200] * n
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, out.decode()
    fresh = store.connect(settings.db_path)
    assert len(store_events.events_of_email(fresh, made["email_id"])) == n


async def wait_for_http(session: aiohttp.ClientSession, url: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if loop.time() > deadline:
            raise AssertionError(f"{url} not up within {timeout} s")
        await asyncio.sleep(0.05)
