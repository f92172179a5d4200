"""The tracker's batch writer in a process of its own, fed by the HTTP process over a pipe.

Why: classifying hits and writing them (SQLite inserts, summary folds, the copies' reads)
cost the tracker more CPU than answering the requests, and in one process both ran under
one GIL: the writer's Python held up the event loop (p99) and the two could never use
more than one core between them. In a child process each has an interpreter of its own.

How the two talk (length-prefixed ``marshal`` frames, both ways; both ends are this code):

- parent -> child: first the pickled settings, then ``(feed_wanted, pending, [hit, ...])``
  with the hits queued during ``SEND_INTERVAL``, each a plain tuple in :class:`PendingHit`
  field order (``feed_wanted``: whether anyone follows the live feed, so the child builds
  notices only when they have a reader; ``pending``: hits answered and not yet written,
  by which the child sets its writer thread's CPU priority, :mod:`tracker.priority`).
- child -> parent: ``(hits written, webhooks queued, notices)`` after each batch is
  committed (or spooled). The parent counts what is still pending from it (``/healthz``,
  back-pressure), hands the notices to the live feed and wakes the webhook sender.

Lifetime: the child ignores SIGINT and SIGTERM (a signal to the whole process group must
not cut its queue short) and stops when its stdin reaches EOF: the tracker closed it after
its last request, or was SIGKILLed (the kernel closes the pipe), so no orphan is left. In
both cases it first writes everything it was given, as the in-process writer's ``close()``
does (spooling what the database refuses for ``close_timeout`` seconds). If the child dies
while the tracker runs (a bug, the OOM killer), the parent starts a new one and sends it
again every hit not yet acknowledged, so none is lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import marshal
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import config
from tracker.priority import WriterPriority
from tracker.writer import BACKLOG_LIMIT, Backlog, BatchWriter, PendingHit

log = logging.getLogger("mailtally.tracker")

ROOT = Path(__file__).resolve().parent.parent  # where ``tracker`` is imported from
RESPAWN_DELAY = 1.0  # seconds before a child that died on its own is started again
START_TIMEOUT = 60.0  # seconds the child may take to be ready (imports, migrations)
CLOSE_TIMEOUT = 30.0  # how long the child retries a locked database before spooling
GC_THRESHOLDS = (50_000, 20, 100)  # the child's cyclic collector (Python's: 700, 10, 10)
NICE = 5  # the child's scheduling niceness relative to the tracker
SEND_INTERVAL = 0.01  # seconds between frames of hits while hits keep coming
_LEN = 4


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(_LEN, "big") + payload


class WriterProcess(Backlog):
    """Parent side, in the tracker's event loop: the interface of :class:`BatchWriter`
    that the HTTP handlers use (``enqueue``, ``submit``, ``pending``, ``behind``,
    ``alive``), with the writing done by a child process."""

    def __init__(
        self,
        settings: config.Settings,
        publish: Callable[[list[dict], bool], None],
        feed_wanted: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.publish = publish
        self.feed_wanted = feed_wanted
        self.backlog_limit = BACKLOG_LIMIT
        self.queued = 0  # hits handed to enqueue/submit
        self.written = 0  # hits the child acknowledged (written or spooled)
        self.proc: asyncio.subprocess.Process | None = None
        self._buffer: list[tuple] = []  # hits of this turn of the event loop
        self._unacked: collections.deque[tuple] = collections.deque()  # sent, not written
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        self._stopping = False
        self._reader: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self.cpu_seconds_of_exited = 0.0  # CPU of children that have ended (for benches)

    # --- lifetime --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the child and wait until it is ready (its signals ignored, its spool
        queued): a tracker that answers has a writer that a group signal does not stop."""
        self._loop = asyncio.get_running_loop()
        await self._spawn()
        waiting = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait(
            [waiting, self._reader], timeout=START_TIMEOUT, return_when="FIRST_COMPLETED"
        )
        if not self._ready.is_set():
            waiting.cancel()
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            raise RuntimeError("tracker: the writer process did not start")
        self._watch = asyncio.create_task(self._watcher(), name="tracker-writer-process")

    async def _spawn(self) -> None:
        self._ready = asyncio.Event()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            # Signals ignored before the imports: a group SIGTERM at start must not kill it.
            "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "from tracker.writer_process import main; main()",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        payload = pickle.dumps((self.settings, logging.getLogger().getEffectiveLevel()))
        self.proc.stdin.write(_frame(payload))
        if self._unacked:  # a child that died before writing these: the new one does
            hits = list(self._unacked)
            self.proc.stdin.write(_frame(marshal.dumps((self.feed_wanted(), self.pending, hits))))
        self._reader = asyncio.create_task(self._read_acks(self.proc), name="tracker-writer-acks")

    async def _watcher(self) -> None:
        """Start the child again if it ends while the tracker runs."""
        while not self._stopping:
            proc = self.proc
            await proc.wait()
            if self._reader is not None:
                await self._reader
            if self._stopping:
                return
            log.error(
                "tracker: the writer process ended (exit %s); starting a new one", proc.returncode
            )
            await asyncio.sleep(RESPAWN_DELAY)
            if not self._stopping:
                await self._spawn()

    async def close(self) -> None:
        """Send what is buffered, close the child's stdin, and wait until it has written
        everything and exited."""
        self._stopping = True
        self._send()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ConnectionError):
                proc.stdin.close()
            await proc.wait()
        if self._reader is not None:
            await self._reader
        if self._watch is not None:
            await self._watch
        for _, fut in self._waiting:
            if not fut.done():
                fut.set_result(None)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    # --- producer side ---------------------------------------------------------------------

    def enqueue(self, hit: tuple) -> None:
        """Queue a hit (a tuple in :class:`PendingHit` field order) without waiting."""
        self.queued += 1
        if not self._buffer:
            # One frame per SEND_INTERVAL, not per turn of the event loop: each write to the
            # pipe wakes the child, and those wake-ups cost more than the hits they carry.
            self._loop.call_later(SEND_INTERVAL, self._send)
        self._buffer.append(hit)

    def submit(self, hit: tuple) -> asyncio.Future:
        """Queue a hit; the future completes once the child has written it."""
        self.enqueue(hit)
        fut = self._loop.create_future()
        self._waiting.append((self.queued, fut))
        return fut

    def _send(self) -> None:
        """One frame with the hits queued since the last."""
        hits, self._buffer = self._buffer, []
        if not hits:
            return
        self._unacked.extend(hits)
        proc = self.proc
        if proc is None or proc.returncode is not None or proc.stdin.is_closing():
            return  # kept in _unacked: the next child gets them
        proc.stdin.write(_frame(marshal.dumps((self.feed_wanted(), self.pending, hits))))

    # --- acknowledgements ------------------------------------------------------------------

    async def _read_acks(self, proc: asyncio.subprocess.Process) -> None:
        reader = proc.stdout
        while True:
            try:
                size = int.from_bytes(await reader.readexactly(_LEN), "big")
                written, webhooks, notices = marshal.loads(await reader.readexactly(size))
            except asyncio.IncompleteReadError:
                return
            self._ready.set()  # the child's first frame says it is ready
            self.written += written
            unacked = self._unacked
            for _ in range(min(written, len(unacked))):
                unacked.popleft()
            waiting = self._waiting
            while waiting and waiting[0][0] <= self.written:
                fut = waiting.popleft()[1]
                if not fut.done():
                    fut.set_result(None)
            if notices or webhooks:
                try:
                    self.publish(notices, webhooks)
                except Exception:  # the live feed must never stop the acknowledgements
                    log.exception("tracker: publishing notices failed")


