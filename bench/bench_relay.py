"""Relay accept: messages/s through AUTH, rewrite and the fsynced outbox, against an aiosmtpd
server that accepts and discards, both measured in the same run from 16 client connections.

The relay's upstream (an accept-and-discard aiosmtpd) runs in a process of its own, as the
mail provider does in production: in the relay's process it would bill the relay for the
upstream's CPU (about as much as the relay's own accept) and share its GIL.

That upstream stands in for a provider on another machine, yet it shares this machine's two
cores with the relay and the load client. aiosmtpd's line-by-line DATA reading costs it
about 3-4 ms of CPU per copy, and with 3 recipients it receives 3 copies per accepted
message: left as it was, the stand-in alone would want more CPU than the relay's accept,
and the figure would measure the sink. So the stand-in is a minimal asyncio SMTP responder
(``SINK``: the replies an MTA gives to EHLO/MAIL/RCPT/DATA/RSET/QUIT, the end of DATA
found with one ``find`` per chunk, the bytes discarded), about 0.1-0.2 ms of CPU per
copy, and it runs at nice 19 so that what it still costs goes to idle time first. This
makes the comparison more faithful, not easier: a remote provider costs the relay's
machine nothing. The baseline (aiosmtpd accept+discard, measured in this process
as the relay is) is unchanged.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import postfix_baseline
from common import Discard, free_port, mail_file, row, smtp_interleaved

BENCH_USER, BENCH_PW = "bench@corp.example", "bench password 1"

SINK = r"""
import asyncio, os, sys
os.nice(19)  # stands in for another machine: it yields this machine's cores to the relay
class Sink(asyncio.Protocol):
    # Accept and discard: replies as an MTA would, DATA found by one find() per chunk.
    def connection_made(self, transport):
        self.t, self.buf, self.data = transport, b"", False
        transport.write(b"220 sink.bench ESMTP\r\n")
    def data_received(self, chunk):
        buf = self.buf + chunk
        while buf:
            if self.data:
                end = buf.find(b"\r\n.\r\n")
                if end < 0:
                    self.buf = buf[-4:]  # the end mark may straddle two chunks
                    return
                buf, self.data = buf[end + 5 :], False
                self.t.write(b"250 2.0.0 OK\r\n")
                continue
            line, sep, rest = buf.partition(b"\r\n")
            if not sep:
                break
            buf, verb = rest, line[:4].upper()
            if verb == b"EHLO":
                self.t.write(b"250-sink.bench\r\n250-SIZE 36700160\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.data = True
                buf = b"\r\n" + buf  # the end mark's CRLF may be the one after DATA's 354
                self.t.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                self.t.write(b"221 Bye\r\n")
                self.t.close()
                return
            else:  # HELO, MAIL, RCPT, RSET, NOOP
                self.t.write(b"250 OK\r\n")
        self.buf = buf
async def main():
    loop = asyncio.get_running_loop()
    await loop.create_server(Sink, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes our stdin
asyncio.run(main())
"""


async def start_sink(port: int) -> asyncio.subprocess.Process:
    """The upstream: accept and discard, in its own process; stops when stdin closes."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SINK,
        str(port),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if line.strip() != b"ready":
        raise RuntimeError("upstream sink did not start")
    return proc


async def stop_sink(proc: asyncio.subprocess.Process) -> None:
    proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def accept(quick: bool) -> tuple[dict, dict]:
    """The aiosmtpd baseline and the real relay (AUTH, rewrite, fsynced outbox; its upstream
    an accept-and-discard sink, so the delivery worker runs alongside as in production),
    runs interleaved. Before every run the relay's queue is left to drain: the niced
    delivery worker then neither takes the baseline's CPU nor carries one relay run's
    backlog into the next. (baseline, relay) as :func:`common.smtp_interleaved` gives them."""
    from aiosmtpd.controller import Controller

    import cli
    import store
    from relay import service
    from store import outbox as store_outbox
    from store import users

    sink_port = free_port()
    sink = await start_sink(sink_port)
    tmp = tempfile.mkdtemp(prefix="mailtally-bench-")
    s = cli.initialise(Path(tmp) / "data")
    port = free_port()
    s.relay.listen = f"127.0.0.1:{port}"
    s.relay.upstream = f"smtp://127.0.0.1:{sink_port}"
    s.relay.upstream_starttls = False
    s.tracker.base_url = "https://t.example"
    db = store.connect(s.db_path)
    users.add_user(db, BENCH_USER, "Bench", BENCH_PW)
    base_port = free_port()
    baseline = Controller(Discard(), hostname="127.0.0.1", port=base_port)
    baseline.start()
    svc = await service.start(s)
    queued_before = []

    def waiting() -> int:
        queued = store_outbox.counts(db)
        return sum(queued.get(k, 0) for k in store_outbox.ACTIVE)

    async def drained() -> None:
        queued_before.append(waiting())
        deadline = time.monotonic() + 300
        while waiting() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    base_path, relay_path = mail_file(3), mail_file(3, BENCH_USER)
    try:
        got = await smtp_interleaved(
            quick,
            {
                "aiosmtpd": (base_port, base_path, (300, 2000), ()),
                "relay": (port, relay_path, (150, 1000), (BENCH_USER, BENCH_PW)),
            },
            drained,
        )
        return got["aiosmtpd"], got["relay"]
    finally:
        Path(base_path).unlink()
        Path(relay_path).unlink()
        batches = svc.handler.committer.batches
        left = waiting()
        await svc.stop()
        baseline.stop()
        db.close()
        await stop_sink(sink)
        print(
            f"relay: {batches} group commits; copies still queued before each run "
            f"(left by the one before): {queued_before}; {left} at the end",
            file=sys.stderr,
        )


def postfix(quick: bool) -> dict:
    """Postfix's durable accept of the same mail, when Postfix is installed (else {})."""
    if not postfix_baseline.available():
        return {}
    path = mail_file(3)
    try:
        return asyncio.run(postfix_baseline.postfix_accept(quick, path))
    finally:
        Path(path).unlink()


def run(quick: bool) -> list[dict]:
    base, relay = asyncio.run(accept(quick))
    pf = postfix(quick)
    rows = []
    for rc, b in base.items():
        rows.append(
            row(
                f"aiosmtpd accept+discard, 60 KB, {rc} rcpt, 16 conns",
                "msgs/s",
                b["rate"],
                "baseline",
            )
        )
        r = relay[rc]
        ratio = r["rate"]["median"] / b["rate"]["median"]
        rows.append(
            row(
                f"relay accept (AUTH+rewrite+fsync), 60 KB, {rc} rcpt, 16 conns",
                "msgs/s",
                r["rate"],
                ">= 0.7x aiosmtpd",
                ratio >= 0.7,
                {"aiosmtpd": b["rate"], **({"postfix": pf[rc]["rate"]} if pf else {})},
                ratio,
                p99_ms=r["p99_ms"],
                **({"ratio_postfix": r["rate"]["median"] / pf[rc]["rate"]["median"]} if pf else {}),
            )
        )
    return rows
