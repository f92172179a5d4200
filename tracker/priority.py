"""The writer's CPU priority: spare CPU only while its backlog is short, its fair share once
the backlog grows.

Why: on a machine whose cores the HTTP side and its clients keep busy, each of the writer's
batches (tens of ms of CPU every ``GATHER_SECONDS``) took a core from them, and the
requests answered meanwhile waited two to three times as long (measured: p99 ~20 ms
against ~7 ms without the writer, in bursts that matched its batches). A niceness does not
prevent that; Linux's ``SCHED_IDLE`` does: a waking task treats a core that runs only
idle-policy tasks as free and takes it at once. So the writer thread runs ``SCHED_IDLE``
while few hits wait, and writes in the gaps the requests leave. A burst of hits is
answered first and written a moment later.

A writer that only gets spare CPU must not fall behind for ever: past ``HURRY_ABOVE`` hits
waiting (answered, not yet written; counted by the HTTP side, which sends the figure with
every frame) it goes back to the ordinary policy at its niceness, competing for CPU as it
did before, until the backlog is down to ``CALM_BELOW``. The HTTP side's back-pressure
(responses wait for their commit past ``BACKLOG_LIMIT``) stays the last resort.

``HURRY_ABOVE`` is near that limit, not below it by half: a writer competing for CPU is what
slows the requests, so it competes only when back-pressure is near. With the bench's bursts
of 20,000 hits at ~10,000/s, a hurry threshold at half the limit was crossed in most runs
and set the p99 (median of four runs: 17.0 ms against 8.6 for bare aiohttp in the same run);
at nine tenths it was not (13.1 against 8.9), and the hits left waiting at the end of a burst
(5,000-15,000) are written in well under a second once the requests stop.

Leaving ``SCHED_IDLE`` needs ``CAP_SYS_NICE`` or an ``RLIMIT_NICE`` that allows the
writer's niceness: a probe thread tries the round trip first, and where it is refused the
writer keeps its niceness alone (as before), never the idle policy it could not leave.
"""

from __future__ import annotations

import os
import threading

from tracker.writer import BACKLOG_LIMIT

HURRY_ABOVE = BACKLOG_LIMIT * 9 // 10  # hits waiting beyond which the writer competes for CPU
CALM_BELOW = BACKLOG_LIMIT // 10  # hits waiting below which it takes spare CPU only


def _set(tid: int, idle: bool) -> None:
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    os.sched_setscheduler(tid, policy, os.sched_param(0))


def can_leave_idle() -> bool:
    """Whether a thread of this process may go to ``SCHED_IDLE`` and come back (tried in a
    throwaway thread: scheduling policies are per thread on Linux)."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    result: list[bool] = []

    def probe() -> None:
        tid = threading.get_native_id()
        try:
            _set(tid, True)
            _set(tid, False)
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, name="sched-probe")
    t.start()
    t.join()
    return result == [True]


class WriterPriority:
    """Switches one thread (the writer's) between ``SCHED_IDLE`` and the ordinary policy by
    the backlog it is told of, with hysteresis."""

    def __init__(
        self, tid: int, hurry_above: int = HURRY_ABOVE, calm_below: int = CALM_BELOW
    ) -> None:
        self.tid = tid
        self.hurry_above = hurry_above
        self.calm_below = calm_below
        self.enabled = can_leave_idle()
        self.idle = False
        self.switches = 0
        if self.enabled:
            self._switch(True)

    def follow(self, pending: int) -> None:
        """The backlog now: hurry past ``hurry_above``, calm down below ``calm_below``."""
        if not self.enabled:
            return
        if self.idle and pending > self.hurry_above:
            self._switch(False)
        elif not self.idle and pending < self.calm_below:
            self._switch(True)

    def hurry(self) -> None:
        """Ordinary policy from now on, whatever the backlog (the tracker is stopping: what
        is queued is written before the process ends, which must not wait for spare CPU)."""
        if self.enabled and self.idle:
            self._switch(False)
        self.enabled = False

    def _switch(self, idle: bool) -> None:
        try:
            _set(self.tid, idle)
        except OSError:  # the thread is gone (closing), or the policy was refused
            self.enabled = False
            return
        self.idle = idle
        self.switches += 1
