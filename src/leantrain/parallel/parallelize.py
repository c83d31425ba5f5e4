"""Apply execution strategies to a plain model from outside it.

Order (DESIGN.md): tensor parallel -> activation checkpointing -> compile -> FSDP2/DDP. This
file holds the single-process pieces; the distributed ones plug into the same function.
None of them changes parameter names, so checkpoints do not depend on how a run executed.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from leantrain.config import Config


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
        if hasattr(module, "kernel") and module.__class__.__name__ == "Attention":
            module.kernel = kernel


def parallelize(model: nn.Module, cfg: Config, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The module the training step calls. `model` itself keeps its state-dict names."""
    kernel = choose_attention_kernel(cfg.train.attention, device, dtype, cfg.model.seq_len)
    set_attention_kernel(model, kernel)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.ac_every)
    if cfg.train.compile:
        return torch.compile(model)
    return model
