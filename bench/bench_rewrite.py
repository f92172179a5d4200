"""Rewrite: ms per message for the relay's rewriter against a plain regex href splice (the floor)."""

from __future__ import annotations

import time

from common import HREF, corpus_files, make_mail, spread, template


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


def run(quick: bool) -> list[dict]:
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
