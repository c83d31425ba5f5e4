"""How close the planner comes to measured runs on this machine, and the source of plan/calibration.json.

Each case trains a few steps of a recipe in a fresh `leantrain train` process (so the peak resident set is
that run's alone), then compares the logged peak_mem_bytes and step time with `leantrain.plan`'s estimate
for the same resolved config on "this CPU":

    python bench/plan_accuracy.py                 # table of predicted vs measured, ratios
    python bench/plan_accuracy.py --calibrate     # also write the measured MFU rows into plan/calibration.json
    python bench/plan_accuracy.py --fit           # refit CPU_RUNTIME_BYTES and CPU_ALLOCATOR_FACTOR (plan/memory.py)

Targets (issue 06): memory within +-15%, time within +-25% once calibrated. Timing is noisy on a shared
machine: run it when the cores are idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from leantrain.config import load_config
from leantrain.plan.catalog import this_cpu
from leantrain.plan.memory import CPU_ALLOCATOR_FACTOR, CPU_RUNTIME_BYTES
from leantrain.plan.planner import config_layout, estimate, load_calibration
from leantrain.train.telemetry import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "src" / "leantrain" / "plan" / "calibration.json"

CASES = {  # name: (recipe, overrides)
    "micro-fp32": ("tiny", ["--model.n_layers=2", "--model.dim=64", "--model.n_kv_heads=2", "--model.seq_len=64",
                            "--train.micro_batch_size=4", "--precision.dtype=fp32"]),
    "tiny-bf16": ("tiny", []),
    "tiny-fp32": ("tiny", ["--precision.dtype=fp32"]),
    "tiny-bf16-ac-full": ("tiny", ["--train.activation_checkpointing=full"]),
    "small-bf16": ("small", []),
    "small-fp32": ("small", ["--precision.dtype=fp32"]),
}


def run_case(recipe: str, overrides: list[str], steps: int, data: str) -> dict:
    """Train `steps` steps in a subprocess; returns peak memory, median step time, median MFU."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "leantrain.cli", "train", "--recipe", recipe, "--run-dir", tmp,
               f"--train.steps={steps}", "--train.eval_every=0", "--train.eval_steps=1", "--train.sample_tokens=0",
               "--checkpoint.every=0", "--log.every=1", "--log.progress=none", f"--data.path={data}", *overrides]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        metrics = read_jsonl(Path(tmp) / "metrics.jsonl")
        cfg = load_config(Path(tmp) / "config.toml")
    timed = metrics[2:] or metrics  # the first steps allocate and warm up
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.model.seq_len
    return {"cfg": cfg, "peak_mem_bytes": max(r["peak_mem_bytes"] for r in metrics),
            "step_time_s": tokens_per_step / tps, "mfu": statistics.median(r["mfu"] for r in timed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--data", default="data/stdlib")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    ap.add_argument("--calibrate", action="store_true", help="write measured MFU rows to plan/calibration.json")
    ap.add_argument("--fit", action="store_true", help="least-squares fit of the CPU runtime and allocator factor")
    args = ap.parse_args()

    hw = this_cpu()
    table = load_calibration()
    rows, measured_rows, fit_points = [], [], []
    print(f"hardware: {hw.name}; bf16 peak {hw.peak_bf16 / 1e9:.0f} GFLOP/s, fp32 {hw.peak_fp32 / 1e9:.0f}")
    print(f"{'case':20} {'mem pred':>9} {'mem meas':>9} {'ratio':>6} {'step pred':>9} {'step meas':>9} {'ratio':>6}"
          f" {'MFU meas':>8} {'tensors':>8}")
    for name in args.cases.split(","):
        recipe, overrides = CASES[name]
        m = run_case(recipe, overrides, args.steps, args.data)
        cfg = m["cfg"]
        est = estimate(cfg, hw, config_layout(cfg, hw, 1), table)
        mem_ratio = est.peak_memory_bytes / m["peak_mem_bytes"]
        time_ratio = est.compute_s / m["step_time_s"]
        tensors = (est.peak_memory_bytes - CPU_RUNTIME_BYTES) / CPU_ALLOCATOR_FACTOR  # the modelled tensors alone
        fit_points.append((tensors, m["peak_mem_bytes"]))
        print(f"{name:20} {est.peak_memory_bytes / 2**20:8.0f}M {m['peak_mem_bytes'] / 2**20:8.0f}M {mem_ratio:6.2f} "
              f"{est.compute_s:9.3f} {m['step_time_s']:9.3f} {time_ratio:6.2f} {m['mfu']:8.3f} "
              f"{tensors / 2**20:7.0f}M")
        rows.append((name, mem_ratio, time_ratio))
        measured_rows.append({"name": f"{name} ({cfg.model.n_layers}x{cfg.model.dim}, seq {cfg.model.seq_len}, "
                              f"micro-batch {cfg.train.micro_batch_size})", "device": "cpu",
                              "cpu": hw.name, "dtype": est.layout.dtype,
                              "flops_per_token": est.flops_per_token, "mfu": round(m["mfu"], 4),
                              "date": time.strftime("%Y-%m-%d")})
    worst_mem = max(abs(r[1] - 1) for r in rows)
    worst_time = max(abs(r[2] - 1) for r in rows)
    print(f"worst memory error {worst_mem:.0%} (target 15%), worst time error {worst_time:.0%} (target 25%)")
    if args.fit and len(fit_points) >= 2:  # measured = runtime + factor x tensors, relative errors weighted
        import numpy as np

        t, meas = np.array(fit_points).T
        w = 1 / meas
        runtime, factor = np.linalg.lstsq(np.vstack([w, t * w]).T, meas * w, rcond=None)[0]
        worst = np.max(np.abs((runtime + factor * t) / meas - 1))
        print(f"fit: CPU_RUNTIME_BYTES = {runtime / 2**20:.0f} MiB, CPU_ALLOCATOR_FACTOR = {factor:.2f} "
              f"(worst error {worst:.0%})")
    if args.calibrate:
        table["measured"] = [r for r in measured_rows if not r["name"].startswith("tiny-bf16-ac")]
        table["command"] = "python bench/plan_accuracy.py --calibrate --steps " + str(args.steps)
        CALIBRATION.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {len(table['measured'])} measured rows to {CALIBRATION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
