"""Time `mailtally report emails --format json` over 100,000 emails and 1,000,000 events.

    python bench/bench_reports.py [--dir /tmp/mailtally-bench-reports] [--runs 5] [--fresh]

Makes (once, or again with --fresh) a data directory with a config and a database from
bench/gen_reports_db.py, then measures, as medians of --runs:
- the command itself, end to end, as a user runs it (a new process, output to a file);
- the same report in-process (query + JSON text, no interpreter start-up);
- a filtered report (one user, last 30 days), --all-hits, `report users`, `report links`;
- what the summary triggers cost the tracker: events inserted per second, 1000 per
  transaction, with and without them (rolled back, the database is left as it was).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gen_reports_db import generate  # noqa: E402

import cli  # noqa: E402
import store  # noqa: E402
from store import records, reports  # noqa: E402


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return round(statistics.median(times), 3)


def run_cli(config: Path, args: list[str], out: Path) -> None:
    with out.open("w") as fh:
        subprocess.run(
            [sys.executable, "-m", "cli", "--config", str(config), *args],
            cwd=ROOT,
            stdout=fh,
            check=True,
        )


def insert_rate(db, with_triggers: bool, n: int = 20_000) -> float:
    """Events per second the tracker's batched writes reach (rolled back afterwards)."""
    d = db.execute("SELECT id, email_id, contact_id FROM deliveries LIMIT 2000").fetchall()
    now = store.now_iso()
    rows = [
        ("open", 0, now, e, dl, None, c, 0, "198.51.100.1", "Mozilla/5.0", "GET", "human", "human")
        for i in range(n)
        for dl, e, c in [d[i % len(d)]]
    ]
    began = time.perf_counter()
    records.insert_events_measured(db, rows, with_triggers=with_triggers)
    return round(n / (time.perf_counter() - began))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/mailtally-bench-reports"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--emails", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()

    config = args.dir / "config.toml"
    db_path = args.dir / "mailtally.db"
    sizes = None
    if args.fresh or not config.exists() or not db_path.exists():
        cli.initialise(args.dir, force=True)
        began = time.perf_counter()
        sizes = generate(db_path, args.emails, args.events)
        sizes["generate_seconds"] = round(time.perf_counter() - began, 1)
    db = store.connect(db_path)
    counts = records.table_counts(db)
    out = args.dir / "report.json"
    user = db.execute("SELECT email FROM users ORDER BY id LIMIT 1").fetchone()[0]
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(days=30)).strftime("%Y-%m-%d")

    def in_process(filt=None, all_hits=False):
        return "[\n" + ",\n".join(reports.iter_email_json(db, filt, all_hits=all_hits)) + "\n]"

    run_cli(config, ["report", "emails", "--format", "json"], out)  # warm the page cache
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "sqlite": store.db.sqlite3.sqlite_version,
            "platform": platform.platform(),
        },
        "sizes": counts,
        "runs": args.runs,
        "cli_report_emails_json_s": median_time(
            lambda: run_cli(config, ["report", "emails", "--format", "json"], out), args.runs
        ),
        "cli_startup_only_s": median_time(
            lambda: run_cli(config, ["--help"], args.dir / "help.txt"), args.runs
        ),
        "output_bytes": out.stat().st_size,
        "in_process_report_emails_json_s": median_time(in_process, args.runs),
        "cli_report_emails_user_30d_json_s": median_time(
            lambda: run_cli(
                config,
                ["report", "emails", "--user", user, "--since", since, "--format", "json"],
                out,
            ),
            args.runs,
        ),
        "in_process_all_hits_s": median_time(lambda: in_process(all_hits=True), 1),
        "in_process_report_users_s": median_time(lambda: reports.user_report(db), args.runs),
        "in_process_report_links_s": median_time(lambda: reports.link_report(db), 1),
        "events_insert_per_s_with_triggers": insert_rate(db, True),
        "events_insert_per_s_without_triggers": insert_rate(db, False),
    }
    if sizes:
        results["generated"] = sizes
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
