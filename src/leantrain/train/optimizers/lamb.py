"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes").

Adam's update, rescaled per tensor by the trust ratio ||w|| / ||update||: every layer moves by the same
fraction of its own size whatever its gradient scale, which keeps large-batch training (where the lr
is scaled up) from blowing up the layers whose Adam step is large relative to their weights.
"""

from __future__ import annotations

import torch

from leantrain.train.optimizers._dtensor import adam_moments, full_norm


class Lamb(torch.optim.Optimizer):
    """Adam moments with bias correction, decoupled weight decay inside the update, per-tensor trust ratio."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                w, m, v, t = adam_moments(self.state[p], p, beta1, beta2)
                update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt_().add_(eps))
                if wd:
                    update.add_(w, alpha=wd)
                w_norm, u_norm = full_norm(w, p), full_norm(update, p)
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                w.add_(update * (trust * -lr).to(update.dtype))
        return loss
