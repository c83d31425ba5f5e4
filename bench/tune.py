"""What `leantrain tune` buys, on real runs of a small model (one process, through the Python API).

1. Default config vs a tuned one at the same per-run budget: the val loss the default settings reach, and the
   best val loss of a TPE + ASHA study of N trials (and what the study cost, in token-steps).
2. Pruning on vs off: the same study with the pruner off; trials completed, token-steps used, best loss.
3. Multi-objective (val_loss, energy_kwh; NSGA-II): the Pareto front's spread in val loss and kWh, and how
   much energy the cheapest point on the front saves for how much loss.

    python bench/tune.py                     # ~1.5 minutes on 2 CPU cores
    python bench/tune.py --trials 16 --steps 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _data import ROOT, dataset

sys.path.insert(0, str(ROOT / "src"))

SPACE = {"optim.lr": [3e-4, 3e-2, "log"], "optim.warmup_steps": [0, 20], "optim.name": ["adamw", "lion"]}
ENERGY_SPACE = {"optim.lr": [1e-3, 2e-2, "log"], "model.dim": [32, 64, 96, 128], "model.n_layers": [1, 3]}


def base(data: str, steps: int, trials: int, **tune) -> dict:
    return {"model": {"n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 4, "seq_len": 64},
            "data": {"path": data},
            "train": {"steps": steps, "micro_batch_size": 8, "eval_every": max(1, steps // 6), "eval_steps": 4,
                      "sample_tokens": 0},
            "checkpoint": {"every": 0, "keep": 1}, "log": {"every": max(1, steps // 6), "progress": "none"},
            "energy": {"meter": "auto"},
            "tune": {"trials": trials, "space": SPACE, **tune}}


def study(name: str, out: Path, cfg: dict) -> tuple[object, float]:
    import leantrain

    t0 = time.perf_counter()
    leantrain.tune(leantrain.load_config(overrides=cfg), out / name)
    wall = time.perf_counter() - t0
    return leantrain.tune_show(out / name, page=True), wall


def tokens(result) -> int:
    return sum(t.attrs.get("tokens", 0) for t in result.trials)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="token dataset (default data/stdlib, else a small one is made)")
    ap.add_argument("--trials", type=int, default=12, help="trials per single-objective study (12)")
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps per run (48)")
    ap.add_argument("--energy-trials", type=int, default=10, help="trials of the multi-objective study (10)")
    args = ap.parse_args()

    import leantrain
    from leantrain.device import cpu_model, physical_cores

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        data = dataset(args.data, out)
        print(f"CPU: {cpu_model()} ({physical_cores()} cores); model dim 64 x 2 layers, seq 64, batch 8, "
              f"{args.steps} steps per run", flush=True)

        cfg = base(data, args.steps, args.trials)
        default = leantrain.load_config(overrides={k: v for k, v in cfg.items() if k != "tune"})
        t0 = time.perf_counter()
        run = leantrain.train(default, out / "default")
        default_wall = time.perf_counter() - t0
        per_run = run.tokens
        print(f"default config: val loss {run.val_loss:.4f} ({run.tokens:,} tokens, {default_wall:.1f} s)", flush=True)

        pruned, pruned_wall = study("asha", out, cfg)
        best = pruned.row(pruned.best[0])
        print(f"tune, {args.trials} trials, TPE + ASHA: best val loss {best.values[0]:.4f} (trial {best.number}: "
              f"{best.params}); {tokens(pruned):,} token-steps = {tokens(pruned) / per_run:.1f} default runs, "
              f"{pruned_wall:.1f} s", flush=True)

        cfg_off = base(data, args.steps, args.trials, pruner="none")
        full, full_wall = study("no-pruning", out, cfg_off)
        best_full = full.row(full.best[0])
        print("\npruning   trials completed  pruned  token-steps   best val loss  wall s")
        for name, r, wall, b in (("on (asha)", pruned, pruned_wall, best), ("off", full, full_wall, best_full)):
            states = [t.state for t in r.trials]
            print(f"{name:<9} {states.count('complete'):>16} {states.count('pruned'):>7} {tokens(r):>12,} "
                  f"{b.values[0]:>15.4f} {wall:>7.1f}")
        print(f"pruning saved {1 - tokens(pruned) / tokens(full):.0%} of the token-steps; best loss "
              f"{best.values[0] - best_full.values[0]:+.4f} vs no pruning", flush=True)

        cfg_e = base(data, args.steps, args.energy_trials, objective="val_loss,energy_kwh")
        cfg_e["tune"]["space"] = ENERGY_SPACE
        multi, multi_wall = study("energy", out, cfg_e)
        front = sorted((multi.row(n) for n in multi.best), key=lambda t: t.values[0])
        source = run.metrics.get("energy_source", "?")
        print(f"\nmulti-objective (val_loss, energy_kwh; NSGA-II, {args.energy_trials} trials, {multi_wall:.1f} s, "
              f"energy source: {source}): Pareto front of {len(front)}")
        for t in front:
            print(f"  trial {t.number:>2}: val loss {t.values[0]:.4f}  {t.values[1] * 1000:.4f} Wh  {t.params}")
        if len(front) > 1:
            lo, cheap = front[0], front[-1]
            print(f"spread: val loss {lo.values[0]:.4f} .. {cheap.values[0]:.4f}, energy "
                  f"{cheap.values[1] * 1000:.4f} .. {lo.values[1] * 1000:.4f} Wh; the cheapest point saves "
                  f"{1 - cheap.values[1] / lo.values[1]:.0%} of the energy for {cheap.values[0] - lo.values[0]:+.4f} "
                  "val loss")


if __name__ == "__main__":
    main()
