"""LoRA adapters and layer freezing, applied to a plain model from outside it.

`apply_lora` swaps chosen `nn.Linear` modules for `LoRALinear`, which keeps the base weight under
its own name (`layers.0.attention.wq.weight` stays) and adds two small trainable matrices next to
it (`...wq.lora_a` [rank, in], `...wq.lora_b` [out, rank]); y = W x + b + (alpha/rank) * B A dropout(x).
Because names only grow, a checkpoint of the adapted model is the base state dict plus adapter
tensors, FSDP2 still shards one block at a time and activation checkpointing still wraps blocks.
B starts at zero, so an adapted model computes exactly what its base did until it trains.

The routed experts of an MoE block (model/moe.py) are 3-D weights [experts, in, out], not Linears: a target
that names them (`w1`, `w2`, `w3`, all-linear) gets an `ExpertLoRA` per weight, a torch parametrization that
adds each expert's own (alpha/rank) A_e B_e to its slice wherever the block reads the weight. Their base weight
is then saved as `...feed_forward.parametrizations.w1.original` (and the adapters as `....w1.0.lora_a`), and
`lora_dropout` does not apply to them (the update is on the weight, not on the tokens).

`merge_lora` folds B A into W and puts plain `nn.Linear` modules (and plain expert weights) back: the result
is the model class with its original state-dict keys, which is what export and sampling want.

Like the rest of `model/`, this knows nothing of devices, precision or training.
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from leantrain.config import FinetuneConfig
from leantrain.errors import ConfigError
from leantrain.model.moe import MoEFeedForward

EXPERT_WEIGHTS = ("w1", "w2", "w3")  # an MoE block's 3-D expert weights (gate, down, up)

ALL_LINEAR = "all-linear"
# Linears inside the blocks; the output head is left out of all-linear because it is usually tied
# to the embedding (name it as "output" to adapt an untied head).
BLOCK_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoRALinear(nn.Module):
    """A linear layer with a low-rank trainable update beside its (frozen) weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.scale = alpha / rank
        self.weight = base.weight  # the same Parameter object: same name, same storage, not copied
        self.bias = base.bias
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        """A as nn.Linear's default (Kaiming uniform), B zero: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return y + F.linear(F.linear(h, self.lora_a), self.lora_b) * self.scale

    def delta(self) -> Tensor:
        """The update B A * scale, in float32 (merging in low precision would round it away)."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


