"""Another process holds the database with BEGIN EXCLUSIVE for 3 seconds while clients keep
hitting pixels and links: every request is answered promptly all the same, and once the
lock is gone every hit is recorded, exactly once."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp

from store import events as store_events
from tests.support import hold_lock, wait_for
from tests.tracker.conftest import db, sent, settings, tracker  # noqa: F401 (fixtures)
from tracker import tokens

HOLD_SECONDS = 3.0
AGENT = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 lock/{}"
LINK = "https://pricing.example.com/plans?a=1&b=2#top"


async def test_three_second_exclusive_lock_neither_delays_nor_loses_hits(
    tracker,  # noqa: F811
    sent,  # noqa: F811
    db,  # noqa: F811
    settings,  # noqa: F811
):
    svc, base, signer = tracker
    made = sent(recipients=[f"r{i}@acme.example" for i in range(10)], links=[LINK])
    urls = [(tokens.open_url(base, signer, d), 200) for d in made["deliveries"]]
    urls += [(tokens.click_url(base, signer, d, 0, LINK), 302) for d in made["deliveries"]]
    locker = hold_lock(settings.db_path, HOLD_SECONDS)
    answered: list[tuple[str, float, float]] = []  # (user agent, sent at, seconds taken)
    try:
        locked_at = time.monotonic()

        async def client(n: int) -> None:
            rng = random.Random(n)
            async with aiohttp.ClientSession() as s:
                i = 0
                while time.monotonic() - locked_at < HOLD_SECONDS - 0.3:
                    url, want = rng.choice(urls)
                    agent = AGENT.format(f"{n}-{i}")
                    i += 1
                    t0 = time.monotonic()
                    async with s.get(
                        url, headers={"User-Agent": agent}, allow_redirects=False
                    ) as r:
                        body = await r.read()
                        assert r.status == want
                        if want == 302:
                            assert r.headers["Location"] == LINK
                        else:
                            assert body.startswith(b"GIF89a")
                    answered.append((agent, t0, time.monotonic() - t0))
                    await asyncio.sleep(0.005)

        await asyncio.gather(*(client(n) for n in range(4)))
        assert locker.poll() is None, "the lock was released before the load ended"
        # the database really was unwritable meanwhile: nothing of it is recorded yet
        assert svc.writer.pending > 0
    finally:
        released = locker.stdout.readline().strip()
        locker.wait(timeout=30)
    assert released == "released"

    assert len(answered) >= 100, len(answered)
    slowest = max(took for _, _, took in answered)
    assert slowest < 1.0, f"a response took {slowest:.2f} s while the database was locked"

    def recorded() -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in store_events.events_of_email(db, made["email_id"]):
            if not e["inferred"]:
                counts[e["user_agent"]] = counts.get(e["user_agent"], 0) + 1
        return counts

    got = await wait_for(lambda: len(recorded()) >= len(answered) and recorded(), timeout=60)
    assert sorted(got) == sorted(agent for agent, _, _ in answered)
    assert set(got.values()) == {1}
