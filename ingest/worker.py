"""The ingest worker: processes spooled messages in arrival order, after the 250.

Runs in a thread so parsing a big message never stalls the SMTP listener. An entry is
deleted only after its inbound-log entry is committed; on start, and whenever woken
(new SMTP message or a local hand-off from the relay) or every ``poll`` seconds, it
drains the spool, so a restart resumes whatever was accepted but not yet filed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time

import config
import store
from ingest import process, spool
from store import inbound as store_inbound
from store import outbox as store_outbox

log = logging.getLogger("mailtally.ingest")

# At most this many entries, or this long, per transaction: one commit (and one fsync of
# the WAL) per batch, while other writers never wait long for the lock.
BATCH = 32
BATCH_SECONDS = 0.25
OS_ERROR_TRIES = 3


class Worker:
    """Drains the spool; at most one message is processed at a time."""

    def __init__(self, settings: config.Settings, poll: float = 1.0) -> None:
        self.settings = settings
        self.root = spool.spool_dir(settings)
        self.poll = poll
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._stopping = threading.Event()
        self._db = None
        self._os_errors: dict[str, int] = {}

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self.root.mkdir(parents=True, exist_ok=True)
        spool.clean_tmp(self.root)
        spool.add_waker(self.wake)
        self._task = asyncio.create_task(self._run(), name="ingest-worker")

    def wake(self) -> None:
        """Thread-safe: process new entries now."""
        loop, event = self._loop, self._event
        if loop is not None and event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass

    async def _run(self) -> None:
        assert self._event is not None
        while not self._stopping.is_set():
            self._event.clear()
            try:
                await asyncio.to_thread(self.drain)
            except Exception:  # never let the worker die; the entry stays for later
                log.exception("ingest worker error")
            try:
                await asyncio.wait_for(self._event.wait(), timeout=self.poll)
            except TimeoutError:
                pass

    def _connection(self):
        if self._db is None:
            # Durable commits: a spool entry is deleted right after its batch commits, so
            # the commit must be on disk first (one WAL fsync per batch, not per message).
            self._db = store_outbox.durable(store.connect(self.settings.db_path))
        return self._db

    def drain(self) -> int:
        """Process every pending entry (oldest first); return how many were filed."""
        done = 0
        paths = spool.pending(self.root)
        while paths and not self._stopping.is_set():
            taken, filed = self.process_batch(paths[:BATCH])
            done += filed
            if taken == 0:
                break  # the database is busy: the next round retries
            paths = paths[taken:]
        return done

    def process_batch(self, paths: list) -> tuple[int, int]:
        """File up to ``len(paths)`` entries in ONE transaction; return (taken, filed).

        Each entry runs in its own savepoint, so bad input rolls back only itself (and is
        recorded as an error). The attachment files of the batch are fsync'd together just
        before the commit, and the spool entries are removed only after it: one durable
        commit per batch instead of one per message, the same crash guarantees (an entry
        is either still spooled or filed, and a filed one is recognised by its spool id).
        """
        db = self._connection()
        try:
            db.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            log.warning("ingest: database busy, will retry: %s", exc)
            return 0, 0
        finished: list[spool.Entry] = []
        sync: list = []
        taken = filed = 0
        alone = None
        started = time.monotonic()
        try:
            for path in paths:
                if taken and (
                    self._stopping.is_set() or time.monotonic() - started > BATCH_SECONDS
                ):
                    break
                try:
                    outcome = self._process_in_batch(db, path, sync)
                except process.OwnTransaction as own:
                    alone = own
                    break
                taken += 1
                if outcome is not None:
                    finished.append(outcome[0])
                    filed += outcome[1]
            for p in sync:
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
            db.conn.execute("COMMIT")
        except BaseException as exc:
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            if alone is not None:
                alone.mail.cleanup()
            if isinstance(exc, sqlite3.OperationalError | OSError):
                # Locked/busy database or a disk error: every entry stays for the next round.
                log.warning("ingest: batch rolled back, will retry: %s", exc)
                return 0, 0
            raise
        for entry in finished:
            spool.remove(entry)
        if alone is not None:
            outcome = self._process_alone(db, alone)
            if outcome is None:
                return taken, filed  # busy: retried next round
            taken += 1
            filed += outcome
        return taken, filed

    def _process_alone(self, db, own: process.OwnTransaction) -> int | None:
        """File a message that queues a notice (its own commits), as already parsed and
        decided in the batch: 1 when filed, None if the database was busy (the entry stays
        for the next round)."""
        inbound = own.inbound
        try:
            process.commit(self.settings, db, inbound, own.mail, own.plan)
        except sqlite3.OperationalError as exc:
            log.warning("ingest: will retry %s: %s", inbound.spool_id, exc)
            return None
        except Exception as exc:  # never crash or loop on one message
            log.exception("ingest: cannot process %s", inbound.spool_id)
            try:
                process.failed(self.settings, db, inbound, f"{type(exc).__name__}: {exc}")
            except sqlite3.OperationalError:
                return None
        finally:
            own.mail.cleanup()
        inbound.path.unlink(missing_ok=True)
        return 1

    def _process_in_batch(self, db, path, sync: list) -> tuple[spool.Entry, int] | None:
        """One entry inside the batch transaction: (entry to remove, 1 if filed now)."""
        try:
            entry = spool.read(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("unreadable spool entry %s: %s", path, exc)
            path.rename(path.with_suffix(".bad"))
            return None
        if store_inbound.processed_entry(db, entry.id):
            return entry, 0  # filed before a crash; only the clean-up was missing
        inbound = process.Inbound(
            mail_from=entry.mail_from,
            rcpts=entry.rcpts,
            path=entry.path,
            offset=entry.body_offset,
            meta=entry.meta,
            received_at=entry.received_at,
            spool_id=entry.id,
        )
        db.conn.execute("SAVEPOINT entry")
        try:
            process.process(self.settings, db, inbound, sync=sync)
        except process.OwnTransaction:
            db.conn.execute("ROLLBACK TO entry")
            db.conn.execute("RELEASE entry")
            raise
        except (sqlite3.OperationalError, OSError) as exc:
            # Locked database, full disk: retry the whole batch later. An OSError that
            # keeps coming back for this entry is about the entry: recorded, not retried.
            tries = self._os_errors[entry.id] = self._os_errors.get(entry.id, 0) + 1
            if isinstance(exc, sqlite3.OperationalError) or tries < OS_ERROR_TRIES:
                raise
            db.conn.execute("ROLLBACK TO entry")
            log.exception("ingest: cannot process %s", entry.id)
            process.failed(self.settings, db, inbound, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # bad input must be explained, never crash or loop
            db.conn.execute("ROLLBACK TO entry")
            log.exception("ingest: cannot process %s", entry.id)
            try:
                process.failed(self.settings, db, inbound, f"{type(exc).__name__}: {exc}")
            except sqlite3.Error:
                db.conn.execute("ROLLBACK TO entry")
                db.conn.execute("RELEASE entry")
                log.exception("ingest: cannot record the failure of %s; kept", entry.id)
                return None
        db.conn.execute("RELEASE entry")
        self._os_errors.pop(entry.id, None)
        return entry, 1

    async def stop(self) -> None:
        self._stopping.set()
        spool.remove_waker(self.wake)
        if self._event is not None:
            self._event.set()
        if self._task is not None:
            await self._task
        if self._db is not None:
            self._db.close()
            self._db = None
