"""Sparsity masks over a transformer's linear weights: magnitude, 2:4, and the gradual (cubic) schedule.

Shared by one-shot pruning (`compress/prune.py`) and gradual pruning during training (`train/pruning.py`),
so both prune the same weights by the same rule. Which weights: the `nn.Linear` weights inside the blocks
(wq, wk, wv, wo, w1, w2, w3). Left dense: the embedding, the output projection (tied, it *is* the
embedding; untied, it is the layer where pruning costs most loss per weight), norms, biases, MoE routers
and the stacked expert tensors of an MoE layer. A mask is a bool tensor of the weight's shape, True = kept.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """{parameter name: weight} of the block linears that pruning may zero, in module order."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("layers.") and not name.endswith("router"):
            out[f"{name}.weight"] = module.weight
    return out


def cubic_sparsity(step: int, target: float, start: int, end: int, initial: float = 0.0) -> float:
    """Sparsity due at `step`: Zhu & Gupta (2017)'s s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3.

    Prunes fast while many redundant weights remain and slowly near the target, so the network has time
    to recover. 0 before `start`, `target` from `end` on.
    """
    if step < start:
        return 0.0
    if step >= end:
        return target
    frac = (step - start) / (end - start)
    return target + (initial - target) * (1.0 - frac) ** 3


def masks_by_score(scores: dict[str, Tensor], sparsity: float, scope: str = "layer") -> dict[str, Tensor]:
    """Masks dropping the `sparsity` fraction of entries with the lowest score: per tensor (scope "layer")
    or over all tensors at once (scope "global"). Exact counts (top-k, not a threshold), so ties never
    prune more or less than asked; an entry scored +inf is never dropped."""
    if scope == "global":
        flat = torch.cat([s.detach().float().flatten() for s in scores.values()])
        dropped = _lowest(flat, round(sparsity * flat.numel()))
        masks, offset = {}, 0
        for name, s in scores.items():
            masks[name] = dropped[offset:offset + s.numel()].logical_not().view(s.shape)
            offset += s.numel()
        return masks
    return {name: _lowest(s.detach().float().flatten(), round(sparsity * s.numel())).logical_not().view(s.shape)
            for name, s in scores.items()}


def _lowest(flat: Tensor, k: int) -> Tensor:
    """Bool vector marking the k lowest entries of `flat`."""
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        out[torch.topk(flat, k, largest=False, sorted=False).indices] = True
    return out


def two_four_mask(weight: Tensor) -> Tensor:
    """Keep the 2 largest-magnitude weights of every 4 consecutive ones along the input dimension (the
    layout NVIDIA's sparse tensor cores and torch's semi-structured kernels read). in_features must divide by 4."""
    out_f, in_f = weight.shape
    if in_f % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4, not {in_f}")
    groups = weight.detach().abs().float().view(out_f, in_f // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.view(out_f, in_f)


def is_two_four(mask: Tensor) -> bool:
    """Every group of 4 along the input dimension keeps at most 2 (the pattern the kernels accept)."""
    return bool((mask.view(mask.size(0), -1, 4).sum(-1) <= 2).all())


@torch.no_grad()
def apply_masks(weights: dict[str, Tensor], masks: dict[str, Tensor]) -> None:
    """Zero the dropped entries in place (a multiply, so it works on any device and dtype)."""
    for name, mask in masks.items():
        weights[name].mul_(mask.to(weights[name].dtype))


def sparsity_report(weights: dict[str, Tensor]) -> dict[str, float]:
    """{name: fraction of exact zeros} per weight, and "all" over them together."""
    zeros = {name: int((w == 0).sum()) for name, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    out = {name: round(zeros[name] / w.numel(), 6) for name, w in weights.items()}
    out["all"] = round(sum(zeros.values()) / max(total, 1), 6)
    return out
