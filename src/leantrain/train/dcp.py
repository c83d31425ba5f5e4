"""Sharded checkpoints: every rank writes its own shards with torch.distributed.checkpoint (DCP).

With `checkpoint.format = "sharded"` no rank ever holds the whole model or optimizer: each writes the
pieces it owns (FSDP2 shards, tensor-parallel slices; replicated tensors once) and on resume each reads
the pieces its new layout needs, so a checkpoint resumes at another world size or layout. Layout of
one checkpoint, `checkpoints/step-0000100/`:

    shards/*.safetensors   the tensors, one file per writing rank, keyed "model/<name>" and
                           "optim/<name>/<state>"; each file's header records where its pieces sit
                           in the whole tensors (DCP's Hugging Face storage format)
    state.json             step, tokens, loader, RNG, optimizer scalars and param groups, config hash
    manifest.json          size and sha256 of every file above; written last

DCP's default file format keeps its index and non-tensor values as pickles, which run code when
loaded; its safetensors storage (used here) holds tensors only, its index rebuilt from the files'
headers, and everything else goes in state.json. Discipline as for full checkpoints: written under
`.tmp-step-*`, renamed when whole, `latest` moved last, a damaged newest one skipped loudly on resume.
The files are written by every rank into the same run directory, so that directory must be on a
file system all nodes share.

`consolidate` turns one into a full checkpoint (model.safetensors + optim.safetensors, the format of
`checkpoint.py`), in one process.
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

from leantrain.errors import CheckpointError
from leantrain.train.checkpoint import (
    Checkpointer,
    Snapshot,
    _aliases,
    _fsync_dir,
    _safetensors_chunks,
    _write_durable,
    rng_state,
)

KIND = "sharded"
SHARDS = "shards"


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every save/load in a process without a group; one process is a layout like any other."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _distributed() else 0


def _from_rank0(value: Any) -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _flat(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict, dict]:
    """(tensors keyed for the files, this rank's model state dict, optimizer state dict): sharded, by name.

    Tied aliases are left out of the tensors (their target is stored once)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    aliases = _aliases(model)
    flat: dict[str, Any] = {f"model/{k}": v for k, v in msd.items() if k not in aliases}
    for fqn, pstate in osd["state"].items():
        for key, v in pstate.items():
            if torch.is_tensor(v):
                flat[f"optim/{fqn}/{key}"] = v
    return flat, msd, osd


def save_sharded(checkpointer: Checkpointer, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 state: dict[str, Any]) -> Path:
    """Write a sharded checkpoint; a collective every rank calls (in a single process: one rank).

    Rank 0 prepares the temporary folder and, once every rank's shards are in, writes state.json and
    the manifest, renames the folder into place, moves `latest` and prunes. Any rank's failure is a
    CheckpointError on every rank; earlier checkpoints stay intact.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    final = checkpointer.path_for(step)
    tmp = checkpointer.root / f".tmp-{final.name}-{KIND}"
    problem = None
    if _rank() == 0:
        try:
            checkpointer.root.mkdir(parents=True, exist_ok=True)
            checkpointer._remove_leftovers()
            tmp.mkdir()
        except OSError as e:
            problem = str(e.strerror or e)
    problem = _from_rank0(problem)
    if problem is None:
        flat, _, osd = _flat(model, optimizer)
        try:
            with _single_process_quiet():
                dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True),
                         no_dist=not _distributed())
        except Exception as e:  # noqa: BLE001 - DCP gathers any rank's failure into a CheckpointException
            problem = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
    if problem is None and _rank() == 0:
        try:
            _finish(checkpointer, tmp, final, step, model, osd, state)
        except OSError as e:
            problem = str(e.strerror or e)
    problem = _from_rank0(problem)
    if problem is not None:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not save checkpoint {final.name} in {checkpointer.root}: {problem}; earlier "
                              "checkpoints are intact; free disk space or fix permissions, then resume")
    return final


def _finish(checkpointer: Checkpointer, tmp: Path, final: Path, step: int, model: torch.nn.Module, osd: dict,
            state: dict[str, Any]) -> None:
    """Rank 0, after every shard is written: state.json, manifest (hashing every file), rename, `latest`."""
    scalars = {f"{fqn}/{k}": v for fqn, ps in osd["state"].items() for k, v in ps.items() if not torch.is_tensor(v)}
    full_state = dict(state)
    full_state.update(format=1, kind=KIND, step=step, aliases=_aliases(model), optim_scalars=scalars,
                      param_groups=osd["param_groups"], rng=rng_state())
    manifest: dict[str, Any] = {"format": 1, "kind": KIND, "step": step, "files": {}}
    size, sha = _write_durable(tmp / "state.json", json.dumps(full_state).encode())
    manifest["files"]["state.json"] = {"bytes": size, "sha256": sha}
    for f in sorted((tmp / SHARDS).iterdir()):
        size, sha = _hash_file(f)
        manifest["files"][f"{SHARDS}/{f.name}"] = {"bytes": size, "sha256": sha}
    _write_durable(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp / SHARDS)
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. after a rollback)
        shutil.rmtree(final)
    os.replace(tmp, final)
    checkpointer._point_latest(final.name)
    checkpointer.prune(final)


def _hash_file(path: Path) -> tuple[int, str]:
    import hashlib

    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def is_sharded(manifest: dict[str, Any]) -> bool:
    return manifest.get("kind") == KIND


def read_sharded(path: Path, manifest: dict[str, Any]) -> Snapshot:
    """Verify a sharded checkpoint's files against its manifest; the Snapshot holds its state and the
    shards' folder (the tensors are read by `restore_sharded`, each rank its own pieces)."""
    for name, info in manifest["files"].items():
        try:
            size, sha = _hash_file(path / name)
        except OSError:
            raise CheckpointError(f"checkpoint {path.name} is damaged: {name} is missing") from None
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path.name} is damaged: {name} fails its checksum "
                                  f"({size} bytes, expected {info['bytes']})")
        if sha != info["sha256"]:
            raise CheckpointError(f"checkpoint {path.name} is damaged: {name} fails its checksum (sha256 differs)")
    try:
        state = json.loads((path / "state.json").read_text())
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path.name} is damaged: {e}") from None
    return Snapshot(manifest["step"], {}, {}, state, sharded_dir=path / SHARDS)


