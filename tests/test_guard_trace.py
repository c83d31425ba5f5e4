"""The stability guard's defaults on recorded real runs: no healthy step dropped, every injected spike caught.

tests/data/guard_traces.json holds the per-step loss and gradient norm of real runs on the stdlib
corpus with the guard off: the tiny recipe's 300 steps with seeds 1337 and 7 (`python bench/guard.py
--record 2 --save ...` records them again) and the first 217 steps of the small recipe. The old
defaults (sigma 6 from step 21 on) dropped tiny seed 7's step 22, a 19x gradient-norm jump inside
the learning-rate warm-up that the run recovered from by itself, and small's step 89.
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

import pytest

from leantrain.config import GuardConfig
from leantrain.train.guard import Guard

TRACES = json.loads((Path(__file__).parent / "data" / "guard_traces.json").read_text())


def copy_of(g: Guard) -> Guard:
    c = Guard(g.cfg, g.warmup_steps)
    c.load_state_dict(g.state_dict())
    return c


@pytest.mark.parametrize("name", sorted(TRACES))
def test_defaults_drop_no_healthy_step_of_a_real_run(name: str) -> None:
    t = TRACES[name]
    g = Guard(GuardConfig(), warmup_steps=t["warmup_steps"])
    verdicts = [(step, g.check(lo, gn)) for step, (lo, gn) in enumerate(zip(t["loss"], t["grad_norm"],
                                                                              strict=True), 1)]
    assert [v for v in verdicts if v[1]] == []
    assert g.good_steps == len(t["loss"]) and len(g.losses) == g.cfg.window


@pytest.mark.parametrize("name", sorted(TRACES))
def test_defaults_catch_spikes_and_non_finite_values_after_the_warm_up(name: str) -> None:
    t = TRACES[name]
    g = Guard(GuardConfig(), warmup_steps=t["warmup_steps"])
    start = t["warmup_steps"] + g.cfg.min_history
    tested = 0
    for step, (lo, gn) in enumerate(zip(t["loss"], t["grad_norm"], strict=True), 1):
        if step > start:
            assert "loss spike" in copy_of(g).check(lo * 2, gn), step
            assert "grad norm spike" in copy_of(g).check(lo, gn * 10), step
            assert copy_of(g).check(lo * 1.5, gn * 3) is not None, step
            assert "non-finite" in copy_of(g).check(math.nan, gn) and "non-finite" in copy_of(g).check(lo, math.inf)
            tested += 1
        elif step <= t["warmup_steps"]:  # inside the lr warm-up only non-finite values are bad
            assert copy_of(g).check(lo, gn * 10) is None
            assert "non-finite" in copy_of(g).check(lo, math.inf)
        assert g.check(lo, gn) is None
    assert tested == len(t["loss"]) - start


def test_old_defaults_dropped_healthy_warm_up_steps() -> None:
    """The control: sigma 6 over 50 steps, tested from step 21 with no floor, drops warm-up steps."""
    old = GuardConfig(sigma=6.0, window=50, min_history=20, min_loss_rise=0.006, min_grad_rise=0.006)
    skipped = {}
    for name, t in TRACES.items():
        g = Guard(old, warmup_steps=0)
        skipped[name] = next((step for step, (lo, gn) in enumerate(zip(t["loss"], t["grad_norm"], strict=True), 1)
                              if g.check(lo, gn) is not None), None)  # the first: later ones follow from it
    assert skipped == {"tiny-seed1337": None, "tiny-seed7": 22, "small-seed1337-first217": 89}


def test_resumed_guard_decides_as_the_uninterrupted_one() -> None:
    """The warm-up count travels in the checkpoint: a guard restored mid-warm-up still waits it out."""
    t = TRACES["tiny-seed7"]
    whole, first = Guard(GuardConfig(), 30), Guard(GuardConfig(), 30)
    pairs = list(zip(t["loss"], t["grad_norm"], strict=True))
    for lo, gn in pairs[:15]:
        whole.check(lo, gn)
        first.check(lo, gn)
    resumed = Guard(GuardConfig(), 30)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.good_steps == 15 and resumed.losses == deque()
    assert [whole.check(lo, gn) for lo, gn in pairs[15:]] == [resumed.check(lo, gn) for lo, gn in pairs[15:]]
    assert resumed.good_steps == whole.good_steps == len(pairs) and resumed.losses == whole.losses
