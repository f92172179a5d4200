"""Notifications to the sending user: the live feed and signed, retried webhooks.

The writer hands committed notices to :class:`Feed` (in the event loop) and has already
queued webhook deliveries in the database in the same transaction as the events, so a
crash loses neither. :class:`WebhookSender` works through that queue with backoff.

Webhook requests carry ``X-Mailtally-Timestamp`` (Unix seconds) and
``X-Mailtally-Signature: sha256=HEX`` where HEX is HMAC-SHA256 over
``"{timestamp}." + body`` with the endpoint's secret; see :func:`verify_signature`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp

import config
import store
from store import webhooks as store_webhooks

log = logging.getLogger("mailtally.tracker")

SIGNATURE_HEADER = "X-Mailtally-Signature"
TIMESTAMP_HEADER = "X-Mailtally-Timestamp"
MAX_BACKOFF = 3600.0


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str, timestamp: str, body: bytes, signature: str, tolerance: float = 300.0
) -> bool:
    """What a receiver does: recompute the MAC and reject stale timestamps (replays)."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs(time.time() - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


class Feed:
    """Fan-out of committed notices to live subscribers (``/feed``), in the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.subscribers: set[asyncio.Queue] = set()
        self.wake_webhooks = asyncio.Event()

    def publish_threadsafe(self, notices: list[dict], webhooks_queued: bool = True) -> None:
        """Called by the writer thread after a commit. The webhook sender is woken only
        when the batch queued deliveries (each wake costs it a database round trip)."""
        if webhooks_queued or self.subscribers:
            self.loop.call_soon_threadsafe(self._publish, notices, webhooks_queued)

    def publish(self, notices: list[dict], webhooks_queued: bool = True) -> None:
        """Called in the event loop (by the writer process' acknowledgements)."""
        self._publish(notices, webhooks_queued)

    def _publish(self, notices: list[dict], webhooks_queued: bool = True) -> None:
        if webhooks_queued:
            self.wake_webhooks.set()
        for q in list(self.subscribers):
            for notice in notices:
                if q.full():  # a stalled watcher loses old lines, never blocks the tracker
                    q.get_nowait()
                q.put_nowait(notice)

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=1000)
        self.subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.subscribers.discard(q)


def wanted(notice: dict, user: str | None, all_hits: bool) -> bool:
    """Whether a feed subscriber asked for this notice (user filter, human-only default)."""
    if user and (notice.get("user") or "").lower() != user.lower():
        return False
    if all_hits or notice.get("verdict") == "human":
        return True
    return notice.get("type") == "relabel" and notice.get("previous_verdict") == "human"


class WebhookSender:
    """Posts queued webhook deliveries; 2xx is done, anything else retries with backoff."""

    def __init__(self, settings: config.Settings, wake: asyncio.Event) -> None:
        self.settings = settings
        self.wake = wake
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._db = None
        # One thread owns the connection: calls take turns, and closing it queues behind any
        # call still running after a cancellation (closing it from elsewhere crashed SQLite).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhooks-db")

    async def _call(self, fn, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, self._db, *args))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._db = await loop.run_in_executor(self._executor, store.connect, self.settings.db_path)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        # Python 3.11's wait_for can swallow a cancellation that races with the wake event
        # (the writer's last flush sets it during shutdown): the flag ends the loop anyway.
        self._stopping = True
        self.wake.set()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._session.close()
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=False)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._work()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a locked database or a bug: try again shortly
                log.warning("webhooks: %s", exc)
                await asyncio.sleep(1.0)
                continue
            self.wake.clear()
            if self._stopping:
                break
            try:
                idle = await self._idle_time()
                await asyncio.wait_for(self.wake.wait(), timeout=idle)
            except TimeoutError:
                pass

    async def _idle_time(self) -> float:
        nxt = await self._call(store_webhooks.next_due_at)
        if not nxt:
            return 5.0
        wait = dt.datetime.fromisoformat(nxt).timestamp() - time.time()
        return min(5.0, max(0.01, wait))

    async def _work(self) -> None:
        while True:
            batch = await self._call(store_webhooks.due, store.now_iso(), 50)
            if not batch:
                return
            await asyncio.gather(*(self._send(item) for item in batch))

    async def _send(self, item: dict) -> None:
        secret = item["secret"] or self.settings.webhooks.secret
        body = item["payload"].encode()
        ts = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "mailtally-webhooks/1",
            TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: sign(secret, ts, body),
            "X-Mailtally-Delivery": str(item["id"]),
        }
        try:
            async with self._session.post(item["url"], data=body, headers=headers) as resp:
                await resp.read()
                ok, error = 200 <= resp.status < 300, f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"
        if ok:
            await self._call(store_webhooks.delivered, item["id"])
            return
        attempts = item["attempts"] + 1
        if attempts >= self.settings.webhooks.max_attempts:
            next_at = None
        else:
            delay = min(self.settings.webhooks.backoff_seconds * 2 ** (attempts - 1), MAX_BACKOFF)
            next_at = store.to_iso(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay))
        await self._call(store_webhooks.attempt_failed, item["id"], error, next_at)
