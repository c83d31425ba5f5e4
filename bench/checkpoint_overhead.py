"""Checkpoint overhead: what saving costs the training loop, synchronously and in the background.

Trains the same config three ways, each in a fresh subprocess: no checkpoints, a synchronous save
every N steps, an async save every N steps (`checkpoint.async = true`). The modes run in the order
none, sync, async, async, sync, none (and so on for more rounds) so that a machine that speeds up
or slows down during the benchmark does not favour one mode. Prints, per mode: mean step time over
the timed window (which holds every save and what follows it), tokens/s, the overhead against no
checkpoints, the time the loop was blocked per save (the snapshot copy, plus the whole write when
synchronous) and the wall and CPU time of each write.

On a shared machine the means of separate runs differ by more than the few percent a checkpoint
costs, so the headline figure is local: the cost of a save is the time the `--after` steps that
follow it (the save itself, and the background write overlapping them) took beyond the run's median
step, and the overhead is that cost spread over the `--every` steps it protects. The same figure
for "none", at the same steps, is the control: how much a neighbour's noise alone adds there.

    python bench/checkpoint_overhead.py                          # tiny recipe, save every 25 steps
    python bench/checkpoint_overhead.py --every 10 --saves 2 --rounds 1 --threads 1
    python bench/checkpoint_overhead.py --steps 60               # window = steps after warm-up
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

from _data import dataset  # bench/ is on sys.path when a bench runs as a script

ROOT = Path(__file__).resolve().parents[1]

MODES = ["none", "sync", "async"]


class Clock:
    """Observer: the time each step was logged, and each checkpoint event."""

    def __init__(self):
        self.t: dict[int, float] = {}
        self.saves: list[dict] = []

    def on_step(self, r):
        self.t[r["step"]] = time.perf_counter()

    def on_event(self, e):
        if e["event"] == "checkpoint":
            self.saves.append({"step": e["step"], "blocked_s": e["blocked_s"]})

    def on_end(self, s):
        pass


def worker(args: argparse.Namespace) -> None:
    from leantrain.config import load_config
    from leantrain.train.trainer import Trainer

    every = args.every if args.mode != "none" else 0
    cfg = load_config(recipe=args.recipe, overrides={
        "data": {"path": args.data},
        "train": {"steps": args.steps, "eval_every": 0, "eval_steps": 1, "sample_tokens": 0,
                  "threads": args.threads},
        "precision": {"dtype": args.dtype},
        "checkpoint": {"every": every, "keep": 2, "async": args.mode == "async"},
        "log": {"every": 1, "progress": "none", "grad_health_every": 0},
    })
    clock = Clock()
    with tempfile.TemporaryDirectory(dir=args.scratch) as run_dir:
        trainer = Trainer(cfg, run_dir, observers=[clock], resume=False)
        trainer.fit()
        writes = trainer.checkpointer.timings
    # interval k: from step k-1 logged to step k logged; it holds the save made at the end of step k-1
    window = range(args.warmup + 1, args.steps)  # the last step also evaluates: left out
    intervals = {k: clock.t[k] - clock.t[k - 1] for k in window}
    inside = [s for s in clock.saves if args.warmup <= s["step"] < args.steps - 1]
    written = [w for w in writes if args.warmup <= w["step"] < args.steps - 1]
    print(json.dumps({
        "mode": args.mode, "intervals": intervals, "saves": inside, "writes": written, "every": args.every,
        "tokens_per_step": trainer.plan["tokens_per_step"], "params": trainer.plan["params"],
        "dtype": trainer.plan["dtype"], "threads": trainer.plan["threads"],
        "checkpoint_bytes": writes[-1]["bytes"] if writes else 0,
    }))


def run_mode(mode: str, args: argparse.Namespace, data: str, scratch: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--data", data, "--scratch", str(scratch),
           "--recipe", args.recipe, "--steps", str(args.steps), "--every", str(args.every),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--dtype", args.dtype]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{mode} run failed:\n{r.stderr}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["intervals"] = {int(k): v for k, v in out["intervals"].items()}
    print(f"  {mode:5} {time.perf_counter() - t0:6.1f} s, mean step "
          f"{statistics.mean(out['intervals'].values()):.3f} s", flush=True)
    return out


def save_costs(run: dict, after: int) -> tuple[list[float], float]:
    """Per save (for "none": per step where a save would be), the time of the `after` steps that
    follow it beyond the run's median step; and that median."""
    d = run["intervals"]
    median = statistics.median(d.values())
    at = [s for s in d if s % run["every"] == 0 and all(s + j in d for j in range(1, after + 1))]
    return [sum(d[s + j] - median for j in range(1, after + 1)) for s in at], median


def pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--data", help="token dataset (default data/stdlib, prepared in a temp dir if missing)")
    p.add_argument("--every", type=int, default=25, help="steps between saves (25)")
    p.add_argument("--saves", type=int, default=2, help="saves inside the timed window (2)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out at the start (3)")
    p.add_argument("--steps", type=int, help="total steps; default warmup + saves*every + after + 1")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the three modes, order reversed each round (2)")
    p.add_argument("--after", type=int, default=3, help="steps after a save charged to it (3)")
    p.add_argument("--threads", type=int, default=0, help="train.threads (0: one per physical core)")
    p.add_argument("--dtype", default="auto", help="precision.dtype (auto)")
    p.add_argument("--worker", choices=MODES, dest="mode", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps is None:
        args.steps = args.warmup + args.saves * args.every + args.after + 1
    if args.mode:
        return worker(args)

    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        scratch = Path(tmp)
        data = dataset(args.data, scratch)
        results: dict[str, list[dict]] = {m: [] for m in MODES}
        for rnd in range(args.rounds):
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            print(f"round {rnd + 1}/{args.rounds}", flush=True)
            for mode in order:
                results[mode].append(run_mode(mode, args, data, scratch))

    first = results["none"][0]
    timed = args.steps - 1 - args.warmup
    print(f"\ncheckpoint overhead · recipe {args.recipe} · {first['params'] / 1e6:.2f}M params · {first['dtype']} · "
          f"{first['threads']} threads · {first['checkpoint_bytes'] / 1e6:.1f} MB per checkpoint · save every "
          f"{args.every} steps · {timed} steps timed per run (after {args.warmup} warm-up) · {args.rounds} round(s)")
    means = {m: statistics.mean(d for r in results[m] for d in r["intervals"].values()) for m in MODES}
    head = (f"{'mode':6} {'mean step':>10} {'median':>8} {'tokens/s':>9} {'vs none':>8} {'saves':>5} "
            f"{'blocked/save':>13} {'write/save wall, cpu':>21} {'cost/save':>10} {'overhead':>9}")
    print(head)
    print("-" * len(head))
    overhead = {}
    for m in MODES:
        costs, medians = [], []
        for r in results[m]:
            c, med = save_costs(r, args.after)
            costs += c
            medians.append(med)
        median = statistics.mean(medians)
        cost = statistics.mean(costs) if costs else float("nan")
        overhead[m] = cost / (args.every * median)
        saves = [s for r in results[m] for s in r["saves"]]
        writes = [w for r in results[m] for w in r["writes"]]
        blocked = f"{statistics.mean(s['blocked_s'] for s in saves):.3f} s" if saves else "-"
        write = (f"{statistics.mean(w['wall_s'] for w in writes):.3f} s, "
                 f"{statistics.mean(w['cpu_s'] for w in writes):.3f} s") if writes else "-"
        vs_none = "-" if m == "none" else pct(means[m] / means["none"] - 1)
        print(f"{m:6} {means[m]:>8.3f} s {median:>6.3f} s {first['tokens_per_step'] / means[m]:>9,.0f} {vs_none:>8} "
              f"{len(saves):>5} {blocked:>13} {write:>21} {cost:>8.3f} s {pct(overhead[m]):>9}")
    print(f"\noverhead = cost/save / ({args.every} steps x median step); cost/save = time of the {args.after} steps "
          "after a save beyond the median step (for none: after the steps where a save would be, the noise floor)")
    print(f"step-time overhead of checkpointing every {args.every} steps, net of the noise floor: "
          f"sync {pct(overhead['sync'] - overhead['none'])}, async {pct(overhead['async'] - overhead['none'])}")


if __name__ == "__main__":
    main()
