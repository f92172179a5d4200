"""Run mailtally's benchmarks against baselines measured in the same run.

    python bench/run.py [--quick] [--only NAME[,NAME...]] [--out bench/results.json]

Each figure is the median of several runs with its spread (min..max). Loads come from a
separate client process on 127.0.0.1, bounded in count and time. Test mail is made at run
time from ../shared/corpora/html (never copied into the repository).

Benchmarks: rewrite (relay rewrite vs a plain regex href splice, the floor),
smtp-baseline (aiosmtpd accept-and-discard, messages/s from 16 connections),
http-baseline (bare aiohttp GIF endpoint, req/s and p50/p99 from 64 connections),
reports (bench/bench_reports.py, full runs only).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CORPUS = ROOT.parent / "shared" / "corpora" / "html"
HREF = re.compile(rb'href="([^"]*)"')
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)


def spread(values: list[float]) -> dict:
    """Median with min..max: one noisy run on a shared machine must not decide the figure."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- test messages


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.rglob("*.html") if p.is_file())


def template(size: int, links: int) -> str:
    """An HTML body of about `size` bytes with `links` distinct hrefs, cut from the corpus."""
    chunks = []
    for p in corpus_files():
        body = p.read_text("utf-8", "replace")
        m = re.search(r"<body[^>]*>(.*)</body>", body, re.S | re.I)
        chunks.append(HREF.sub(b'href=""', (m.group(1) if m else body).encode()).decode())
    out, i = [], 0
    while sum(map(len, out)) < size:
        out.append(chunks[i % len(chunks)])
        i += 1
    text = "".join(out)[:size]
    text = re.sub(r'href=""', "", text)
    per = max(1, len(text) // links)
    pieces = []
    for n in range(links):
        seg = text[n * per : (n + 1) * per]
        seg = re.sub(r"<[^>]*$", "", seg)  # never cut inside a tag
        pieces.append(f'{seg}<a href="https://example.com/p/{n}?utm=bench">link {n}</a>\n')
    return f"<html><body>{''.join(pieces)}</body></html>"


def make_mail(html: str, rcpts: int = 1, sender: str = "sender@bench.example") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(f"r{i}@dest.example" for i in range(rcpts))
    msg["Subject"] = "bench"
    msg["Message-ID"] = "<bench@bench.example>"
    msg.set_content("plain part")
    msg.add_alternative(html, subtype="html")
    return msg.as_bytes()


# ---------------------------------------------------------------- rewrite


def regex_floor(data: bytes) -> bytes:
    """The floor: splice every href with a per-link URL and append a pixel, nothing else."""
    n = iter(range(1, 1 << 30))
    out = HREF.sub(lambda m: b'href="https://t.example/c/' + str(next(n)).encode() + b'"', data)
    return out.replace(b"</body>", b'<img src="https://t.example/o/x" alt=""></body>', 1)


def relay_rewrite(data: bytes) -> bytes:
    from relay import rewrite
    from relay.links import LinkContext

    plan = rewrite.plan(
        rewrite.analyse(data), LinkContext("https://t.example"), track_opens=True, track_clicks=True
    )
    return plan.render(lambda pos, url: f"https://t.example/c/{pos}", "https://t.example/o/x", None)


def time_ms(fn, data: bytes, runs: int, inner: int) -> dict:
    values = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(inner):
            fn(data)
        values.append((time.perf_counter() - t) * 1000 / inner)
    return spread(values)


def bench_rewrite(quick: bool) -> list[dict]:
    runs, rows = (3, []) if quick else (7, [])
    cases = [
        ("60 KB / 40 links", make_mail(template(60_000, 40)), 2.0),
        ("600 KB / 300 links", make_mail(template(600_000, 300)), 20.0),
    ]
    for name, mail, target in cases:
        inner = 5 if quick else 20
        if "600" in name:
            inner = max(1, inner // 5)
        assert relay_rewrite(mail) != mail, "rewrite changed nothing"
        got = time_ms(relay_rewrite, mail, runs, inner)
        floor = time_ms(regex_floor, mail, runs, inner)
        ratio = got["median"] / floor["median"]
        rows.append(
            {
                "bench": f"rewrite {name}",
                "unit": "ms/msg",
                "value": got,
                "baseline": {"regex floor": floor},
                "ratio": ratio,
                "target": f"<= {target} ms, <= 4x floor",
                "met": got["median"] <= target and ratio <= 4,
            }
        )
    mails = [make_mail(p.read_text("utf-8", "replace")) for p in corpus_files()]

    def all_rw(_):
        for m in mails:
            relay_rewrite(m)

    def all_floor(_):
        for m in mails:
            regex_floor(m)

    per = len(mails)
    got = time_ms(all_rw, b"", runs, 1)
    floor = time_ms(all_floor, b"", runs, 1)
    got = {k: (v / per if k != "runs" else v) for k, v in got.items()}
    floor = {k: (v / per if k != "runs" else v) for k, v in floor.items()}
    rows.append(
        {
            "bench": f"rewrite whole corpus ({per} msgs)",
            "unit": "ms/msg",
            "value": got,
            "baseline": {"regex floor": floor},
            "ratio": got["median"] / floor["median"],
            "target": "<= 4x floor",
            "met": got["median"] / floor["median"] <= 4,
        }
    )
    return rows


# ---------------------------------------------------------------- load client (subprocess)

CLIENT = r"""
import asyncio, json, sys, time
kind, host, port, conc, total, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
extra = sys.argv[7] if len(sys.argv) > 7 else ""
SENDER = sys.argv[9] if len(sys.argv) > 9 else "sender@bench.example"
lat = []
async def http_worker(q, deadline):
    import aiohttp
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        while q and time.monotonic() < deadline:
            url = q.pop()
            t = time.perf_counter()
            async with s.get(url, allow_redirects=False) as r:
                await r.read()
                assert r.status in (200, 302), r.status
            lat.append(time.perf_counter() - t)
async def smtp_worker(q, deadline, data, rcpts):
    import aiosmtplib
    c = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False)
    await c.connect()
    if len(sys.argv) > 9:
        await c.login(sys.argv[9], sys.argv[10])
    while q and time.monotonic() < deadline:
        q.pop()
        t = time.perf_counter()
        await c.sendmail(SENDER, rcpts, data)
        lat.append(time.perf_counter() - t)
    await c.quit()
async def main():
    deadline = time.monotonic() + limit
    t = time.perf_counter()
    if kind == "http":
        q = [f"http://{host}:{port}{extra}"] * total
        await asyncio.gather(*(http_worker(q, deadline) for _ in range(conc)))
    else:
        data = open(extra, "rb").read()
        rcpts = [f"r{i}@dest.example" for i in range(int(sys.argv[8]))]
        q = [1] * total
        await asyncio.gather(*(smtp_worker(q, deadline, data, rcpts) for _ in range(conc)))
    el = time.perf_counter() - t
    lat.sort()
    print(json.dumps({"n": len(lat), "seconds": el, "rate": len(lat) / el,
        "p50_ms": lat[len(lat) // 2] * 1000, "p99_ms": lat[int(len(lat) * 0.99)] * 1000}))
asyncio.run(main())
"""


async def run_client(*args) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    if proc.returncode:
        raise RuntimeError(f"load client failed: {err.decode()[-500:]}")
    return json.loads(out)


async def repeated(runs: int, *args) -> dict:
    res = [await run_client(*args) for _ in range(runs)]
    return {k: spread([r[k] for r in res]) for k in ("rate", "p50_ms", "p99_ms")}


# ---------------------------------------------------------------- baselines


async def smtp_baseline(quick: bool) -> dict:
    """aiosmtpd that accepts and discards: the ceiling for any aiosmtpd-based server."""
    from aiosmtpd.controller import Controller

    class Discard:
        async def handle_DATA(self, server, session, envelope):
            return "250 OK"

    port = free_port()
    ctl = Controller(Discard(), hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        with tempfile.NamedTemporaryFile(suffix=".eml", delete=False) as f:
            f.write(make_mail(template(60_000, 40), 3))
        out = {}
        for rc in (1, 3):
            out[rc] = await repeated(
                3,
                "smtp",
                "127.0.0.1",
                port,
                16,
                300 if quick else 2000,
                5 if quick else 20,
                f.name,
                rc,
            )
        os.unlink(f.name)
        return out
    finally:
        ctl.stop()


async def bench_baselines(quick: bool, only: set[str]) -> list[dict]:
    from aiohttp import web

    rows = []
    if not only or "smtp-baseline" in only:
        smtp = await asyncio.get_running_loop().run_in_executor(
            None, lambda: asyncio.run(smtp_baseline(quick))
        )
        for rc, r in smtp.items():
            rows.append(
                {
                    "bench": f"aiosmtpd accept+discard, 60 KB, {rc} rcpt, 16 conns",
                    "unit": "msgs/s",
                    "value": r["rate"],
                    "baseline": {},
                    "ratio": None,
                    "target": "baseline",
                    "met": None,
                }
            )
    if not only or "relay" in only:
        relay = await asyncio.get_running_loop().run_in_executor(
            None, lambda: asyncio.run(relay_accept(quick))
        )
        base = {r["bench"]: r["value"] for r in rows}
        for rc, r in relay.items():
            b = base.get(f"aiosmtpd accept+discard, 60 KB, {rc} rcpt, 16 conns")
            ratio = r["rate"]["median"] / b["median"] if b else None
            rows.append(
                {
                    "bench": f"relay accept (AUTH+rewrite+fsync), 60 KB, {rc} rcpt, 16 conns",
                    "unit": "msgs/s",
                    "value": r["rate"],
                    "baseline": {"aiosmtpd": b} if b else {},
                    "ratio": ratio,
                    "target": ">= 0.7x aiosmtpd",
                    "met": None if ratio is None else ratio >= 0.7,
                }
            )
    if not only or "http-baseline" in only:

        async def gif(_):
            return web.Response(body=GIF, content_type="image/gif")

        app = web.Application()
        app.router.add_get("/o/{tok}", gif)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            # the server shares this process' loop; the client runs in its own process
            r = await repeated(
                3,
                "http",
                "127.0.0.1",
                port,
                64,
                2000 if quick else 20000,
                5 if quick else 20,
                "/o/x",
            )
        finally:
            await runner.cleanup()
        rows.append(
            {
                "bench": "bare aiohttp GIF, 64 conns",
                "unit": "req/s",
                "value": r["rate"],
                "p50_ms": r["p50_ms"],
                "p99_ms": r["p99_ms"],
                "baseline": {},
                "ratio": None,
                "target": "baseline",
                "met": None,
            }
        )
    return rows


# ---------------------------------------------------------------- relay accept

BENCH_USER, BENCH_PW = "bench@corp.example", "bench password 1"


async def relay_accept(quick: bool) -> dict:
    """The real relay (AUTH, rewrite, fsynced outbox) with its upstream an accept-and-discard
    sink, so the delivery worker runs alongside as it does in production."""
    from aiosmtpd.controller import Controller

    import cli
    import store
    from relay import service
    from store import users

    class Discard:
        async def handle_DATA(self, server, session, envelope):
            return "250 OK"

    sink = Controller(Discard(), hostname="127.0.0.1", port=free_port())
    sink.start()
    tmp = tempfile.mkdtemp(prefix="mailtally-bench-")
    s = cli.initialise(Path(tmp) / "data")
    port = free_port()
    s.relay.listen = f"127.0.0.1:{port}"
    s.relay.upstream = f"smtp://127.0.0.1:{sink.port}"
    s.relay.upstream_starttls = False
    s.tracker.base_url = "https://t.example"
    db = store.connect(s.db_path)
    users.add_user(db, BENCH_USER, "Bench", BENCH_PW)
    db.close()
    svc = await service.start(s)
    try:
        with tempfile.NamedTemporaryFile(suffix=".eml", delete=False) as f:
            f.write(make_mail(template(60_000, 40), 3, BENCH_USER))
        out = {}
        for rc in (1, 3):
            out[rc] = await repeated(
                3,
                "smtp",
                "127.0.0.1",
                port,
                16,
                150 if quick else 1000,
                5 if quick else 20,
                f.name,
                rc,
                BENCH_USER,
                BENCH_PW,
            )
        os.unlink(f.name)
        return out
    finally:
        await svc.stop()
        sink.stop()


# ---------------------------------------------------------------- reports (reuse)


def bench_reports() -> list[dict]:
    out = ROOT / "bench" / "reports-results.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_reports.py")], check=True, timeout=3600
    )
    data = json.loads(out.read_text())
    return [
        {
            "bench": "reports (bench_reports.py)",
            "unit": "s",
            "value": data,
            "baseline": {},
            "ratio": None,
            "target": "<= 1 s",
            "met": None,
        }
    ]


