"""One-shot pruning of a trained model: unstructured magnitude, 2:4 semi-structured, and structured.

`apply_pruning` is what `leantrain compress --method prune-*` calls. Unstructured and 2:4 pruning bake
their masks into the weights as exact zeros: the model keeps its shape, and only a sparse kernel or a
compressor can turn the zeros into speed or bytes (the 2:4 pattern is the one GPU sparse tensor cores read;
on CPU there is no such kernel, so those zeros are dense zeros, and `info["accelerated"]` says so).
Structured pruning removes whole attention heads and MLP channels, the same number in every block, and
rebuilds a smaller dense `Transformer` whose `ModelConfig` says its new sizes (n_heads, n_kv_heads, ffn_dim,
with head_dim pinned so the head width does not change): every runtime and export is faster with it.
Which weights may be zeroed, and why the embedding and the output head stay dense: `model/sparsity.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from leantrain.config import ModelConfig
from leantrain.errors import ConfigError
from leantrain.model import Transformer
from leantrain.model.flops import ffn_hidden_dim, head_size
from leantrain.model.sparsity import (
    apply_masks,
    is_two_four,
    masks_by_score,
    prunable_weights,
    sparsity_report,
    two_four_mask,
)

METHODS = ("prune-magnitude", "prune-structured", "prune-2:4")
DEFAULTS: dict[str, Any] = {"sparsity": 0.5, "scope": "global", "heads_fraction": 0.25, "channels_fraction": 0.25,
                            "score": "magnitude"}


def check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options with defaults filled in; a bad value is one ConfigError naming the fix."""
    if method not in METHODS:
        raise ConfigError(f"pruning method {method!r} is not allowed; expected one of {', '.join(METHODS)}")
    given = {k: v for k, v in options.items() if v is not None}  # None: not given, the default
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown pruning option(s) {', '.join(sorted(unknown))}; allowed: {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **given}
    for key in ("sparsity", "heads_fraction", "channels_fraction"):
        value = opts[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
            raise ConfigError(f"pruning option {key} = {value!r} is not allowed; expected a number in [0, 1) "
                              "(1 would remove everything)")
    if opts["scope"] not in ("global", "layer"):
        raise ConfigError(f"pruning option scope = {opts['scope']!r} is not allowed; expected global or layer")
    if opts["score"] not in ("magnitude", "taylor"):
        raise ConfigError(f"pruning option score = {opts['score']!r} is not allowed; expected magnitude or taylor")
    return opts


def apply_pruning(model: nn.Module, model_cfg: ModelConfig, method: str, options: dict[str, Any],
                  calib_batches: list[Tensor] | None = None) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """Prune `model` by `method`; returns (model, its config, info for compression.json).

    prune-magnitude and prune-2:4 zero weights in place and return the same model and config; prune-structured
    returns a new, smaller model and config. `calib_batches` (token ids [B, T+1] or [B, T], or (x, y) pairs)
    feed the first-order Taylor score (`score = "taylor"`); magnitude scores need none.
    """
    opts = check_options(method, options)
    if model_cfg.moe_experts and method == "prune-structured":
        raise ConfigError("prune-structured does not handle mixture-of-experts layers yet; use prune-magnitude")
    before = sum(p.numel() for p in model.parameters())
    weights = prunable_weights(model)
    if method == "prune-magnitude":
        masks = masks_by_score({n: w.detach().abs() for n, w in weights.items()}, opts["sparsity"], opts["scope"])
        apply_masks(weights, masks)
        info = {"sparsity_target": opts["sparsity"], "scope": opts["scope"]}
    elif method == "prune-2:4":
        info = _two_four(weights)
    else:
        model, model_cfg, info = _structured(model, model_cfg, opts, calib_batches)
        weights = prunable_weights(model)
    after = sum(p.numel() for p in model.parameters())
    nonzero = after - sum(int((w == 0).sum()) for w in weights.values())
    return model, model_cfg, {"method": method, **info, "sparsity": sparsity_report(weights),
                              "params_before": before, "params_after": after, "nonzero_params_after": nonzero}


def semi_structured_kernel() -> str | None:
    """Why a 2:4 model would (not) run faster here: None when torch's semi-structured sparse kernel is usable
    (CUDA, compute capability >= 8.0), else the reason."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this torch has no torch.sparse.to_sparse_semi_structured"
    if not torch.cuda.is_available():
        return "no CUDA device: CPU has no 2:4 sparse kernel, the zeros are computed as dense weights"
    if torch.cuda.get_device_capability()[0] < 8:
        return "the GPU predates sparse tensor cores (compute capability < 8.0)"
    return None


def _two_four(weights: dict[str, nn.Parameter]) -> dict[str, Any]:
    odd = [n for n, w in weights.items() if w.size(1) % 4]
    masks = {n: two_four_mask(w) for n, w in weights.items() if n not in odd}
    apply_masks(weights, masks)
    assert all(is_two_four(m) for m in masks.values())
    why_not = semi_structured_kernel()
    return {"pattern": "2:4 along the input dimension", "skipped_layers": odd,
            "accelerated": False,  # the saved weights are dense with zeros either way
            "kernel": why_not or ("torch.sparse.to_sparse_semi_structured can run these weights (fp16/bf16) on "
                                  "this GPU; the saved weights stay dense")}


# ---- structured --------------------------------------------------------------------------------------

def _calib_xy(batch: Any, seq_len: int) -> tuple[Tensor, Tensor]:
    if isinstance(batch, tuple | list):
        x, y = batch
    else:
        x, y = batch[:, :-1], batch[:, 1:]
    return x[:, :seq_len], y[:, :seq_len]


def _taylor_scores(model: nn.Module, cfg: ModelConfig, batches: list[Any]) -> dict[str, Tensor]:
    """|w * dL/dw| per weight entry, summed over the calibration batches (first-order Taylor estimate of the
    loss change from removing that weight; Molchanov et al. 2019)."""
    if not batches:
        raise ConfigError("score = taylor needs calibration batches (token ids); give some or use score = magnitude")
    params = dict(model.named_parameters())
    was_training, flags = model.training, {n: p.requires_grad for n, p in params.items()}
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items() if p.dim() == 2}
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.enable_grad():
            for p in params.values():
                p.requires_grad_(True)
            for batch in batches:
                x, y = _calib_xy(batch, cfg.seq_len)
                model.zero_grad(set_to_none=True)
                model(x.to(device), y.to(device)).backward()
                for n, s in scores.items():
                    if params[n].grad is not None:
                        s += (params[n].detach() * params[n].grad).abs().float()
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return scores


def _keep_count(total: int, fraction: float, what: str, fix: str) -> int:
    keep = total - int(fraction * total + 0.5)  # half rounds up, not to even: 0.5 of 5 channels removes 3
    if keep < 1:
        raise ConfigError(f"{what}: removing {fraction:g} of {total} leaves none; {fix}")
    return keep


def _structured(model: nn.Module, cfg: ModelConfig, opts: dict[str, Any],
                calib: list[Any] | None) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """Drop the least important heads and channels of every block (the same count in each) and rebuild."""
    hf, cf = opts["heads_fraction"], opts["channels_fraction"]
    if hf and cfg.arch == "gpt2":
        raise ConfigError("heads_fraction > 0 needs a Llama-family arch (gpt2 ties the head width to dim / n_heads); "
                          "set heads_fraction = 0 and prune channels only")
    hd, H, KV = head_size(cfg), cfg.n_heads, cfg.n_kv_heads
    group = H // KV
    # GQA: keep every kv head and drop the same number of query heads from each group; plain multi-head
    # attention (group 1): drop whole heads, queries, keys and values together
    if group > 1:
        per_group = _keep_count(group, hf, f"heads_fraction = {hf:g}", f"each kv group has {group} query heads "
                                f"({H} heads / {KV} kv heads): lower heads_fraction below {1 - 0.5 / group:g}")
        new_h, new_kv = per_group * KV, KV
    else:
        new_h = new_kv = _keep_count(H, hf, f"heads_fraction = {hf:g}", f"the model has {H} heads: lower it")
    hidden = ffn_hidden_dim(cfg)
    new_hidden = _keep_count(hidden, cf, f"channels_fraction = {cf:g}", f"the MLP has {hidden} channels: lower it")
    params = {n: p.detach() for n, p in model.named_parameters()}
    scores = (_taylor_scores(model, cfg, calib or []) if opts["score"] == "taylor"
              else {n: p.abs().float() for n, p in params.items() if p.dim() == 2})
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kept: dict[str, Any] = {"heads": [], "channels": []}
    for i in range(cfg.n_layers):
        a, f = f"layers.{i}.attention", f"layers.{i}.feed_forward"
        # a head's importance: its query rows and its output columns (a kv head: also its key and value rows)
        q_rows = scores[f"{a}.wq.weight"].view(H, hd, -1).sum((1, 2))
        o_cols = scores[f"{a}.wo.weight"].view(-1, H, hd).sum((0, 2))
        head_score = q_rows + o_cols
        if group > 1:
            within = head_score.view(KV, group).topk(per_group, dim=1).indices.sort(dim=1).values
            heads = (within + torch.arange(KV, device=within.device)[:, None] * group).flatten()
            kv_heads = torch.arange(KV)
        else:
            kv = (scores[f"{a}.wk.weight"].view(H, hd, -1).sum((1, 2))
                  + scores[f"{a}.wv.weight"].view(H, hd, -1).sum((1, 2)))
            heads = kv_heads = (head_score + kv).topk(new_h).indices.sort().values
        q_idx = (heads.cpu()[:, None] * hd + torch.arange(hd)).flatten()
        kv_idx = (kv_heads.cpu()[:, None] * hd + torch.arange(hd)).flatten()
        for name, idx in (("wq", q_idx), ("wk", kv_idx), ("wv", kv_idx)):
            for suffix in ("weight", "bias"):
                key = f"{a}.{name}.{suffix}"
                if key in state:
                    state[key] = state[key][idx.to(state[key].device)]
        state[f"{a}.wo.weight"] = state[f"{a}.wo.weight"][:, q_idx.to(state[f"{a}.wo.weight"].device)]
        # a channel's importance: its gate/up rows and its down column
        ch = scores[f"{f}.w1.weight"].sum(1) + scores[f"{f}.w2.weight"].sum(0)
        if f"{f}.w3.weight" in scores:
            ch = ch + scores[f"{f}.w3.weight"].sum(1)
        channels = ch.topk(new_hidden).indices.sort().values.cpu()
        for key in (f"{f}.w1.weight", f"{f}.w1.bias", f"{f}.w3.weight"):
            if key in state:
                state[key] = state[key][channels.to(state[key].device)]
        state[f"{f}.w2.weight"] = state[f"{f}.w2.weight"][:, channels.to(state[f"{f}.w2.weight"].device)]
        kept["heads"].append(heads.cpu().tolist())
        kept["channels"].append(len(channels))
    new_cfg = dataclasses.replace(cfg, n_heads=new_h, n_kv_heads=new_kv, ffn_dim=new_hidden,
                                  head_dim=cfg.head_dim if cfg.arch == "gpt2" else hd)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    with torch.device(device):
        small = Transformer(new_cfg).to(dtype)
    small.load_state_dict(state, strict=True)
    small.train(model.training)
    for old, new in zip(model.layers, small.layers, strict=True):  # the attention kernel chosen for it carries over
        new.attention.kernel = old.attention.kernel
    info = {"score": opts["score"], "heads_fraction": hf, "channels_fraction": cf,
            "n_heads": [H, new_h], "n_kv_heads": [KV, new_kv], "ffn_dim": [hidden, new_hidden], "head_dim": hd,
            "heads_kept": kept["heads"], "gqa": "query heads dropped within each kv group" if group > 1
            else "whole heads dropped"}
    return small, new_cfg, info
