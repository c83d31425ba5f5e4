"""Time to target: how long each optimizer + schedule takes to reach the val loss AdamW + cosine reaches.

Every contender trains the demo model (recipe tiny: 4 layers, dim 256, seq 256) on the built-in corpus
(data/stdlib) for the same step budget, with the same seeds, evaluating on the same fixed val batches
every `--eval-every` steps. The target is the val loss AdamW + cosine reaches at the end of its budget
(the worst of its seeds, so the baseline reaches it on every seed). For each contender the table shows
the steps, tokens, training seconds (step time only: evaluation and checkpoint time are left out) and
energy (when the run records energy_j) at the first evaluation at or below the target, averaged over
the seeds that reached it, and the ratio of time to the baseline's.

    python bench/time_to_target.py                                # 6 contenders x 2 seeds, ~12 min idle
    python bench/time_to_target.py --only adamw-cosine,muon-cosine --seeds 1,2,3 --steps 200
    python bench/time_to_target.py --set muon-cosine:optim.muon_lr=0.03   # try another setting

The runs share this machine's cores with whatever else runs on it: time ratios are only as good as the
quiet of the machine (the step counts and tokens to target are not affected by load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

BASELINE = "adamw-cosine"
# name -> config overrides; learning rates set as the literature suggests for each, not tuned further here:
# Muon 0.02 with momentum 0.95 on hidden matrices (AdamW's lr on the rest); Lion lr ~6x below AdamW's
# with ~5x the weight decay (the same lr*wd product); LAMB's step is relative to each tensor's norm,
# so its lr is a fraction of |w| per step; schedule-free AdamW replaces the decay by averaging.
CONTENDERS: dict[str, dict[str, object]] = {
    "adamw-cosine": {"optim.name": "adamw", "optim.schedule": "cosine"},
    "adamw-wsd": {"optim.name": "adamw", "optim.schedule": "wsd", "optim.wsd_shape": "1-sqrt"},
    "muon-cosine": {"optim.name": "muon", "optim.schedule": "cosine", "optim.muon_lr": 0.02,
                    "optim.muon_momentum": 0.95},
    "muon-wsd": {"optim.name": "muon", "optim.schedule": "wsd", "optim.wsd_shape": "1-sqrt", "optim.muon_lr": 0.02},
    "lion-cosine": {"optim.name": "lion", "optim.schedule": "cosine", "optim.lr": 5e-4, "optim.weight_decay": 0.5},
    "lamb-cosine": {"optim.name": "lamb", "optim.schedule": "cosine", "optim.lr": 1e-2},
    "sf-adamw": {"optim.name": "schedule_free_adamw", "optim.schedule": "constant"},
}
DEFAULT = ["adamw-cosine", "muon-cosine", "muon-wsd", "lion-cosine", "lamb-cosine", "sf-adamw"]


def run_one(name: str, overrides: dict[str, object], seed: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Train one contender at one seed; returns its eval records (step, tokens, train_s, val_loss, energy_j)."""
    from leantrain.config import load_config
    from leantrain.train.trainer import Trainer

    over = {
        "data.path": args.data, "train.steps": args.steps, "train.micro_batch_size": args.batch,
        "train.seed": seed, "train.eval_every": args.eval_every, "train.eval_steps": args.eval_steps,
        "train.sample_tokens": 0, "optim.warmup_steps": args.warmup, "checkpoint.every": 0,
        "log.every": args.eval_every, "log.progress": "none", "log.grad_health_every": 0, **overrides,
    }
    nested: dict[str, dict[str, object]] = {}
    for dotted, v in over.items():
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = v
    cfg = load_config(recipe="tiny", overrides=nested)
    run_dir = tmp / f"{name}-seed{seed}"
    Trainer(cfg, run_dir, resume=False).fit()
    out, train_s, prev_tokens = [], 0.0, 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        train_s += (r["tokens"] - prev_tokens) / r["tokens_per_s"]  # the window's step time, without eval
        prev_tokens = r["tokens"]
        if "val_loss" in r:
            out.append({"step": r["step"], "tokens": r["tokens"], "train_s": train_s, "val_loss": r["val_loss"],
                        "energy_j": r.get("energy_j")})
    return {"name": name, "seed": seed, "evals": out, "final_val": out[-1]["val_loss"]}


