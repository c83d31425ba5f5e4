"""What a checkpoint holds, copied off the live model: the `Snapshot`, RNG states, and the
optimizer's state in the checkpoint's own format (tensors keyed "<param index>/<name>", scalars,
param groups and tied aliases in state.json). Both formats and every world size share it."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leantrain.train.checkpoint.manifest import FORMAT

# keys every checkpoint's state.json holds, whatever wrote it; a state without them cannot be resumed
FORMAT_KEYS = ("step", "rng", "param_groups", "optim_scalars", "aliases")


@dataclass
class Snapshot:
    """Everything a checkpoint holds, copied off the live model so it can be written later."""

    step: int
    model: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]
    state: dict[str, Any]
    sharded_dir: Path | None = None  # a sharded checkpoint's shards: its tensors stay on disk until restored
    # more safetensors files written beside model.safetensors, e.g. {"adapters.safetensors": LoRA tensors}
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # found while reading (files the manifest does not list)
    listed: list[str] = field(default_factory=list)  # the files its manifest lists: all that loading may read


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(x, dtype=torch.uint8) for x in s["cuda"]])
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def missing_keys(state: Any, require: tuple[str, ...] = ()) -> list[str]:
    """Keys a loaded state.json lacks (the format's and the caller's); a non-dict lacks them all."""
    if not isinstance(state, dict):
        return [*FORMAT_KEYS, *require]
    missing = [k for k in (*FORMAT_KEYS, *require) if k not in state]
    rng = state.get("rng")
    if "rng" not in missing and not (isinstance(rng, dict) and all(k in rng for k in ("torch", "numpy", "python"))):
        missing.append("rng.torch/numpy/python")
    if "param_groups" not in missing and not isinstance(state["param_groups"], list):
        missing.append("param_groups (a list)")
    return missing


def snapshot(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Snapshot:
    """Copy model and optimizer state to CPU now, so training may go on while it is written."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_ptr: dict[int, str] = {}
    for name, t in model.state_dict().items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in by_ptr and t.shape == tensors[by_ptr[ptr]].shape:
            aliases[name] = by_ptr[ptr]
            continue
        by_ptr[ptr] = name
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    osd = optimizer.state_dict()
    return assemble(step, tensors, aliases, osd["state"].items(), osd["param_groups"], state)


def assemble(step: int, tensors: dict[str, torch.Tensor], aliases: dict[str, str], param_states: Any,
             param_groups: list[dict], state: dict) -> Snapshot:
    """The checkpoint format: optimizer tensors keyed "<param index>/<name>", its scalars, param
    groups, aliases and RNG states in state.json."""
    optim_tensors, optim_scalars = {}, {}
    for idx, pstate in param_states:
        for key, v in pstate.items():
            if torch.is_tensor(v):
                optim_tensors[f"{idx}/{key}"] = v.detach().to("cpu", copy=True).contiguous()
            else:
                optim_scalars[f"{idx}/{key}"] = v
    full_state = dict(state)
    full_state.update(format=FORMAT, step=step, aliases=aliases, optim_scalars=optim_scalars,
                      param_groups=param_groups, rng=rng_state())
    return Snapshot(step, tensors, optim_tensors, full_state)


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters registered under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def optim_fqns(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's own order: the name of parameter index i of the checkpoint format.

    The first name of each parameter in `named_parameters()` is the key torch.distributed's
    state-dict helpers use for it."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def gather_snapshot(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict) -> Snapshot | None:
    """`snapshot` for a distributed run: a collective every rank must call; rank 0 gets the whole
    (unsharded) state in the single-process format, the other ranks None."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    if dist.get_rank() != 0:
        return None
    aliases = tied_aliases(model)
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in msd.items() if name not in aliases}
    param_states = ((idx, osd["state"].get(fqn, {})) for idx, fqn in enumerate(optim_fqns(model, optimizer)))
    return assemble(step, tensors, aliases, param_states, optimizer.state_dict()["param_groups"], state)
