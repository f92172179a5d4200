"""The ingest worker: processes spooled messages in arrival order, after the 250.

Runs in a thread so parsing a big message never stalls the SMTP listener. An entry is
deleted only after its inbound-log entry is committed; on start, and whenever woken
(new SMTP message or a local hand-off from the relay) or every ``poll`` seconds, it
drains the spool, so a restart resumes whatever was accepted but not yet filed.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading

import config
import store
from ingest import process, spool
from store import inbound as store_inbound

log = logging.getLogger("mailtally.ingest")


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
        self.processed = 0

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
            self._db = store.connect(self.settings.db_path)
        return self._db

    def drain(self) -> int:
        """Process every pending entry (oldest first); return how many were filed."""
        done = 0
        for path in spool.pending(self.root):
            if self._stopping.is_set():
                break
            if self.process_path(path):
                done += 1
        return done

    def process_path(self, path) -> bool:
        try:
            entry = spool.read(path)
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            log.error("unreadable spool entry %s: %s", path, exc)
            path.rename(path.with_suffix(".bad"))
            return False
        db = self._connection()
        if store_inbound.processed_entry(db, entry.id):
            spool.remove(entry)  # filed before a crash; only the clean-up was missing
            return False
        inbound = process.Inbound(
            mail_from=entry.mail_from,
            rcpts=entry.rcpts,
            path=entry.path,
            offset=entry.body_offset,
            meta=entry.meta,
            received_at=entry.received_at,
            spool_id=entry.id,
        )
        try:
            process.process(self.settings, db, inbound)
        except sqlite3.OperationalError as exc:
            # Locked or busy database: leave the entry, try again at the next round.
            log.warning("ingest: will retry %s: %s", entry.id, exc)
            return False
        except Exception as exc:  # bad input must be explained, never crash or loop
            if isinstance(exc, sqlite3.IntegrityError) and store_inbound.processed_entry(
                db, entry.id
            ):
                # Another ingest process filed this very entry first (unique spool id).
                spool.remove(entry)
                return False
            log.exception("ingest: cannot process %s", entry.id)
            try:
                process.failed(self.settings, db, inbound, f"{type(exc).__name__}: {exc}")
            except sqlite3.OperationalError:
                return False
        spool.remove(entry)
        self.processed += 1
        return True

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
