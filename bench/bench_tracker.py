"""Tracker: requests/s and p50/p99 for pixel and click hits, every hit recorded, 64 connections,
against a bare aiohttp endpoint (the target's baseline), the same on aiohttp's low-level
server (the API the tracker uses) and (when installed) nginx serving the same GIF and
redirect, all measured in the same run (interleaved) from a separate load-client process.

The tracker runs for real: ``cli.initialise`` settings, a database with a user, 1,000 sent
emails and 4,000 copies, distinct valid pixel and click tokens, and a mix of user agents
(Gmail's image proxy, Apple Mail, Outlook, desktop and phone browsers). After every run the
bench checks that the number of hits recorded equals the number of requests answered; the
tracker's figure counts until the last hit is committed (answered and recorded per second),
its answer rate alone is reported beside it.

Two load generators, each against all the servers: the Python client below (aiohttp,
one process, about a core of CPU at these rates) and wrk (Debian's, in C, when installed;
``WRK_SCRIPT`` walks the same plan of paths and user agents). With the Python client the
client is the bottleneck of the bare endpoint, so the ratio says how much the tracker's
CPU slows a client sharing its two cores; with wrk the servers are the bottleneck, so the
ratio is the tracker's cost per request against aiohttp doing nothing. Both are reported.
Every server runs on the event loop ``mailtally run`` uses (``cli.new_event_loop``).

The tracker's CPU per request is that of the whole server: this process (where its HTTP
side runs) plus its writer process (read from ``/proc/<pid>/stat`` before and after each
run), so moving work into the child does not hide it. The clock is read with 10 ms
ticks, a rounding of under 1 us per request over a run of 20,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from common import GIF, free_port, row, run_script, spread

EMAILS, RECIPIENTS, LINKS = 1000, 4, 3
CONNS = 64
PIXEL_AGENTS = [
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)",
]
BROWSERS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
]

# The load client: its own process, CONNS keep-alive connections, each taking the next
# (path, user agent) from the shared list; bounded in count and time.
CLIENT = r"""
import asyncio, json, sys, time
import aiohttp
host, port, conc, total, limit, plan = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
items = [line.rstrip("\n").split("\t", 1) for line in open(plan, encoding="utf-8") if line.strip()]
lat, statuses, errors = [], {}, 0
nxt = 0
async def worker(deadline):
    global nxt, errors
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        while nxt < total and time.monotonic() < deadline:
            path, ua = items[nxt % len(items)]
            nxt += 1
            t = time.perf_counter()
            try:
                async with s.get(f"http://{host}:{port}{path}", headers={"User-Agent": ua}, allow_redirects=False) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
            except aiohttp.ClientError:
                errors += 1
                continue
            lat.append(time.perf_counter() - t)
