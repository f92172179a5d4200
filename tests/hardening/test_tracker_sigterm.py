"""`mailtally tracker` killed with SIGTERM in the middle of a continuous load from several
clients loses no hit: every request that got its pixel or redirect is in the events table
exactly once (each request carries its own user agent, so each is identifiable), the
process exits 0, and nothing is left in the spool."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import aiohttp

from store import events as store_events
from tests.tracker.conftest import db, sent, settings  # noqa: F401 (fixtures)
from tests.tracker.test_process import start_tracker
from tracker import tokens
from tracker.writer import SPOOL_NAME

CLIENTS = 8
AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0 hit/{}"
LINKS = ("https://shop.example.com/a?x=1&y=2", "https://shop.example.com/b#top")


async def test_sigterm_under_continuous_load_loses_no_answered_hit(
    settings,  # noqa: F811
    sent,  # noqa: F811
    db,  # noqa: F811
):
    made = sent(recipients=[f"r{i}@acme.example" for i in range(30)], links=LINKS)
    signer = tokens.Signer(settings.tracker.secrets)
    base = settings.tracker.base_url
    urls = [tokens.open_url(base, signer, d) for d in made["deliveries"]]
    urls += [
        tokens.click_url(base, signer, d, i, url)
        for d in made["deliveries"]
        for i, url in enumerate(LINKS)
    ]
    proc = await start_tracker(settings)
    answered: list[str] = []
    signalled = asyncio.Event()
    after_signal = 0

    async def client(n: int) -> None:
        nonlocal after_signal
        rng = random.Random(n)
        async with aiohttp.ClientSession() as s:
            for i in range(100_000):
                agent = AGENT.format(f"{n}-{i}")
                try:
                    async with s.get(
                        rng.choice(urls), headers={"User-Agent": agent}, allow_redirects=False
                    ) as r:
                        await r.read()
                        assert r.status in (200, 302), r.status
                        answered.append(agent)
                        after_signal += signalled.is_set()
                except (aiohttp.ClientError, OSError):
                    if signalled.is_set():
                        return  # the tracker is going away: stop when it no longer answers
                    raise

    started = time.monotonic()
    clients = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
    try:
        # SIGTERM while all clients are busy, once a good number of hits went through.
        while len(answered) < 800 and time.monotonic() - started < 60:
            await asyncio.sleep(0.02)
            assert not any(c.done() for c in clients), [c.exception() for c in clients if c.done()]
        proc.send_signal(signal.SIGTERM)
        signalled.set()
        code = await asyncio.wait_for(proc.wait(), 60)
        await asyncio.wait_for(asyncio.gather(*clients), 60)
    finally:
        for c in clients:
            c.cancel()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = (await proc.stderr.read()).decode(errors="replace")
    assert code == 0, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert len(answered) >= 800

    hits = [e for e in store_events.events_of_email(db, made["email_id"]) if not e["inferred"]]
    recorded: dict[str, int] = {}
    for e in hits:
        recorded[e["user_agent"]] = recorded.get(e["user_agent"], 0) + 1
    missing = [a for a in answered if a not in recorded]
    assert not missing, f"{len(missing)} answered hits not recorded, e.g. {missing[:3]}"
    assert all(n == 1 for n in recorded.values()), "a hit was recorded twice"
    # Every recorded hit is a request that was sent (those cut off by the shutdown may or
    # may not be recorded, but never invented or doubled).
    assert len(hits) >= len(answered)
    assert all(a.startswith("Mozilla/5.0 (X11") for a in recorded)
    assert not (settings.data_dir / SPOOL_NAME).exists()