class ExpertLoRA(nn.Module):
    """LoRA on a stack of expert weights W [experts, in, out]: W_e + (alpha/rank) A_e B_e for every expert e, with
    A [experts, in, rank] and B [experts, rank, out] (zero, so the update starts at exactly zero). Registered as a
    parametrization of the weight, so the MoE block's grouped matmul reads the adapted weight unchanged."""

    def __init__(self, w: Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        experts, fan_in, fan_out = w.shape
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        kw = {"device": w.device, "dtype": w.dtype}
        self.lora_a = nn.Parameter(torch.empty(experts, fan_in, rank, **kw))
        self.lora_b = nn.Parameter(torch.zeros(experts, rank, fan_out, **kw))
        with torch.no_grad():  # each expert's A as LoRALinear's (Kaiming uniform over its fan-in)
            bound = 1 / math.sqrt(fan_in)
            self.lora_a.uniform_(-bound, bound)

    def forward(self, w: Tensor) -> Tensor:
        return w + (self.lora_a @ self.lora_b * self.scale).to(w.dtype)


def parse_targets(spec: str) -> list[str]:
    """`"wq,wk"` -> ["wq", "wk"]; `"all-linear"` stands for every linear of the blocks."""
    names: list[str] = []
    for s in spec.split(","):
        s = s.strip()
        names += list(BLOCK_LINEARS) if s == ALL_LINEAR else [s] if s else []
    return list(dict.fromkeys(names))


def _matches(name: str, target: str) -> bool:
    """A target names a module by its last parts (`wq`, `attention.wq`) or by a glob (`layers.1.*.wq`)."""
    return name == target or name.endswith("." + target) or fnmatch.fnmatchcase(name, target)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: str) -> list[str]:
    """Wrap every `nn.Linear` whose name matches `targets`, freeze all other parameters; returns the
    wrapped module names. A target that matches no linear is a ConfigError (a typo would otherwise
    train nothing)."""
    wanted = parse_targets(targets)
    if not wanted:
        raise ConfigError("config: finetune.lora_targets is empty; name modules such as \"wq,wv\" or use "
                          "\"all-linear\"")
    chosen: list[tuple[str, nn.Linear]] = []
    experts: list[tuple[MoEFeedForward, str]] = []  # (MoE block, name of its 3-D weight)
    used: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            for leaf in EXPERT_WEIGHTS:
                hits = [t for t in wanted if _matches(f"{name}.{leaf}", t)]
                if hits:
                    experts.append((module, leaf))
                    used.update(hits)
        if type(module) is not nn.Linear:
            continue
        hits = [t for t in wanted if _matches(name, t)]
        if hits:
            chosen.append((name, module))
            used.update(hits)
    optional = set(BLOCK_LINEARS) if ALL_LINEAR in targets else set()  # all-linear: gpt2 blocks have no w3
    missing = [t for t in wanted if t not in used and t not in optional]
    if missing or not (chosen or experts):
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear})
        raise ConfigError(f"config: finetune.lora_targets {','.join(missing) or targets!r} matches no linear layer "
                          f"of the model; use names from {', '.join(linears)} or \"all-linear\"")
    emb = getattr(model, "tok_embeddings", None)
    if any(emb is not None and m.weight is emb.weight for _, m in chosen):
        raise ConfigError("config: finetune.lora_targets includes the output projection, which is tied to the "
                          "embedding (a merged update could not stay tied); drop output or set "
                          "model.tie_embeddings = false")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha, dropout))
    for moe, leaf in experts:
        parametrize.register_parametrization(moe, leaf, ExpertLoRA(getattr(moe, leaf), rank, alpha))
    names = {id(m): n for n, m in model.named_modules()}
    return [name for name, _ in chosen] + [f"{names[id(moe)]}.{leaf}" for moe, leaf in experts]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put a plain `nn.Linear` back, in place; returns `model`.

    The merged model has the base model's exact state-dict keys and computes what the adapted one did
    (up to float rounding of W + BA)."""
    for module in list(model.modules()):
        if isinstance(module, MoEFeedForward) and parametrize.is_parametrized(module):
            for leaf in [k for k in EXPERT_WEIGHTS if parametrize.is_parametrized(module, k)]:
                [lora] = module.parametrizations[leaf]
                w = module.parametrizations[leaf].original
                merged = (w.float() + lora.lora_a.float() @ lora.lora_b.float() * lora.scale).to(w.dtype)
                parametrize.remove_parametrizations(module, leaf, leave_parametrized=False)
                getattr(module, leaf).copy_(merged)
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        w = module.weight
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter((w.float() + module.delta()).to(w.dtype), requires_grad=w.requires_grad)
        if module.bias is not None:
            linear.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
    return model


def is_adapter(name: str) -> bool:
    """True for the state-dict keys of LoRA adapter tensors."""
    return name.endswith((".lora_a", ".lora_b"))


def adapter_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapter tensors of a state dict: what `adapters.safetensors` holds."""
    return {k: v for k, v in state.items() if is_adapter(k)}


def _pattern_matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def freeze(model: nn.Module, patterns: str) -> list[str]:
    """Stop gradients for parameters named by `patterns` (a comma list of name prefixes such as
    `tok_embeddings,layers.0` or globs such as `layers.*.attention.*`); returns the frozen names.

    A tied output projection is the embedding's own tensor, so freezing one freezes both."""
    wanted = [s.strip() for s in patterns.split(",") if s.strip()]
    frozen: list[str] = []
    used: set[str] = set()
    for name, p in model.named_parameters():
        hits = [pat for pat in wanted if _pattern_matches(name, pat)]
        if hits:
            p.requires_grad_(False)
            frozen.append(name)
            used.update(hits)
    missing = [pat for pat in wanted if pat not in used]
    if missing:
        raise ConfigError(f"config: finetune.freeze pattern {','.join(missing)!r} matches no parameter; use name "
                          "prefixes such as tok_embeddings, layers.0, layers.1.attention or globs like layers.*.wq")
    return frozen


def trainable_params(model: nn.Module) -> int:
    """Parameters that get gradients (tied ones counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def apply_finetune(model: nn.Module, cfg: FinetuneConfig) -> dict[str, int] | None:
    """Freeze and/or add adapters per `[finetune]`, after any pretrained weights are loaded and before
    the model is parallelized; None when `[finetune]` asks for neither (pretraining)."""
    if not cfg.freeze.strip() and cfg.lora_rank == 0:
        return None
    frozen = freeze(model, cfg.freeze) if cfg.freeze.strip() else []
    wrapped = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets) \
        if cfg.lora_rank else []
    return {"lora_modules": len(wrapped), "frozen_params": len(frozen), "trainable_params": trainable_params(model),
            "total_params": sum(p.numel() for p in model.parameters())}
