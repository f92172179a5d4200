"""Run mailtally's benchmarks against baselines measured in the same run.

    python bench/run.py [--quick] [--only NAME[,NAME...]] [--out bench/results.json]

Each figure is the median of several runs with its spread (min..max). Loads come from a
separate client process on 127.0.0.1, bounded in count and time. Test mail is made at run
time from ../shared/corpora/html (never copied into the repository).

Each benchmark is a module ``bench/bench_<name>.py`` with ``run(quick) -> list[row]`` that
measures its own baseline in the same run; BENCHES lists them in the order they run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, row  # noqa: E402

# name -> module; "reports" is slow (it builds a 100,000-email database) so --quick skips it
BENCHES = {
    "rewrite": "bench_rewrite",
    "relay": "bench_relay",
    "delivery": "bench_delivery",
    "tracker": "bench_tracker",
    "ingest": "bench_ingest",
    "bigmail": "bench_bigmail",
}
FULL_ONLY = {"reports"}


def bench_reports(quick: bool) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_reports.py")],
        check=True,
        timeout=3600,
        capture_output=True,
        text=True,
    )
    data = json.loads(proc.stdout)
    (ROOT / "bench" / "reports-results.json").write_text(json.dumps(data, indent=2) + "\n")
    took = data["cli_report_emails_json_s"]  # median of its runs, CLI start-up included
    return [
        row(
            "reports: `report emails --format json`, 100k emails / 1M events",
            "s",
            data,
            "<= 1 s",
            took <= 1,
            seconds=took,
        )
    ]


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
    names = [*BENCHES, *FULL_ONLY]
    ap.add_argument("--only", default="", help="comma list: " + ",".join(names))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    a = ap.parse_args()
    only = [x for x in a.only.split(",") if x]
    unknown = sorted(set(only) - set(names))
    if unknown:
        ap.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(names)}")
    chosen = only or [n for n in names if not (a.quick and n in FULL_ONLY)]
    rows: list[dict] = []
    for name in chosen:
        if name == "reports":
            rows += bench_reports(a.quick)
        else:
            rows += importlib.import_module(BENCHES[name]).run(a.quick)
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
