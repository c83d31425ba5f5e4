"""Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled").

No decay schedule: the optimizer keeps a base sequence z (plain AdamW-style steps at a constant lr)
and evaluates the model at x, a running weighted average of z, which plays the part a decaying lr
plays otherwise. The gradient is taken at y = (1-beta1) z + beta1 x, the weights the model holds
while training. So the weights must be switched to x for evaluation, sampling and checkpoints
(`eval()`), and back to y before training goes on (`train()`); the trainer does that.

Follows the reference implementation (facebookresearch/schedule_free, AdamWScheduleFree) with r = 0
and weight_lr_power = 2; warmup comes from the trainer's lr schedule (use schedule = "constant").
"""

from __future__ import annotations

import torch

from leantrain.train.optimizers._dtensor import local


class ScheduleFreeAdamW(torch.optim.Optimizer):
    """Weights hold y in train mode, x in eval mode; state z (base sequence) and exp_avg_sq per parameter;
    step count `k`, `lr_max` and `weight_sum` per group (they travel in checkpoints with the groups)."""

    def __init__(self, params, lr: float = 2.5e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, weight_lr_power: float = 2.0):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "weight_lr_power": weight_lr_power, "k": 0, "lr_max": 0.0, "weight_sum": 0.0,
                    "train_mode": True}
        super().__init__(params, defaults)

    @torch.no_grad()
    def eval(self) -> None:
        """Weights y -> x = (y - (1-beta1) z) / beta1, the averaged point to evaluate and save. Idempotent."""
        self._switch(to_train=False)

    @torch.no_grad()
    def train(self) -> None:
        """Weights x -> y = (1-beta1) z + beta1 x, where gradients are taken. Idempotent."""
        self._switch(to_train=True)

    def _switch(self, to_train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue
            beta1 = group["betas"][0]
            weight = 1 - beta1 if to_train else 1 - 1 / beta1
            for p in group["params"]:
                if "z" in self.state[p]:
                    local(p).lerp_(local(self.state[p]["z"]), weight)
            group["train_mode"] = to_train

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError("schedule-free AdamW stepped in eval mode; call optimizer.train() first")
            beta1, beta2 = group["betas"]
            lr, wd, eps, k = group["lr"], group["weight_decay"], group["eps"], group["k"]
            lr_max = group["lr_max"] = max(lr, group["lr_max"])
            weight = lr_max ** group["weight_lr_power"]
            group["weight_sum"] += weight
            ckp1 = weight / group["weight_sum"] if group["weight_sum"] else 0.0  # x's averaging weight this step
            y_lr = lr * (beta1 * (1 - ckp1) - 1)
            bias_correction2 = 1 - beta2 ** (k + 1)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone()
                    state["exp_avg_sq"] = torch.zeros_like(p)
                y, g, z, v = local(p), local(p.grad), local(state["z"]), local(state["exp_avg_sq"])
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                step = g / (v / bias_correction2).sqrt_().add_(eps)
                if wd:
                    step.add_(y, alpha=wd)  # decay evaluated at y, as the reference does
                y.lerp_(z, ckp1)
                y.add_(step, alpha=y_lr)
                z.sub_(step, alpha=lr)
            group["k"] = k + 1
        return loss
