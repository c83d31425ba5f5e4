"""Muon (Keller Jordan 2024): momentum orthogonalised by a Newton-Schulz iteration, for 2-D hidden weights.

SGD momentum's update for a weight matrix is dominated by a few directions; replacing it by the
nearest semi-orthogonal matrix (all singular values ~1) moves every direction alike, which trains
transformer hidden layers in fewer steps than AdamW. Embeddings, the output head, norms and biases
are not matrices that act on a hidden state the same way: those groups (`use_muon=False`) take an
AdamW step inside the same optimizer, so there is one optimizer and one state to checkpoint.

Under FSDP2 each rank holds rows of the matrix; the orthogonalisation needs the whole matrix, so
the update is all-gathered, orthogonalised on every rank alike, and each rank keeps its own rows.
"""

from __future__ import annotations

import math

import torch

from leantrain.train.optimizers._dtensor import adam_moments, full, local, shard

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: fast rise of small singular values


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T: the quintic iteration X <- aX + (bA + cA^2)X, A = X X^T.

    Runs in bf16 on CUDA (it tolerates the rounding and the matmuls are faster), fp32 elsewhere.
    """
    a, b, c = NS_COEFFICIENTS
    dtype = dtype or (torch.bfloat16 if g.device.type == "cuda" else torch.float32)
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix A is the smaller one
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        a_mat = x @ x.mT
        b_mat = b * a_mat + c * a_mat @ a_mat
        x = a * x + b_mat @ x
    if tall:
        x = x.mT
    return x


class Muon(torch.optim.Optimizer):
    """Groups with `use_muon=True`: Nesterov momentum -> Newton-Schulz -> scale by sqrt(max(1, rows/cols)).
    Their step size is `lr * lr_scale`, so the trainer's schedule (which sets every group's `lr`) shapes
    both kinds of group while Muon's peak stays `lr_scale` times AdamW's. Other groups: AdamW."""

    def __init__(self, params, lr: float = 3e-3, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 lr_scale: float = 1.0, use_muon: bool = True, ns_dtype: torch.dtype | None = None):
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps, "betas": betas,
                    "eps": eps, "weight_decay": weight_decay, "lr_scale": lr_scale, "use_muon": use_muon}
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype  # None: bf16 on CUDA, fp32 elsewhere (see newton_schulz)
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D weight matrices only; give the others use_muon=False")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, wd, beta = group["lr"] * group["lr_scale"], group["weight_decay"], group["momentum"]
        todo = []  # (param, its local weight, the whole update matrix)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            w, g, buf = local(p), local(p.grad), local(state["momentum_buffer"])
            buf.lerp_(g, 1 - beta)
            update = g.lerp(buf, beta) if group["nesterov"] else buf
            todo.append((p, w, full(update, p)))
        # matrices of one shape (every layer's wq, w1, ...) orthogonalise together: one batched matmul per
        # iteration instead of one small matmul per matrix (~0.9x the time for the tiny recipe's 28 matrices on
        # 2 CPU cores; the same bits as one at a time)
        for batch in _same_shape_batches([u for _, _, u in todo]):
            ortho = newton_schulz(torch.stack([todo[i][2] for i in batch]), group["ns_steps"], self.ns_dtype)
            for k, i in enumerate(batch):
                p, w, _ = todo[i]
                if wd:
                    w.mul_(1 - lr * wd)
                rows, cols = p.shape
                w.add_(shard(ortho[k], p).to(w.dtype), alpha=-lr * math.sqrt(max(1.0, rows / cols)))

    def _adamw(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            w, m, v, t = adam_moments(self.state[p], p, beta1, beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            if wd:
                w.mul_(1 - lr * wd)
            w.addcdiv_(m, denom, value=-lr / (1 - beta1**t))


MAX_BATCH_ELEMENTS = 1 << 26  # one stacked batch holds at most 64M elements (256 MB in fp32)


def _same_shape_batches(mats: list[torch.Tensor]) -> list[list[int]]:
    """Indices of `mats` grouped by shape, in first-seen order, each group cut to MAX_BATCH_ELEMENTS."""
    groups: dict[tuple[int, ...], list[list[int]]] = {}
    for i, m in enumerate(mats):
        runs = groups.setdefault(tuple(m.shape), [[]])
        if runs[-1] and (len(runs[-1]) + 1) * m.numel() > MAX_BATCH_ELEMENTS:
            runs.append([])
        runs[-1].append(i)
    return [run for runs in groups.values() for run in runs]
