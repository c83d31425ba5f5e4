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
    """[decay, no decay]: weight decay on matrices that multiply activations only."""
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


def muon_param_groups(model: nn.Module, weight_decay: float, lr_scale: float) -> list[dict]:
    """Muon takes the 2-D hidden weights (those inside the blocks); embeddings, the output head, norms and
    biases stay on AdamW, whose per-coordinate steps suit rows looked up sparsely and vectors."""
    hidden, other_decay, no_decay, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = "embed" in name or (name.endswith("output.weight") and _is_tied(model, p))
        is_head = name.rsplit(".", 2)[-2:-1] in (["output"], ["lm_head"])
        if p.ndim == 2 and not is_embedding and not is_head:
            hidden.append(p)
        elif p.ndim >= 2 and not is_embedding:
            other_decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": hidden, "weight_decay": weight_decay, "use_muon": True, "lr_scale": lr_scale},
              {"params": other_decay, "weight_decay": weight_decay, "use_muon": False},
              {"params": no_decay, "weight_decay": 0.0, "use_muon": False}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device,
                    dtype: torch.dtype | None = None) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` over the model's parameter groups (docs/optimizers.md compares them).

    `dtype` is the run's compute dtype: Muon runs its Newton-Schulz matmuls in it (bf16 ~3x faster on a
    CPU with bf16 units); None leaves Muon's default (bf16 on CUDA, fp32 elsewhere).
    """
    from leantrain.train.optimizers import Lamb, Lion, Muon, ScheduleFreeAdamW

    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "muon":
        groups = muon_param_groups(model, cfg.weight_decay, cfg.muon_lr / cfg.lr)
        return Muon(groups, lr=cfg.lr, momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps, betas=betas, eps=cfg.eps,
                    ns_dtype=dtype)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        # fused runs one kernel for all parameters on CUDA and CPU alike; it is bit-stable.
        fused = device.type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused)
    if cfg.name == "lamb":
        return Lamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    if cfg.name == "lion":
        return Lion(groups, lr=cfg.lr, betas=(cfg.lion_beta1, cfg.lion_beta2))
    if cfg.name == "schedule_free_adamw":
        return ScheduleFreeAdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    raise ValueError(f"unknown optimizer {cfg.name}")  # config validation makes this unreachable


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule.

    cosine: to lr * min_lr_ratio at the last step. wsd (warmup-stable-decay): hold the peak, then decay
    to the floor over the last decay_fraction of the run, shaped linear, cosine or 1-sqrt; a run can
    branch off the stable phase at any point. inverse_sqrt: lr * sqrt(warmup / step), no end point, for
    runs of unknown length. constant: for schedule-free AdamW, whose averaging replaces the decay.
    """
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
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(max(1, warmup) / (step + 1))
    decay_steps = max(1, round(total_steps * cfg.decay_fraction))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return cfg.lr
    frac = min(1.0, (step - decay_start + 1) / decay_steps)
    if cfg.wsd_shape == "cosine":
        return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * frac))
    if cfg.wsd_shape == "1-sqrt":
        return lo + (cfg.lr - lo) * (1 - math.sqrt(frac))
    return cfg.lr + (lo - cfg.lr) * frac


def batch_size_at(step: int, warmup_steps: int, micro_batch_size: int) -> int:
    """Sequences per micro-batch at optimizer step `step` (0-based) under batch-size warmup: linear from 1 to
    `micro_batch_size` over `warmup_steps` steps, then `micro_batch_size`. Early on, when the gradient noise
    is small next to the gradient, a smaller batch makes about the same progress per step for fewer tokens."""
    if step >= warmup_steps:
        return micro_batch_size
    return max(1, math.ceil(micro_batch_size * (step + 1) / warmup_steps))
