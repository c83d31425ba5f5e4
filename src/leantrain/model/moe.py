"""Mixture-of-experts feed-forward: token-choice top-k routing over SwiGLU experts (docs/moe.md).

`MoEFeedForward` replaces a block's `FeedForward` when `[model] moe_experts > 0`. Each token's router
scores (a linear in float32, whatever the autocast dtype: small logit errors flip top-k choices) pick
top_k experts; the token's output is the gate-weighted sum of those experts' SwiGLU outputs, plus the
shared experts every token goes through.

Compute: the (token, expert) assignments are sorted by expert, so each expert's tokens are one contiguous
slice, and the three expert projections are each one grouped matmul over the slices (`torch._grouped_mm`
where this PyTorch offers it for the device and dtype, probed once; otherwise one matmul per expert on its
slice). No token loop and no all-experts-on-all-tokens compute (`reference_forward` does that, for tests).

Expert weights are 3-D parameters [experts, in, out] (`w1` gate, `w3` up, `w2` down), not a ModuleList: the
grouped matmul reads them as they are, and expert parallelism (parallel/expert.py, which plugs in as
`expert_parallel`) shards dim 0 over ranks.

Balance: `aux` adds the Switch loss (Fedus et al. 2021) E * sum_i f_i P_i; `bias` is DeepSeek-V3's loss-free
method: a per-expert bias added to the scores for the choice only (gates use the raw scores), moved by
`moe_bias_rate` * sign(mean load - load) once per optimizer step, outside autograd. The bias is a persistent
buffer, so it is saved and restored with the model's weights (exact resume). The router z-loss (ST-MoE)
mean(logsumexp(logits)^2) keeps logits small. A capacity factor drops, per expert, the assignments past
ceil(factor * tokens * top_k / experts) in token order, in training only (eval and generation are dropless,
so cached and uncached decoding agree).

The module records its last training forward's losses and loads in `last`; `MoETracker` (used by the trainer)
collects them after each micro-batch, adds the losses to the step's loss, updates the biases after the
optimizer step and reports the telemetry.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leantrain.config import ModelConfig
from leantrain.model.feedforward import FeedForward
from leantrain.model.flops import moe_hidden_dim


@functools.cache
def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs forward and backward here (it is private and its device/dtype
    support varies by build: CPU has it in 2.13; CUDA wants bf16 on recent GPUs)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.autocast(device_type, enabled=False):  # the first call may come from inside autocast
            return _probe_grouped_mm(device_type, dtype)
    except (RuntimeError, NotImplementedError):
        return False


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    """A tiny forward and backward against a plain matmul; fixed inputs, so no random draw shifts the run's RNG."""
    a = (torch.arange(128, device=device_type) % 7 / 7).reshape(8, 16).to(dtype).requires_grad_()
    b = (torch.arange(256, device=device_type) % 5 / 5).reshape(2, 16, 8).to(dtype).requires_grad_()
    out = torch._grouped_mm(a, b, offs=torch.tensor([3, 8], device=device_type, dtype=torch.int32))
    out.backward(torch.ones_like(out))
    ref = a[3:].detach().float() @ b[1].detach().float()
    return bool(torch.allclose(out[3:].detach().float(), ref, atol=1e-1, rtol=1e-2)) and b.grad is not None


def expert_matmul(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """x [M, in] holds each expert's rows contiguously (counts[e] rows for expert e, in order); returns
    x_e @ w[e] for every slice, [M, out]. One grouped matmul, or one matmul per expert on its slice."""
    if torch.is_autocast_enabled(x.device.type):  # _grouped_mm is not on autocast's lists: cast as a linear would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    elif w.dtype != x.dtype:
        x = x.to(w.dtype)
    aligned = (x.size(1) * x.element_size()) % 16 == 0 and (w.size(2) * w.element_size()) % 16 == 0
    # torch.compile's fake kernel of _grouped_mm accepts bf16 only (2.13): other dtypes take the loop when compiling
    traceable = x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    if aligned and traceable and x.size(0) and grouped_mm_available(x.device.type, x.dtype):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x.contiguous(), w, offs=offs)
    return torch.cat([part @ w[e] for e, part in enumerate(x.split(counts.tolist()))]) if x.size(0) else \
        x.new_zeros(0, w.size(2))


