"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

The update is the sign of an interpolation of momentum and gradient, so every coordinate moves by
exactly lr: one state tensor (half AdamW's memory) and no second moment. Because the update is
larger than Adam's per coordinate, Lion wants an lr ~3-10x smaller and a weight decay as much larger.
"""

from __future__ import annotations

import torch

from leantrain.train.optimizers._dtensor import local


class Lion(torch.optim.Optimizer):
    """p <- p*(1 - lr*wd) - lr * sign(beta1*m + (1-beta1)*g);  m <- beta2*m + (1-beta2)*g."""

    def __init__(self, params, lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                w, g, m = local(p), local(p.grad), local(state["exp_avg"])
                update = m.lerp(g, 1 - beta1).sign_()
                if wd:
                    w.mul_(1 - lr * wd)
                w.add_(update, alpha=-lr)
                m.lerp_(g, 1 - beta2)
        return loss