# ---------------------------------------------------------------- output


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("aiosmtpd", "aiohttp", "aiosmtplib", "sqlite-utils"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "load": os.getloadavg(),
    }


def fmt(v) -> str:
    if isinstance(v, dict) and "median" in v:
        return f"{v['median']:.3g} ({v['min']:.3g}..{v['max']:.3g})"
    return "" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def show(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="mailtally bench (median, min..max)")
    for c in ("bench", "unit", "value", "baseline", "ratio", "p99 ms", "target", "met"):
        t.add_column(c)
    for r in rows:
        base = "; ".join(f"{k} {fmt(v)}" for k, v in r["baseline"].items())
        val = r["value"] if "median" in r["value"] else "see json"
        t.add_row(
            r["bench"],
            r["unit"],
            fmt(val),
            base,
            fmt(r["ratio"]),
            fmt(r.get("p99_ms")),
            r["target"],
            fmt(r["met"]),
        )
    Console(width=160).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs, smaller loads")
    ap.add_argument(
        "--only", default="", help="comma list: rewrite,smtp-baseline,relay,http-baseline,reports"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    a = ap.parse_args()
    only = {x for x in a.only.split(",") if x}
    rows: list[dict] = []
    if not only or "rewrite" in only:
        rows += bench_rewrite(a.quick)
    rows += asyncio.run(bench_baselines(a.quick, only))
    if ("reports" in only) or (not only and not a.quick):
        rows += bench_reports()
    show(rows)
    a.out.write_text(
        json.dumps(
            {
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "quick": a.quick,
                "machine": machine(),
                "versions": versions(),
                "results": rows,
            },
            indent=2,
            default=str,
        )
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
