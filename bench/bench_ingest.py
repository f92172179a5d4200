"""Ingest: BCC mails logged per second (accepted over SMTP, spooled with fsync, parsed and
filed in the database with their contacts and attachment) against an aiosmtpd server that
accepts and discards the same mail, both measured in the same run from 16 connections of a
separate client process.

The mail: 60 KB (text + HTML cut from the corpus, plus one text attachment), From a user,
To three external recipients, RCPT to the BCC logging address. Every message has its own
Message-ID and its own attachment bytes, so each is a new email with a new attachment file
(no dedup short-cut). "Logged" = the inbound log says ``logged`` for all N messages; the
rate is N over the time from the first connection to the last one filed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

from common import Discard, free_port, row, run_script, spread, template

SENDER = "seller@corp.example"
TO = ["ann@customer-a.example", "bob@customer-b.example", "cid@customer-c.example"]
PLACEHOLDER = b"BENCHMSGID"

# Sends `total` copies of the mail file over `conc` connections; each copy gets its own
# Message-ID (and attachment bytes) by replacing PLACEHOLDER with a unique token.
CLIENT = r"""
import asyncio, json, os, sys, time
import aiosmtplib
host, port, conc, total, limit, path, sender, rcpt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6], sys.argv[7], sys.argv[8]
data = open(path, "rb").read()
lat, refused = [], []
async def worker(q, deadline):
    c = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=60)
    await c.connect()
    while q and time.monotonic() < deadline:
        i = q.pop()
        msg = data.replace(b"BENCHMSGID", b"m%d-%d" % (os.getpid(), i))
        t = time.perf_counter()
        errors, _ = await c.sendmail(sender, [rcpt], msg)
        if errors:
            refused.append(str(errors))
        lat.append(time.perf_counter() - t)
    await c.quit()
async def main():
    deadline = time.monotonic() + limit
    t = time.perf_counter()
    q = list(range(total))
    await asyncio.gather(*(worker(q, deadline) for _ in range(conc)))
    el = time.perf_counter() - t
    lat.sort()
    print(json.dumps({"n": len(lat), "refused": len(refused), "seconds": el,
        "rate": len(lat) / el, "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[int(len(lat) * 0.99)] * 1000}))
asyncio.run(main())
"""


def bench_mail(size: int = 60_000) -> bytes:
    """The 60 KB BCC mail (with PLACEHOLDER where the unique token goes)."""
    msg = EmailMessage()
    msg["From"] = f"Seller <{SENDER}>"
    msg["To"] = ", ".join(TO)
    msg["Subject"] = "Our proposal"
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = f"<{PLACEHOLDER.decode()}@corp.example>"
    msg.set_content("Hello,\nplease find our proposal attached.\n")
    msg.add_alternative(template(size - 12_000, 40), subtype="html")
    rows = "\n".join(f"{PLACEHOLDER.decode()},item {i},{i * 7}.00" for i in range(300))
    msg.add_attachment(rows, subtype="csv", filename="quote.csv")
    return msg.as_bytes()


async def load(port: int, total: int, limit: float, path: str, rcpt: str) -> dict:
    """Send ``total`` copies of the mail at ``path`` from the separate client process."""
    return await run_script(
        CLIENT, "127.0.0.1", port, 16, total, limit, path, SENDER, rcpt, timeout=300
    )


class Baseline:
    """aiosmtpd accept-and-discard (same mail, same client), kept up between runs."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.port = free_port()
        self.ctl = Controller(Discard(), hostname="127.0.0.1", port=self.port)

    async def run(self, path: str, total: int, limit: float) -> dict:
        return await load(self.port, total, limit, path, "bcc@discard.example")


async def ingest_run(path: str, total: int, limit: float) -> dict:
    """One run on a fresh data dir: the real ingest service, N mails, time until all filed."""
    import cli
    import store
    from ingest import service
    from store import users

    tmp = tempfile.mkdtemp(prefix="mailtally-bench-ingest-")
    s = cli.initialise(Path(tmp) / "data")
    port = free_port()
    s.ingest.listen = f"127.0.0.1:{port}"
    db = store.connect(s.db_path)
    users.add_user(db, SENDER, "Seller", None)
    svc = await service.start(s)

    def logged() -> int:
        return db.execute("SELECT COUNT(*) FROM inbound_log WHERE decision = 'logged'").fetchone()[
            0
        ]

    try:
        t = time.perf_counter()
        client = await load(port, total, limit, path, s.ingest.bcc_address)
        n = client["n"] - client["refused"]
        deadline = time.monotonic() + 300
        while logged() < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {logged()} of {n} accepted mails filed")
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t
        emails = db.execute("SELECT COUNT(*) FROM emails").fetchone()[0]
        links = db.execute("SELECT COUNT(*) FROM email_contacts").fetchone()[0]
        atts = db.execute("SELECT COUNT(*) FROM attachments").fetchone()[0]
        errors = db.execute(
            "SELECT COUNT(*) FROM inbound_log WHERE decision != 'logged'"
        ).fetchone()[0]
        if (emails, links, atts, errors) != (n, 3 * n, n, 0):
            raise RuntimeError(f"not all filed right: {emails=} {links=} {atts=} {errors=} {n=}")
        return {
            "logged_rate": n / elapsed,
            "accepted_rate": client["rate"],
            "p50_ms": client["p50_ms"],
            "p99_ms": client["p99_ms"],
            "n": n,
        }
    finally:
        await svc.stop()
        db.close()


async def measure(quick: bool) -> tuple[list[dict], list[dict]]:
    with tempfile.NamedTemporaryFile(suffix=".eml", delete=False) as f:
        f.write(bench_mail())
    total, limit, runs = (300, 10, 3) if quick else (1000, 30, 5)
    base_server = Baseline()
    base_server.ctl.start()
    try:
        # Interleaved (baseline, ingest, baseline, ...): on a shared machine the load drifts,
        # and it should drift over both sides alike.
        base, ours = [], []
        for _ in range(runs):
            base.append(await base_server.run(f.name, total, limit))
            ours.append(await ingest_run(f.name, total, limit))
        return base, ours
    finally:
        base_server.ctl.stop()
        Path(f.name).unlink()


def run(quick: bool) -> list[dict]:
    base, ours = asyncio.run(measure(quick))
    b = spread([r["rate"] for r in base])
    logged = spread([r["logged_rate"] for r in ours])
    accepted = spread([r["accepted_rate"] for r in ours])
    ratio = logged["median"] / b["median"]
    return [
        row(
            "aiosmtpd accept+discard, 60 KB + attachment, 16 conns",
            "msgs/s",
            b,
            "baseline",
            p99_ms=spread([r["p99_ms"] for r in base]),
        ),
        row(
            "ingest BCC logged (spool+parse+file), 60 KB, 3 To, 1 attachment, 16 conns",
            "msgs/s",
            logged,
            ">= 0.5x aiosmtpd",
            ratio >= 0.5,
            {"aiosmtpd": b},
            ratio,
            accepted_rate=accepted,
            accepted_ratio=accepted["median"] / b["median"],
            p99_ms=spread([r["p99_ms"] for r in ours]),
            mails=ours[0]["n"],
        ),
    ]


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2, default=str))
