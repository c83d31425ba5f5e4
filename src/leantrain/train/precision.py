"""Precision policy beyond the autocast dtype: float8 linear layers through torchao.

fp8 doubles the matmul rate of Hopper/Ada GPUs over bf16. torchao swaps `nn.Linear` for
`Float8Linear`, which casts inputs, weights and output gradients to float8 with dynamic per-tensor
scales (the "tensorwise" recipe) while master weights stay fp32 and everything else stays in the
autocast dtype. On CPU torch runs the float8 matmul emulated: correct numbers, no speed-up, useful to
check a run's numerics before paying for a GPU. Where fp8 cannot run, the run goes on in bf16 and says
why instead of failing.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

# torchao's kernels need dimensions that are multiples of 16
_FP8_MULTIPLE = 16


def float8_unavailable(device: torch.device) -> str | None:
    """Why float8 training cannot run here, or None when it can."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        return f"fp8 needs a GPU of compute capability >= 8.9 (Ada, Hopper or newer); this one is {major}.{minor}"
    if device.type not in ("cuda", "cpu"):
        return f"fp8 is not supported on {device.type}"
    logging.getLogger("torchao").setLevel(logging.ERROR)  # it warns about kernels for other GPUs on import
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "fp8 needs torchao: pip install torchao"
    return None


def float8_eligible(module: nn.Module, name: str) -> bool:
    """Linear layers whose shapes float8 kernels take; the output projection stays in bf16, as in
    torchtitan, because the logits are where low precision hurts the loss most."""
    return (isinstance(module, nn.Linear) and name.split(".")[-1] != "output"
            and module.in_features % _FP8_MULTIPLE == 0 and module.out_features % _FP8_MULTIPLE == 0)


def apply_float8(model: nn.Module, device: torch.device) -> tuple[int, str | None]:
    """Convert the eligible linear layers in place; returns (layers converted, reason when none could be).

    Must run before FSDP2 and compile wrap the model (they must see the Float8Linear modules).
    """
    reason = float8_unavailable(device)
    if reason is not None:
        return 0, reason
    from torchao.float8 import convert_to_float8_training

    before = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, module_filter_fn=float8_eligible)
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    if converted == 0:
        return 0, f"none of the {before} linear layers has dimensions divisible by {_FP8_MULTIPLE}"
    return converted, None
