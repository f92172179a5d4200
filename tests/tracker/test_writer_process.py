"""The writer process (tracker.writer_process): it goes when the tracker goes, even by
SIGKILL, after writing what it was given; if it dies while the tracker runs, a new one
writes every hit the old one had not acknowledged."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp

from store import events as store_events
from tests.support import alive, child_pids, hold_lock, wait_for
from tests.tracker.test_process import CHROME, start_tracker
from tracker import tokens


async def hit_all(urls: list[str]) -> None:
    async with aiohttp.ClientSession() as s:
        for url in urls:
            async with s.get(url, headers={"User-Agent": CHROME}) as r:
                await r.read()
                assert r.status == 200


async def test_sigkilled_tracker_leaves_no_writer_behind_and_its_hits_written(settings, sent, db):
    made = sent(recipients=[f"r{i}@acme.example" for i in range(10)])
    signer = tokens.Signer(settings.tracker.secrets)
    proc = await start_tracker(settings)
    try:
        writers = child_pids(proc.pid)
        assert len(writers) == 1, writers
        urls = [tokens.open_url(settings.tracker.base_url, signer, d) for d in made["deliveries"]]
        # The database locked until after the kill: no hit can be written before it.
        locker = hold_lock(settings.db_path, 2.0)
        await hit_all(urls * 5)
        await asyncio.sleep(0.3)  # handed over (the tracker sends every 10 ms), unwritten
        assert store_events.count_hits(db) == 0
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        # The pipe is closed by the kernel: the writer writes what it has and exits.
        await wait_for(lambda: not alive(writers[0]), timeout=20)
        assert locker.wait(timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert store_events.count_hits(db) == 50


async def test_a_writer_that_dies_is_replaced_and_no_hit_is_lost(tracker, sent, db):
    svc, base, signer = tracker
    made = sent(recipients=[f"r{i}@acme.example" for i in range(10)])
    urls = [tokens.open_url(base, signer, d) for d in made["deliveries"]]
    await hit_all(urls)
    await wait_for(lambda: svc.writer.pending == 0)
    first = svc.writer.proc
    os.kill(first.pid, signal.SIGKILL)
    await first.wait()
    assert not svc.writer.alive
    await hit_all(urls * 3)  # answered while no writer runs: kept until one does
    assert svc.writer.pending == 30
    await wait_for(lambda: svc.writer.alive and svc.writer.proc is not first, timeout=20)
    await wait_for(lambda: svc.writer.pending == 0, timeout=20)
    assert store_events.count_hits(db) == 40
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/healthz") as r:
            assert r.status == 200


async def test_the_writer_ignores_sigterm_to_the_group_and_drains_at_eof(settings, sent, db):
    """systemd and a terminal's Ctrl-C signal the whole group: the writer must not stop
    before the tracker has handed it its last hits."""
    made = sent(recipients=[f"r{i}@acme.example" for i in range(10)])
    signer = tokens.Signer(settings.tracker.secrets)
    proc = await start_tracker(settings)
    try:
        (writer,) = child_pids(proc.pid)
        urls = [tokens.open_url(settings.tracker.base_url, signer, d) for d in made["deliveries"]]
        await hit_all(urls * 3)
        os.kill(writer, signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert alive(writer)
        await hit_all(urls)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert not alive(writer)
    assert store_events.count_hits(db) == 40
