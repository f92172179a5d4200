"""The batch writer: classifies queued hits and commits them in groups (group commit).

Requests put hits on a queue and wait at most ``write_wait_seconds`` for their commit.
One thread owns the database: it takes whatever is queued, classifies each hit against
its copy's recent hits, writes all of them in one transaction, then takes the next lot.
A slow or locked disk makes batches bigger, not responses slower. ``close()`` writes
everything still queued; if the database stays unwritable, the hits go to a spool file
that the next start replays, so a clean shutdown loses nothing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime as dt
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import config
import store
from store import events as store_events
from store import tracking
from store import webhooks as store_webhooks
from tracker import classify

log = logging.getLogger("mailtally.tracker")

SPOOL_NAME = "tracker-unwritten.jsonl"


@dataclass
class PendingHit:
    """A hit as received: the verified token's content plus the request description."""

    kind: str  # open, click, honeypot
    delivery_id: int
    position: int | None
    url: str
    method: str
    user_agent: str
    ip: str
    at: float
    headers: dict[str, str] = field(default_factory=dict)


def _iso(ts: float) -> str:
    return store.to_iso(dt.datetime.fromtimestamp(ts, dt.UTC))


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


_STOP = object()


class BatchWriter:
    """Owns a database connection in one thread and writes hits in groups."""

    def __init__(
        self,
        settings: config.Settings,
        rules: classify.Rules,
        publish: Callable[[list[dict]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.rules = rules
        self.publish = publish or (lambda notices: None)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tracker-writer", daemon=True)
        self._closing = False
        # Client addresses of recent hits, kept in memory only: anonymous events store none,
        # but the burst rules still need to tell clients apart for a few seconds.
        self._ips: collections.OrderedDict[int, tuple[str, float]] = collections.OrderedDict()
        self.written = 0
        self.batches = 0
        self.pending = 0
        self.spool_path = settings.data_dir / SPOOL_NAME

    # --- producer side ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._replay_spool()

    def submit(self, hit: PendingHit) -> concurrent.futures.Future:
        """Queue a hit; the future completes when its batch is committed."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.pending += 1
        self._queue.put((hit, fut))
        return fut

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop the thread (blocking)."""
        self._closing = True
        self._close_deadline = time.monotonic() + timeout
        self._queue.put(_STOP)
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        db = store.connect(self.settings.db_path)
        try:
            stop = False
            while not stop:
                batch = [self._queue.get()]
                while True:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if any(item is _STOP for item in batch):
                    stop = True
                    batch = [item for item in batch if item is not _STOP]
                if batch:
                    self._write_with_retry(db, batch)
        finally:
            db.close()

    def _write_with_retry(self, db, batch: list) -> None:
        delay = 0.02
        while True:
            try:
                notices = self._write(db, [hit for hit, _ in batch])
                break
            except sqlite3.OperationalError as exc:  # locked or busy: wait, never drop
                if self._closing and time.monotonic() > self._close_deadline:
                    self._spool([hit for hit, _ in batch], str(exc))
                    notices = []
                    break
                log.warning("tracker: database unavailable (%s), retrying", exc)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except Exception:  # a bug must not lose hits: keep them for the next start
                log.exception("tracker: could not write %d hits; spooled", len(batch))
                self._spool([hit for hit, _ in batch], "error")
                notices = []
                break
        real = sum(1 for hit, _ in batch if hit is not None)
        self.written += real
        self.batches += 1
        self.pending -= real
        for _, fut in batch:
            if fut is not None and not fut.done():
                fut.set_result(None)
        if notices:
            try:
                self.publish(notices)
            except Exception:  # the live feed must never stop the writer
                log.exception("tracker: publishing notices failed")

    def _spool(self, hits: list[PendingHit], why: str) -> None:
        with open(self.spool_path, "a", encoding="utf-8") as fh:
            for hit in hits:
                fh.write(json.dumps(asdict(hit)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        log.error("tracker: %d hits spooled to %s (%s)", len(hits), self.spool_path, why)

    def _replay_spool(self) -> None:
        path = Path(self.spool_path)
        if not path.exists():
            return
        replay = path.with_suffix(".replaying")
        os.replace(path, replay)
        for line in replay.read_text(encoding="utf-8").splitlines():
            if line.strip():
                self._queue.put((PendingHit(**json.loads(line)), None))
                self.pending += 1
        self._queue.put((None, _Unlink(replay)))

    # --- one batch --------------------------------------------------------------------------

    def _write(self, db, hits: list[PendingHit]) -> list[dict]:
        notices: list[dict] = []
        with store.sql.transaction(db):
            for hit in hits:
                if hit is None:
                    continue
                notices += self._record(db, hit)
            for notice in notices:
                self._queue_webhooks(db, notice)
        now = time.time()
        while self._ips and next(iter(self._ips.values()))[1] < now - 120:
            self._ips.popitem(last=False)
        return notices

    def _record(self, db, hit: PendingHit) -> list[dict]:
        ctx = tracking.copy_context(db, hit.delivery_id)
        at = _iso(hit.at)
        request = classify.Hit(
            kind=hit.kind,
            method=hit.method,
            user_agent=hit.user_agent,
            ip=hit.ip,
            at=hit.at,
            headers=hit.headers,
            position=hit.position,
        )
        kind = "open" if hit.kind == "open" else "click"
        if ctx is None:
            # Erased or unknown copy: still recorded, with nothing that identifies anyone.
            verdict = classify.classify(request, classify.Copy(), [], self.rules)
            store_events.insert_event(
                db,
                {
                    "kind": kind,
                    "at": at,
                    "anonymous": 1,
                    "method": hit.method,
                    "verdict": verdict.verdict,
                    "reason": verdict.reason,
                },
            )
            return []
        since = _iso(hit.at - self.rules.lookback_seconds)
        priors = [
            classify.Prior(
                id=p["id"],
                kind=p["kind"],
                at=_epoch(p["at"]) or 0.0,
                ip=p["ip"] or self._ips.get(p["id"], (None, 0))[0],
                verdict=p["verdict"],
                reason=p["reason"],
                position=p["position"],
            )
            for p in tracking.recent_hits(db, hit.delivery_id, since)
        ]
        delivered = _epoch(ctx["delivered_at"]) or _epoch(ctx["created_at"])
        verdict = classify.classify(
            request, classify.Copy(delivered, ctx["link_count"]), priors, self.rules
        )
        anonymous = bool(ctx["shared"]) or (
            self.settings.privacy.enabled and ctx["lawful_basis"] != "yes"
        )
        link = (
            tracking.link_id(db, ctx["email_id"], hit.position)
            if hit.kind == "click" and hit.position is not None
            else None
        )
        event = {
            "kind": kind,
            "at": at,
            "email_id": ctx["email_id"],
            "delivery_id": hit.delivery_id,
            "link_id": link["id"] if link else None,
            "contact_id": None if anonymous else ctx["contact_id"],
            "anonymous": int(anonymous),
            "ip": None if anonymous else hit.ip,
            "user_agent": None if anonymous else hit.user_agent[:1000],
            "method": hit.method,
            "verdict": verdict.verdict,
            "reason": verdict.reason,
        }
        ids = store_events.insert_event(db, event)
        self._ips[ids[0]] = (hit.ip, time.time())
        who = None if anonymous else (ctx["contact_email"] or ctx["recipient"])
        base = {
            "user": ctx["user_email"],
            "user_id": ctx["user_id"],
            "email_id": ctx["email_id"],
            "subject": ctx["subject"],
            "delivery_id": hit.delivery_id,
            "recipient": who,
            "anonymous": anonymous,
        }
        notice = dict(
            base,
            type="event",
            id=ids[0],
            kind=kind,
            honeypot=hit.kind == "honeypot",
            inferred=False,
            at=at,
            verdict=verdict.verdict,
            reason=verdict.reason,
            url=hit.url if hit.kind == "click" else None,
        )
        if kind == "open" and verdict.verdict == "human":
            notice["open_number"] = tracking.human_open_count(db, hit.delivery_id)
        notices = [notice]
        if len(ids) > 1:
            notices.append(
                dict(base, type="event", id=ids[1], kind="open", inferred=True, at=at)
                | {"verdict": "human", "reason": f"inferred_from_{kind}", "url": None}
                | {"open_number": tracking.human_open_count(db, hit.delivery_id)}
            )
        if verdict.relabel:
            for changed in store_events.relabel(
                db, list(verdict.relabel), "machine", verdict.reason
            ):
                notices.append(
                    dict(
                        base,
                        type="relabel",
                        id=changed["id"],
                        kind=changed["kind"],
                        inferred=bool(changed["inferred"]),
                        at=changed["at"],
                        verdict="machine",
                        previous_verdict=changed["previous_verdict"],
                        reason=verdict.reason,
                    )
                )
        return notices

    def _queue_webhooks(self, db, notice: dict) -> None:
        """Queue the notice for the sending user's webhooks and the global ones."""
        if not notice.get("user_id"):
            return
        wanted_everything = notice["type"] == "relabel" and notice["previous_verdict"] == "human"
        targets = [
            (None, url, self.settings.webhooks.all_hits) for url in self.settings.webhooks.urls
        ]
        targets += [
            (w["id"], w["url"], bool(w["all_hits"]))
            for w in store_webhooks.webhooks_for_user(db, notice["user_id"])
        ]
        payload = json.dumps(public_notice(notice), ensure_ascii=False, sort_keys=True)
        for webhook_id, url, all_hits in targets:
            if notice["verdict"] == "human" or all_hits or wanted_everything:
                store_webhooks.enqueue(db, url=url, webhook_id=webhook_id, payload=payload)


class _Unlink:
    """Marks the end of a replayed spool: remove the file once its hits are committed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def done(self) -> bool:
        return False

    def set_result(self, _value: object) -> None:
        self.path.unlink(missing_ok=True)


def public_notice(notice: dict) -> dict:
    """The notice as sent to webhooks and the feed (internal ids left out)."""
    return {k: v for k, v in notice.items() if k not in ("user_id",)}
