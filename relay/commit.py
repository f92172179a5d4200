"""Group commit of accepted messages: many SMTP sessions, one fsync'd file, one commit.

Each session hands the copies of its message to :meth:`GroupCommitter.commit` and waits.
Whenever the committer thread is free it takes *everything* waiting: all those copies go
into one spool file (one fsync, one directory fsync) and all their outbox rows into one
durable transaction; then every waiting session hears 250 together. Under load a batch holds
many messages, so the cost of durability per message falls as load rises; with one client
it is exactly one message per batch and nobody waits for a timer.

If a batch cannot be made durable (disk error, database locked for too long), every
message in it fails and nothing of it stays queued (no spool name, no row).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import config
import store
from relay import outbox
from store import outbox as store_outbox
from store import spoolfile

log = logging.getLogger("mailtally.relay.commit")


class GroupCommitter:
    """Durable queueing of copies for the submission server (used from its event loop)."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-commit")
        self.db = store_outbox.durable(store.connect(settings.db_path, migrate=False))
        self._waiting: list[tuple[list[outbox.Copy], asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self.batches = 0  # how many commits were made (for tests and benchmarks)

    async def commit(self, copies: list[outbox.Copy]) -> list[int]:
        """Queue ``copies`` durably (with whatever else is waiting); their outbox ids."""
        if not copies:
            return []
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((copies, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="relay-group-commit")
        # shield: a session that goes away must not cancel the batch of the others.
        return await asyncio.shield(fut)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                ids = await loop.run_in_executor(
                    self.executor, self._write, [c for copies, _ in batch for c in copies]
                )
            except BaseException as exc:  # every waiting session must hear, whatever happened
                if not isinstance(exc, Exception):
                    exc = RuntimeError(f"group commit interrupted: {exc!r}")
                log.warning("relay: could not queue %d message(s): %s", len(batch), exc)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            i = 0
            for copies, fut in batch:
                if not fut.done():
                    fut.set_result(ids[i : i + len(copies)])
                i += len(copies)

    def _write(self, copies: list[outbox.Copy]) -> list[int]:
        """One spool file, one directory fsync, one commit (runs in the committer thread)."""
        root = outbox.spool_dir(self.settings)
        paths = outbox.write_batch(root, copies)
        try:
            spoolfile.fsync_dir(root)
            return store_outbox.add(self.db, outbox.rows_for(copies, paths))
        except BaseException:
            if self.db.conn.in_transaction:  # a failed COMMIT can leave it open
                self.db.conn.rollback()
            for p in paths:
                outbox.remove_spool(p)
            raise

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.db.close()
