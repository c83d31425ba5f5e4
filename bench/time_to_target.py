"""Time to target: how long each optimizer + schedule takes to reach the val loss a tuned AdamW + cosine reaches.

First a sweep (`--sweep-adamw`, one seed) trains AdamW + cosine at each learning rate of a log grid and keeps
the lr with the lowest final val loss: an untuned baseline flatters every alternative. That lr becomes the
baseline's (its sweep run is reused as its first seed) and the lr of every contender that does not set its
own (Muon's embeddings, head and norms, AdamW + WSD, schedule-free AdamW).

Every contender trains the demo model (recipe tiny: 4 layers, dim 256, seq 256) on the built-in corpus
(data/stdlib) for the same step budget (a fraction of it where a contender has a "budget"), with the same
seeds, evaluating on the same fixed val batches every `--eval-every` steps. The target is the val loss the
tuned AdamW + cosine reaches at the end of its budget (the worst of its seeds, so the baseline reaches it on
every seed). For each contender the table
shows the steps, tokens, training seconds (step time only: evaluation and checkpoint time are left out) and
energy (when the run records energy_j) at the first evaluation at or below the target, averaged over the
seeds that reached it, and the ratio of time to the baseline's; then the curves: val loss against training
seconds at every evaluation, the mean over seeds, `*` from the first point at or below the target.

    python bench/time_to_target.py                                # sweep 4 lrs + 3 contenders x 2 seeds, ~12 min
    python bench/time_to_target.py --sweep-adamw 3e-3             # no sweep: AdamW at 3e-3
    python bench/time_to_target.py --only muon-cosine,lion-cosine,lamb-cosine --seeds 1,2,3 --steps 200
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
# Contenders without their own optim.lr take the lr the AdamW sweep picks. "budget" (a fraction of --steps)
# gives a contender a shorter run: its schedule decays within it, which is how a schedule reaches a loss
# early (measured inside a full-length run, it is still at its peak lr when it passes the target).
CONTENDERS: dict[str, dict[str, object]] = {
    "adamw-cosine": {"optim.name": "adamw", "optim.schedule": "cosine"},
    "adamw-wsd": {"optim.name": "adamw", "optim.schedule": "wsd", "optim.wsd_shape": "1-sqrt"},
    "muon-cosine": {"optim.name": "muon", "optim.schedule": "cosine", "optim.muon_lr": 0.02,
                    "optim.muon_momentum": 0.95},
    # Muon's AdamW part (embeddings, head, norms) at the tiny recipe's own lr, which AdamW alone cannot take at
    # this batch, and no warmup: the orthogonalised hidden updates have a fixed size from the first step, and
    # they keep the model stable (a warmup cost Muon 5-15 steps here; AdamW without one ended 0.35 higher)
    "muon-fast": {"optim.name": "muon", "optim.schedule": "cosine", "optim.muon_lr": 0.02, "optim.lr": 3e-3,
                  "optim.warmup_steps": 0},
    # batch-size warmup: each step's batch grows from 1 to 8 sequences over the first 30 steps
    "muon-fast-bw": {"optim.name": "muon", "optim.schedule": "cosine", "optim.muon_lr": 0.02, "optim.lr": 3e-3,
                     "optim.warmup_steps": 0, "train.batch_warmup_steps": 30},
    "adamw-bw": {"optim.name": "adamw", "optim.schedule": "cosine", "train.batch_warmup_steps": 30},
    "muon-wsd": {"optim.name": "muon", "optim.schedule": "wsd", "optim.wsd_shape": "1-sqrt", "optim.muon_lr": 0.02},
    "lion-cosine": {"optim.name": "lion", "optim.schedule": "cosine", "optim.lr": 5e-4, "optim.weight_decay": 0.5},
    "lamb-cosine": {"optim.name": "lamb", "optim.schedule": "cosine", "optim.lr": 1e-2},
    "adamw-w0": {"optim.name": "adamw", "optim.schedule": "cosine", "optim.warmup_steps": 0},
    "sf-adamw": {"optim.name": "schedule_free_adamw", "optim.schedule": "constant"},
    "muon-wsd-60": {"optim.name": "muon", "optim.schedule": "wsd", "optim.wsd_shape": "1-sqrt",
                    "optim.muon_lr": 0.02, "budget": 0.6},
    "muon-wsd-50": {"optim.name": "muon", "optim.schedule": "wsd", "optim.wsd_shape": "1-sqrt",
                    "optim.muon_lr": 0.02, "budget": 0.5},
}
# the sweep and these fit ~12 minutes on 2 cores; Lion, LAMB, schedule-free AdamW and the shortened WSD runs lost
# to Muon here before (docs/optimizers.md)
DEFAULT = ["adamw-cosine", "muon-cosine", "muon-fast"]
# factor-1.4 grid around the optimum: at 8 x 256 tokens per step the tiny recipe's 3e-3 is too high for AdamW
# (1.4e-3 beat 7e-4, 1e-3 and 2e-3; 3e-3, 6e-3 and 1.2e-2 were worse still)
SWEEP = "7e-4,1e-3,1.4e-3,2e-3"


def run_one(name: str, overrides: dict[str, object], seed: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Train one contender at one seed; returns its eval records (step, tokens, train_s, val_loss, energy_j)."""
    from leantrain.config import load_config
    from leantrain.train.trainer import Trainer

    overrides = dict(overrides)
    steps = max(1, round(args.steps * overrides.pop("budget", 1.0)))
    over = {
        "data.path": args.data, "train.steps": steps, "train.micro_batch_size": args.batch,
        "train.seed": seed, "train.eval_every": args.eval_every, "train.eval_steps": args.eval_steps,
        "train.sample_tokens": 0, "optim.warmup_steps": args.warmup, "checkpoint.every": 0,
        "log.every": args.eval_every, "log.progress": "none", "log.grad_health_every": 0,
        # the optimizers are compared as they are: a guard skipping spiky steps (or stopping a run) would not
        "guard.policy": "off", **overrides,
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


def fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def parse_lrs(text: str) -> list[float]:
    """'1e-3,3e-3' -> [0.001, 0.003]; ValueError names the bad item."""
    lrs = []
    for item in text.split(","):
        try:
            lr = float(item)
        except ValueError:
            raise ValueError(f"{item.strip()!r} is not a number") from None
        if not 0 < lr < 1:
            raise ValueError(f"{item.strip()} is outside (0, 1)")
        lrs.append(lr)
    return sorted(set(lrs))


def sweep_adamw(lrs: list[float], seed: int, args: argparse.Namespace, tmp: Path, t0: float) -> list[dict]:
    """AdamW + cosine at each lr, one seed; prints the table, returns the runs (each with its `lr`)."""
    runs = []
    for lr in lrs:
        run = run_one(BASELINE, {**CONTENDERS[BASELINE], "optim.lr": lr}, seed, args, tmp / f"sweep-{lr:g}")
        run["lr"] = lr
        runs.append(run)
        print(f"  sweep lr {lr:<8g} seed {seed}: final val {run['final_val']:.4f} "
              f"({run['evals'][-1]['train_s']:.0f} s training, {time.perf_counter() - t0:.0f} s so far)", flush=True)
    best = min(runs, key=lambda r: r["final_val"])
    print(f"\nAdamW + cosine lr sweep ({args.steps} steps, seed {seed}): lowest final val loss wins")
    print(f"{'lr':>8} {'final val':>9} {'min val':>8} {'train s':>8}")
    for r in runs:
        print(f"{r['lr']:>8g} {r['final_val']:>9.4f} {min(e['val_loss'] for e in r['evals']):>8.4f} "
              f"{r['evals'][-1]['train_s']:>8.1f}{'  <- picked' if r is best else ''}")
    if len(runs) > 1 and best in (runs[0], runs[-1]):
        print(f"note: the best lr {best['lr']:g} is at the edge of the grid; the optimum may lie beyond it")
    return runs


def curves(names: list[str], runs: list[dict], target: float) -> None:
    """Val loss against training seconds at each evaluation, the mean over seeds, one column pair per contender."""
    by_name = {n: [r for r in runs if r["name"] == n] for n in names}
    steps = sorted({e["step"] for r in runs for e in r["evals"]})
    width = max(15, *(len(n) for n in names))
    print(f"\ncurves: val loss at training seconds (mean over seeds; * = at or below the target {target:.4f})")
    print(f"{'step':>5} " + " ".join(f"{n:>{width}}" for n in names))
    for step in steps:
        cells = []
        for n in names:
            at = [e for r in by_name[n] for e in r["evals"] if e["step"] == step]
            if not at:
                cells.append(f"{'—':>{width}}")
                continue
            s, v = statistics.fmean(e["train_s"] for e in at), statistics.fmean(e["val_loss"] for e in at)
            cells.append(f"{f'{s:.1f} s {v:.3f}' + ('*' if v <= target else ' '):>{width}}")
        print(f"{step:>5} " + " ".join(cells))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help=f"comma-separated contenders (default {','.join(DEFAULT)}); all: "
                   f"{','.join(CONTENDERS)}")
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds (default 1,2)")
    p.add_argument("--sweep-adamw", default=SWEEP, metavar="LR1,LR2,...",
                   help=f"AdamW + cosine learning rates to sweep with the first seed; the best is the baseline "
                        f"(default {SWEEP}; one lr: no sweep)")
    p.add_argument("--steps", type=int, default=150, help="step budget of every run (150)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (8, of 256 tokens)")
    p.add_argument("--warmup", type=int, default=15, help="warmup steps (15)")
    p.add_argument("--eval-every", type=int, default=5, help="steps between evaluations (5)")
    p.add_argument("--eval-steps", type=int, default=4, help="val batches per evaluation (4)")
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib"), help="token dataset (data/stdlib)")
    p.add_argument("--set", action="append", default=[], metavar="NAME:section.key=value",
                   help="extra override for one contender; repeatable (AdamW + cosine's lr: use --sweep-adamw)")
    p.add_argument("--json", help="also write all runs, the sweep and the table to this file")
    args = p.parse_args()

    names = args.only.split(",") if args.only else list(DEFAULT)
    if BASELINE not in names:
        names.insert(0, BASELINE)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; choose from {', '.join(CONTENDERS)}")
    try:
        lrs = parse_lrs(args.sweep_adamw)
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as e:
        p.error(f"--sweep-adamw takes learning rates and --seeds integers, comma-separated: {e}")
    contenders = {n: dict(CONTENDERS[n]) for n in names}
    follow_lr = [n for n in names if "optim.lr" not in contenders[n]]  # before --set: a set lr is the user's
    for s in args.set:
        name, _, kv = s.partition(":")
        key, _, value = kv.partition("=")
        if name not in contenders or "." not in key or not value:
            p.error(f"--set {s!r}: expected NAME:section.key=value with NAME one of {', '.join(names)}")
        if name == BASELINE and key == "optim.lr":
            p.error("--set adamw-cosine:optim.lr: the baseline's lr comes from the sweep; use --sweep-adamw LR")
        contenders[name][key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value

    runs: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ttt-") as tmp:
        sweep = sweep_adamw(lrs, seeds[0], args, Path(tmp), t0)
        best = min(sweep, key=lambda r: r["final_val"])
        for n in follow_lr:
            contenders[n]["optim.lr"] = best["lr"]
        print()
        for name in names:  # baseline first: its final loss sets the target
            for seed in seeds:
                if name == BASELINE and seed == seeds[0]:
                    runs.append(best)  # the sweep already trained it
                else:
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
            "settings": " ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                                 for k, v in contenders[name].items()
                                 if k not in ("optim.name", "optim.schedule")),
        })
    base_s = rows[0]["train_s"]
    has_energy = any(r["energy_j"] is not None for r in rows)

    print(f"\ntime to val loss {target:.4f} (AdamW + cosine at the swept lr {best['lr']:g}, {args.steps} steps, worst "
          f"of seeds {seeds}); recipe tiny, {args.batch} x 256 tokens per step, eval every {args.eval_every} steps")
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
    curves(names, runs, target)
    best_row = min((r for r in rows[1:] if r["ratio"] is not None), key=lambda r: r["ratio"], default=None)
    if best_row:
        print(f"\nbest: {best_row['name']} reaches the tuned AdamW + cosine's final val loss in "
              f"{best_row['ratio']:.2f}x its training time")
    print(f"total wall time {time.perf_counter() - t0:.0f} s; ratio = training seconds to target / AdamW+cosine's "
          "(— = not reached within the budget)")
    if args.json:
        sweep_rows = [{"lr": r["lr"], "final_val": r["final_val"], "train_s": r["evals"][-1]["train_s"]}
                      for r in sweep]
        Path(args.json).write_text(json.dumps({"target": target, "adamw_lr": best["lr"], "sweep": sweep_rows,
                                               "rows": rows, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
