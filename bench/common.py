"""Shared pieces of the benchmarks: spreads, test mail cut from the corpus, the load client.

Every bench module imports from here; loads always come from a separate client process on
127.0.0.1 (``run_client``), bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
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


async def run_script(script: str, *args, timeout: float = 120) -> dict:
    """Run a load-client ``script`` in its own Python process with ``args`` (as strings) and
    return the JSON it prints; bounded by ``timeout`` seconds."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode:
        raise RuntimeError(f"load client failed: {err.decode()[-500:]}")
    return json.loads(out)


async def run_client(*args) -> dict:
    """The shared load client (``CLIENT``) with ``args``: kind host port conc total ..."""
    return await run_script(CLIENT, *args)


def summarise(res: list[dict]) -> dict:
    """Rate and latencies of several load runs, each as a spread."""
    return {k: spread([r[k] for r in res]) for k in ("rate", "p50_ms", "p99_ms")}


class Discard:
    """aiosmtpd handler that accepts every message and keeps nothing: the baseline server."""

    async def handle_DATA(self, server, session, envelope):
        return "250 OK"


async def smtp_load(
    port: int, quick: bool, path: str, totals: tuple[int, int] = (300, 2000), *auth: str
) -> dict:
    """The SMTP load every accept benchmark uses: the mail at ``path`` to 1 and 3 recipients
    from 16 connections, 3 runs each (``auth``: user and password to AUTH with)."""
    return (await smtp_interleaved(quick, {"": (port, path, totals, auth)}))[""]


async def smtp_interleaved(
    quick: bool,
    servers: dict[str, tuple[int, str, tuple[int, int], tuple[str, ...]]],
    settle: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, dict[int, dict]]:
    """:func:`smtp_load` against several servers (name: port, mail path, totals quick/full,
    auth), their runs interleaved (a, b, a, b, ...) so that a change in what else the
    machine runs hits each alike; ``settle`` is awaited before every run (so that no
    server's work left over from its last run lands in another's)."""
    runs: dict[str, dict[int, list[dict]]] = {name: {1: [], 3: []} for name in servers}
    for rc in (1, 3):
        for _ in range(3):
            for name, (port, path, totals, auth) in servers.items():
                if settle is not None:
                    await settle()
                total = totals[0] if quick else totals[1]
                limit = 5 if quick else 20
                runs[name][rc].append(
                    await run_client("smtp", "127.0.0.1", port, 16, total, limit, path, rc, *auth)
                )
    return {name: {rc: summarise(r) for rc, r in by.items()} for name, by in runs.items()}


def row(bench: str, unit: str, value, target: str, met=None, baseline=None, ratio=None, **more):
    """One result row, the shape results.json and the table use."""
    return {
        "bench": bench,
        "unit": unit,
        "value": value,
        "baseline": baseline or {},
        "ratio": ratio,
        "target": target,
        "met": met,
        **more,
    }


def mail_file(rcpts: int = 3, sender: str = "sender@bench.example", size: int = 60_000) -> str:
    """A 60 KB / 40-link mail written to a temporary file for the load client."""
    with tempfile.NamedTemporaryFile(suffix=".eml", delete=False) as f:
        f.write(make_mail(template(size, 40), rcpts, sender))
    return f.name
