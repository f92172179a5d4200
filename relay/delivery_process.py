"""The delivery worker in a process of its own, started and woken by the relay.

Why: the relay's accept path and the delivery worker are both CPU under one GIL; in one
process, choosing and sending copies took a third to a half of the time the accept path
needed. In a child process each has an interpreter of its own.

How the two talk: the parent writes the pickled settings to the child's stdin, then one
byte whenever a group commit queued something (coalesced: at most one write per turn of
the event loop). The child delivers exactly as the in-process :class:`relay.delivery.Worker`
does (same class); it also walks the queue every second, so a lost wake-up only delays.

Lifetime: the child stops when its stdin reaches EOF -- the relay stopped, or was
SIGKILLed (the kernel closes the pipe), so no orphan keeps delivering on its own. It
ignores SIGINT and SIGTERM (a signal to the whole process group is the relay's to act on). It then
finishes the sends under way (bounded by ``relay.upstream_timeout``) and commits their
outcomes before it exits.

One worker per queue: the child holds an exclusive ``flock`` on
``DATA_DIR/relay-delivery.lock`` while it delivers, and a new child waits for it first.
So a relay restarted at once after a crash never has two workers on the same rows: its
child starts only once the old child (still finishing a send) has committed and exited.
The lock goes with the process, whatever way it ends.

Priority: the child runs at ``nice`` +10. A client waits for its 250 while a queued copy
waits for nobody, so when both want the same core the accept path goes first. Queued mail
still drains: the scheduler never starves a niced process (at +10 it gets about a tenth of
a contended core, all of an idle one), and the relay's accept path can keep at most two
cores busy (its own process and the prepare worker, one GIL each): on a bigger machine the
rest is the worker's. During a burst on a small machine the queue grows and is worked off when
the burst ends; the copies are on disk meanwhile.

Crash recovery of spool names without a row (``relay.outbox.recover``) is done by the
parent before it listens, never by the child: the parent's committer writes names before
their rows, and a child scanning concurrently would queue them twice. An old child that
queues a delivery-failure report at that very moment may see its report queued twice; the
second finds its spool name gone and is marked failed (nothing is lost either way).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pickle
import sys
from pathlib import Path

import config
from relay.prepare_process import _CHILD, _receive, child_env

log = logging.getLogger("mailtally.relay.delivery")

LOCK_NAME = "relay-delivery.lock"
NICE = 10  # CPU priority below the accept path's (see "Priority" in the module docstring)
RESPAWN_DELAY = 1.0  # seconds before a child that died on its own is started again


class DeliveryProcess:
    """Parent side: start, wake and stop the delivery child (from the relay's event loop)."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task | None = None
        self._stopping = False
        self._wake_pending = False

    async def start(self) -> None:
        await self._spawn()
        self._watch = asyncio.create_task(self._watcher(), name="relay-delivery-process")

    async def _spawn(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD.format("delivery_process"),
            stdin=asyncio.subprocess.PIPE,
            env=child_env(),
        )
        payload = pickle.dumps((self.settings, logging.getLogger().getEffectiveLevel()))
        self.proc.stdin.write(len(payload).to_bytes(8, "big") + payload)
        self._wake_pending = False

    async def _watcher(self) -> None:
        """Start the child again if it ends while the relay runs (a bug or the OOM killer
        must not stop delivery until the next restart)."""
        while not self._stopping:
            code = await self.proc.wait()
            if self._stopping:
                return
            log.error("relay: delivery process exited (%s); starting it again", code)
            await asyncio.sleep(RESPAWN_DELAY)
            if not self._stopping:
                await self._spawn()

    def wake(self) -> None:
        """Something was queued: tell the child (one byte per turn of the loop at most)."""
        if self._wake_pending or self.proc is None:
            return
        self._wake_pending = True
        asyncio.get_running_loop().call_soon(self._send_wake)

    def _send_wake(self) -> None:
        self._wake_pending = False
        proc = self.proc
        if proc is None or proc.returncode is not None or proc.stdin.is_closing():
            return
        with contextlib.suppress(OSError):  # the child died: the watcher restarts it
            proc.stdin.write(b"w")

    async def stop(self) -> None:
        """EOF to the child; wait while it finishes its sends and commits, kill past that."""
        self._stopping = True
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            proc.stdin.close()
            try:
                async with asyncio.timeout(self.settings.relay.upstream_timeout + 30):
                    await proc.wait()
            except TimeoutError:
                log.error("relay: delivery process did not stop; killing it")
                proc.kill()
                await proc.wait()
        if self._watch is not None:
            await asyncio.gather(self._watch, return_exceptions=True)


# ---------------------------------------------------------------------- the child


def main() -> None:
    """Entry point of the child (``python -c``): settings from stdin, deliver until EOF."""
    try:
        settings, level = _receive(0)
    except EOFError:  # the relay closed the pipe before sending the settings
        return
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with contextlib.suppress(OSError):
        os.nice(NICE)
    asyncio.run(_serve(settings))


class _Pipe(asyncio.Protocol):
    """The parent's pipe: any byte is a wake-up, EOF means stop."""

    def __init__(self, on_wake, stopped: asyncio.Event) -> None:
        self.on_wake, self.stopped = on_wake, stopped

    def data_received(self, data: bytes) -> None:
        self.on_wake()

    def eof_received(self) -> bool:
        self.stopped.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.stopped.set()


async def _lock(path: Path, stopped: asyncio.Event) -> int | None:
    """Take the delivery lock (fd), waiting while an old worker finishes; None if told to
    stop first."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if not said:
                log.info("relay: waiting for the previous delivery process to finish")
                said = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                await stopped.wait()
        if stopped.is_set():
            os.close(fd)
            return None


async def _serve(settings: config.Settings) -> None:
    from relay import delivery

    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    worker: list[delivery.Worker] = []
    await loop.connect_read_pipe(
        lambda: _Pipe(lambda: worker and worker[0].wake(), stopped),
        os.fdopen(0, "rb", buffering=0),
    )
    fd = await _lock(settings.data_dir / LOCK_NAME, stopped)
    if fd is None:
        return
    try:
        w = delivery.Worker(settings)
        await w.start(recover=False)
        worker.append(w)
        w.wake()
        await stopped.wait()
        await w.stop()
    finally:
        os.close(fd)  # releases the lock
