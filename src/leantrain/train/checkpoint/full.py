"""The full format: the whole model and optimizer state, one safetensors file per kind.

    model.safetensors     model weights (tied aliases stored once, listed in state.json)
    optim.safetensors     optimizer tensors, keyed "<param index>/<name>"
    state.json            step, tokens, loader, RNG, schedule and optimizer scalars, config hash
    adapters.safetensors  LoRA runs only: the adapter tensors alone (model.safetensors holds them too)

Under torch.distributed (DDP, FSDP2) rank 0 writes the state every rank gathered (`gather_snapshot`);
on resume every rank reads the files and takes its own shard (`load_into_distributed`), so a full
checkpoint resumes at any world size and layout without a converter.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from leantrain.errors import CheckpointError
from leantrain.files import write_durable
from leantrain.train.checkpoint import manifest
from leantrain.train.checkpoint.state import Snapshot, optim_fqns

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def safetensors_chunks(tensors: dict[str, torch.Tensor]) -> list[bytes | memoryview]:
    """A safetensors file as a list of buffers: the header, then each tensor's own memory, uncopied.

    safetensors' `save` builds the whole file in one bytes object while holding the GIL (~0.1 s for
    the tiny recipe's 64 MB), which stalls the training thread during a background write; the
    file written from these chunks is a standard safetensors file (8-byte header length, JSON
    header padded to 8 bytes, tensors packed in header order) that `safetensors.torch.load` reads.
    """
    header, views, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"tensor {name} must be a contiguous CPU tensor to be written")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        view = memoryview(raw).cast("B") if t.numel() else memoryview(raw)
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + view.nbytes]}
        views.append(view)
        offset += view.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return [struct.pack("<Q", len(head)) + head, *views]


_ST_TORCH = {name: dtype for dtype, name in _ST_DTYPES.items()}
_MAX_HEADER = 100 << 20


def tensors_from_safetensors(buf: bytearray | mmap.mmap) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `buf`, as views into it (no copy; they keep `buf` alive, and
    `buf` cannot be closed or resized while they do).

    `safetensors.torch.load` copies every tensor out of the bytes it is given; a checkpoint's bytes are read
    into a buffer of our own anyway (to be hashed), so wrapping them saves one copy of the whole file on
    every resume. Tensors whose offset does not suit their dtype's alignment are copied. The header must
    describe the data exactly (tensors packed back to back, as every safetensors writer lays them out).
    ValueError names what is malformed.
    """
    if sys.byteorder != "little":  # the format is little-endian; the library byte-swaps where we would not
        try:
            return st_load(bytes(buf))
        except (SafetensorError, KeyError, OverflowError) as e:
            raise ValueError(str(e).strip()[:200]) from None
    try:
        return _views(memoryview(buf))
    except (TypeError, OverflowError, RecursionError, RuntimeError) as e:
        raise ValueError(f"its header is malformed ({type(e).__name__})") from None


