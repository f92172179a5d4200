"""The delivery worker runs in a process of its own (``relay.delivery_process``): it delivers
while the relay runs, stops with it, and never runs twice on one queue."""

from __future__ import annotations

import asyncio
import fcntl
import os

import store
from relay import delivery_process
from tests.relay.conftest import html_message, running_relay, submit_all
from tests.support import wait_for


async def submit(settings, rcpt: str = "carol@client.test") -> None:
    mail = (rcpt, html_message("<p>hi</p>", to=rcpt))
    await asyncio.to_thread(submit_all, settings, [mail])


async def test_delivers_from_a_child_process_that_ends_with_the_relay(settings, alice, upstream):
    settings.relay.upstream_starttls = False
    async with running_relay(settings) as svc:
        child = svc.worker.proc
        assert child.pid != os.getpid() and child.returncode is None
        await submit(settings)
        await wait_for(lambda: len(upstream.messages) == 1, timeout=30)
    assert child.returncode == 0  # stopped on EOF, cleanly


async def test_a_second_worker_waits_until_the_first_lets_go_of_the_queue(
    settings, alice, upstream
):
    """A relay restarted while the old worker still finishes a send must not start a second
    worker on the same rows: the new child waits for the lock the old one holds."""
    from relay import service

    settings.relay.upstream_starttls = False
    fd = os.open(settings.data_dir / delivery_process.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # stands in for a worker that is still running
    svc = await service.start(settings)
    try:
        await submit(settings)
        await asyncio.sleep(2.0)  # the worker walks the queue at least once a second
        assert upstream.messages == []  # accepted and queued, but nobody delivers yet
        os.close(fd)  # the old worker exits
        fd = -1
        await wait_for(lambda: len(upstream.messages) == 1, timeout=30)
    finally:
        if fd >= 0:
            os.close(fd)
        await svc.stop()


async def test_the_relay_starts_the_worker_again_when_it_dies(settings, alice, upstream):
    settings.relay.upstream_starttls = False
    async with running_relay(settings) as svc:
        first = svc.worker.proc
        first.kill()
        await first.wait()
        await wait_for(lambda: svc.worker.proc is not first, timeout=10)
        await submit(settings)
        await wait_for(lambda: len(upstream.messages) == 1, timeout=30)


async def test_rewriting_runs_in_a_worker_process_that_is_replaced_when_it_dies(
    settings, alice, upstream
):
    """Plans and renders happen in ``relay.prepare_process``; a dead worker costs the
    messages under way a 451 at most, and the next message gets a new worker."""
    settings.relay.upstream_starttls = False
    async with running_relay(settings) as svc:
        preparer = svc.handler.preparer
        first = [w.proc for w in preparer._workers]
        assert all(p.pid != os.getpid() and p.poll() is None for p in first)
        await submit(settings, "carol@client.test")
        for p in first:
            p.kill()
            await asyncio.to_thread(p.wait)
        await submit(settings, "dave@client.test")
        now = {w.proc.pid for w in preparer._workers if w is not None and w.alive}
        assert now and not now & {p.pid for p in first}
        await wait_for(lambda: len(upstream.messages) == 2, timeout=30)
    assert preparer._workers == [None] * len(first)
    for _, _, data in upstream.messages:  # both copies were rewritten (tracked)
        assert b"https://t.example/" in data


async def test_a_render_whose_plan_is_gone_fails_open(settings):
    from relay import prepare_process

    preparer = prepare_process.PrepareProcess(settings)
    try:
        await preparer.start()
        (out,) = await asyncio.to_thread(
            preparer.render,
            [(prepare_process.PlanRef(10**9, [], preparer._workers[0].serial), [1])],
        )
    finally:
        await asyncio.to_thread(preparer.close)
    assert isinstance(out, LookupError)


async def test_a_prepare_given_up_half_way_does_not_stop_the_next_ones(settings, alice):
    """A session that goes away while its message is being prepared (aiosmtpd cancels its
    handler) must not leave the worker's reply unread: the pipe would fill and every later
    message would hang."""
    from relay import prepare_process
    from store import users

    user = users.find_user(store.connect(settings.db_path), "alice@corp.test")
    data = html_message("<p>" + "x" * 200_000 + '<a href="https://e.test/">a</a></p>')
    preparer = prepare_process.PrepareProcess(settings)
    try:
        await preparer.start()
        for _ in range(3):
            task = asyncio.create_task(
                preparer.prepare(user, "alice@corp.test", ["carol@client.test"], data)
            )
            await asyncio.sleep(0)
            task.cancel()
        for _ in range(3):  # 3 x 200 KB more through the same pipe
            async with asyncio.timeout(30):
                got = await preparer.prepare(user, "alice@corp.test", ["carol@client.test"], data)
            assert got.result.external == ["carol@client.test"]
    finally:
        await asyncio.to_thread(preparer.close)


async def test_a_message_whose_worker_dies_under_it_is_prepared_by_a_new_one(settings, alice):
    """The worker holds the request (stopped), then dies: the message is prepared again by
    a new worker instead of costing its client a 451."""
    import signal

    from relay import prepare_process
    from store import users

    user = users.find_user(store.connect(settings.db_path), "alice@corp.test")
    data = html_message('<p><a href="https://e.test/">a</a></p>')
    preparer = prepare_process.PrepareProcess(settings)
    try:
        await preparer.start()
        first = preparer._workers[0].proc
        first.send_signal(signal.SIGSTOP)
        task = asyncio.create_task(
            preparer.prepare(user, "alice@corp.test", ["carol@client.test"], data)
        )
        await wait_for(lambda: preparer._workers[0].waiting, timeout=10)
        first.kill()
        async with asyncio.timeout(30):
            got = await task
        assert got.result.external == ["carol@client.test"]
        assert preparer._workers[0].proc.pid != first.pid
    finally:
        await asyncio.to_thread(preparer.close)


async def test_requests_and_replies_survive_the_worker_being_stopped_and_continued(settings, alice):
    """SIGSTOP/SIGCONT (a debugger, a profiler, a loaded machine's scheduler) interrupts
    the pipe reads and writes half way; every reply must still arrive whole."""
    import random
    import signal

    from relay import prepare_process
    from store import users

    user = users.find_user(store.connect(settings.db_path), "alice@corp.test")
    links = "".join(
        f'<p>{"y " * 400}\r\n<a href="https://e.test/{i}">l</a></p>\r\n' for i in range(40)
    )
    data = html_message(links)
    preparer = prepare_process.PrepareProcess(settings)
    await preparer.start()
    pids = [w.proc.pid for w in preparer._workers]
    done = asyncio.Event()

    async def pause() -> None:
        rng = random.Random(7)
        while not done.is_set():
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(rng.uniform(0, 0.01))
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(rng.uniform(0, 0.01))

    async def session() -> None:
        for _ in range(15):
            got = await preparer.prepare(user, "alice@corp.test", ["c@client.test"], data)
            (copies,) = await asyncio.to_thread(preparer.render, [(got.plan, [1])])
            assert isinstance(copies, list) and b"https://t.example/" in copies[0]

    pauser = asyncio.create_task(pause())
    try:
        async with asyncio.timeout(120):
            await asyncio.gather(*(session() for _ in range(8)))
    finally:
        done.set()
        await pauser
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        await asyncio.to_thread(preparer.close)


async def test_workers_leave_sigterm_to_the_relay(settings, alice, upstream):
    """A SIGTERM to the whole process group (a service manager stopping mailtally) reaches
    the workers too: they keep going until the relay closes their pipes."""
    import signal

    settings.relay.upstream_starttls = False
    async with running_relay(settings) as svc:
        delivery = svc.worker.proc
        prepare = [w.proc for w in svc.handler.preparer._workers]
        for pid in [delivery.pid, *(p.pid for p in prepare)]:
            os.kill(pid, signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert delivery.returncode is None and all(p.poll() is None for p in prepare)
        await submit(settings)
        await wait_for(lambda: len(upstream.messages) == 1, timeout=30)
        assert svc.worker.proc is delivery
        assert [w.proc for w in svc.handler.preparer._workers] == prepare
    assert delivery.returncode == 0 and all(p.returncode == 0 for p in prepare)
