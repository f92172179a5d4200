"""The batch writer: classifies queued hits and commits them in groups (group commit).

Requests put hits on a queue and answer at once; only when the writer is more than
``backlog_limit`` hits behind do they wait (at most ``write_wait_seconds``) for their
commit. One thread owns the database: it takes whatever is queued, reads what the lot
needs in a few queries (the copies, their recent hits, their open counts, their links),
classifies each hit against its copy's recent hits, writes all of them in one transaction,
then takes the next lot. A slow or locked disk makes batches bigger, not responses slower.
``close()`` writes everything still queued; if the database stays unwritable, the hits go
to a spool file that the next start replays, so a clean shutdown loses nothing.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import datetime as dt
import json
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import config
import store
from store import events as store_events
from store import report_schema, tracking
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


_SECONDS: dict[int, str] = {}  # whole Unix seconds -> their ISO text up to the seconds


def _iso(ts: float) -> str:
    """``store.to_iso`` of a Unix time (the same text, without a datetime per hit: the
    seconds' text is made once per second, the microseconds rounded as datetime does)."""
    if ts < 0:
        return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="microseconds")
    frac, whole = math.modf(ts)
    sec, us = int(whole), round(frac * 1e6)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    head = _SECONDS.get(sec)
    if head is None:
        if len(_SECONDS) > 4096:
            _SECONDS.clear()
        head = _SECONDS[sec] = dt.datetime.fromtimestamp(sec, dt.UTC).isoformat()[:19]
    return f"{head}.{us:06d}+00:00"


def _text(value: str) -> str:
    """Header text as SQLite can store it: undecodable bytes (which aiohttp keeps as lone
    surrogates) become U+FFFD instead of failing the batch."""
    if value.isascii():
        return value
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return value.encode("utf-8", "replace").decode("utf-8")


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


_STOP = object()
_MANY = object()  # marks a queue item holding a list of hits
# Hits queued but not yet written beyond which responses wait for their commit: a few
# seconds of work, a few MB of memory.
BACKLOG_LIMIT = 20_000
CACHE_KIB = 32 * 1024  # the writer connection's page cache
CHECKPOINT_PAGES = 10_000  # WAL pages after which the writer's commit checkpoints
OPEN_COUNTS_KEPT = 500_000  # copies whose open counts the writer keeps (then starts over)
CONTEXTS_KEPT = 200_000  # copies whose contexts the writer keeps (then starts over)
# The least time between the starts of two batches when hits keep coming: what a hit may
# wait before its batch begins, and the live feed's delay under load.
GATHER_SECONDS = 0.2
# The longest a report entry waits to be re-rendered while hits keep coming (see _write).
REFRESH_SECONDS = 1.0


class Backlog:
    """Counts of hits queued and written, shared by the writer thread and the tracker's
    front for the writer process: both answer `/healthz` and back-pressure the same way."""

    queued: int
    written: int
    backlog_limit: int

    @property
    def pending(self) -> int:
        """Hits queued and not yet written."""
        return self.queued - self.written

    @property
    def behind(self) -> bool:
        """Whether the queue is long enough that new hits should wait for their commit."""
        return self.queued - self.written > self.backlog_limit


