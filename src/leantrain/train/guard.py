"""Training stability: catch bad steps before they reach the weights, and watch gradient health.

The guard looks at each step's loss and gradient norm BEFORE the optimizer step:
- non-finite loss or grad norm is always bad;
- a spike is a loss or grad norm more than `sigma` standard deviations above the mean of the
  last `window` good steps AND more than a floor above it (`min_loss_rise`, `min_grad_rise`: a
  fraction of that mean), checked once `min_history` good steps after the learning-rate warm-up
  are known. The floors let `sigma` be low enough to catch spikes soon after the warm-up, where
  the window is still wide, without calling ordinary batch noise of a quiet window a spike; the
  warm-up is left out because healthy runs jump there (bench/guard.py measures both rates on
  recorded runs).
Its history is part of the checkpoint, so a resumed run makes the same decisions.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

from leantrain.config import GuardConfig


class Guard:
    """`warmup_steps` is the learning-rate warm-up: gradient norms jump 10-50x and the loss falls fast
    there in healthy runs (bench/guard.py), so its steps are neither tested for spikes (non-finite
    values always are) nor kept as history, which they would widen for `window` steps."""

    def __init__(self, cfg: GuardConfig, warmup_steps: int = 0):
        self.cfg = cfg
        self.warmup_steps = warmup_steps
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.norms: deque[float] = deque(maxlen=cfg.window)
        self.good_steps = 0  # steps that passed, all of them (the windows keep the last `window`)
        self.interventions = 0  # since the last checkpoint; more than max_retries ends the run

    @staticmethod
    def _spike(history: deque[float], value: float, sigma: float, min_rise: float) -> bool:
        """`value` is more than `sigma` std devs and more than `min_rise` x mean above the history's mean."""
        n = len(history)
        mean = sum(history) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in history) / n)
        return value > mean + max(sigma * std, min_rise * abs(mean), 1e-8)

    def check(self, loss: float, grad_norm: float) -> str | None:
        """None when the step is fine, else the reason it is not ("non-finite ...", "loss spike ...")."""
        if self.cfg.policy == "off":
            return None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"non-finite loss {loss} / grad norm {grad_norm}"
        if len(self.losses) >= self.cfg.min_history:
            if self._spike(self.losses, loss, self.cfg.sigma, self.cfg.min_loss_rise):
                return f"loss spike {loss:.4f} (recent mean {sum(self.losses) / len(self.losses):.4f})"
            if self._spike(self.norms, grad_norm, self.cfg.sigma, self.cfg.min_grad_rise):
                return f"grad norm spike {grad_norm:.3g} (recent mean {sum(self.norms) / len(self.norms):.3g})"
        if self.good_steps >= self.warmup_steps:
            self.losses.append(loss)
            self.norms.append(grad_norm)
        self.good_steps += 1
        return None

    @property
    def enabled(self) -> bool:
        return self.cfg.policy != "off"

    def record_intervention(self) -> None:
        """A step was dropped (or rolled back); counted until the next checkpoint."""
        self.interventions += 1

    def too_many(self) -> bool:
        """More interventions since the last checkpoint than guard.max_retries allows: the run has diverged."""
        return self.interventions > self.cfg.max_retries

    def reset_after_checkpoint(self) -> None:
        """A checkpoint is a known good point: the intervention budget starts again."""
        self.interventions = 0

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms), "interventions": self.interventions,
                "good_steps": self.good_steps}

    def load_state_dict(self, d: dict[str, Any], keep_interventions: bool = False) -> None:
        """The history of a checkpoint. A rollback keeps the intervention count it had: the budget counts
        the trouble since the last checkpoint, not the state saved in it."""
        self.losses.clear()
        self.norms.clear()
        self.losses.extend(d["losses"])
        self.norms.extend(d["norms"])
        # a checkpoint from before the count was kept: its runs checkpoint after their warm-up
        self.good_steps = d.get("good_steps", max(self.warmup_steps, len(self.losses)))
        if not keep_interventions:
            self.interventions = d["interventions"]


def _value(t: torch.Tensor) -> float:
    """A scalar as a float; a DTensor (FSDP2 shards) is reduced over its ranks first."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return float(t)


def _group(name: str) -> str:
    """Parameters grouped per block: "layers.3", "tok_embeddings", "norm", "output"."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


class GradHealth:
    """Per-block gradient norms and update/weight ratios every `every` steps, plus warnings when the
    global gradient norm stays under `vanish_floor` for `vanish_steps` steps, or jumps above
    `explode_factor` times its running mean."""

    def __init__(self, model: torch.nn.Module, every: int, vanish_floor: float = 1e-7, vanish_steps: int = 20,
                 explode_factor: float = 20.0):
        self.model, self.every = model, every
        self.vanish_floor, self.vanish_steps, self.explode_factor = vanish_floor, vanish_steps, explode_factor
        self.small_streak = 0
        self.mean_norm: float | None = None
        self._before: dict[str, torch.Tensor] | None = None

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def before_update(self) -> dict[str, float]:
        """Per-block grad norms; also remembers weights to measure the update."""
        sq: dict[str, float] = {}
        self._before = {}
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                g = _group(name)
                sq[g] = sq.get(g, 0.0) + _value(p.grad.detach().float().square().sum())
                self._before[name] = p.detach().clone()
        return {g: math.sqrt(v) for g, v in sq.items()}

    def after_update(self) -> dict[str, float]:
        """Per-block ||update|| / ||weight|| for the step just taken (healthy is around 1e-3)."""
        upd: dict[str, float] = {}
        wsq: dict[str, float] = {}
        for name, p in self.model.named_parameters():
            if self._before is not None and name in self._before:
                g = _group(name)
                upd[g] = upd.get(g, 0.0) + _value((p.detach() - self._before[name]).float().square().sum())
                wsq[g] = wsq.get(g, 0.0) + _value(self._before[name].float().square().sum())
        self._before = None
        return {g: math.sqrt(upd[g] / max(wsq[g], 1e-30)) for g in upd}

    def state_dict(self) -> dict[str, Any]:
        """The warning state, kept in checkpoints so a resumed run warns when the uninterrupted one would."""
        return {"small_streak": self.small_streak, "mean_norm": self.mean_norm}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.small_streak, self.mean_norm = d["small_streak"], d["mean_norm"]

    def warn(self, grad_norm: float) -> str | None:
        """A warning line when gradients vanish or explode, else None."""
        self.small_streak = self.small_streak + 1 if grad_norm < self.vanish_floor else 0
        mean = self.mean_norm
        self.mean_norm = grad_norm if mean is None else 0.95 * mean + 0.05 * grad_norm
        if self.small_streak == self.vanish_steps:
            return f"vanishing gradients: norm under {self.vanish_floor:g} for {self.vanish_steps} steps"
        if mean is not None and math.isfinite(grad_norm) and grad_norm > self.explode_factor * mean:
            return f"exploding gradients: norm {grad_norm:.3g} is {grad_norm / mean:.0f}x its running mean"
        return None
