"""Which weights travel between server and clients, and how they go in and out of a model.

Full federation sends every parameter once (tied embeddings once, buffers never: they are rebuilt from the
config); LoRA-only federation sends the adapter tensors alone, since every party builds the same frozen base
from the same seed (or the same `train.init_from` checkpoint). Flower's ArrayRecord carries them.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from leantrain.model.lora import is_adapter


def exchanged(model: torch.nn.Module, lora_only: bool) -> dict[str, torch.nn.Parameter]:
    """The parameters that travel, by name, in the model's own order."""
    return {n: p for n, p in model.named_parameters() if not lora_only or is_adapter(n)}


def to_record(model: torch.nn.Module, lora_only: bool) -> ArrayRecord:
    """The travelling weights as an ArrayRecord (float32 copies on the CPU)."""
    return ArrayRecord(torch_state_dict={n: p.detach().to("cpu", torch.float32).contiguous()
                                         for n, p in exchanged(model, lora_only).items()})


@torch.no_grad()
def load_record(model: torch.nn.Module, record: ArrayRecord, lora_only: bool) -> None:
    """Copy the weights of `record` into the model; a missing or extra name is an error (different configs)."""
    params = exchanged(model, lora_only)
    state = record.to_torch_state_dict()
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"the global weights do not fit this model (missing {missing[:3]}, unexpected "
                         f"{extra[:3]}); server and clients must use the same [model] and [finetune] config")
    for name, p in params.items():
        p.copy_(state[name].to(p.device, p.dtype))
