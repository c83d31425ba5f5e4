"""Gradual pruning during training: `[prune]` masks that tighten on a cubic schedule and keep pruned weights zero.

Every `every` steps from `start_step` to `end_step` the masks are recomputed from the weights' magnitudes at
the sparsity `cubic_sparsity` says is due (Zhu & Gupta 2017), and after every optimizer step the masks are
applied, so an optimizer's momentum never brings a pruned weight back. A weight once pruned stays pruned
(it is zero, the lowest magnitude, and new masks are and-ed with the old). For 2:4 the weights that may go
are the two smaller of every four, and the schedule decides how many of those are gone, so at `end_step`
the pattern is exactly 2:4.

The masks travel in every full checkpoint as `prune_masks.safetensors` (uint8), so a resumed run prunes
exactly as the uninterrupted one; a checkpoint without them (sharded format) gives them back as the
weights' zero pattern, which is the same set unless a kept weight happens to be exactly 0.0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from leantrain.config import PruneConfig
from leantrain.errors import ConfigError
from leantrain.model.sparsity import apply_masks, cubic_sparsity, masks_by_score, prunable_weights, two_four_mask

MASKS_FILE = "prune_masks.safetensors"


class GradualPruner:
    """Holds the masks of a run's prunable weights; the trainer calls `after_step` after each optimizer step."""

    def __init__(self, model: nn.Module, cfg: PruneConfig):
        self.cfg = cfg
        self.weights = prunable_weights(model)
        if cfg.method == "2:4":
            odd = [n for n, w in self.weights.items() if w.size(1) % 4]
            if odd:
                raise ConfigError(f"prune.method = 2:4 needs every block linear's input width divisible by 4; "
                                  f"{odd[0]} has {self.weights[odd[0]].size(1)}: change the model sizes")
        self.masks: dict[str, Tensor] = {}
        self.sparsity = 0.0  # the sparsity of the last mask update

    @classmethod
    def of(cls, model: nn.Module, cfg: PruneConfig, sharded: bool) -> GradualPruner | None:
        """A pruner for `[prune]`, or None when method = none. Sharded weights (FSDP2) are refused: a mask
        would need the same sharding."""
        if cfg.method == "none":
            return None
        if sharded:
            raise ConfigError("prune.method needs whole weights on each process (one process or DDP); with FSDP2 "
                              "set parallel.dp_shard = 1 or prune after training with `leantrain compress`")
        return cls(model, cfg)

    def due(self, step: int) -> bool:
        c = self.cfg
        return c.start_step <= step <= c.end_step and (step == c.end_step or (step - c.start_step) % c.every == 0)

    @torch.no_grad()
    def after_step(self, step: int) -> dict[str, Any] | None:
        """Update the masks if `step` is a pruning step (returns what it did), then zero the pruned weights."""
        update = None
        if self.due(step):
            self.sparsity = cubic_sparsity(step, self.cfg.sparsity, self.cfg.start_step, self.cfg.end_step)
            new = masks_by_score(self._scores(), self.sparsity, self.cfg.scope)
            self.masks = {n: m & self.masks[n] if n in self.masks else m for n, m in new.items()}
            kept = sum(int(m.sum()) for m in self.masks.values())
            total = sum(m.numel() for m in self.masks.values())
            update = {"sparsity_target": round(self.sparsity, 6), "sparsity": round(1 - kept / total, 6)}
        if self.masks:
            apply_masks(self.weights, self.masks)
        return update

    def _scores(self) -> dict[str, Tensor]:
        """What ranks the weights: |w|; for 2:4 the two larger of each four are never candidates (+inf)."""
        scores = {n: w.detach().abs().float() for n, w in self.weights.items()}
        if self.cfg.method == "2:4":
            for n, w in self.weights.items():
                scores[n].masked_fill_(two_four_mask(w), float("inf"))
        return scores

    def state(self) -> dict[str, dict[str, Tensor]]:
        """The checkpoint's extra file: the masks as uint8 (none before the first pruning step)."""
        if not self.masks:
            return {}
        return {MASKS_FILE: {n: m.to("cpu", torch.uint8).contiguous() for n, m in self.masks.items()}}

    def load(self, extra: dict[str, dict[str, Tensor]]) -> None:
        """Masks back from a checkpoint's extra files, or from the weights' zeros when it has none."""
        saved = extra.get(MASKS_FILE)
        if saved is not None:
            if set(saved) != set(self.weights):
                raise ConfigError(f"the checkpoint's {MASKS_FILE} names other weights than this model's; resume "
                                  "with the config the run was started with")
            self.masks = {n: saved[n].to(self.weights[n].device).bool() for n in self.weights}
        elif any(bool((w == 0).any()) for w in self.weights.values()):
            self.masks = {n: w.detach() != 0 for n, w in self.weights.items()}
        else:
            self.masks = {}
