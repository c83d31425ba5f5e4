"""The sharded format: every rank writes its own shards with torch.distributed.checkpoint (DCP).

With `checkpoint.format = "sharded"` no rank ever holds the whole model or optimizer: each writes the
pieces it owns (FSDP2 shards, tensor-parallel slices; replicated tensors once) and on resume each reads
the pieces its new layout needs, so a checkpoint resumes at another world size or layout:

    shards/*.safetensors   the tensors, one file per writing rank, keyed "model/<name>" and
                           "optim/<name>/<state>"; each file's header records where its pieces sit
                           in the whole tensors (DCP's Hugging Face storage format)
    state.json             step, tokens, loader, RNG, optimizer scalars and param groups, config hash
    manifest.json          size and sha256 of every file above; written last

DCP's default file format keeps its index and non-tensor values as pickles, which run code when
loaded; its safetensors storage (used here) holds tensors only, its index rebuilt from the files'
headers (only the files the manifest lists), and everything else goes in state.json. The files are
written by every rank into the same run directory, so that directory must be on a file system all
nodes share. `consolidate` turns one into a full checkpoint, in one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from leantrain.errors import CheckpointError
from leantrain.files import fsync_dir, write_durable
from leantrain.train.checkpoint import full, manifest
from leantrain.train.checkpoint.state import FORMAT, Snapshot, rng_state, tied_aliases

KIND = "sharded"
SHARDS = "shards"


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if distributed() else 0


def from_rank0(value: Any) -> Any:
    """Rank 0's value on every rank (the value itself in one process)."""
    import torch.distributed as dist

    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every save/load in a process without a group; one process is a layout like any other."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _flat(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict, dict]:
    """(tensors keyed for the files, this rank's model state dict, optimizer state dict): sharded, by name.

    Tied aliases are left out of the tensors (their target is stored once)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    aliases = tied_aliases(model)
    flat: dict[str, Any] = {f"model/{k}": v for k, v in msd.items() if k not in aliases}
    for fqn, pstate in osd["state"].items():
        for key, v in pstate.items():
            if torch.is_tensor(v):
                flat[f"optim/{fqn}/{key}"] = v
    return flat, msd, osd


def write_shards(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[str | None, dict]:
    """Every rank writes its pieces under folder/shards (a collective); (any rank's failure or None,
    this rank's optimizer state dict, whose scalars `write_state` keeps)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    flat, _, osd = _flat(model, optimizer)
    try:
        with _single_process_quiet():
            dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(folder / SHARDS), save_distributed=True),
                     no_dist=not distributed())
    except Exception as e:  # noqa: BLE001 - DCP gathers any rank's failure into a CheckpointException
        return (str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__), osd
    return None, osd


def write_state(folder: Path, step: int, model: torch.nn.Module, osd: dict, state: dict[str, Any]) -> None:
    """Rank 0, after every shard is written: state.json and the manifest (hashing every file), all fsynced."""
    scalars = {f"{fqn}/{k}": v for fqn, ps in osd["state"].items() for k, v in ps.items() if not torch.is_tensor(v)}
    full_state = dict(state)
    full_state.update(format=FORMAT, kind=KIND, step=step, aliases=tied_aliases(model), optim_scalars=scalars,
                      param_groups=osd["param_groups"], rng=rng_state())
    files: dict[str, Any] = {}
    size, sha = write_durable(folder / "state.json", json.dumps(full_state).encode(), sync_dir=False)
    files["state.json"] = {"bytes": size, "sha256": sha}
    for f in sorted((folder / SHARDS).iterdir()):
        files[f"{SHARDS}/{f.name}"] = manifest.hash_file(f)
    manifest.write(folder, step, files, kind=KIND)
    fsync_dir(folder / SHARDS)


def is_sharded(listed: dict[str, Any]) -> bool:
    return listed.get("kind") == KIND


def read(folder: Path, listed: dict[str, Any]) -> Snapshot:
    """Verify a sharded checkpoint's listed files and parse their headers; the Snapshot holds its state and
    the shards' folder (the tensors are read by `load_into`, each rank its own pieces)."""
    for name, info in listed["files"].items():
        manifest.verify_listed(folder, name, info)
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(folder / name), framework="pt") as f:
                    f.keys()
            except (SafetensorError, OSError, ValueError) as e:
                raise manifest.damaged(folder, f"{name} cannot be parsed ({str(e).strip()[:200]})") from None
    if "state.json" not in listed["files"]:
        raise manifest.damaged(folder, "its manifest does not list state.json")
    try:
        with manifest.open_listed(folder, "state.json") as f:
            state = json.loads(f.read())
    except ValueError as e:
        raise manifest.damaged(folder, f"state.json cannot be parsed ({e})") from None
    return Snapshot(listed["step"], {}, {}, state, sharded_dir=folder / SHARDS, listed=sorted(listed["files"]))