def time_to_target(run: dict, target: float) -> dict | None:
    """The first evaluation at or below the target, or None when the run never got there."""
    return next((e for e in run["evals"] if e["val_loss"] <= target), None)


def mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help=f"comma-separated contenders (default {','.join(DEFAULT)}); all: "
                   f"{','.join(CONTENDERS)}")
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds (default 1,2)")
    p.add_argument("--steps", type=int, default=150, help="step budget of every run (150)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (8, of 256 tokens)")
    p.add_argument("--warmup", type=int, default=15, help="warmup steps (15)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between evaluations (10)")
    p.add_argument("--eval-steps", type=int, default=4, help="val batches per evaluation (4)")
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib"), help="token dataset (data/stdlib)")
    p.add_argument("--set", action="append", default=[], metavar="NAME:section.key=value",
                   help="extra override for one contender; repeatable")
    p.add_argument("--json", help="also write all runs and the table to this file")
    args = p.parse_args()

    names = args.only.split(",") if args.only else list(DEFAULT)
    if BASELINE not in names:
        names.insert(0, BASELINE)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; choose from {', '.join(CONTENDERS)}")
    contenders = {n: dict(CONTENDERS[n]) for n in names}
    for s in args.set:
        name, _, kv = s.partition(":")
        key, _, value = kv.partition("=")
        contenders[name][key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    seeds = [int(s) for s in args.seeds.split(",")]

    runs: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ttt-") as tmp:
        for name in names:  # baseline first: its final loss sets the target
            for seed in seeds:
                runs.append(run_one(name, contenders[name], seed, args, Path(tmp)))
                r = runs[-1]
                print(f"  {name:14} seed {seed}: final val {r['final_val']:.4f} "
                      f"({r['evals'][-1]['train_s']:.0f} s training, {time.perf_counter() - t0:.0f} s so far)",
                      flush=True)
    target = max(r["final_val"] for r in runs if r["name"] == BASELINE)

    rows = []
    for name in names:
        mine = [r for r in runs if r["name"] == name]
        hits = [time_to_target(r, target) for r in mine]
        got = [h for h in hits if h is not None]
        rows.append({
            "name": name, "reached": f"{len(got)}/{len(mine)}",
            "steps": mean([h["step"] for h in got]), "tokens": mean([h["tokens"] for h in got]),
            "train_s": mean([h["train_s"] for h in got]), "energy_j": mean([h["energy_j"] for h in got]),
            "final_val": mean([r["final_val"] for r in mine]),
            "settings": " ".join(f"{k.split('.')[-1]}={v}" for k, v in contenders[name].items()
                                 if k not in ("optim.name", "optim.schedule")),
        })
    base_s = rows[0]["train_s"]
    has_energy = any(r["energy_j"] is not None for r in rows)

    def fmt(v: float | None, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    print(f"\ntime to val loss {target:.4f} (AdamW + cosine at {args.steps} steps, worst of seeds {seeds}); "
          f"recipe tiny, {args.batch} x 256 tokens per step, eval every {args.eval_every} steps")
    head = f"{'contender':14} {'reached':>7} {'steps':>6} {'tokens':>9} {'train s':>8} "
    head += f"{'energy J':>9} " if has_energy else ""
    head += f"{'x AdamW+cos':>11} {'final val':>9}  settings"
    print(head)
    for r in rows:
        ratio = r["train_s"] / base_s if r["train_s"] is not None and base_s else None
        r["ratio"] = ratio
        line = (f"{r['name']:14} {r['reached']:>7} {fmt(r['steps'], '.0f'):>6} {fmt(r['tokens'], ',.0f'):>9} "
                f"{fmt(r['train_s'], '.1f'):>8} ")
        line += f"{fmt(r['energy_j'], ',.0f'):>9} " if has_energy else ""
        line += f"{fmt(ratio, '.2f'):>11} {fmt(r['final_val'], '.4f'):>9}  {r['settings']}"
        print(line)
    print(f"total wall time {time.perf_counter() - t0:.0f} s; ratio = training seconds to target / AdamW+cosine's "
          "(— = not reached within the budget)")
    if args.json:
        Path(args.json).write_text(json.dumps({"target": target, "rows": rows, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