def _views(view: memoryview) -> dict[str, torch.Tensor]:
    if len(view) < 8:
        raise ValueError("shorter than its 8-byte header length")
    n = struct.unpack_from("<Q", view)[0]
    if n > min(_MAX_HEADER, len(view) - 8):
        raise ValueError(f"its header length {n} runs past the end of the file")
    header = json.loads(bytes(view[8: 8 + n]))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    base, data_len, entries = 8 + n, len(view) - 8 - n, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        name_dtype = entry.get("dtype") if isinstance(entry, dict) else None
        dtype = _ST_TORCH.get(name_dtype) if isinstance(name_dtype, str) else None
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if dtype is not None else (None, None)
        sizes_ok = isinstance(shape, list) and len(shape) <= 64 and isinstance(offsets, list) and len(offsets) == 2
        if not sizes_ok or dtype is None or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62 for v in [*shape, *offsets]):
            raise ValueError(f"tensor {name!r} has a malformed header entry")
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name!r}'s data offsets do not match its shape")
        entries.append((begin, end, name, dtype, shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    at = 0
    for begin, end, name, _, _ in entries:  # back to back: no gap, no overlap, nothing past the end
        if begin != at:
            raise ValueError(f"tensor {name!r}'s data does not start where the previous one ends")
        at = end
    if at != data_len:
        raise ValueError(f"its tensors cover {at} bytes of {data_len}")
    out = {}
    for begin, end, name, dtype, shape in entries:
        numel = math.prod(shape)
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (base + begin) % dtype.itemsize == 0:
            out[name] = torch.frombuffer(view, dtype=dtype, count=numel, offset=base + begin).view(shape)
        else:
            raw = torch.frombuffer(view, dtype=torch.uint8, count=end - begin, offset=base + begin).clone()
            out[name] = raw.view(dtype).view(shape)
    return out


def write_files(folder: Path, snap: Snapshot) -> dict[str, dict[str, Any]]:
    """Write a snapshot's files into a checkpoint folder being built; returns their manifest entries.
    The caller writes the manifest and fsyncs the folder once."""
    blobs = {
        "model.safetensors": safetensors_chunks(snap.model),
        "optim.safetensors": safetensors_chunks(snap.optim),
        "state.json": json.dumps(snap.state).encode(),
    }
    blobs.update({name: safetensors_chunks(tensors) for name, tensors in snap.extra.items()})
    files = {}
    for name, data in blobs.items():
        size, sha = write_durable(folder / name, data, sync_dir=False)
        files[name] = {"bytes": size, "sha256": sha}
    return files


def read(folder: Path, listed: dict[str, Any]) -> Snapshot:
    """Read and verify a full checkpoint's listed files; what cannot be parsed is damage, named."""
    # two files at once: each is read on one thread and hashed on another, and sha256 is the bound (one core each)
    with ThreadPoolExecutor(2, thread_name_prefix="leantrain-load") as pool:
        blobs = dict(zip(listed["files"], pool.map(lambda item: manifest.read_listed(folder, *item),
                                                   listed["files"].items()), strict=True))
    for name in ("state.json", "model.safetensors", "optim.safetensors"):
        if name not in blobs:
            raise manifest.damaged(folder, f"its manifest does not list {name}")
    try:
        state = json.loads(bytes(blobs["state.json"]))
    except ValueError as e:
        raise manifest.damaged(folder, f"state.json cannot be parsed ({e})") from None
    # model and optimizer first, so their damage is the one named; then the other safetensors files a trainer
    # wrote beside them (LoRA adapters, pruning masks)
    names = ["model.safetensors", "optim.safetensors"]
    names += [n for n in blobs if n.endswith(".safetensors") and n not in names]
    tensors = {}
    for name in names:
        try:
            tensors[name] = tensors_from_safetensors(blobs[name])
        except ValueError as e:
            raise manifest.damaged(folder, f"{name} cannot be parsed ({str(e).strip()[:200]})") from None
    model, optim = tensors.pop("model.safetensors"), tensors.pop("optim.safetensors")
    return Snapshot(listed["step"], model, optim, state, extra=tensors)


def weights(snap: Snapshot) -> dict[str, torch.Tensor]:
    weights = dict(snap.model)
    for alias, target in snap.state.get("aliases", {}).items():
        weights[alias] = weights[target]
    return weights


def does_not_fit(snap: Snapshot, e: Exception) -> CheckpointError:
    first = str(e).strip().splitlines()[0]
    return CheckpointError(f"checkpoint step {snap.step} does not fit this model ({first}); "
                           "resume with the config the run was started with")


def optim_state(snap: Snapshot) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """(state by parameter index, param groups) as the checkpoint holds them."""
    state: dict[int, dict[str, Any]] = {}
    for key, t in snap.optim.items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = t
    for key, v in snap.state.get("optim_scalars", {}).items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = snap.state["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return state, groups


def load_into(snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a full snapshot into a model (and optimizer) built from the same config, in one process."""
    try:
        model.load_state_dict(weights(snap), strict=True)
    except (RuntimeError, KeyError) as e:
        raise does_not_fit(snap, e) from None
    if optimizer is None:
        return
    state, groups = optim_state(snap)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_into_distributed(snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """`load_into` for a distributed run (DDP or FSDP2): a collective every rank calls with the same snapshot
    (each read the same files); each rank keeps its own shard of the weights and optimizer state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # every rank scatters the tensors in dict order, so the order must be the same on every rank;
    # safetensors' loader returns them in a per-process (hash) order
    opts = StateDictOptions(full_state_dict=True, strict=True)
    all_weights = weights(snap)
    try:
        set_model_state_dict(model, {k: all_weights[k] for k in sorted(all_weights)}, options=opts)
    except (RuntimeError, KeyError) as e:
        raise does_not_fit(snap, e) from None
    if optimizer is None:
        return
    state, groups = optim_state(snap)
    fqns = optim_fqns(model, optimizer)
    if sum(len(g["params"]) for g in groups) != len(fqns):
        raise CheckpointError(f"checkpoint step {snap.step} holds optimizer state for a different set of "
                              "parameters; resume with the config the run was started with")
    for g in groups:
        g["params"] = [fqns[i] for i in g["params"]]
    by_name = {fqns[i]: {k: state[i][k] for k in sorted(state[i])} for i in sorted(state)}
    set_optimizer_state_dict(model, optimizer, {"state": by_name, "param_groups": groups}, options=opts)