def restore_sharded(snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a sharded checkpoint into a model (and optimizer) of any layout: each rank reads the pieces of
    the files that its own shards cover. A collective when distributed; also works in a single process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    reader = HuggingFaceStorageReader(str(snap.sharded_dir))
    aliases = snap.state.get("aliases", {})
    if optimizer is None:
        msd = get_model_state_dict(model)
        flat = {f"model/{k}": v for k, v in msd.items() if k not in aliases}
        osd = None
    else:
        flat, msd, osd = _flat(model, optimizer)
    try:
        with _single_process_quiet():
            dcp.load(flat, storage_reader=reader, no_dist=not _distributed())
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


def consolidate(checkpoint_dir: str | Path, out: str | Path) -> Path:
    """Write a sharded checkpoint as one full checkpoint folder (the single-file-per-kind format that
    `generate`, `export` and any resume read), in this process; returns the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from leantrain.train.checkpoint import read_checkpoint

    src = Path(checkpoint_dir)
    snap = read_checkpoint(src)
    if snap.sharded_dir is None:
        raise CheckpointError(f"{src} is already a full checkpoint (model.safetensors); use it as it is")
    reader = HuggingFaceStorageReader(str(snap.sharded_dir))
    meta = reader.read_metadata()
    whole = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()}
    with _single_process_quiet():
        dcp.load(whole, storage_reader=HuggingFaceStorageReader(str(snap.sharded_dir)), no_dist=True)
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
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out} already exists; pick a new --out folder")
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        blobs = {"model.safetensors": _safetensors_chunks(model), "optim.safetensors": _safetensors_chunks(optim),
                 "state.json": json.dumps(state).encode()}
        manifest: dict[str, Any] = {"format": 1, "step": snap.step, "files": {}}
        for name, data in blobs.items():
            size, sha = _write_durable(tmp / name, data)
            manifest["files"][name] = {"bytes": size, "sha256": sha}
        _write_durable(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {out}: {e.strerror or e}; free disk space or pick another --out") \
            from None
    return out
