"""Apply execution strategies to a plain model from outside it.

Order (DESIGN.md): tensor parallel -> activation checkpointing -> compile -> FSDP2/DDP. None of
them changes parameter names, so checkpoints do not depend on how a run executed. Tensor parallel
is not implemented yet (`resolve_degrees` refuses tp > 1).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from leantrain.config import Config
from leantrain.errors import ConfigError
from leantrain.model.transformer import Attention
from leantrain.parallel.distributed import Layout


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> int:
    """Recompute block activations in the backward pass instead of keeping them; returns blocks wrapped.

    `full` wraps every block of `model.layers`; `selective` wraps every `every`-th one, trading
    part of the memory saving for less recomputation. The block's `forward` is wrapped on the
    instance, so module and parameter names stay those of the plain model.
    """
    if mode == "none":
        return 0
    wrapped = 0
    for i, block in enumerate(model.layers):
        if mode == "full" or (mode == "selective" and i % every == 0):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
            wrapped += 1
    return wrapped


MATMUL_ATTENTION_MAX_SEQ = 512


def choose_attention_kernel(requested: str, device: torch.device, dtype: torch.dtype, seq_len: int) -> str:
    """`auto`: matmul attention for bf16 on CPU at short contexts (it beat the flash kernel ~2x
    there), SDPA everywhere else (GPUs, fp32, long contexts where [T, T] scores cost memory)."""
    if requested != "auto":
        return requested
    short = seq_len <= MATMUL_ATTENTION_MAX_SEQ
    return "matmul" if device.type == "cpu" and dtype == torch.bfloat16 and short else "sdpa"


def set_attention_kernel(model: nn.Module, kernel: str) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.kernel = kernel


def apply_fsdp(model: nn.Module, layout: Layout, reshard_after_forward: bool) -> None:
    """FSDP2 in place: each block of `model.layers` is one unit (its weights gathered just before it runs),
    the root holds the rest (embeddings, final norm, output). On a (replicate, shard) mesh with
    dp_replicate > 1 this is HSDP. Parameters become DTensor shards under the same names."""
    from torch.distributed.fsdp import fully_shard

    mesh = layout.mesh if layout.dp_replicate > 1 else layout.mesh["dp_shard"]
    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


def apply_ddp(model: nn.Module, layout: Layout) -> nn.Module:
    """DDP around the model; `model` itself stays the plain module with its own names."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [layout.device.index] if layout.device.type == "cuda" else None
    # the only buffer (rope) is a function of the config, identical everywhere: nothing to broadcast
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                   process_group=layout.mesh["dp_replicate"].get_group())


def set_grad_sync(step_model: nn.Module, enabled: bool) -> None:
    """Turn the gradient all-reduce / reduce-scatter off for all but the last micro-batch of a step."""
    module = getattr(step_model, "_orig_mod", step_model)
    if hasattr(module, "require_backward_grad_sync"):  # DDP
        module.require_backward_grad_sync = enabled
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(enabled)


def parallelize(model: nn.Module, cfg: Config, device: torch.device, dtype: torch.dtype,
                layout: Layout | None = None) -> nn.Module:
    """The module the training step calls. `model` itself keeps its state-dict names.

    With a distributed `layout`: FSDP2 (or HSDP) shards `model` in place when dp_shard > 1 and the
    result is `model` itself; DDP (dp_replicate > 1 alone) returns a wrapper around it.
    """
    kernel = choose_attention_kernel(cfg.train.attention, device, dtype, cfg.model.seq_len)
    set_attention_kernel(model, kernel)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.ac_every)
    if layout is None or not layout.distributed:
        if cfg.train.compile:
            return torch.compile(model)
        return model
    if cfg.train.compile:
        raise ConfigError("config: train.compile = true is not supported with more than one process yet; "
                          "set --train.compile=false")
    if layout.sharded:
        apply_fsdp(model, layout, cfg.parallel.fsdp_reshard_after_forward)
        return model
    return apply_ddp(model, layout)
