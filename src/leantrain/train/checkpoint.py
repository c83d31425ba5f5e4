"""Checkpoints that survive crashes and never execute code when loaded.

Layout of one checkpoint, `checkpoints/step-0000100/`:
    model.safetensors   model weights (tied aliases stored once, listed in state.json)
    optim.safetensors   optimizer tensors, keyed "<param index>/<name>"
    state.json          step, tokens, loader, RNG, schedule and optimizer scalars, config hash
    adapters.safetensors  LoRA runs only: the adapter tensors alone (model.safetensors holds them too)
    manifest.json       size and sha256 of every file above; written last

Under torch.distributed (DDP, FSDP2) the same files are written: every rank joins in gathering the
full model and optimizer state (`gather_snapshot`), rank 0 writes it, and on resume every rank reads
the files and takes its own shard (`restore_full`). So a checkpoint resumes at any world size and
layout without a converter. Fine for models whose full state fits one host's memory; for larger ones
`checkpoint.format = "sharded"` writes each rank's shards instead (train/dcp.py); `read_checkpoint`,
`restore` and `restore_full` accept both kinds.

A checkpoint is built in `.tmp-step-*`, every file fsynced, then renamed into place; the
`latest` pointer is replaced after that. A crash at any moment leaves either the old or the
new checkpoint whole. Loading checks the manifest and falls back to the previous checkpoint,
loudly, when the newest is damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load

from leantrain.errors import CheckpointError

FORMAT = 1
_PREFIX = "step-"


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
    return _assemble(step, tensors, aliases, osd["state"].items(), osd["param_groups"], state)


def _assemble(step: int, tensors: dict[str, torch.Tensor], aliases: dict[str, str], param_states: Any,
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


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters registered under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _optim_fqns(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
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
    aliases = _aliases(model)
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in msd.items() if name not in aliases}
    param_states = ((idx, osd["state"].get(fqn, {})) for idx, fqn in enumerate(_optim_fqns(model, optimizer)))
    return _assemble(step, tensors, aliases, param_states, optimizer.state_dict()["param_groups"], state)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def _safetensors_chunks(tensors: dict[str, torch.Tensor]) -> list[bytes | memoryview]:
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


def _write_durable(path: Path, data: bytes | list[bytes | memoryview]) -> tuple[int, str]:
    """Write, flush and fsync a file from one buffer or a list of them; returns (bytes, sha256).

    Hashing and writing large buffers both release the GIL, so a background write barely
    competes with the training thread for it."""
    chunks = [data] if isinstance(data, bytes | memoryview) else data
    digest, size = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for chunk in chunks:
            digest.update(chunk)
            f.write(chunk)
            size += memoryview(chunk).nbytes
        f.flush()
        os.fsync(f.fileno())
    return size, digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Writes, lists, prunes and loads the checkpoints of one run directory."""

    def __init__(self, root: Path, keep: int):
        self.root = Path(root)
        self.keep = keep
        self._thread: threading.Thread | None = None
        self._error: CheckpointError | None = None
        self.timings: list[dict[str, float]] = []  # per finished write: step, wall_s, cpu_s (its thread), bytes

    def write_async(self, snap: Snapshot) -> None:
        """Write in a background thread; the snapshot is already a private copy, so training goes on.

        At most one write is in flight: a second call first waits for the one before. A failure
        is raised by the next `write_async` or `wait`.
        """
        self.wait()

        def work() -> None:
            try:
                self.write(snap)
            except CheckpointError as e:
                self._error = e

        self._thread = threading.Thread(target=work, name=f"checkpoint-{snap.step}")
        self._thread.start()

    def wait(self) -> None:
        """Block until a background write is done; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def path_for(self, step: int) -> Path:
        return self.root / f"{_PREFIX}{step:07d}"

    def list(self) -> list[Path]:
        """Complete checkpoints (renamed into place), oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
        return sorted(found, key=lambda p: p.name)

    def write(self, snap: Snapshot) -> Path:
        """Write a snapshot atomically, move `latest` to it, then prune old ones.

        An OSError (disk full, permissions) leaves every earlier checkpoint as it was and
        is raised as a CheckpointError that says so.
        """
        t0, cpu0 = time.perf_counter(), time.thread_time()
        final = self.path_for(snap.step)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            tmp.mkdir()
            blobs = {
                "model.safetensors": _safetensors_chunks(snap.model),
                "optim.safetensors": _safetensors_chunks(snap.optim),
                "state.json": json.dumps(snap.state).encode(),
            }
            blobs.update({name: _safetensors_chunks(tensors) for name, tensors in snap.extra.items()})
            manifest = {"format": FORMAT, "step": snap.step, "files": {}}
            for name, data in blobs.items():
                size, sha = _write_durable(tmp / name, data)
                manifest["files"][name] = {"bytes": size, "sha256": sha}
            _write_durable(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
            _fsync_dir(tmp)
            if final.exists():  # a re-save of the same step (e.g. after a rollback)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._point_latest(final.name)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"could not save checkpoint {final.name} in {self.root}: {e.strerror or e}; earlier "
                "checkpoints are intact; free disk space or fix permissions, then resume") from None
        self.prune(final)
        self.timings.append({"step": snap.step, "wall_s": time.perf_counter() - t0,
                             "cpu_s": time.thread_time() - cpu0,
                             "bytes": sum(f["bytes"] for f in manifest["files"].values())})
        return final

    def _remove_leftovers(self) -> None:
        """Temp folders and pointer files of writes that died (killed mid-write, disk full). One
        writer per run directory, and at most one write in flight, so none of them is live."""
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(".latest.tmp"):
                p.unlink(missing_ok=True)

    def _point_latest(self, name: str) -> None:
        tmp = self.root / f".latest.tmp{os.getpid()}"
        _write_durable(tmp, (name + "\n").encode())
        os.replace(tmp, self.root / "latest")
        _fsync_dir(self.root)

    def prune(self, newest: Path) -> None:
        """Keep the `keep` newest checkpoints up to `newest`, the one just written. Any past it are
        from a future the run abandoned when it resumed from an older one (the newest was damaged,
        or `latest` had not moved yet); left in place they would outrank `newest` in a fallback."""
        found = self.list()
        abandoned = [p for p in found if p.name > newest.name]
        kept_window = [p for p in found if p.name <= newest.name]
        for old in abandoned + kept_window[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_latest(self) -> tuple[Path, Snapshot, list[str]] | None:
        """Newest loadable checkpoint, with one warning line per damaged one skipped; None if none exist."""
        candidates = self.list()
        if not candidates:
            return None
        pointer = self.root / "latest"
        try:  # `latest` names the newest whole one; a newer dir without it was never pointed to
            named = pointer.read_text().strip()
            candidates.sort(key=lambda p: (p.name == named, p.name))
        except OSError:
            pass
        warnings = []
        for path in reversed(candidates):
            try:
                return path, read_checkpoint(path), warnings
            except CheckpointError as e:
                warnings.append(str(e))
        raise CheckpointError(
            f"no usable checkpoint in {self.root}: {'; '.join(warnings)}; nothing was overwritten; "
            "start a new run with --restart or point --run-dir elsewhere")


def read_checkpoint(path: Path) -> Snapshot:
    """Read and verify one checkpoint; any damage is a CheckpointError naming the file."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError):
        raise CheckpointError(f"checkpoint {path.name} is damaged: manifest.json missing or unreadable") from None
    if manifest.get("kind") == "sharded":
        from leantrain.train.dcp import read_sharded

        return read_sharded(path, manifest)
    blobs = {}
    for name, info in files.items():
        try:
            data = (path / name).read_bytes()
        except OSError:
            raise CheckpointError(f"checkpoint {path.name} is damaged: {name} is missing") from None
        if len(data) != info["bytes"]:
            raise CheckpointError(f"checkpoint {path.name} is damaged: {name} fails its checksum "
                                  f"({len(data)} bytes, expected {info['bytes']})")
        if _sha256(data) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path.name} is damaged: {name} fails its checksum (sha256 differs)")
        blobs[name] = data
    try:
        state = json.loads(blobs["state.json"])
        return Snapshot(manifest["step"], st_load(blobs["model.safetensors"]),
                        st_load(blobs["optim.safetensors"]), state)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path.name} is damaged: {e}") from None


def _weights(snap: Snapshot) -> dict[str, torch.Tensor]:
    weights = dict(snap.model)
    for alias, target in snap.state.get("aliases", {}).items():
        weights[alias] = weights[target]
    return weights


def _does_not_fit(snap: Snapshot, e: Exception) -> CheckpointError:
    first = str(e).strip().splitlines()[0]
    return CheckpointError(f"checkpoint step {snap.step} does not fit this model ({first}); "
                           "resume with the config the run was started with")


def _optim_state(snap: Snapshot) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
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


def restore(snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a snapshot into a model (and optimizer) built from the same config."""
    if snap.sharded_dir is not None:
        from leantrain.train.dcp import restore_sharded

        return restore_sharded(snap, model, optimizer)
    try:
        model.load_state_dict(_weights(snap), strict=True)
    except RuntimeError as e:
        raise _does_not_fit(snap, e) from None
    if optimizer is None:
        return
    state, groups = _optim_state(snap)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def restore_full(snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """`restore` for a distributed run (DDP or FSDP2): a collective every rank calls with the same snapshot
    (each read the same files); each rank keeps its own shard of the weights and optimizer state."""
    if snap.sharded_dir is not None:
        from leantrain.train.dcp import restore_sharded

        return restore_sharded(snap, model, optimizer)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # every rank scatters the tensors in dict order, so the order must be the same on every rank;
    # safetensors' loader returns them in a per-process (hash) order
    opts = StateDictOptions(full_state_dict=True, strict=True)
    weights = _weights(snap)
    try:
        set_model_state_dict(model, {k: weights[k] for k in sorted(weights)}, options=opts)
    except (RuntimeError, KeyError) as e:
        raise _does_not_fit(snap, e) from None
    if optimizer is None:
        return
    state, groups = _optim_state(snap)
    fqns = _optim_fqns(model, optimizer)
    if sum(len(g["params"]) for g in groups) != len(fqns):
        raise CheckpointError(f"checkpoint step {snap.step} holds optimizer state for a different set of "
                              "parameters; resume with the config the run was started with")
    for g in groups:
        g["params"] = [fqns[i] for i in g["params"]]
    by_name = {fqns[i]: {k: state[i][k] for k in sorted(state[i])} for i in sorted(state)}
    set_optimizer_state_dict(model, optimizer, {"state": by_name, "param_groups": groups}, options=opts)
