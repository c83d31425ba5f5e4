"""What the benches share: the token dataset they train on (data/stdlib when `make demo` prepared it, else a
small one) and the CPU name each prints beside its figures."""

from __future__ import annotations

import itertools
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dataset(path: str | None, scratch: Path) -> str:
    """data/stdlib when prepared (`make demo` does it), else a small stdlib dataset in a temp dir."""
    candidate = Path(path) if path else ROOT / "data" / "stdlib"
    if (candidate / "meta.json").is_file():
        return str(candidate)
    if path:
        sys.exit(f"{candidate} is not a token dataset (no meta.json)")
    from leantrain.corpus.readers import read_builtin
    from leantrain.tokens.prepare import prepare_dataset

    out = scratch / "stdlib-bench"
    print(f"data/stdlib is not prepared; tokenizing part of the stdlib into {out} ...", flush=True)
    prepare_dataset(lambda: itertools.islice(read_builtin("stdlib"), 400), out, vocab_size=8192)
    return str(out)


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_overrides(data: str, steps: int, seq: int, batch: int, lr: float, log_every: int = 20,
                  **extra: dict) -> dict:
    """The config of a short fp32 bench run on `data` (no evals, checkpoints or samples on the way); `extra`
    sections are merged over it, e.g. `model={...}`, `distill={...}`."""
    base = {"data": {"path": data}, "model": {"seq_len": seq, "vocab_size": 8192},
            "train": {"steps": steps, "micro_batch_size": batch, "eval_every": 0, "eval_steps": 8, "sample_tokens": 0,
                      "seed": 7},
            "optim": {"lr": lr, "warmup_steps": max(1, steps // 10)}, "precision": {"dtype": "fp32"},
            "checkpoint": {"every": 0}, "log": {"every": log_every, "progress": "none"}}
    for section, values in extra.items():
        base.setdefault(section, {}).update(values)
    return base


REPORT_ENV = "LEANTRAIN_BENCH_REPORT"  # bench/all.py names a JSON-lines file here for each child it runs


def report_ratio(name: str, value: float, baseline: str, unit: str = "x", better: str = "higher",
                 **figures: float) -> None:
    """Record one headline figure of this bench (a ratio against `baseline`, measured in the same run) for
    bench/all.py: appended as a JSON line to the file $LEANTRAIN_BENCH_REPORT names; nothing when it is unset,
    so a bench run by hand prints its table only. `figures` are side numbers shown with it (tokens_per_s=...)."""
    import json
    import os

    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    row = {"bench": Path(sys.argv[0]).stem, "name": name, "value": float(value), "unit": unit,
           "baseline": baseline, "better": better, "figures": {k: float(v) for k, v in figures.items()}}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
