"""Relay delivery: messages/s from a filled outbox into an aiosmtpd sink, against the same sink
fed directly by a client process, both measured in the same run.

The outbox is filled honestly: a client process submits N messages through the real relay
(AUTH, rewrite, fsynced spool) while its upstream is a closed port, so the copies wait in
the queue. The relay is stopped, the queue made due (what ``mailtally queue retry`` does) and
a fresh delivery worker started with the sink as upstream; the figure is N / (time until the
sink has counted N messages). The sink runs in its own process and accepts and discards.
The direct baseline sends the same 60 KB message N times to the same sink from a separate
client process over as many connections as the worker uses. Recipients cycle over RCPTS
addresses, so per-recipient ordering is exercised the way a sales team's mail would be.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import free_port, mail_file, row, spread

BENCH_USER, BENCH_PW = "bench@corp.example", "bench password 1"
RCPTS = 64

SINK = r"""
import asyncio, sys, time
from aiosmtpd.smtp import SMTP
port, expect = int(sys.argv[1]), int(sys.argv[2])
class Count:
    n = 0
    async def handle_DATA(self, server, session, envelope):
        self.n += 1
        if self.n == expect:
            print("done", time.monotonic(), flush=True)
        return "250 OK"
async def main():
    loop, handler = asyncio.get_running_loop(), Count()  # one counter for every connection
    await loop.create_server(lambda: SMTP(handler, hostname="sink.bench"), "127.0.0.1", port)
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # runs until the parent closes stdin
asyncio.run(main())
"""

FEED = r"""
import asyncio, sys, time, aiosmtplib
host, port, conc, total, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rcpts, user, pw = int(sys.argv[6]), sys.argv[7], sys.argv[8]
sender = user or "sender@bench.example"
data = open(path, "rb").read()
todo = list(range(total))
async def connect():
    c = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=60)
    await c.connect()
    if user:
        await c.login(user, pw)
    return c
async def send(c):
    while todo:
        i = todo.pop(0)
        await c.sendmail(sender, [f"r{i % rcpts}@dest.example"], data)
    await c.quit()
async def main():
    clients = await asyncio.gather(*(connect() for _ in range(conc)))
    print("start", time.monotonic(), flush=True)  # connected (and logged in): clock starts
    await asyncio.gather(*(send(c) for c in clients))
asyncio.run(main())
"""


class Sink:
    """The counting accept-and-discard sink in its own process."""

    def __init__(self, expect: int) -> None:
        self.port = free_port()
        self.expect = expect

    async def __aenter__(self) -> Sink:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SINK,
            str(self.port),
            str(self.expect),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert (await asyncio.wait_for(self.proc.stdout.readline(), 30)).strip() == b"ready"
        return self

    async def done(self, timeout: float) -> float:
        """time.monotonic() (system-wide clock) when the sink counted the last message."""
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        word, at = line.split()
        assert word == b"done", line
        return float(at)

    async def __aexit__(self, *exc) -> None:
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def feed(
    port: int, conc: int, total: int, path: str, user: str = "", pw: str = "", rcpts: int = RCPTS
) -> float:
    """Send ``total`` messages from a client process; returns when its clock started."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FEED,
        "127.0.0.1",
        str(port),
        str(conc),
        str(total),
        path,
        str(rcpts),
        user,
        pw,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    if proc.returncode:
        raise RuntimeError(f"feed client failed: {err.decode()[-800:]}")
    return float(out.split()[1])


async def direct(n: int, conc: int, path: str) -> float:
    """msgs/s of the client process straight into the sink."""
    async with Sink(n) as sink:
        start = await feed(sink.port, conc, n, path)
        return n / (await sink.done(120) - start)


async def through_outbox(n: int, path: str, rcpts: int = RCPTS) -> float:
    """msgs/s of the delivery worker emptying an outbox of n copies (to ``rcpts`` recipients
    in turn) into the sink."""
    import cli
    import store
    from relay import delivery, service
    from store import outbox as store_outbox
    from store import users

    tmp = Path(tempfile.mkdtemp(prefix="mailtally-bench-delivery-"))
    try:
        s = cli.initialise(tmp / "data")
        s.relay.listen = f"127.0.0.1:{free_port()}"
        s.relay.upstream = f"smtp://127.0.0.1:{free_port()}"  # closed: everything waits
        s.relay.upstream_starttls = False
        s.relay.retry_schedule = [3600]
        s.tracker.base_url = "https://t.example"
        db = store.connect(s.db_path)
        users.add_user(db, BENCH_USER, "Bench", BENCH_PW)
        svc = await service.start(s)
        try:
            await feed(int(s.relay.listen.split(":")[1]), 8, n, path, BENCH_USER, BENCH_PW, rcpts)
        finally:
            await svc.stop()
        queued = store_outbox.counts(db)
        assert sum(queued.get(k, 0) for k in store_outbox.ACTIVE) == n, queued
        store_outbox.retry_now(db)
        async with Sink(n) as sink:
            s.relay.upstream = f"smtp://127.0.0.1:{sink.port}"
            worker = delivery.Worker(s)
            start = time.monotonic()
            await worker.start()
            try:
                rate = n / (await sink.done(300) - start)
            finally:
                await worker.stop()
        db.close()
        return rate
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def measure(quick: bool) -> tuple[dict, dict, dict, int]:
    import config

    conc = config.RelaySettings().delivery_connections  # what the worker in through_outbox uses
    n = 300 if quick else 1000
    runs = 3 if quick else 5
    path = mail_file(1, BENCH_USER)
    base, relay, single = [], [], []
    try:
        for _ in range(runs):  # interleaved, so drifting load hits all alike
            base.append(await direct(n, conc, path))
            relay.append(await through_outbox(n, path))
            single.append(await through_outbox(n // 2, path, rcpts=1))
    finally:
        Path(path).unlink()
    return spread(base), spread(relay), spread(single), conc


def run(quick: bool) -> list[dict]:
    base, relay, single, conc = asyncio.run(measure(quick))
    ratio = relay["median"] / base["median"]
    return [
        row(
            f"aiosmtpd sink fed directly, 60 KB, 1 rcpt, {conc} conns",
            "msgs/s",
            base,
            "baseline",
        ),
        row(
            f"relay delivery outbox -> same sink, 60 KB, {RCPTS} rcpts cycling",
            "msgs/s",
            relay,
            ">= 0.7x direct",
            ratio >= 0.7,
            {"direct": base},
            ratio,
        ),
        row(
            "relay delivery, all to ONE recipient (kept in order: one at a time)",
            "msgs/s",
            single,
            "information (worst case of per-recipient order)",
            None,
            {"direct": base},
            single["median"] / base["median"],
        ),
    ]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    for r in run("--quick" in sys.argv):
        print(r)
