"""The bench harness runs end to end: real rewrite, real numbers, results.json written."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_rewrite_bench_writes_results(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--only",
            "rewrite",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["machine"]["cpus"] >= 1 and "python" in data["versions"]
    names = [r["bench"] for r in data["results"]]
    assert any("60 KB" in n for n in names) and any("600 KB" in n for n in names)
    for r in data["results"]:
        v, floor = r["value"], r["baseline"]["regex floor"]
        assert 0 < v["min"] <= v["median"] <= v["max"] and v["runs"] >= 3
        assert floor["median"] > 0 and r["ratio"] == v["median"] / floor["median"]