async def main():
    deadline = time.monotonic() + limit
    t = time.perf_counter()
    await asyncio.gather(*(worker(deadline) for _ in range(conc)))
    el = time.perf_counter() - t
    lat.sort()
    print(json.dumps({"n": len(lat), "seconds": el, "rate": len(lat) / el, "errors": errors,
        "statuses": statuses, "answered": statuses.get(200, 0) + statuses.get(302, 0),
        "p50_ms": lat[len(lat) // 2] * 1000, "p99_ms": lat[int(len(lat) * 0.99)] * 1000}))
asyncio.run(main())
"""


async def load(port: int, total: int, limit: float, plan: Path) -> dict:
    return await run_script(
        CLIENT, "127.0.0.1", port, CONNS, total, limit, plan, timeout=limit + 60
    )


# wrk's script: each thread walks the plan (path TAB user agent) from its own offset; the
# summary is printed as one JSON line. wrk runs are bounded in time (``-d``): a count limit
# in Lua (a callback per response) costs wrk CPU, and wrk reports its ``-d`` as the
# duration even when its threads stop early.
WRK_SCRIPT = r"""
local items, counter = {}, 0
function setup(thread) thread:set("id", counter); counter = counter + 1 end
function init(args)
  for line in io.lines(args[1]) do
    local p, ua = line:match("^([^\t]+)\t(.*)$")
    if p then table.insert(items, {p, ua}) end
  end
  n, idx = #items, id * 7919
end
function request()
  idx = idx + 1
  local it = items[(idx % n) + 1]
  return wrk.format("GET", it[1], {["User-Agent"] = it[2]})
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "duration_us": %d, "status_errors": %d, '
    .. '"socket_errors": %d, "p50_us": %d, "p99_us": %d}\n', summary.requests,
    summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""
WRK_THREADS = 2


async def wrk_load(port: int, total: int, limit: float, plan: Path) -> dict:
    """One wrk run (``WRK_THREADS`` threads, ``CONNS`` connections) of ``limit`` seconds
    (``total`` is not used: see ``WRK_SCRIPT``); the figures in the shape the Python client
    gives."""
    script = plan.with_suffix(".lua")
    if not script.exists():
        script.write_text(WRK_SCRIPT, encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        shutil.which("wrk"),
        f"-t{WRK_THREADS}",
        f"-c{CONNS}",
        f"-d{max(1, round(limit))}s",
        "--latency",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}",
        "--",
        str(plan),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), limit + 60)
    lines = [x for x in out.decode().splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"wrk failed: {err.decode()[-500:]}")
    w = json.loads(lines[-1])
    seconds = w["duration_us"] / 1e6
    answered = w["requests"] - w["status_errors"]
    return {
        "n": w["requests"],
        "seconds": seconds,
        "rate": w["requests"] / seconds,
        "errors": w["socket_errors"] + w["status_errors"],
        "answered": answered,
        "p50_ms": w["p50_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        # wrk stops with requests in flight: the server may have answered (and the
        # tracker recorded) up to one per connection that wrk did not count.
        "in_flight": CONNS,
    }


def summary(runs: list[dict]) -> dict:
    keys = ("rate", "p50_ms", "p99_ms", "sustained", "cpu_us", "http_cpu_us", "writer_cpu_us")
    return {k: spread([r[k] for r in runs]) for k in keys if k in runs[0]}


# ---------------------------------------------------------------- test data


def make_data(workdir: Path):
    """Settings and a database of sent copies; returns (settings, plan file)."""
    import cli
    import store
    from store import contacts as store_contacts
    from store import tracking
    from store import users as store_users
    from tracker import tokens

    settings = cli.initialise(workdir / "data")
    port = free_port()
    settings.tracker.listen = f"127.0.0.1:{port}"
    settings.tracker.base_url = f"http://127.0.0.1:{port}"
    signer = tokens.Signer(settings.tracker.secrets)
    delivered = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    db = store.connect(settings.db_path)
    user = store_users.add_user(db, "seller@bench.example", "Seller", None)
    pixels, clicks = [], []
    with db.conn:
        for e in range(EMAILS):
            pairs = []
            for r in range(RECIPIENTS):
                contact, _ = store_contacts.ensure_contact(db, f"r{e}-{r}@buyer{e % 50}.example")
                pairs.append((contact["email"], contact["id"]))
            links = [
                f"https://shop.example.com/p/{e}/{i}?utm_source=mail&a=1" for i in range(LINKS)
            ]
            made = tracking.add_sent_email(
                db,
                user_id=user["id"],
                subject=f"Offer {e}",
                recipients=pairs,
                links=links,
                delivered_at=delivered,
                from_addr=user["email"],
            )
            for d in made["deliveries"]:
                pixels.append(f"/o/{signer.open_token(d)}.gif")
                clicks += [f"/c/{signer.click_token(d, i, url)}" for i, url in enumerate(links)]
    db.close()
    rng = random.Random(8)
    plan_lines = [  # about 70% pixels, 30% clicks, random copies
        f"{rng.choice(pixels)}\t{rng.choice(PIXEL_AGENTS)}"
        if rng.random() < 0.7
        else f"{rng.choice(clicks)}\t{rng.choice(BROWSERS)}"
        for _ in range(20000)
    ]
    plan = workdir / "plan.tsv"
    plan.write_text("\n".join(plan_lines) + "\n", encoding="utf-8")
    return settings, plan


# ---------------------------------------------------------------- servers


@contextlib.asynccontextmanager
async def bare_aiohttp(low_level: bool = False):
    """A bare aiohttp endpoint: the GIF for /o/, a 302 for /c/ (the ceiling for aiohttp).
    The baseline is a ``web.Application`` with two routes, aiohttp's usual API; with
    ``low_level`` it is aiohttp's low-level ``web.Server`` with a prefix test, the API the
    tracker itself uses (tracker/app.py), reported beside it so that the tracker's own
    choice of API is not hidden in the ratio."""
    from aiohttp import web

    async def gif(_):
        return web.Response(body=GIF, content_type="image/gif")

    async def redirect(_):
        return web.Response(status=302, headers={"Location": "https://shop.example.com/"})

    async def either(request):
        return await (gif if request.path.startswith("/o/") else redirect)(request)

    if low_level:
        runner = web.ServerRunner(web.Server(either, access_log=None))
    else:
        app = web.Application()
        app.router.add_get("/o/{tok}", gif)
        app.router.add_get("/c/{tok}", redirect)
        runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


NGINX_CONF = """worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
    server {{
        listen 127.0.0.1:{port};
        location /o/ {{ root {d}/www; default_type image/gif; try_files /pixel.gif =404;
            add_header Cache-Control "no-cache, no-store, must-revalidate, max-age=0"; }}
        location /c/ {{ return 302 https://shop.example.com/; }}
    }}
}}
"""


@contextlib.asynccontextmanager
async def nginx():
    """nginx (one worker) serving the same GIF and redirect; yields None when not installed."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if not exe:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        d = Path(tmp)
        (d / "www").mkdir()
        (d / "tmp").mkdir()
        (d / "www" / "pixel.gif").write_bytes(GIF)
        for p in (d, d / "www", d / "tmp", d / "www" / "pixel.gif"):
            p.chmod(0o755)
        port = free_port()
        (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=port))
        proc = subprocess.Popen(
            [exe, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=10)


Loader = Callable[[int, int, float, Path], Awaitable[dict]]


async def timed(loader: Loader, port: int, total: int, limit: float, plan: Path) -> dict:
    """One load run, with this process' CPU per request (meaningful for in-process servers)."""
    cpu = time.process_time()
    r = await loader(port, total, limit, plan)
    r["cpu_us"] = (time.process_time() - cpu) / max(r["n"], 1) * 1e6
    return r


def writer_cpu(svc) -> float:
    """CPU seconds (user + system) used so far by the tracker's writer process."""
    fields = Path(f"/proc/{svc.writer.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def tracker_run(
    loader: Loader, svc, db, plan: Path, total: int, limit: float
) -> tuple[dict, dict]:
    """One run against the real tracker; every answered request must be a recorded hit."""
    from store import events as store_events

    before = store_events.count_hits(db)
    cpu = time.process_time()
    child = writer_cpu(svc)
    r = await loader(svc.port, total, limit, plan)
    ended = time.monotonic()
    backlog = svc.writer.pending
    while svc.writer.pending and time.monotonic() < ended + 120:
        await asyncio.sleep(0.01)
    drain = time.monotonic() - ended
    # CPU of the whole server (this process' event loop and the writer process) per hit
    # until the last hit is committed: what the tracker costs, whatever else the machine runs.
    r["http_cpu_us"] = (time.process_time() - cpu) / max(r["n"], 1) * 1e6
    r["writer_cpu_us"] = (writer_cpu(svc) - child) / max(r["n"], 1) * 1e6
    r["cpu_us"] = r["http_cpu_us"] + r["writer_cpu_us"]
    recorded = store_events.count_hits(db) - before
    # The honest rate: requests answered AND recorded, per second from the first request
    # until the last hit is committed (a queue still draining when the load stops is not done).
    r["sustained"] = r["answered"] / (r["seconds"] + drain)
    unseen = r.get("in_flight", 0)  # answered after the client stopped counting
    if (
        not r["answered"] <= recorded <= r["answered"] + unseen
        or r["errors"]
        or r["answered"] != r["n"]
    ):
        raise AssertionError(f"tracker lost or failed hits: {r} recorded={recorded}")
    check = {"answered": r["answered"], "recorded": recorded}
    check |= {"queued_at_end": backlog, "drain_s": round(drain, 2)}
    return r, check


async def measure(settings, plan: Path, runs: int, loaders: dict):
    """All three servers up at once, runs interleaved (bare, nginx, tracker, bare, ...), so a
    change in what else the machine runs hits all three alike; once per load generator."""
    import store
    from tracker import service

    results = {}
    async with (
        bare_aiohttp() as bare_port,
        bare_aiohttp(low_level=True) as low_port,
        nginx() as nginx_port,
    ):
        svc = await service.start(settings)
        db = store.connect(settings.db_path)
        try:
            for name, (loader, total, limit) in loaders.items():
                bare, low, ngx, real, checks = [], [], [], [], []
                for _ in range(runs):
                    bare.append(await timed(loader, bare_port, total, limit, plan))
                    low.append(await timed(loader, low_port, total, limit, plan))
                    if nginx_port:
                        ngx.append(await loader(nginx_port, total, limit, plan))
                    r, check = await tracker_run(loader, svc, db, plan, total, limit)
                    real.append(r)
                    checks.append(check)
                results[name] = (summary(bare), summary(low), summary(ngx) if ngx else None)
                results[name] += (summary(real), checks)
        finally:
            await svc.stop()
            db.close()
    return results


def rows_for(
    client: str, bare: dict, low: dict, ngx: dict | None, real: dict, checks: list
) -> list[dict]:
    """The table rows of one load generator."""
    ratio = real["sustained"]["median"] / bare["rate"]["median"]

    def baseline(name: str, figures: dict | None, note: str = "baseline") -> dict:
        if not figures:
            return row(f"{name}, {client}", "req/s", None, f"{note} (not installed)")
        more = {"server_cpu_us_per_request": figures["cpu_us"]} if "cpu_us" in figures else {}
        return row(
            f"{name}, 64 conns, {client}",
            "req/s",
            figures["rate"],
            note,
            p50_ms=figures["p50_ms"],
            p99_ms=figures["p99_ms"],
            **more,
        )

    out = [
        baseline("bare aiohttp GIF/302", bare),
        baseline("bare aiohttp low-level server GIF/302", low, "baseline (the tracker's API)"),
        baseline("nginx GIF/302 (1 worker)", ngx),
    ]
    out.append(
        row(
            f"tracker pixel+click, answered and recorded, 64 conns, {client}",
            "req/s",
            real["sustained"],
            ">= 0.8x bare aiohttp; p99 <= 15 ms",
            met=ratio >= 0.8 and real["p99_ms"]["median"] <= 15,
            baseline=bare["rate"],
            ratio=round(ratio, 3),
            ratio_low_level=round(real["sustained"]["median"] / low["rate"]["median"], 3),
            ratio_nginx=(
                round(real["sustained"]["median"] / ngx["rate"]["median"], 3) if ngx else None
            ),
            answered_rate=real["rate"],
            server_cpu_us_per_request=real["cpu_us"],
            http_process_cpu_us_per_request=real["http_cpu_us"],
            writer_process_cpu_us_per_request=real["writer_cpu_us"],
            cpu_ratio=round(real["cpu_us"]["median"] / bare["cpu_us"]["median"], 2),
            p50_ms=real["p50_ms"],
            p99_ms=real["p99_ms"],
            recorded=checks,
        )
    )
    return out


def run(quick: bool) -> list[dict]:
    import cli

    runs = 3
    total, limit = (3000, 5.0) if quick else (20000, 20.0)
    # name: (load, requests, seconds); wrk's runs are bounded by time alone (WRK_SCRIPT)
    loaders: dict[str, tuple[Loader, int, float]] = {"Python client": (load, total, limit)}
    if shutil.which("wrk"):
        loaders["wrk"] = (wrk_load, 0, limit / 2)
    with tempfile.TemporaryDirectory(prefix="bench-tracker-") as tmp:
        settings, plan = make_data(Path(tmp))
        with asyncio.Runner(loop_factory=cli.new_event_loop) as runner:
            results = runner.run(measure(settings, plan, runs, loaders))
    out = []
    for client, figures in results.items():
        out += rows_for(client, *figures)
    if "wrk" not in results:
        out.append(row("tracker with wrk", "req/s", None, "wrk not installed (Debian: wrk)"))
    return out


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=1))
