"""One trial: a normal leantrain run in STUDY_DIR/trials/NNNN/, trained through `leantrain.api.train`.

`TrialReporter` is the run's observer: at every evaluation it reports the val loss to Optuna, and when the
pruner says the trial is behind it raises `StopRun`, so the trainer ends the run after that step exactly as
a signal would (checkpoint, summary, report). What a trial measured and why it ended (pruned at which step,
the error that failed it) is kept in its user attributes, which `leantrain tune --show` and
optuna-dashboard read.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leantrain.config import Config, tune_objectives
from leantrain.errors import LeantrainError
from leantrain.train.observers import StopRun
from leantrain.tune.space import Param, apply_params, suggest

PRUNED = "pruned"


class TrialFailed(Exception):
    """A trial that could not give a result (a config combination refused, a diverged run); the study goes on."""


class WorkerStopped(Exception):  # noqa: N818 - a stop, not an error
    """The worker was asked to stop (SIGTERM, Ctrl-C) during a trial; the trial is retried when the study resumes."""


class TrialReporter:
    """Reports each evaluation's val loss to the Optuna trial and stops the run when the pruner says so."""

    def __init__(self, trial: Any, prune: bool):
        self.trial, self.prune = trial, prune
        self.pruned_at: tuple[int, float] | None = None
        self.evals: list[tuple[int, float]] = []

    def on_step(self, record: dict[str, Any]) -> None:
        if "val_loss" not in record or not math.isfinite(record["val_loss"]):
            return
        step, loss = record["step"], record["val_loss"]
        self.evals.append((step, loss))
        if not self.prune:
            return
        self.trial.report(loss, step)
        if self.trial.should_prune():
            self.pruned_at = (step, loss)
            raise StopRun(PRUNED)

    def on_event(self, event: dict[str, Any]) -> None:
        pass

    def on_end(self, summary: dict[str, Any]) -> None:
        pass


@dataclass
class TrialRunner:
    """The objective Optuna calls: suggest values, train the trial's run, return its objective value(s)."""

    base: Config
    params: list[Param]
    study_dir: Path
    prune: bool
    train: Callable[..., Any]  # leantrain.api.train, handed in: tune sits above the API
    threads: int = 0

    def run_dir(self, trial: Any) -> Path:
        """trials/NNNN of this trial, or of the trial it retries (the retry inherits the run_dir attribute, so a
        killed worker's run resumes from its checkpoint)."""
        inherited = trial.user_attrs.get("run_dir")
        return self.study_dir / (inherited or f"trials/{trial.number:04d}")

    def __call__(self, trial: Any) -> float | list[float]:
        import optuna

        values = suggest(trial, self.params)
        run_dir = self.run_dir(trial)
        for inherited in ("fail_reason", "pruned_reason"):  # a retry copies the attributes of the trial it retries
            if trial.user_attrs.get(inherited):
                trial.set_user_attr(inherited, "")
        trial.set_user_attr("run_dir", str(run_dir.relative_to(self.study_dir)))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            cfg = apply_params(self.base, values, threads=self.threads)
        except LeantrainError as e:
            trial.set_user_attr("fail_reason", str(e))
            raise TrialFailed(str(e)) from None
        reporter = TrialReporter(trial, self.prune)
        t0 = time.perf_counter()
        try:
            result = self.train(cfg, run_dir, observers=[reporter], resume=True)
        except LeantrainError as e:
            trial.set_user_attr("fail_reason", str(e))
            raise TrialFailed(str(e)) from None
        wall = round(time.perf_counter() - t0, 3)
        measured = {"steps": result.step, "tokens": result.tokens, "val_loss": result.val_loss, "wall_s": wall,
                    **{k: result.metrics.get(k) for k in ("energy_kwh", "cost_usd", "co2_g")}}
        for k, v in measured.items():
            if v is not None:
                trial.set_user_attr(k, v)
        if result.stopped == PRUNED and reporter.pruned_at is not None:
            step, loss = reporter.pruned_at
            trial.set_user_attr("pruned_reason", f"pruned at step {step}: val loss {loss:.4f} behind the other "
                                f"trials at that step")
            raise optuna.TrialPruned(f"pruned at step {step}")
        if result.stopped:
            trial.set_user_attr("fail_reason", f"stopped by {result.stopped} at step {result.step}; retried on resume")
            raise WorkerStopped(result.stopped)
        out = []
        for word in tune_objectives(self.base.tune.objective):
            v = measured.get(word)
            if v is None or not math.isfinite(v):
                why = f"{word} is {v}" + ("; energy.meter is off" if v is None and word != "val_loss" else "")
                trial.set_user_attr("fail_reason", why)
                raise TrialFailed(why)
            out.append(float(v))
        return out[0] if len(out) == 1 else out
