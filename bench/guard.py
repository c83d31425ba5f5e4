"""The stability guard on real training traces: false skips on clean runs, catch rate on injected faults.

A trace is the per-step loss and gradient norm of a real run trained with the guard off
(`--log.every=1 --guard.policy=off`). Each guard configuration replays every trace through
`leantrain.train.guard.Guard`, as the trainer calls it, and counts

  false skips  clean steps the guard would drop (after the first one the replay keeps going as if
               it had not: the run really took the step)
  catch rate   for every step after the guard's warm-up (the learning-rate warm-up, then
               `min_history` steps; the same steps for the old defaults) and each fault kind, a
               fresh copy of the guard as it stood before that step is shown the faulted step:
               loss x2, x4 (gradient norm unchanged), gradient norm x10, x100 (loss unchanged),
               both x1.5 / x3, NaN or inf in either:
               the spikes the defaults must all catch ("min spike" is the lowest of these rates);
               then loss x1.5 and gradient norm x3 alone, which overlap healthy noise (a x1.5 of an
               easy batch is an ordinary loss): the sensitivity

The first rows are the old defaults (sigma 6, window 50, 20 steps of history, no floor but a std
floor of 1e-3 x mean, spike tests from step 21 whatever the warm-up) and the current defaults
(`GuardConfig()`: warm-up steps neither tested nor kept as history); then a grid around them.

    python bench/guard.py                          # the traces committed in tests/data/guard_traces.json
    python bench/guard.py --record 2 --save traces.json   # train the tiny recipe twice (seeds 1337, 7) first
    python bench/guard.py runs/tiny-*/             # metrics.jsonl of runs trained with --log.every=1
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import subprocess
import sys
import tempfile
import tomllib
from collections import deque
from pathlib import Path

import leantrain.recipes
from leantrain.config import GuardConfig
from leantrain.train.guard import Guard

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACES = ROOT / "tests" / "data" / "guard_traces.json"
FAULTS = {  # name -> (loss, grad norm) of the faulted step from the clean one
    "loss x2": lambda lo, g: (lo * 2, g), "loss x4": lambda lo, g: (lo * 4, g),
    "grad x10": lambda lo, g: (lo, g * 10), "grad x100": lambda lo, g: (lo, g * 100),
    "both x1.5/x3": lambda lo, g: (lo * 1.5, g * 3),
    "nan loss": lambda lo, g: (math.nan, g), "inf loss": lambda lo, g: (math.inf, g),
    "nan grad": lambda lo, g: (lo, math.nan), "inf grad": lambda lo, g: (lo, math.inf),
    # sensitivity, not promised
    "loss x1.5": lambda lo, g: (lo * 1.5, g), "grad x3": lambda lo, g: (lo, g * 3),
}
SENSITIVITY = ("loss x1.5", "grad x3")
OLD = {"sigma": 6.0, "window": 50, "min_history": 20, "min_loss_rise": 0.006, "min_grad_rise": 0.006}


def record(n: int, recipe: str, scratch: Path) -> dict[str, dict]:
    """Train `recipe` n times (seeds 1337, 7, 42, ...) with the guard off and a metrics line per step."""
    traces = {}
    for seed in [1337, 7, 42, 123, 2024][:n]:
        run = scratch / f"{recipe}-seed{seed}"
        print(f"recording {run.name} ...", flush=True)
        subprocess.run([sys.executable, "-m", "leantrain.cli", "train", "--recipe", recipe, "--run-dir", str(run),
                        "--log.every=1", "--guard.policy=off", "--checkpoint.every=0", "--log.progress=none",
                        f"--train.seed={seed}"], check=True, stdout=subprocess.DEVNULL)
        spec = tomllib.loads((Path(leantrain.recipes.__file__).parent / f"{recipe}.toml").read_text())
        traces[run.name] = trace_of(run / "metrics.jsonl", spec["optim"]["warmup_steps"])
    return traces


def trace_of(metrics: Path, warmup_steps: int) -> dict:
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "loss" in r and "step" in r]
    steps = [r["step"] for r in recs]
    if steps != list(range(1, len(steps) + 1)):
        sys.exit(f"{metrics}: not one metrics line per step (train with --log.every=1)")
    return {"warmup_steps": warmup_steps, "loss": [r["loss"] for r in recs],
            "grad_norm": [r["grad_norm"] for r in recs]}


def load(paths: list[str]) -> dict[str, dict]:
    traces: dict[str, dict] = {}
    for p in map(Path, paths):
        if p.is_dir():
            cfg = (p / "config.toml").read_text()
            warmup = int(next(line.split("=")[1] for line in cfg.splitlines() if line.startswith("warmup_steps")))
            traces[p.name] = trace_of(p / "metrics.jsonl", warmup)
        else:
            traces.update(json.loads(p.read_text()))
    return traces


def copy_of(g: Guard) -> Guard:
    c = Guard(g.cfg, g.warmup_steps)
    c.losses, c.norms = deque(g.losses, g.losses.maxlen), deque(g.norms, g.norms.maxlen)
    c.good_steps = g.good_steps
    return c


def replay(cfg: GuardConfig, trace: dict, use_warmup: bool) -> tuple[list[int], dict[str, list[int]], int]:
    """(false-skip steps, {fault: [steps it was caught, or -step when missed]}, steps tested)."""
    warmup = trace["warmup_steps"] if use_warmup else 0
    g = Guard(cfg, warmup)
    false, caught = [], {k: [] for k in FAULTS}
    for step, (loss, norm) in enumerate(zip(trace["loss"], trace["grad_norm"], strict=True), 1):
        if step > trace["warmup_steps"] + cfg.min_history:  # the same steps for every config, the old one too
            for name, fault in FAULTS.items():
                hit = copy_of(g).check(*fault(loss, norm)) is not None
                caught[name].append(step if hit else -step)
        if g.check(loss, norm) is not None:
            false.append(step)
            if g.good_steps >= g.warmup_steps:  # the clean run took this step: replay it as it happened
                g.losses.append(loss)
                g.norms.append(norm)
            g.good_steps += 1
    return false, caught, len(trace["loss"])


def evaluate(label: str, cfg: GuardConfig, traces: dict[str, dict], use_warmup: bool = True) -> dict:
    false_all, steps = {}, 0
    hits = {k: [0, 0] for k in FAULTS}
    missed: dict[str, list[str]] = {k: [] for k in FAULTS}
    for name, trace in traces.items():
        false, caught, n = replay(cfg, trace, use_warmup)
        false_all[name], steps = false, steps + n
        for k, v in caught.items():
            hits[k][0] += sum(s > 0 for s in v)
            hits[k][1] += len(v)
            missed[k] += [f"{name}@{-s}" for s in v if s < 0]
    return {"label": label, "cfg": cfg, "false": false_all, "steps": steps, "hits": hits, "missed": missed}


def row(r: dict) -> str:
    c = r["cfg"]
    n_false = sum(map(len, r["false"].values()))
    rates = [h / t if t else 1.0 for h, t in r["hits"].values()]
    spikes = [h / t for k, (h, t) in r["hits"].items() if t and k not in SENSITIVITY]
    return (f"{r['label']:9} {c.sigma:5.1f} {c.window:6d} {c.min_history:7d} {c.min_loss_rise:6.3g} "
            f"{c.min_grad_rise:6.3g} {n_false:6d} {1000 * n_false / r['steps']:8.2f} {min(spikes):8.1%} "
            + " ".join(f"{x:6.1%}" for x in rates))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="*", help="run dirs (metrics.jsonl, one line per step) or trace JSON files")
    ap.add_argument("--record", type=int, default=0, help="first train the recipe this many times (guard off)")
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--save", help="write the traces (recorded or read) to this JSON file")
    ap.add_argument("--no-grid", action="store_true", help="only the old and the current defaults")
    args = ap.parse_args()
    traces: dict[str, dict] = {}
    if args.record:
        with tempfile.TemporaryDirectory() as scratch:
            traces.update(record(args.record, args.recipe, Path(scratch)))
    traces.update(load(args.traces or ([] if args.record else [str(DEFAULT_TRACES)])))
    if args.save:
        Path(args.save).write_text(json.dumps(traces, separators=(",", ":")) + "\n")
    for name, t in traces.items():
        print(f"trace {name}: {len(t['loss'])} steps, lr warm-up {t['warmup_steps']}, loss {t['loss'][0]:.2f} -> "
              f"{t['loss'][-1]:.2f}, grad norm max {max(t['grad_norm']):.3g} at step "
              f"{t['grad_norm'].index(max(t['grad_norm'])) + 1}")
    default = GuardConfig()
    rows = [evaluate("old", dataclasses.replace(default, **OLD), traces, use_warmup=False),
            evaluate("default", default, traces)]
    if not args.no_grid:
        for sigma, window, history, rises in itertools.product((3.0, 4.0, 6.0), (20, 50), (10, 20),
                                                               ((0.0, 0.0), (0.2, 1.0), (0.3, 1.5))):
            cfg = dataclasses.replace(default, sigma=sigma, window=window, min_history=history,
                                      min_loss_rise=rises[0], min_grad_rise=rises[1])
            rows.append(evaluate("grid", cfg, traces))
    print(f"\nfalse skips: clean steps dropped, over {rows[0]['steps']} steps of {len(traces)} clean runs; "
          "catch: faulted steps caught, each fault at every step after the guard's warm-up; min spk: the "
          "lowest catch rate of the promised faults (all but the last two columns)")
    print(f"{'config':9} {'sigma':>5} {'window':>6} {'history':>7} {'loss+':>6} {'grad+':>6} {'false':>6} "
          f"{'per 1000':>8} {'min spk':>8} " + " ".join(f"{k[:6]:>6}" for k in FAULTS))
    for r in rows:
        print(row(r))
    print("\nmargins of the defaults: the largest healthy value over its window's mean on the tested steps "
          f"(floors: loss {1 + default.min_loss_rise:g}x, grad norm {1 + default.min_grad_rise:g}x; "
          "a spike must pass sigma too)")
    for name, t in traces.items():
        g, top = Guard(default, t["warmup_steps"]), [0.0, 0.0]
        for lo, gn in zip(t["loss"], t["grad_norm"], strict=True):
            if len(g.losses) >= default.min_history:
                top = [max(top[0], lo * len(g.losses) / sum(g.losses)), max(top[1], gn * len(g.norms) / sum(g.norms))]
            g.check(lo, gn)
        print(f"  {name}: loss {top[0]:.3f}x, grad norm {top[1]:.2f}x")
    for r in rows[:2]:
        print(f"\n{r['label']}: false skips " + ("; ".join(f"{n} at steps {s}" for n, s in r["false"].items() if s)
                                               or "none"))
        for k, m in r["missed"].items():
            if m:
                print(f"  missed {k}: {len(m)} ({', '.join(m[:6])}{' ...' if len(m) > 6 else ''})")


if __name__ == "__main__":
    main()
