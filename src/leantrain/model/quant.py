"""Quantized weights through torchao: the methods, fake quantization for QAT, and a safe on-disk form.

Every method quantizes the model's linear layers and its token embedding (one tensor when the output
projection is tied to it) with a torchao tensor subclass, so the model stays a plain `Transformer` whose
weights happen to be quantized tensors and everything that calls it (generate, evaluate, serve) works:

    int8           Int8WeightOnlyConfig: int8 weights, one scale per output row (fp32 activations)
    int8-dynamic   Int8DynamicActivationInt8WeightConfig: int8 weights and int8 activations per token
    int4           IntxWeightOnlyConfig(int4, PerGroup(g)): int4 weights, one scale per group of g inputs.
                   torchao 0.18 has no CPU int4 kernel for fp32 activations (its Int4WeightOnlyConfig
                   packings need CUDA/XPU/NPU or the mslk library), so the values are held one per int8
                   in memory and dequantized per matmul; the file stores two values per byte.

On disk (`quantized_state` / `load_quantized`): torchao's own safetensors flattening
(`torchao.prototype.safetensors`: plain int tensors + scales + zero points, with a JSON description that
names only classes torchao allows), so a reload rebuilds the same tensors without re-quantizing and
without unpickling anything. QAT (`apply_qat`) fake-quantizes the linear layers with the same scheme
the conversion uses, through torchao's `QATConfig`; a QAT model's state dict is the plain model's.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from torch import nn

METHODS = ("int8", "int8-dynamic", "int4", "fp8")
QAT_SCHEMES = ("int8", "int4")


def import_torchao() -> Any:
    """Import torchao without its import-time log lines (CUDA-only extension libraries it cannot load on a CPU
    build, a torch deprecation note), which would otherwise precede every command's own output."""
    import sys

    if "torchao" in sys.modules:
        return sys.modules["torchao"]
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        import torchao
        import torchao.prototype.safetensors.safetensors_support  # noqa: F401 - registers more enums
        import torchao.quantization.qat  # noqa: F401
    except ImportError:
        from leantrain.errors import LeantrainError

        raise LeantrainError("quantization needs torchao 0.18 or newer, which is not installed; install it with "
                             "pip install 'torchao>=0.18'") from None
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    return torchao


def torchao_config(method: str, group_size: int = 32, *, qat: bool = False) -> Any:
    """The torchao config of a method. QAT schemes (and their conversion) use IntxWeightOnlyConfig, the one
    weight-only family torchao's QATConfig fake-quantizes (symmetric; int8 per output row, int4 per group)."""
    import_torchao()
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
    )

    if method == "int4":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    if method == "int8" and qat:
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    if method == "int8":
        return Int8WeightOnlyConfig()
    if method == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if method == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    raise ValueError(f"unknown quantization method {method!r}; expected one of {', '.join(METHODS)}")


def _eligible(group_size: int, method: str):
    def check(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear | nn.Embedding) or getattr(module, "weight", None) is None:
            return False
        # GPT-2's learned positions are sliced, not looked up (and tiny); fp8 has no embedding lookup
        if fqn == "pos_embeddings" or (method == "fp8" and isinstance(module, nn.Embedding)):
            return False
        return method != "int4" or module.weight.shape[-1] % group_size == 0
    return check


def quantize_model(model: nn.Module, method: str, group_size: int = 32, *, qat: bool = False) -> dict[str, Any]:
    """Quantize `model` in place (linear layers and embeddings); returns what was done (layers, skipped).

    A tied output projection is re-tied to the quantized embedding afterwards, so it is stored once."""
    import_torchao()
    from torchao.quantization import quantize_

    tied = getattr(model, "output", None) is not None and model.output.weight is model.tok_embeddings.weight
    check = _eligible(group_size, method)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Embedding)]
    done = [n for n, m in model.named_modules() if check(m, n)]
    if tied and "tok_embeddings" not in done and "output" in done:
        done.remove("output")  # both stay full precision, still one tensor
    chosen = set(done)
    quantize_(model, torchao_config(method, group_size, qat=qat), filter_fn=lambda m, fqn: fqn in chosen)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    return {"layers": len(done), "skipped": [n for n in names if n not in chosen and not (tied and n == "output")]}


