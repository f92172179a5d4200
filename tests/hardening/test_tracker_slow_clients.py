"""2,000 slow or idle connections against `mailtally tracker` (started, as under systemd,
with a soft limit of 1,024 open files) do not stop a normal client getting its pixel and
redirect promptly: idle sockets, request lines and headers trickled a byte at a time."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import time

import pytest

from tests.hardening.test_http_hostile import raw_get
from tests.support import wait_healthy
from tests.tracker.conftest import db, sent, settings  # noqa: F401 (fixtures)
from tests.tracker.test_process import run_cli
from tracker import tokens

SLOW = 2000
TARGET = "https://pricing.example.com/plans?a=1&b=2#top"
SERVER_SOFT_LIMIT = 1024


def _systemd_like_limit() -> None:
    """In the tracker's process before exec: the soft limit most services start with."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_SOFT_LIMIT, hard))


@pytest.fixture
def many_files():
    """Room in this (the client) process for 2,000 sockets and more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = SLOW * 2 + 512
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} < {need}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def start_tracker(settings, stderr):  # noqa: F811
    proc = await run_cli(
        settings,
        "tracker",
        stdout=subprocess.DEVNULL,
        stderr=stderr,  # a file: a full pipe would stall the tracker, not the test
        preexec_fn=_systemd_like_limit,
    )
    return await wait_healthy(settings.tracker.base_url, proc)


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def get(port: int, path: str):
    """raw_get bounded as a whole (connecting included: a server that stopped accepting
    leaves connect() waiting for minutes)."""
    return await asyncio.wait_for(raw_get(port, path, timeout=5.0), 10)


async def test_two_thousand_slow_connections_do_not_stop_normal_clients(
    settings,  # noqa: F811
    sent,  # noqa: F811
    many_files,
    tmp_path,
):
    d = sent(links=[TARGET])["deliveries"][0]
    signer = tokens.Signer(settings.tracker.secrets)
    click = f"/c/{signer.click_token(d, 0, TARGET)}"
    pixel = f"/o/{signer.open_token(d)}.gif"
    port = int(settings.tracker.listen.rsplit(":", 1)[1])
    errors = tmp_path / "tracker.err"
    with open(errors, "wb") as fh:
        proc = await start_tracker(settings, fh)
    writers: list[asyncio.StreamWriter] = []
    try:
        for i in range(SLOW):
            _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            if i % 3 == 1:  # a request line, one byte at a time
                w.write(b"G")
            elif i % 3 == 2:  # a whole request line, then headers that never end
                w.write(f"GET {click} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".encode())
            writers.append(w)  # i % 3 == 0: idle, not a byte
        await asyncio.wait_for(asyncio.gather(*(w.drain() for w in writers)), 10)
        # The server holds (nearly) all of them: more than its inherited soft limit allows.
        held = 0
        for _ in range(200):
            held = open_files(proc.pid)
            if held >= SLOW:
                break
            await asyncio.sleep(0.05)
        assert held >= SLOW, held
        assert held > SERVER_SOFT_LIMIT

        trickle = iter(b"ET /o/x.gif HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100)
        for _ in range(5):
            for path, want in ((click, 302), (pixel, 200)):
                t0 = time.monotonic()
                status, headers, body = await get(port, path)
                elapsed = time.monotonic() - t0
                assert status == want
                if want == 302:
                    assert headers["location"] == TARGET
                else:
                    assert body.startswith(b"GIF89a") and len(body) == 43
                assert elapsed < 2.0, (path, elapsed)
            # every slow client sends one more byte while normal ones are served
            byte = bytes([next(trickle)])
            for i, w in enumerate(writers):
                if i % 3 == 1:
                    w.write(byte)
                elif i % 3 == 2:
                    w.write(b"a")
            await asyncio.wait_for(
                asyncio.gather(*(w.drain() for w in writers if not w.is_closing())), 10
            )
        status, _, _ = await get(port, "/healthz")
        assert status == 200
        assert proc.returncode is None
    finally:
        for w in writers:
            w.close()
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    stderr = errors.read_text(errors="replace")
    assert "Traceback" not in stderr, stderr[-2000:]
    assert "Too many open files" not in stderr, stderr[-2000:]
