"""Energy accounting overhead: what metering costs the training loop (target: under 1% of step time).

Two measurements, both printed as a ratio against the same benchmark's own baseline:

1. direct: the median time of one `EnergyAccountant.read()` (what the trainer adds per metrics line)
   with the meter this machine gets, divided by the median tiny-recipe step time measured here. With
   `log.every = 1` (a read every step, the worst case) this is the overhead; with the default
   `log.every = 10` it is a tenth of it. This figure is stable on a busy machine.
2. end to end: the tiny recipe trained with `energy.meter` = auto and = off, `log.every = 1`,
   interleaved (on, off, off, on, ...), each in this process; median step time of each and their ratio.
   On a shared machine neighbours move the step time by more than 1%, so this is a sanity check of
   the direct figure, not a finer measurement.

    python bench/energy_overhead.py                 # tiny recipe, 20 timed steps x 2 rounds
    python bench/energy_overhead.py --steps 10 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _data import dataset  # bench/ is on sys.path when a bench runs as a script

ROOT = Path(__file__).resolve().parents[1]


class StepClock:
    """Observer: the time each step was logged."""

    def __init__(self):
        self.t: dict[int, float] = {}

    def on_step(self, r):
        self.t[r["step"]] = time.perf_counter()

    def on_event(self, e):
        pass

    def on_end(self, s):
        pass


def train_steps(data: str, meter: str, steps: int, warmup: int, threads: int, scratch: Path) -> list[float]:
    """Step times (s) of the tiny recipe after `warmup` steps, with energy.meter = `meter`, a line every step."""
    from leantrain.config import load_config
    from leantrain.train.trainer import Trainer

    cfg = load_config(recipe="tiny", overrides={
        "data": {"path": data},
        "train": {"steps": warmup + steps + 1, "eval_every": 0, "eval_steps": 1, "sample_tokens": 0,
                  "threads": threads},
        "checkpoint": {"every": 0},
        "log": {"every": 1, "progress": "none", "grad_health_every": 0},
        "energy": {"meter": meter},
    })
    clock = StepClock()
    with tempfile.TemporaryDirectory(dir=scratch) as run_dir:
        Trainer(cfg, run_dir, observers=[clock], resume=False).fit()
    # the last step evaluates and saves: left out
    return [clock.t[k] - clock.t[k - 1] for k in range(warmup + 1, warmup + steps + 1)]


def read_cost(calls: int = 2000) -> tuple[float, str]:
    """Median seconds of one accountant read with the meter `auto` picks here, and that meter."""
    from leantrain.config import load_config
    from leantrain.energy.accounting import EnergyAccountant

    acc = EnergyAccountant(load_config().energy, "cpu")
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        acc.read(i)
        times.append(time.perf_counter() - t0)
    acc.close()
    return statistics.median(times), acc.source


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="token dataset (default data/stdlib, prepared in a temp dir if missing)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (20)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out at the start (3)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of on/off, order reversed each round (2)")
    p.add_argument("--threads", type=int, default=0, help="train.threads (0: one per physical core)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        data = dataset(args.data, scratch)
        per_read, source = read_cost()
        runs: dict[str, list[float]] = {"auto": [], "off": []}
        for r in range(args.rounds):
            order = ["auto", "off"] if r % 2 == 0 else ["off", "auto"]
            for meter in order:
                t0 = time.perf_counter()
                runs[meter] += train_steps(data, meter, args.steps, args.warmup, args.threads, scratch)
                print(f"  round {r + 1} meter={meter:4} {time.perf_counter() - t0:6.1f} s", flush=True)
    on, off = statistics.median(runs["auto"]), statistics.median(runs["off"])
    print(f"meter here: {source}")
    print(f"one accountant read: {per_read * 1e6:.1f} us; median step (meter off): {off * 1e3:.1f} ms")
    print(f"direct overhead, a read every step (log.every = 1): {per_read / off * 100:.4f}% of step time "
          f"(log.every = 10: {per_read / off * 10:.5f}%)")
    print(f"end to end, median step meter on / off: {on * 1e3:.1f} / {off * 1e3:.1f} ms = ratio {on / off:.4f} "
          f"(noise on a shared machine is larger than the effect)")


if __name__ == "__main__":
    main()