def _reader(snap: Snapshot) -> Any:
    """DCP's safetensors reader, over a view of the shards folder that holds only the files the manifest
    lists (the reader would otherwise read every *.safetensors it finds there)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.filesystem import FileSystem

    names = {n.removeprefix(f"{SHARDS}/") for n in snap.listed if n.startswith(f"{SHARDS}/") and n.count("/") == 1}

    class ListedFiles(FileSystem):
        def ls(self, path: str | os.PathLike) -> list[str]:
            return [p for p in super().ls(path) if Path(p).name in names]

    reader = HuggingFaceStorageReader(str(snap.sharded_dir))
    reader.fs = ListedFiles()
    return reader


def load_into(snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a sharded checkpoint into a model (and optimizer) of any layout: each rank reads the pieces of
    the files that its own shards cover. A collective when distributed; also works in a single process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    aliases = snap.state.get("aliases", {})
    if optimizer is None:
        msd = get_model_state_dict(model)
        flat = {f"model/{k}": v for k, v in msd.items() if k not in aliases}
        osd = None
    else:
        flat, msd, osd = _flat(model, optimizer)
    try:
        with _single_process_quiet():
            dcp.load(flat, storage_reader=_reader(snap), no_dist=not distributed())
    except Exception as e:  # noqa: BLE001 - a missing key or a shape that differs: not this model's checkpoint
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"checkpoint step {snap.step} does not fit this model ({first}); "
                              "resume with the config the run was started with") from None
    msd = {k: flat[f"model/{aliases.get(k, k)}"] for k in msd}
    if osd is None:
        set_model_state_dict(model, msd, options=StateDictOptions(strict=True))
        return
    state: dict[str, dict[str, Any]] = {}
    for fqn, pstate in osd["state"].items():
        state[fqn] = {k: flat[f"optim/{fqn}/{k}"] for k, v in pstate.items() if torch.is_tensor(v)}
    for key, v in snap.state.get("optim_scalars", {}).items():
        fqn, name = key.rsplit("/", 1)
        state.setdefault(fqn, {})[name] = v
    groups = snap.state["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict={"state": state, "param_groups": groups})


def consolidate_snapshot(snap: Snapshot) -> Snapshot:
    """A sharded snapshot's tensors read whole, in the full format (model and optimizer tensors keyed as
    `full` writes them), in this process."""
    import torch.distributed.checkpoint as dcp

    meta = _reader(snap).read_metadata()
    whole = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()}
    with _single_process_quiet():
        dcp.load(whole, storage_reader=_reader(snap), no_dist=True)
    groups = snap.state["param_groups"]
    index = {fqn: i for i, fqn in enumerate(p for g in groups for p in g["params"])}
    model = {k.removeprefix("model/"): v for k, v in whole.items() if k.startswith("model/")}
    optim = {}
    for k, v in whole.items():
        if k.startswith("optim/"):
            fqn, name = k.removeprefix("optim/").rsplit("/", 1)
            optim[f"{index[fqn]}/{name}"] = v
    state = dict(snap.state)
    state.pop("kind", None)
    state["optim_scalars"] = {f"{index[k.rsplit('/', 1)[0]]}/{k.rsplit('/', 1)[1]}": v
                              for k, v in snap.state.get("optim_scalars", {}).items()}
    state["param_groups"] = [{**g, "params": [index[p] for p in g["params"]]} for g in groups]
    return Snapshot(snap.step, model, optim, state)


def write_consolidated(snap: Snapshot, out: Path) -> Path:
    """Write a consolidated snapshot as a new full checkpoint folder `out` (built aside, renamed when whole)."""
    if out.exists():
        raise CheckpointError(f"{out} already exists; pick a new --out folder")
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        manifest.write(tmp, snap.step, full.write_files(tmp, snap))
        fsync_dir(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {out}: {e.strerror or e}; free disk space or pick another --out") \
            from None
    return out
