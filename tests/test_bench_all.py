"""bench/all.py: each bench in its own process, its headline figures (reported or parsed) in one JSON and table."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_all_collects_reported_and_printed_figures_and_lists_skips(tmp_path):
    out = tmp_path / "all.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "all.py"), "--only", "plan_vs_published,guard,gpu_check",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["cpu"] and result["date"] and result["command"].startswith("python bench/all.py")
    by = {b["bench"]: b for b in result["benches"]}
    # plan_vs_published reports through _data.report_ratio: the torchtitan 8B case within its +-25% target
    rows = by["plan_vs_published"]["rows"]
    headline = next(x for x in rows if "h100x8" in x["name"])
    assert by["plan_vs_published"]["status"] == "ok" and 0.75 <= headline["value"] <= 1.25
    assert headline["figures"]["published"] == 5762 and "torchtitan" in headline["baseline"]
    # guard prints a table: its rows come from the pattern in bench/all.py
    guard = by["guard"]
    assert guard["status"] == "ok" and {x["name"] for x in guard["rows"]} == {
        "false skips per 1000 steps, old guard", "false skips per 1000 steps, default guard"}
    if not torch.cuda.is_available():
        assert by["gpu_check"]["status"] == "skipped" and "CUDA" in by["gpu_check"]["reason"]
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| plan_vs_published |") == len(rows) and "| gpu_check |" in table
    assert (tmp_path / "logs" / "guard.log").read_text().startswith("trace ")

    # a changed pattern is applied to the saved logs without running anything again
    assert subprocess.run([sys.executable, str(ROOT / "bench" / "all.py"), "--from-logs", "--out", str(out)],
                          capture_output=True, text=True, timeout=120).returncode == 0
    assert json.loads(out.read_text())["benches"] == result["benches"]
