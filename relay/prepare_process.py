"""Checking, planning and rendering each message's rewrite in a process of its own.

Why: the relay's accept path is one process under one GIL, and analysing, planning and
rendering the tracked copies (``relay.rewrite``) was about two thirds of its CPU per
message; with the SMTP sessions, the group commit and the delivery worker on the same
GIL, that capped accepting well below what the machine can do. Here they run in
``WORKERS`` worker processes of our own (:class:`_Worker`: ``python -c`` from a fresh
interpreter, since the relay's process has threads and is never forked; a pipe each way).

What crosses the pipe: to the worker the message and its envelope; back a
``submit.Prepared`` whose rewrite plan stays in the worker (plans are not picklable and
are rendered there anyway) and is named by a :class:`PlanRef` that carries what the
parent needs of it (the tracked links it records). After the parent has recorded the rows
and knows the delivery ids, :meth:`PrepareProcess.render` has the worker render each
message's copies and drop its plan. Plans whose render never comes (a batch that failed
first) are dropped oldest first past ``MAX_PLANS``; a render that finds its plan gone
fails open, as any rendering error does (the original goes out, the error is recorded).

If the worker dies (OOM killer), a message being prepared is prepared again by a new
worker (a second death is a 451), and a render whose plan died with it fails open.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import pickle
import queue
import select
import subprocess
import sys
import threading
from collections import OrderedDict
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path

import config

MAX_PLANS = 4096  # plans kept for renders still to come (a batch is far smaller)
# Pipe capacity (Linux F_SETPIPE_SZ; the default 64 KB holds less than one 60 KB message
# with its envelope): with the default, every request and reply blocked its writer until
# the other side had read, and each wake-up of the parent's reader thread waited for the
# GIL (up to 5 ms) -- per 64 KB. 1 MiB is Linux's default limit for unprivileged users.
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031
WORKERS = 1  # two cost more CPU in all than they won on two cores (relay bench, 19:35)
ROOT = Path(__file__).resolve().parent.parent  # where ``relay`` is imported from
# Signals are ignored before anything is imported: the relay stops its workers by closing
# their pipe, and a SIGINT/SIGTERM sent to the whole process group (Ctrl-C, a service
# manager) must not kill one half-way or make the relay start it again while it stops.
_CHILD = (
    "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "from relay.{0} import main; main()"
)


def child_env() -> dict[str, str]:
    """The environment for a worker child (``python -c``): ours, with ``relay`` importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


class WorkerGone(Exception):
    """The prepare worker exited before it answered."""


@dataclass
class PlanRef:
    """A rewrite plan that stays in the worker process: its key and its tracked links."""

    key: int
    tracked_links: list
    worker: int = 0  # serial of the worker process that holds it (set by the parent)


_serials = itertools.count(1)


class _Worker:
    """One worker process, the thread that writes its requests and the one that reads its
    replies (the event loop never blocks on a full pipe, and a reply being read never
    waits for a request being written)."""

    def __init__(self, settings: config.Settings) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD.format("prepare_process")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        widen_pipe(self.proc.stdin.fileno())
        widen_pipe(self.proc.stdout.fileno())
        self.lock = threading.Lock()  # guards ``waiting`` and ``alive``
        self.waiting: dict[int, Future] = {}
        self.ids = itertools.count(1)
        self.serial = next(_serials)
        self.alive = True
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.requests.put(settings)
        self.writer = threading.Thread(target=self._write, name="relay-prepare-w", daemon=True)
        self.reader = threading.Thread(target=self._read, name="relay-prepare-r", daemon=True)
        self.writer.start()
        self.reader.start()

    def call(self, op: str, *args) -> Future:
        fut: Future = Future()
        # Running: a caller that gives up (a session cancelled mid-DATA cancels the asyncio
        # side) cannot cancel it, so the reader can always set the reply that comes.
        fut.set_running_or_notify_cancel()
        with self.lock:
            if not self.alive:
                fut.set_exception(WorkerGone("the prepare worker exited"))
                return fut
            n = next(self.ids)
            self.waiting[n] = fut
        self.requests.put((n, op, args))
        return fut

    def _write(self) -> None:
        stdin = self.proc.stdin
        while (item := self.requests.get()) is not None:
            try:
                _send(stdin.fileno(), item)
            except OSError:  # the worker is gone: the reader fails what is waiting
                break
        try:
            stdin.close()
        except OSError:
            pass

    def _read(self) -> None:
        out = self.proc.stdout.fileno()
        while True:
            try:
                n, ok, value = _receive(out)
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            with self.lock:
                fut = self.waiting.pop(n, None)
            if fut is not None and not fut.done():
                with contextlib.suppress(InvalidStateError):  # never let the reader die
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(value)
        with self.lock:
            self.alive = False
            waiting, self.waiting = self.waiting, {}
        for fut in waiting.values():
            fut.set_exception(WorkerGone("the prepare worker exited"))

    def close(self) -> None:
        self.requests.put(None)  # EOF once what is queued is written
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.writer.join(5)
        self.reader.join(5)