class BatchWriter(Backlog):
    """Owns a database connection in one thread and writes hits in groups."""

    def __init__(
        self,
        settings: config.Settings,
        rules: classify.Rules,
        publish: Callable[[list[dict], bool], None] | None = None,
        feed_wanted: Callable[[], bool] | None = None,
        committed: Callable[[int, list[dict], bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self.rules = rules
        self.publish = publish or (lambda notices, webhooks_queued: None)
        # Whether anyone follows the live feed: notices are built only for a listener (the
        # feed, or a webhook of the sending user or a global one), not for every hit.
        self.feed_wanted = feed_wanted or (lambda: True)
        # Told after every batch (hits written, notices, webhooks queued): the writer
        # process acknowledges batches to the tracker with it.
        self.committed = committed
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tracker-writer", daemon=True)
        self._closing = False
        # Client addresses of recent hits, kept in memory only: anonymous events store none,
        # but the burst rules still need to tell clients apart for a few seconds.
        self._ips: collections.OrderedDict[int, tuple[str, float]] = collections.OrderedDict()
        # Each copy's recent hits (the burst rules' priors), kept from batch to batch: this
        # thread writes every hit, so after one read per copy the database has nothing new
        # to tell (re-reading them per batch cost more than the insert when copies are hot).
        self.recent = _RecentHits(rules.lookback_seconds)
        # Each copy's human opens, once it has one: nothing but this thread changes that
        # count then (the ingest infers an open only for a copy without any), so it need not
        # be read again per batch. A copy back at none is read again.
        self._opens: dict[int, int] = {}
        # Each copy's context (copy, email, sender, contact), kept while no other connection
        # commits: SQLite's data_version tells when one has (a copy delivered, erased, a
        # lawful basis changed), and then all are read again. Reading ~300 per batch cost
        # more than any other query of the writer.
        self._contexts: dict[int, dict] = {}
        self._data_version: int | None = None
        # Counted by one thread each (no lost updates): queued by the event loop, handled
        # (written or spooled) by the writer.
        self.queued = 0
        self.written = 0
        self.batches = 0
        self.replayed = 0  # hits queued from the spool at start
        self.backlog_limit = BACKLOG_LIMIT
        self.gather_seconds = GATHER_SECONDS
        # Emails whose report entries committed batches left stale (see _write), and when
        # they were last all re-rendered.
        self._stale: set[int] = set()
        self._refreshed = 0.0
        self.refresh_seconds = REFRESH_SECONDS
        self.spool_path = settings.data_dir / SPOOL_NAME
        # The configured webhooks every notice may go to (settings are fixed while running).
        self._global_webhooks: list[tuple[int | None, str, bool]] = [
            (None, url, settings.webhooks.all_hits) for url in settings.webhooks.urls
        ]

    # --- producer side ----------------------------------------------------------------------

    def start(self) -> None:
        self._replay_spool()  # queued before the thread runs: ``replayed`` is final by then
        self._thread.start()

    def enqueue(self, hit: PendingHit) -> None:
        """Queue a hit without waiting for it (it is written, or spooled, before close()
        returns)."""
        self.queued += 1
        self._queue.put((hit, None))

    def enqueue_many(self, hits: list[PendingHit]) -> None:
        """:meth:`enqueue` for a list of hits (one queue item)."""
        self.queued += len(hits)
        self._queue.put((hits, _MANY))

    def submit(self, hit: PendingHit) -> concurrent.futures.Future:
        """Queue a hit; the future completes when its batch is committed."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.queued += 1
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

    @property
    def native_id(self) -> int | None:
        """The writer thread's id in the kernel (for its scheduling policy), once started."""
        return self._thread.native_id

    # --- writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        db = store.connect(self.settings.db_path)  # migrated: the batch gate is installed
        # Each batch reads the copies, emails, contacts and links its events refer to inside
        # its own write transaction, so every reference is known to exist when it is
        # inserted: checking it again per row (five lookups per event) is pure cost. Deletes
        # elsewhere still cascade (that is the deleting connection's business).
        db.conn.execute("PRAGMA foreign_keys=OFF")
        # The pages each batch touches (indexes of events, summary rows) are spread over
        # the whole table: with SQLite's default 2 MB cache most are read again each time.
        db.conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        # Statement journals (every multi-row statement and trigger in a transaction has
        # one) in memory: as temp files they cost some four pwrite() calls per hit.
        db.conn.execute("PRAGMA temp_store=MEMORY")
        # Checkpoint every ~40 MB of WAL, not SQLite's 4 MB: the pages a batch dirties
        # (summary rows, the events indexes) are much the same from batch to batch, and a
        # checkpoint copies each once however often it was committed since the last one.
        # Durability is the WAL's (synchronous=NORMAL), not the checkpoint's.
        db.conn.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
        try:
            stop = False
            began = 0.0
            while not stop:
                batch = [self._queue.get()]
                # Commits close together: gather a little longer, so that each carries more
                # hits (a commit rewrites every index and summary page it touched, and hits
                # on different copies touch different pages: 300 hits per commit cost a
                # quarter less per hit than 100, 1,400 a fifth less than 350). No response waits.
                pause = began + self.gather_seconds - time.monotonic()
                if pause > 0 and not self._closing:
                    time.sleep(pause)
                began = time.monotonic()
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
        hits: list[PendingHit] = []
        for hit, fut in batch:
            if fut is _MANY:
                hits += hit
            elif hit is not None:
                hits.append(hit)
        while True:
            try:
                notices, webhooks = self._write(db, hits)
                break
            except sqlite3.OperationalError as exc:  # locked or busy: wait, never drop
                self._forget(hits)
                if self._closing and time.monotonic() > self._close_deadline:
                    self._spool(hits, str(exc))
                    notices, webhooks = [], 0
                    break
                log.warning("tracker: database unavailable (%s), retrying", exc)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except Exception:  # a bug must not lose hits: keep them for the next start
                self._forget(hits)
                log.exception("tracker: could not write %d hits; spooled", len(hits))
                self._spool(hits, "error")
                notices, webhooks = [], 0
                break
        self.written += len(hits)
        self.batches += 1
        for _, fut in batch:
            if fut is not None and fut is not _MANY and not fut.done():
                fut.set_result(None)
        if self.committed is not None:
            self.committed(len(hits), notices, webhooks > 0)
        elif notices:
            try:
                self.publish(notices, webhooks > 0)
            except Exception:  # the live feed must never stop the writer
                log.exception("tracker: publishing notices failed")

    def _forget(self, hits: list[PendingHit]) -> None:
        """A batch that was rolled back may have left its hits in the caches: the copies
        concerned are read again from the database."""
        for hit in hits:
            self.recent.forget(hit.delivery_id)
            self._opens.pop(hit.delivery_id, None)

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
                self.enqueue(PendingHit(**json.loads(line)))
                self.replayed += 1
        self._queue.put((None, _Unlink(replay)))

    # --- one batch --------------------------------------------------------------------------

    def _write(self, db, hits: list[PendingHit]) -> tuple[list[dict], int]:
        """Record ``hits`` in one transaction; (notices, webhook deliveries queued)."""
        notices: list[dict] = []
        queued = 0
        with store.sql.transaction(db):
            report_schema.begin_batch(db)  # summaries per batch, not per event
            version = db.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version or len(self._contexts) > CONTEXTS_KEPT:
                self._contexts.clear()
                self._data_version = version
            batch = _Batch(
                db, hits, self.recent, self._ips, self._opens, self.feed_wanted(), self._contexts
            )
            for hit in hits:
                notices += self._record(db, hit, batch)
            batch.flush()
            stale = self._stale | batch.emails
            refresh = self._refresh_due()
            if refresh:
                report_schema.refresh_emails(db, stale)
            for notice in notices:
                queued += self._queue_webhooks(db, notice, batch)
            report_schema.end_batch(db)
        self._stale = set() if refresh else stale
        if refresh:
            self._refreshed = time.monotonic()
        now = time.time()
        while self._ips and next(iter(self._ips.values()))[1] < now - 120:
            self._ips.popitem(last=False)
        self.recent.prune(min(h.at for h in hits) if hits else now)
        opens = self._opens
        if len(opens) > OPEN_COUNTS_KEPT:
            opens.clear()
        for d in batch.asked:
            n = batch.open_counts.get(d, 0)
            if n > 0:
                opens[d] = n
            else:
                opens.pop(d, None)
        return notices, queued

    def _refresh_due(self) -> bool:
        """Whether this batch re-renders the report entries of the emails its hits (and the
        batches before it) changed. Always when no hit is left waiting: once the queue is
        empty the reports are exact. While hits keep coming, at most once a
        ``refresh_seconds``: a batch re-rendered some 750 entries for 1,400 hits, about a
        tenth of the writer's CPU, mostly for emails the next batch would change again."""
        return (
            self._closing
            or self._queue.empty()
            or time.monotonic() - self._refreshed >= self.refresh_seconds
        )

    def _record(self, db, hit: PendingHit, batch: _Batch) -> list[dict]:
        """Classify one hit and add its event(s) to the batch; its notices."""
        ctx = batch.contexts.get(hit.delivery_id)
        at = _iso(hit.at)
        user_agent = _text(hit.user_agent)
        request = classify.Hit(
            kind=hit.kind,
            method=hit.method,
            user_agent=user_agent,
            ip=hit.ip,
            at=hit.at,
            headers=hit.headers,
            position=hit.position,
        )
        kind = "open" if hit.kind == "open" else "click"
        if ctx is None:
            # Erased or unknown copy: still recorded, with nothing that identifies anyone.
            verdict = classify.classify(request, classify.Copy(), [], self.rules)
            batch.add_event(
                {
                    "kind": kind,
                    "at": at,
                    "anonymous": 1,
                    "method": hit.method,
                    "verdict": verdict.verdict,
                    "reason": verdict.reason,
                }
            )
            return []
        recent, seen = batch.recent.priors(hit.delivery_id)
        verdict = classify.classify(request, batch.copy(ctx), recent, self.rules, seen)
        anonymous = bool(ctx["shared"]) or (
            self.settings.privacy.enabled and ctx["lawful_basis"] != "yes"
        )
        link = (
            batch.links.get((ctx["email_id"], hit.position))
            if hit.kind == "click" and hit.position is not None
            else None
        )
        event = {
            "kind": kind,
            "at": at,
            "email_id": ctx["email_id"],
            "delivery_id": hit.delivery_id,
            "link_id": link,
            "contact_id": None if anonymous else ctx["contact_id"],
            "anonymous": int(anonymous),
            "ip": None if anonymous else hit.ip,
            "user_agent": None if anonymous else user_agent[:1000],
            "method": hit.method,
            "verdict": verdict.verdict,
            "reason": verdict.reason,
        }
        target = "" if anonymous or ctx["shared"] else (ctx["recipient"] or "")
        ids = [batch.add_event(event, target)]
        if verdict.verdict == "human" and kind == "click" and not batch.opened(hit.delivery_id):
            # HubSpot's retroactive open (store.events.infer_open, decided from the batch's
            # exact count of the copy's human opens).
            inferred = dict(event, kind="open", inferred=1, link_id=None, caused_by=ids[0])
            inferred["reason"] = f"inferred_from_{kind}"
            ids.append(batch.add_event(inferred, target))
        if anonymous:  # the burst rules still tell clients apart for a while
            self._ips[ids[0]] = (hit.ip, time.time())
        batch.recent.add(
            hit.delivery_id,
            classify.Prior(
                ids[0],
                kind,
                hit.at,
                hit.ip,
                verdict.verdict,
                verdict.reason,
                hit.position if link is not None else None,
            ),
        )
        changed_rows: list[dict] = []
        if verdict.relabel:
            # Events still held by the batch change in memory (they are counted when
            # written); stored ones in the database, whose triggers recompute their
            # summaries and contacts from the stored events. The held events are folded in
            # after that, on top (both add up: recomputed + held).
            stored, changed_rows = batch.relabel_held(verdict.relabel, "machine", verdict.reason)
            if stored:
                # Not re-rendered per call: the re-labelled events are this copy's, and the
                # hit's own event puts its email among those the batch re-renders at its end.
                done = store_events.relabel(db, stored, "machine", verdict.reason, refresh=False)
                changed_rows = done + changed_rows
            batch.relabelled(changed_rows)
        if not batch.listened(ctx["user_id"], self._global_webhooks):
            return []
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
            notice["open_number"] = batch.opened(hit.delivery_id)
        notices = [notice]
        if len(ids) > 1:
            notices.append(
                dict(base, type="event", id=ids[1], kind="open", inferred=True, at=at)
                | {"verdict": "human", "reason": f"inferred_from_{kind}", "url": None}
                | {"open_number": batch.opened(hit.delivery_id)}
            )
        for changed in changed_rows:
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

    def _queue_webhooks(self, db, notice: dict, batch: _Batch) -> int:
        """Queue the notice for the sending user's webhooks and the global ones; how many."""
        if not notice.get("user_id"):
            return 0
        wanted_everything = notice["type"] == "relabel" and notice["previous_verdict"] == "human"
        targets = self._global_webhooks + batch.webhooks(notice["user_id"])
        targets = [t for t in targets if notice["verdict"] == "human" or t[2] or wanted_everything]
        if not targets:
            return 0
        payload = json.dumps(public_notice(notice), ensure_ascii=False, sort_keys=True)
        for webhook_id, url, _all_hits in targets:
            store_webhooks.enqueue(db, url=url, webhook_id=webhook_id, payload=payload)
        return len(targets)


STALE_MARGIN = 10.0  # seconds: a copy's hits older than 2 burst windows and this are let go


class _RecentHits:
    """Each copy's recent hits as :class:`classify.Prior` (oldest first), kept between
    batches. A copy's list is complete from its ``since`` on: hits before that were never
    read or have been pruned, and a batch that needs earlier ones reads the copy again."""

    def __init__(self, lookback: float) -> None:
        self.lookback = lookback
        # Least recently added to first: pruning stops at the first copy still in use
        # instead of looking at every copy (50,000 copies cost 8% of the writer's time).
        # copy -> (since, its hits, a classify.Seen of them)
        self._copies: collections.OrderedDict[
            int, tuple[float, list[classify.Prior], classify.Seen]
        ] = collections.OrderedDict()
        self._pruned_at = 0.0

    def missing(self, delivery_ids: set[int], since: float) -> list[int]:
        """The copies whose hits from ``since`` on are not all here."""
        copies = self._copies
        return [d for d in delivery_ids if d not in copies or copies[d][0] > since]

    def load(self, delivery_id: int, since: float, priors: list[classify.Prior]) -> None:
        self._copies[delivery_id] = (since, priors, classify.Seen(priors))
        self._copies.move_to_end(delivery_id)

    def priors(self, delivery_id: int) -> tuple[list[classify.Prior], classify.Seen | None]:
        """The copy's kept hits in time order (all from its ``since`` on; the rules look at
        their times, so no copy of the window is made) and where they came from."""
        found = self._copies.get(delivery_id)
        if found is None:
            return [], None
        return found[1], found[2]

    def add(self, delivery_id: int, prior: classify.Prior) -> None:
        """A hit just recorded becomes a prior of the hits after it."""
        copies = self._copies
        found = copies.get(delivery_id)
        if found is None:
            found = copies[delivery_id] = (prior.at, [], classify.Seen())
        else:
            copies.move_to_end(delivery_id)
        rows = found[1]
        rows.append(prior)
        found[2].add(prior)
        if len(rows) > 1 and (rows[-2].at, rows[-2].id) > (prior.at, prior.id):
            rows.sort(key=lambda p: (p.at, p.id))
        cut = prior.at - 2 * self.lookback - STALE_MARGIN
        if rows[0].at < cut:  # a copy hit for long: its oldest hits go (read again if asked)
            rows = rows[bisect.bisect_left(rows, cut, key=_prior_at) :]
            copies[delivery_id] = (max(found[0], cut), rows, classify.Seen(rows))

    def relabelled(self, changed: dict) -> None:
        """An earlier event turned machine: its prior follows."""
        found = self._copies.get(changed["delivery_id"])
        if found is None:
            return
        rows = found[1]
        for i in range(len(rows) - 1, -1, -1):  # mostly among the last
            p = rows[i]
            if p.id == changed["id"]:
                # Its Seen needs nothing new: a hit re-labelled for the honeypot came from the
                # address of the honeypot hit that re-labelled it, a later hit kept already.
                rows[i] = p._replace(verdict=changed["verdict"], reason=changed["reason"])
                break

    def forget(self, delivery_id: int) -> None:
        self._copies.pop(delivery_id, None)

    def prune(self, oldest_at: float) -> None:
        """Drop the copies whose hits no batch from ``oldest_at`` on needs, least recently
        added to first, until one still in use (at most once a second). The hits of copies
        still in use are trimmed as they are added (:meth:`add`)."""
        if oldest_at - self._pruned_at < 1.0:
            return
        self._pruned_at = oldest_at
        cut = oldest_at - self.lookback - 1.0
        copies = self._copies
        while copies:
            rows = next(iter(copies.values()))[1]
            if rows and rows[-1].at >= cut:
                break
            copies.popitem(last=False)


# Where a machine or self hit counts in a summary row (report_schema._STAT_COLUMNS).
_OTHER_COLUMN = {("open", "machine"): 7, ("click", "machine"): 8, ("open", "self"): 9}
_OTHER_COLUMN["click", "self"] = 10


def _prior_at(p: classify.Prior) -> float:
    return p.at


class _Batch:
    """One batch: what its hits need from the database, read in a few queries at its start,
    and the events it records, written in one statement (:meth:`flush`). Inside the
    batch's transaction nothing else writes, so the counts and recent hits read at the
    start stay exact as long as the batch applies its own events to them."""

    def __init__(
        self,
        db,
        hits: list[PendingHit],
        recent: _RecentHits,
        ips: collections.OrderedDict[int, tuple[str, float]],
        opens: dict[int, int],
        feed_wanted: bool,
        contexts: dict[int, dict],
    ) -> None:
        self.db = db
        self.recent = recent
        self.feed_wanted = feed_wanted
        ids = {h.delivery_id for h in hits}
        self.contexts = {d: contexts[d] for d in ids if d in contexts}
        unread = [d for d in ids if d not in contexts]
        if unread:
            found = tracking.copy_contexts(db, unread)
            contexts.update(found)
            self.contexts.update(found)
        known = {d for d in ids if d in self.contexts}
        for d in ids - known:  # erased: its hits and opens went with it
            recent.forget(d)
            opens.pop(d, None)
        since = min((h.at for h in hits), default=time.time()) - recent.lookback
        cold = recent.missing(known, since)
        if cold:
            found = tracking.recent_hits_of(db, cold, _iso(since))
            for d in cold:
                recent.load(
                    d,
                    since,
                    [
                        classify.Prior(
                            p["id"],
                            p["kind"],
                            _epoch(p["at"]) or 0.0,
                            p["ip"] or ips.get(p["id"], (None, 0))[0],
                            p["verdict"],
                            p["reason"],
                            p["position"],
                        )
                        for p in found.get(d, ())
                    ],
                )
        self.asked = known  # the copies whose open counts this batch knows
        self.open_counts = {d: opens[d] for d in known if d in opens}
        unknown = [d for d in known if d not in opens]
        if unknown:
            self.open_counts.update(tracking.human_open_counts(db, unknown))
        clicked = {
            self.contexts[h.delivery_id]["email_id"]
            for h in hits
            if h.kind == "click" and h.delivery_id in self.contexts
        }
        self.links = tracking.link_ids(db, clicked) if clicked else {}
        self._webhooks: dict[int, list[tuple[int | None, str, bool]]] = {}
        self._next_id = store_events.next_event_id(db)
        self._events: list[dict] = []  # held: numbered, not yet written
        self._targets: list[str] = []  # whom each held event counts for in the summaries
        self.emails: set[int] = set()  # whose report entries to re-render at the end

    def copy(self, ctx: dict) -> classify.Copy:
        """What the rules know of a copy (made once per copy and batch)."""
        found = ctx.get("_copy")
        if found is None:
            delivered = _epoch(ctx["delivered_at"]) or _epoch(ctx["created_at"])
            found = ctx["_copy"] = classify.Copy(delivered, ctx["link_count"])
        return found

    def add_event(self, event: dict, target: str = "") -> int:
        """Number an event and hold it for :meth:`flush`. ``target``: whom its hits count
        for in the report summaries (``report_schema._TARGET``)."""
        event_id = event["id"] = self._next_id
        self._next_id += 1
        self._events.append(event)
        self._targets.append(target)
        if event["kind"] == "open" and event["verdict"] == "human":
            d = event.get("delivery_id")
            self.open_counts[d] = self.open_counts.get(d, 0) + 1
        return event_id

    def relabel_held(
        self, ids: Sequence[int], verdict: str, reason: str
    ) -> tuple[list[int], list[dict]]:
        """:func:`store.events.relabel` for the events still held: the named ones and the
        inferred opens they caused take ``verdict`` and ``reason`` in memory. Returns the
        ids that are not held (for the database) and the held events changed, each as the
        database's re-labelling reports it (``previous_verdict`` added)."""
        events = self._events
        first = events[0]["id"] if events else self._next_id
        held = {i for i in ids if i >= first}
        stored = [i for i in ids if i < first]
        changed: list[dict] = []
        # Held events are numbered in order from ``first``; an inferred open is made
        # right after the event that caused it.
        for i in sorted(held):
            for e in events[i - first : i - first + 2]:
                if (e["id"] == i or e.get("caused_by") == i) and (
                    e["verdict"] != verdict or e["reason"] != reason
                ):
                    previous = e["verdict"]
                    e["verdict"], e["reason"] = verdict, reason
                    changed.append(
                        dict(e, inferred=e.get("inferred", 0), previous_verdict=previous)
                    )
        return stored, changed

    @staticmethod
    def _count(
        event: dict,
        target: str,
        people: dict[tuple[int, str], list],
        reasons: dict[tuple[int, str, str, str], int],
    ) -> None:
        """Add the event to its person's summary row, as ``report_schema._STATS`` counts."""
        key = (event["email_id"], target)
        row = people.get(key)
        if row is None:
            row = people[key] = [0, 0, 0, None, None, 0, 0, 0, 0, 0, 0]
        row[0] += 1
        kind, verdict = event["kind"], event["verdict"]
        if verdict == "human":
            if kind == "open":
                at = event["at"]
                row[1] += 1
                if row[3] is None or at < row[3]:
                    row[3] = at
                if row[4] is None or at > row[4]:
                    row[4] = at
                if event.get("inferred"):
                    row[5] += 1
            elif kind == "click":
                row[2] += 1
            elif kind == "reply":
                row[6] += 1
        elif kind in ("open", "click"):
            row[_OTHER_COLUMN[kind, verdict]] += 1
            reason = (*key, verdict, event["reason"])
            reasons[reason] = reasons.get(reason, 0) + 1

    def flush(self) -> None:
        """Write the events held, their contacts' properties and their summaries (counted
        here, from the events as they are now: a held event may have been re-labelled)."""
        people: dict[tuple[int, str], list] = {}
        reasons: dict[tuple[int, str, str, str], int] = {}
        touched: dict[int, tuple[str, str | None]] = {}  # as store.events.touch_contact
        for event, target in zip(self._events, self._targets, strict=True):
            if event.get("email_id") is not None:
                self._count(event, target, people, reasons)
            contact = event.get("contact_id")
            if event["verdict"] == "human" and not event.get("anonymous") and contact:
                at, click = touched.get(contact, ("", None))
                if event["kind"] == "click" and (click is None or event["at"] > click):
                    click = event["at"]
                touched[contact] = (max(at, event["at"]), click)
        store_events.insert_numbered(self.db, self._events)
        store_events.touch_contacts(self.db, touched)
        report_schema.fold_counted(self.db, people, reasons, self._next_id)
        self.emails.update(x for x, _ in people)
        self._events, self._targets = [], []

    def opened(self, delivery_id: int) -> int:
        """The copy's human opens so far, inferred ones included."""
        return self.open_counts.get(delivery_id, 0)

    def relabelled(self, changed: list[dict]) -> None:
        """Earlier events turned machine: priors and open counts follow."""
        for c in changed:
            if c["delivery_id"] is None:
                continue
            self.recent.relabelled(c)
            if c["kind"] == "open":
                was, now = c["previous_verdict"] == "human", c["verdict"] == "human"
                d = c["delivery_id"]
                self.open_counts[d] = self.open_counts.get(d, 0) + (now - was)

    def listened(self, user_id: int | None, global_webhooks: list) -> bool:
        """Whether a hit of ``user_id``'s copy has anyone to tell: the live feed, a global
        webhook or one of the user's."""
        return self.feed_wanted or bool(global_webhooks) or bool(user_id and self.webhooks(user_id))

    def webhooks(self, user_id: int) -> list[tuple[int | None, str, bool]]:
        if user_id not in self._webhooks:
            self._webhooks[user_id] = [
                (w["id"], w["url"], bool(w["all_hits"]))
                for w in store_webhooks.webhooks_for_user(self.db, user_id)
            ]
        return self._webhooks[user_id]


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