ROW_ALIGN = 16  # rows of each expert's group are padded to a multiple of this


def padded_layout(sorted_experts: Tensor, counts: Tensor, assignments: int) -> tuple[int, Tensor, Tensor]:
    """Where each expert-sorted assignment goes in the padded buffer the expert matmuls run on.

    Each expert's group is padded to a multiple of ROW_ALIGN rows and the buffer always has the same number of
    rows (the last group takes the rest): matmul shapes then come from a small set instead of changing every
    step, which keeps oneDNN's per-shape kernel cache (bf16 on CPU) from growing the process by hundreds of
    MB, and the aligned groups are what grouped-matmul kernels on GPUs ask for. Returns (rows, the buffer row
    of each sorted assignment, the rows of each group)."""
    E = counts.numel()
    rows = -(-(assignments + E * (ROW_ALIGN - 1)) // ROW_ALIGN) * ROW_ALIGN
    seg = (counts + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN
    seg[-1] += rows - seg.sum()
    seg_start, start = seg.cumsum(0) - seg, counts.cumsum(0) - counts
    slot = torch.arange(sorted_experts.numel(), device=counts.device) - start[sorted_experts] + seg_start[
        sorted_experts]
    return rows, slot, seg


def swiglu_experts(x: Tensor, index: Tensor, sorted_experts: Tensor, counts: Tensor, assignments: int,
                   weights: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """The SwiGLU experts (w1 gate, w3 up, w2 down, [experts, in, out]) on rows x[index], which come grouped by
    expert (sorted_experts[i] is row i's expert; counts[e] rows for expert e). Returns [len(index), out] in that
    order. Each expert's rows are gathered straight into their padded slots (padding rows read a zero row)."""
    w1, w3, w2 = weights
    rows, slot, seg = padded_layout(sorted_experts, counts, assignments)
    n = x.size(0)
    xs = torch.cat([x, x.new_zeros(1, x.size(1))])[torch.full((rows,), n, device=x.device).index_copy(0, slot, index)]
    h = F.silu(expert_matmul(xs, w1, seg)) * expert_matmul(xs, w3, seg)
    return expert_matmul(h, w2, seg)[slot]


class MoEFeedForward(nn.Module):
    """Routed SwiGLU experts (plus optional shared ones) in place of a block's dense feed-forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, dim, hidden = cfg.moe_experts, cfg.dim, moe_hidden_dim(cfg)
        self.n_experts, self.top_k, self.hidden = E, cfg.moe_top_k, hidden
        self.router_fn, self.balance, self.capacity = cfg.moe_router, cfg.moe_balance, cfg.moe_capacity
        # the chosen gates sum to 1 (auto: when top_k > 1, as Mixtral / DeepSeek-V3; Switch's top-1 keeps its score)
        self.norm_gates = cfg.moe_gate_norm == "on" or (cfg.moe_gate_norm == "auto" and cfg.moe_top_k > 1)
        self.aux_weight = cfg.moe_aux_weight if cfg.moe_balance == "aux" else 0.0
        self.z_weight, self.bias_rate = cfg.moe_z_weight, cfg.moe_bias_rate
        self.router = nn.Linear(dim, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, dim, hidden))  # gate
        self.w3 = nn.Parameter(torch.empty(E, dim, hidden))  # up
        self.w2 = nn.Parameter(torch.empty(E, hidden, dim))  # down
        self.shared = FeedForward(dim, hidden * cfg.moe_shared_experts) if cfg.moe_shared_experts else None
        # Qwen2-MoE's shared_expert_gate: the shared output times sigmoid(gate(x)) (moe_shared_gate)
        self.shared_gate = nn.Linear(dim, 1, bias=False) if self.shared is not None and cfg.moe_shared_gate else None
        # DeepSeek-V3's selection bias: saved with the weights, changed only by `update_bias`
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        self.last: dict[str, Tensor] | None = None
        # set by parallel/expert.py under expert parallelism: sends tokens to their experts' ranks and back
        self.expert_parallel: Any = None

    @torch.no_grad()
    def reset_parameters(self, std: float, residual_std: float) -> None:
        """normal(0, std) for the router, gate and up projections; residual_std for the down projections
        (they write into the residual stream, as the dense w2); bias zero."""
        for w in (self.router.weight, self.w1, self.w3, *((self.shared.w1.weight, self.shared.w3.weight)
                                                          if self.shared else ())):
            nn.init.normal_(w, mean=0.0, std=std)
        for w in (self.w2, *((self.shared.w2.weight,) if self.shared else ())):
            nn.init.normal_(w, mean=0.0, std=residual_std)
        self.expert_bias.zero_()
        if self.shared_gate is not None:  # drawn last, so the other weights' draws are as without the gate
            nn.init.normal_(self.shared_gate.weight, mean=0.0, std=std)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Router logits [N, E] and scores (float32), and per token the chosen experts [N, k] and their gates."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        scores = torch.softmax(logits, dim=-1) if self.router_fn == "softmax" else torch.sigmoid(logits)
        choice = scores + self.expert_bias if self.balance == "bias" else scores
        experts = choice.topk(self.top_k, dim=-1).indices
        gates = scores.gather(1, experts)
        if self.norm_gates:  # Mixtral / DeepSeek-V3 (moe_gate_norm): the chosen gates sum to 1
            gates = gates / gates.sum(-1, keepdim=True)
        return logits, scores, experts, gates

    def shared_output(self, x: Tensor) -> Tensor:
        """What the shared experts add for tokens x [N, dim] (gated when moe_shared_gate)."""
        out = self.shared(x)
        return out * torch.sigmoid(self.shared_gate(x)) if self.shared_gate is not None else out

    def capacity_per_expert(self, n_tokens: int) -> int:
        """Most assignments one expert takes in a micro-batch; 0 when dropless (the default, and in eval)."""
        if not self.capacity or not self.training:
            return 0
        return max(1, math.ceil(self.capacity * n_tokens * self.top_k / self.n_experts))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N, k, E = x.size(0), self.top_k, self.n_experts
        logits, scores, experts, gates = self.route(x)
        flat = experts.reshape(-1)  # assignment a = token * k + slot
        order = torch.argsort(flat, stable=True)  # by expert, then token order: the capacity priority
        counts = torch.bincount(flat, minlength=E)
        routed = counts
        cap = self.capacity_per_expert(N)
        if cap:
            starts = counts.cumsum(0) - counts
            position = torch.arange(N * k, device=x.device) - starts[flat[order]]
            order = order[position < cap]
            counts = counts.clamp(max=cap)
        # cast once to the compute dtype: the gate and up projections share the one copy autograd keeps
        xc = x.to(torch.get_autocast_dtype(x.device.type)) if torch.is_autocast_enabled(x.device.type) else x
        if self.expert_parallel is not None:  # the experts live on several ranks: parallel/expert.py
            ys = self.expert_parallel(xc, order // k, counts, (self.w1, self.w3, self.w2))
        else:
            ys = swiglu_experts(xc, order // k, flat[order], counts, N * k, (self.w1, self.w3, self.w2))
        ys = ys * gates.reshape(-1)[order].unsqueeze(-1).to(ys.dtype)  # in the compute dtype, as dense outputs
        # back to (token, slot) order, dropped assignments 0, and the slots summed: no atomics, deterministic
        out = ys.new_zeros(N * k, shape[-1]).index_copy(0, order, ys).view(N, k, -1).sum(1)
        if self.shared is not None:
            out = out + self.shared_output(x)
        if self.training:
            self._record(logits, scores, routed, N, int(order.numel()) if cap else N * k)
        return out.view(*shape[:-1], -1)

    def _record(self, logits: Tensor, scores: Tensor, routed: Tensor, n_tokens: int, kept: int) -> None:
        """This forward's balance losses (with their graph) and loads (detached), for `MoETracker`."""
        load = routed.float() / (n_tokens * self.top_k)  # f_i: share of the assignments routed to expert i
        if self.expert_parallel is not None:  # f_i of the global batch, as one process would count it
            load = self.expert_parallel.global_load(routed.float(), n_tokens * self.top_k)
        probs = scores if self.router_fn == "softmax" else scores / scores.sum(-1, keepdim=True)
        aux = self.n_experts * (load * probs.mean(0)).sum()  # Switch: 1.0 when balanced
        z = torch.logsumexp(logits, dim=-1).square().mean()
        loss = self.aux_weight * aux + self.z_weight * z
        self.last = {"loss": loss, "aux": aux.detach(), "z": z.detach(), "counts": routed.detach().float(),
                     "dropped": torch.tensor(1.0 - kept / (n_tokens * self.top_k))}

    @torch.no_grad()
    def update_bias(self, counts: Tensor) -> None:
        """DeepSeek-V3: raise the bias of under-loaded experts and lower the over-loaded ones by `bias_rate`."""
        self.expert_bias += self.bias_rate * torch.sign(counts.mean() - counts).to(self.expert_bias.device)


@torch.no_grad()
def reference_forward(moe: MoEFeedForward, x: Tensor) -> Tensor:
    """Every expert on every token, then keep the routed ones: the slow, obvious MoE the tests compare
    `MoEFeedForward.forward` against (same routing, same capacity rule)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1]).float()
    N, k = x.size(0), moe.top_k
    _, _, experts, gates = moe.route(x)
    cap = moe.capacity_per_expert(N)
    out = torch.zeros_like(x)
    for e in range(moe.n_experts):
        y = (F.silu(x @ moe.w1[e].float()) * (x @ moe.w3[e].float())) @ moe.w2[e].float()
        chosen = experts == e  # [N, k]
        if cap:  # the first `cap` assignments in (token, slot) order stay
            chosen = chosen & (chosen.reshape(-1).cumsum(0).view(N, k) <= cap)
        out += (gates * chosen).sum(-1, keepdim=True) * y
    if moe.shared is not None:
        for m in (moe.shared, moe.shared_gate):  # in float32 as the rest of the reference (as before: in place)
            if m is not None:
                m.float()
        out += moe.shared_output(x)
    return out.view(shape)


class MoETracker:
    """The trainer's one handle on a model's MoE layers: their losses per micro-batch, their bias update per
    step and their telemetry per log line. `MoETracker.of(model)` is None for a dense model."""

    def __init__(self, layers: list[MoEFeedForward]) -> None:
        self.layers = layers
        self.step_counts = [torch.zeros(layer.n_experts) for layer in layers]
        self._window: list[list[dict[str, Tensor]]] = [[] for _ in layers]  # per layer, per micro-batch

    @classmethod
    def of(cls, model: nn.Module) -> MoETracker | None:
        layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
        return cls(layers) if layers else None

    def micro_batch_loss(self, first: bool, n_micro: int) -> Tensor:
        """The balance losses of the forward just run, weighted 1/n_micro so the step's total does not grow
        with gradient accumulation; also takes the loads. `first` starts a new step."""
        if first:
            for c in self.step_counts:
                c.zero_()
        total = 0.0
        for layer, counts, window in zip(self.layers, self.step_counts, self._window, strict=True):
            last, layer.last = layer.last, None
            if last is None:
                continue
            total = total + last.pop("loss") / n_micro
            counts += last["counts"].cpu()
            window.append({key: v.detach().cpu() for key, v in last.items()})
        return total if isinstance(total, Tensor) else torch.zeros(())

    def end_step(self, all_sum: Callable[[Tensor], Tensor] | None = None) -> None:
        """After the optimizer step: move each layer's bias (balance = bias) by the step's loads, summed over
        ranks with `all_sum` so every rank's bias stays the same."""
        for layer, counts in zip(self.layers, self.step_counts, strict=True):
            if layer.balance == "bias":
                total = all_sum(counts.to(layer.expert_bias.device)) if all_sum is not None else counts
                layer.update_bias(total)

    def metrics(self) -> dict[str, Any]:
        """Means over the micro-batches since the last call (then reset): aux and z-loss, dropped share,
        the worst layer's max/mean expert load, and each layer's load fractions (`moe_load`, layer by expert)."""
        rows = [r for window in self._window for r in window]
        if not rows:
            return {}
        fractions = [c / c.sum().clamp(min=1) for c in
                     (torch.stack([r["counts"] for r in window]).sum(0) for window in self._window if window)]
        out = {
            "moe_aux": torch.stack([r["aux"] for r in rows]).mean().item(),
            "moe_z": torch.stack([r["z"] for r in rows]).mean().item(),
            "moe_dropped": torch.stack([r["dropped"] for r in rows]).mean().item(),
            "moe_load_max_over_mean": max((f.max() * f.numel()).item() for f in fractions),
            "moe_load": [[round(v, 4) for v in f.tolist()] for f in fractions],
        }
        self._window = [[] for _ in self.layers]
        return out