# --- child ------------------------------------------------------------------------------------


def _read_frame(stream) -> bytes | None:
    head = stream.read(_LEN)
    if len(head) < _LEN:
        return None
    size = int.from_bytes(head, "big")
    body = stream.read(size)
    return body if len(body) == size else None


def main() -> None:
    """The child: read hits from stdin until EOF, write them, acknowledge on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stdin, out = sys.stdin.buffer, sys.stdout.buffer.fileno()
    first = _read_frame(stdin)
    if first is None:
        return
    settings, level = pickle.loads(first)
    # Answers first: when the cores are all busy, the scheduler should run the HTTP side
    # (whose clients wait) before this process (whose work waits in a queue, and whose
    # batches only grow cheaper per hit when it falls a little behind).
    with contextlib.suppress(OSError):
        os.nice(NICE)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tracker.service import build_rules

    feed = threading.Event()
    lock = threading.Lock()
    replayed: list[int] = []

    def committed(written: int, notices: list[dict], webhooks: bool) -> None:
        # Hits replayed from the spool at start were never counted by this parent.
        if not replayed:
            replayed.append(writer.replayed)
        skip = min(replayed[0], written)
        replayed[0] -= skip
        data = _frame(marshal.dumps((written - skip, webhooks, notices if feed.is_set() else [])))
        with lock:
            try:
                while data:
                    data = data[os.write(out, data) :]
            except OSError:  # the tracker is gone: keep writing what is queued all the same
                pass

    writer = BatchWriter(settings, build_rules(settings), None, feed.is_set, committed)
    # The writer keeps many objects for long (30 s of hits per copy) and makes a few dicts
    # per hit that die young, without cycles: the default collector thresholds had it walk
    # everything often (~5 us per hit measured). Collect rarely; what is loaded now, never.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    writer.start()
    # Spare CPU only while the backlog is short (tracker.priority); this thread, which
    # reads the frames and so learns the backlog, keeps the ordinary policy.
    priority = WriterPriority(writer.native_id)
    committed(0, [], False)  # ready
    while True:
        frame = _read_frame(stdin)
        if frame is None:
            break
        wanted, pending, hits = marshal.loads(frame)
        priority.follow(pending)
        if wanted:
            feed.set()
        else:
            feed.clear()
        writer.enqueue_many([PendingHit(*h) for h in hits])
    priority.hurry()
    writer.close(CLOSE_TIMEOUT)