class PrepareProcess:
    """Parent side: ``prepare`` from the event loop, ``render`` from the committer thread.

    ``WORKERS`` processes; each message goes to the one with the fewest requests waiting,
    and its render to the one that holds its plan.
    """

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self._workers: list[_Worker | None] = [None] * WORKERS
        self._lock = threading.Lock()

    def _get(self, i: int) -> _Worker:
        with self._lock:
            worker = self._workers[i]
            if worker is None or not worker.alive:
                if worker is not None:
                    worker.proc.wait()
                worker = self._workers[i] = _Worker(self.settings)
            return worker

    def _serving(self, serial: int) -> _Worker | None:
        with self._lock:
            for worker in self._workers:
                if worker is not None and worker.serial == serial and worker.alive:
                    return worker
        return None

    async def start(self) -> None:
        """Start the workers now rather than on the first message (imports take a while)."""
        await asyncio.gather(
            *(asyncio.wrap_future(self._get(i).call("ready")) for i in range(WORKERS))
        )

    async def prepare(self, user: dict, mail_from: str, rcpts: list[str], data: bytes):
        """``submit.prepare`` in a worker (raises ``submit.Refused`` as it does).

        Preparing only reads, so a message whose worker died under it is prepared once more
        by a new worker (a worker can die between two messages unnoticed until the reply
        is missing); a second death is the caller's 451.
        """
        try:
            return await self._prepare_once(user, mail_from, rcpts, data)
        except WorkerGone:
            return await self._prepare_once(user, mail_from, rcpts, data)

    async def _prepare_once(self, user: dict, mail_from: str, rcpts: list[str], data: bytes):
        with self._lock:
            loads = [len(w.waiting) if w is not None else 0 for w in self._workers]
        worker = self._get(loads.index(min(loads)))
        prepared = await asyncio.wrap_future(worker.call("prepare", user, mail_from, rcpts, data))
        if prepared.data is None:  # the worker left the message as it came (see _prepare)
            prepared.data = data
        if isinstance(prepared.plan, PlanRef):
            prepared.plan.worker = worker.serial
        return prepared

    def render(self, jobs: list[tuple[PlanRef, list[int]]]) -> list[list[bytes] | Exception]:
        """Copies of each (plan, delivery ids), one entry per job (blocking: called from the
        committer thread). An exception in place of copies means: send the original."""
        by_worker: dict[int, list[int]] = {}
        for n, (ref, _) in enumerate(jobs):
            by_worker.setdefault(ref.worker, []).append(n)
        out: list[list[bytes] | Exception] = [WorkerGone("the prepare worker exited")] * len(jobs)
        calls = []
        for serial, ns in by_worker.items():
            worker = self._serving(serial)
            if worker is not None:
                keys = [(jobs[n][0].key, jobs[n][1]) for n in ns]
                calls.append((ns, worker.call("render", keys)))
        for ns, fut in calls:  # the workers render at the same time
            try:
                for n, copies in zip(ns, fut.result(), strict=True):
                    out[n] = copies
            except WorkerGone:
                pass
        return out

    def close(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, [None] * WORKERS
        for worker in workers:
            if worker is not None:
                worker.close()


def widen_pipe(fd: int) -> None:
    """Give a pipe ``PIPE_SIZE`` of buffer where the system allows (else keep its own)."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)


def _send(fd: int, obj) -> None:
    """One length-prefixed pickle, written whole with ``os.write`` (no buffered layer)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(len(data).to_bytes(8, "big") + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _receive(fd: int):
    size = int.from_bytes(_read_exactly(fd, 8), "big")
    return pickle.loads(_read_exactly(fd, size))


# ---------------------------------------------------------------------- in the worker

_settings: config.Settings | None = None
_db = None
_plans: OrderedDict[int, object] = OrderedDict()
_keys = itertools.count(1)


def main() -> None:
    """The worker (``python -c``): settings, then requests until EOF on stdin."""

    import store
    from relay import submit  # noqa: F401 (imported now, not on the first message)

    global _settings, _db
    stdin, stdout = 0, os.dup(1)
    os.dup2(2, 1)  # stray prints (Python or C) go to stderr, never into the replies
    sys.stdout = sys.stderr
    try:
        _settings = _receive(stdin)
    except EOFError:
        return
    _db = store.connect(_settings.db_path, migrate=False)
    ops = {"ready": lambda: True, "prepare": _prepare, "render": _render}
    requests = _Requests(stdin)
    while (request := requests.next()) is not None:
        n, op, args = request
        try:
            reply = (n, True, ops[op](*args))
        except Exception as exc:
            reply = (n, False, _picklable(exc))
        try:
            _send(stdout, reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            _send(stdout, (n, False, RuntimeError(f"reply not picklable: {exc}")))


class _Requests:
    """The worker's requests, renders first.

    A render is what the group committer (and so every message of its batch) is waiting
    for, while a prepare is one session's next step: served in arrival order, a render
    queued behind the prepares of the messages that arrived meanwhile, and the committer's
    batches took three to four times the CPU they needed in wall time (relay bench: 16 ms
    for ~4 ms of rendering). So every request already in the pipe is read (non-blocking)
    before the next one is chosen, and renders go first; each kind keeps its order.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.buf = bytearray()
        self.renders: list = []
        self.others: list = []
        self.eof = False

    def next(self):
        """The next request (a render if any is waiting), or None at EOF once all are done."""
        while True:
            self._drain()
            if self.renders:
                return self.renders.pop(0)
            if self.others:
                return self.others.pop(0)
            if self.eof:
                return None
            select.select([self.fd], [], [])

    def _drain(self) -> None:
        while not self.eof:
            try:
                chunk = os.read(self.fd, PIPE_SIZE)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
            self.buf += chunk
        while len(self.buf) >= 8:
            size = int.from_bytes(self.buf[:8], "big")
            if len(self.buf) < 8 + size:
                break
            # Unpickled from a view: a slice and a bytes() of it were two copies of each
            # message (60 KB in the bench) before the unpickler made its own.
            with memoryview(self.buf) as view, view[8 : 8 + size] as body:
                request = pickle.loads(body)
            del self.buf[: 8 + size]
            (self.renders if request[1] == "render" else self.others).append(request)


def _prepare(user: dict, mail_from: str, rcpts: list[str], data: bytes):
    from relay import submit

    prepared = submit.prepare(_settings, _db, user, mail_from, rcpts, data)
    if prepared.data == data:  # no header removed or added: the parent has these bytes
        prepared.data = None
    if prepared.plan is not None:
        key = next(_keys)
        _plans[key] = prepared.plan
        while len(_plans) > MAX_PLANS:
            _plans.popitem(last=False)
        prepared.plan = PlanRef(key, list(prepared.plan.tracked_links))
    return prepared


def _render(jobs: list[tuple[int, list[int]]]) -> list[list[bytes] | Exception]:
    from relay import submit

    out: list[list[bytes] | Exception] = []
    for key, delivery_ids in jobs:
        plan = _plans.pop(key, None)
        if plan is None:
            out.append(LookupError("rewrite plan gone (evicted)"))
            continue
        try:
            out.append(submit.render_copies(_settings, plan, delivery_ids))
        except Exception as exc:  # fail open, as in-process rendering does
            out.append(_picklable(exc))
    return out


def _picklable(exc: Exception) -> Exception:
    """``exc`` if it survives the trip to the parent, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
