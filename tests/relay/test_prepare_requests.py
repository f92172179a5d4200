"""The prepare worker's request reading (``relay.prepare_process._Requests``): renders go
before prepares already waiting, each kind in its order, and its pipes are widened."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pickle

from relay import prepare_process

_F_GETPIPE_SZ = 1032


def _frame(request) -> bytes:
    data = pickle.dumps(request)
    return len(data).to_bytes(8, "big") + data


def test_renders_waiting_in_the_pipe_go_before_prepares_that_came_first():
    r, w = os.pipe()
    try:
        for request in [
            (1, "prepare", ("a",)),
            (2, "prepare", ("b",)),
            (3, "render", ([],)),
            (4, "prepare", ("c",)),
            (5, "render", ([],)),
        ]:
            os.write(w, _frame(request))
        os.close(w)
        w = -1
        requests = prepare_process._Requests(r)
        order = []
        while (request := requests.next()) is not None:
            order.append(request[0])
        assert order == [3, 5, 1, 2, 4]
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_a_request_split_across_reads_is_put_together():
    r, w = os.pipe()
    try:
        frame = _frame((7, "prepare", (b"x" * 100_000,)))
        requests = prepare_process._Requests(r)
        os.write(w, frame[:5])
        assert requests.renders == requests.others == []
        requests._drain()  # half a length prefix: nothing yet
        assert requests.others == []
        os.write(w, frame[5:40_000])
        requests._drain()
        assert requests.others == []
        os.write(w, frame[40_000:])
        os.close(w)
        w = -1
        n, op, (data,) = requests.next()
        assert (n, op, len(data)) == (7, "prepare", 100_000)
        assert requests.next() is None
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


async def test_the_worker_pipes_hold_a_whole_message(settings):
    """The default 64 KB held less than one 60 KB message with its envelope, so every
    request and reply waited for the other side to read."""
    preparer = prepare_process.PrepareProcess(settings)
    try:
        await preparer.start()
        proc = preparer._workers[0].proc
        for f in (proc.stdin, proc.stdout):
            assert fcntl.fcntl(f.fileno(), _F_GETPIPE_SZ) >= prepare_process.PIPE_SIZE
    finally:
        await asyncio.to_thread(preparer.close)
