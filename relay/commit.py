"""Group commit of accepted messages: many SMTP sessions, one fsync'd file, one commit.

Each session hands its checked and planned message (``submit.Prepared``) to
:meth:`GroupCommitter.commit` and waits. Whenever the committer thread is free it takes
*everything* waiting and, for the whole batch: records the emails, deliveries and links in
one transaction, renders the copies, writes all of them into one spool file (one fsync, one
directory fsync) and adds all their outbox rows in one durable commit; then every waiting
session hears 250 together. The accept path thus takes the database's write lock twice per
batch instead of per message, and under load a batch holds many messages, so the cost of
durability per message falls as load rises; with one client a batch is one message and
nobody waits for a timer.

If a batch cannot be made durable (disk error, database locked for too long), every
message in it fails and nothing of it stays queued (no spool name, no row).

The work is split in two stages that overlap (rows and rendering of one batch while the
previous one is written and fsync'd): rendering on the same thread as the fsyncs made the
committer the accept path's bottleneck, its CPU and its disk waits strictly in turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import config
import store
from relay import outbox, prepare_process, submit
from store import outbox as store_outbox
from store.sql import transaction

log = logging.getLogger("mailtally.relay.commit")

Job = submit.Prepared | list[outbox.Copy]
Renderer = Callable[[list[tuple["prepare_process.PlanRef", list[int]]]], list]


class GroupCommitter:
    """Durable queueing of copies for the submission server (used from its event loop).

    Two stages, each in a thread and on a database connection of its own, so that one
    batch's disk work overlaps the next batch's CPU work: ``executor`` records the rows and
    renders the copies of batch N+1 while ``queue_executor`` writes, fsyncs and commits
    the copies of batch N. Batches go through the second stage one at a time, in order,
    so outbox ids keep acceptance order.
    """

    def __init__(self, settings: config.Settings, renderer: Renderer | None = None) -> None:
        self.settings = settings
        self.renderer = renderer  # renders plans kept elsewhere (relay.prepare_process)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-commit")
        self.queue_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-queue")
        # Rows: committed without waiting for the disk; the queue connection's FULL commit
        # of the outbox rows syncs them too (one WAL file, written in order).
        self.db = store_outbox.durable(store.connect(settings.db_path, migrate=False), False)
        self.queue_db = store_outbox.durable(store.connect(settings.db_path, migrate=False))
        self._waiting: list[tuple[Job, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self.batches = 0  # how many commits were made (for tests and benchmarks)

    async def commit(self, job: Job) -> list[int]:
        """Queue a message (or ready copies) durably with whatever else is waiting.

        Returns the outbox ids of its copies; a ``Prepared`` message has its rows and copies
        filled in. On failure nothing of it stays queued and the error is raised.
        """
        if isinstance(job, list) and not job:
            return []
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((job, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="relay-group-commit")
        # shield: a session that goes away must not cancel the batch of the others.
        return await asyncio.shield(fut)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        queueing: asyncio.Task | None = None  # the previous batch's second stage
        while self._waiting or queueing is not None:
            if not self._waiting:
                await queueing
                queueing = None
                continue
            batch, self._waiting = self._waiting, []
            try:
                made = await loop.run_in_executor(self.executor, self._make, [j for j, _ in batch])
            except BaseException as exc:
                _fail(batch, exc)
                continue
            if queueing is not None:
                await queueing  # one batch in the second stage at a time, in order
            queueing = asyncio.create_task(self._queue(batch, made), name="relay-queue")

    async def _queue(self, batch: list[tuple[Job, asyncio.Future]], made: _Made) -> None:
        try:
            ids = await asyncio.get_running_loop().run_in_executor(
                self.queue_executor, self._enqueue, made
            )
        except BaseException as exc:
            _fail(batch, exc)
            return
        self.batches += 1
        for (_, fut), job_ids in zip(batch, ids, strict=True):
            if fut.done():
                continue
            if isinstance(job_ids, Exception):
                fut.set_exception(job_ids)
            else:
                fut.set_result(job_ids)

    def _make(self, jobs: list[Job]) -> _Made:
        """First stage: the batch's rows in one transaction, then its copies (committer
        thread). A message whose copies cannot be made (e.g. its ingest hand-off fails)
        fails alone; a failure of the shared steps fails the batch."""
        messages = [j for j in jobs if isinstance(j, submit.Prepared)]
        failed: dict[int, Exception] = {}
        try:
            if messages:
                with transaction(self.db):
                    for m in messages:
                        submit.record(self.db, m)
                remote = [
                    (j.plan, j.delivery_ids)
                    for j in messages
                    if isinstance(j.plan, prepare_process.PlanRef)
                ]
                rendered = iter(self.renderer(remote) if remote else [])
                for i, job in enumerate(jobs):
                    if isinstance(job, submit.Prepared):
                        copies = (
                            next(rendered)
                            if isinstance(job.plan, prepare_process.PlanRef)
                            else None
                        )
                        try:
                            submit.render(self.settings, self.db, job, copies)
                        except Exception as exc:
                            log.warning("relay: could not queue a message: %s", exc)
                            failed[i] = exc
                            submit.discard(self.db, job)
        except BaseException:
            if self.db.conn.in_transaction:  # a failed COMMIT can leave it open
                self.db.conn.rollback()
            for m in messages:
                submit.discard(self.db, m)
            raise
        per_job = [
            [] if i in failed else (j.copies if isinstance(j, submit.Prepared) else j)
            for i, j in enumerate(jobs)
        ]
        return _Made(messages, per_job, failed)

    def _enqueue(self, made: _Made) -> list[list[int] | Exception]:
        """Second stage: one spool file, one directory fsync, one durable commit of the
        outbox rows (queue thread); if that fails, the batch's rows go too."""
        copies = [c for cs in made.per_job for c in cs]
        try:
            ids = outbox.enqueue_copies(self.settings, self.queue_db, copies)
        except BaseException:
            if self.queue_db.conn.in_transaction:
                self.queue_db.conn.rollback()
            for m in made.messages:
                submit.discard(self.queue_db, m)
            raise
        out: list[list[int] | Exception] = []
        n = 0
        for i, cs in enumerate(made.per_job):
            out.append(made.failed[i] if i in made.failed else ids[n : n + len(cs)])
            n += len(cs)
        return out

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.queue_executor.shutdown(wait=True)
        self.db.close()
        self.queue_db.close()


@dataclass
class _Made:
    """A batch between the two stages: its messages, each job's copies, who failed."""

    messages: list[submit.Prepared]
    per_job: list[list[outbox.Copy]]
    failed: dict[int, Exception]


def _fail(batch: list[tuple[Job, asyncio.Future]], exc: BaseException) -> None:
    """Every waiting session of a failed batch hears, whatever happened."""
    if not isinstance(exc, Exception):
        exc = RuntimeError(f"group commit interrupted: {exc!r}")
    log.warning("relay: could not queue %d message(s): %s", len(batch), exc)
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)
