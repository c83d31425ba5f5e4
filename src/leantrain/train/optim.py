"""Optimizers and learning-rate schedules.

Weight decay goes only to matrices that multiply activations; norms, biases and embeddings
are left alone (decaying an embedding row pulls rare tokens toward zero for no benefit).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from leantrain.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = "embed" in name or (name.endswith("output.weight") and _is_tied(model, p))
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _is_tied(model: nn.Module, p: nn.Parameter) -> bool:
    emb = getattr(model, "tok_embeddings", None)
    return emb is not None and emb.weight is p


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        # fused runs one kernel for all parameters on CUDA and CPU alike; it is bit-stable.
        fused = device.type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
    raise ValueError(f"unknown optimizer {cfg.name}")  # config validation makes this unreachable


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule."""
    warmup = min(cfg.warmup_steps, total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    lo = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, total_steps - warmup - 1)
        frac = min(1.0, (step - warmup) / span)
        return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * frac))
    # wsd: hold the peak, then decay linearly over the last decay_fraction of the run.
    decay_steps = max(1, round(total_steps * cfg.decay_fraction))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return cfg.lr
    frac = min(1.0, (step - decay_start + 1) / decay_steps)
    return cfg.lr + (lo - cfg.lr) * frac