def apply_qat(model: nn.Module, scheme: str, group_size: int = 32) -> int:
    """Fake-quantize the linear layers for quantization-aware training (torchao QATConfig "prepare");
    returns how many. The weights stay float and keep their names, so checkpoints load as a plain model,
    and `quantize_model(..., qat=True)` later quantizes them with the same scheme."""
    import_torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    check = _eligible(group_size, scheme)
    chosen = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and check(m, n)}
    quantize_(model, QATConfig(torchao_config(scheme, group_size, qat=True), step="prepare"),
              filter_fn=lambda m, fqn: fqn in chosen)
    return len(chosen)


# ---- on disk ---------------------------------------------------------------------------------------------

def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], last dim even -> uint8, two values per byte (low nibble first)."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack_int4(p: torch.Tensor) -> torch.Tensor:
    low = (p & 0xF).to(torch.int8)
    high = (p >> 4).to(torch.int8)
    out = torch.stack([low, high], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return torch.where(out > 7, out - 16, out).to(torch.int8)


def quantized_state(model: nn.Module, method: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(plain tensors for a safetensors file, layout for state.json) of a quantized model.

    Tied aliases are stored once; int4 values are packed two per byte."""
    import_torchao()
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    sd = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases[name] = seen[id(p)]
            continue
        seen[id(p)] = name
        sd[name] = p.detach()
    sd.update({n: b.detach() for n, b in model.named_buffers() if n.split(".")[-1] != "rope"})
    flat, meta = flatten_tensor_state_dict(sd)
    packed = []
    tensors = {}
    for key, t in flat.items():
        t = t.detach().to("cpu").contiguous()
        if method == "int4" and key.endswith("_qdata") and t.dtype == torch.int8 and t.shape[-1] % 2 == 0:
            t = _pack_int4(t).contiguous()
            packed.append(key)
        tensors[key] = t
    return tensors, {"method": method, "torchao": meta, "packed_int4": packed, "aliases": aliases}


def load_quantized(model: nn.Module, tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> None:
    """Put the saved quantized tensors into a freshly built model of the same config (no re-quantizing)."""
    import_torchao()
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    flat = dict(tensors)
    for key in layout.get("packed_int4", []):
        flat[key] = _unpack_int4(flat[key])
    meta = layout["torchao"]
    sd, leftover = unflatten_tensor_state_dict(flat, meta)
    if leftover:
        raise ValueError(f"tensors the layout does not describe: {', '.join(sorted(leftover)[:3])}")
    for alias, target in layout.get("aliases", {}).items():
        sd[alias] = sd[target]
    model.load_state_dict(sd, strict=True, assign=True)
    for alias, target in layout.get("aliases", {}).items():  # one shared parameter again, as trained
        mod_a, _, attr_a = alias.rpartition(".")
        mod_t, _, attr_t = target.rpartition(".")
        setattr(model.get_submodule(mod_a), attr_a, getattr(model.get_submodule(mod_t), attr_t))
    for p in model.parameters():
        p.requires_grad_(False)


def is_quantized(model: nn.Module) -> str | None:
    """The torchao tensor class of the first quantized weight, or None for a plain model."""
    return next((type(p).__name__ for p in model.parameters() if type(p) not in (torch.Tensor, nn.Parameter)), None)


def layout_summary(layout: dict[str, Any]) -> str:
    """One line naming a saved layout (for messages)."""
    kinds = {json.loads(v).get("_type") for k, v in layout.get("torchao", {}).items() if k != "tensor_names"}
    return f"{layout.get('method')} ({', '.join(sorted(k for k in kinds if k and k != 'Tensor'))})"
