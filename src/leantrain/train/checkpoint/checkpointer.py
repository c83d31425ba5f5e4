"""The `Checkpointer`: writes, lists, prunes and loads the checkpoints of one run directory, in either
format, and the loaders that pick the format from a checkpoint's manifest.

A checkpoint is built in `.tmp-step-*`, every file fsynced, the folder fsynced, then renamed into
place; the `latest` pointer is replaced after that. A crash at any moment leaves either the old or the
new checkpoint whole. Loading reads only what the manifest lists, checks every file, and falls back to
the previous checkpoint, loudly, when the newest is damaged, unparseable or lacks state it needs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from leantrain.errors import CheckpointError
from leantrain.files import fsync_dir, write_durable
from leantrain.train.checkpoint import full, manifest, sharded
from leantrain.train.checkpoint.state import Snapshot, gather_snapshot, missing_keys, snapshot

_PREFIX = "step-"


def read_checkpoint(path: str | Path, require: tuple[str, ...] = ()) -> Snapshot:
    """Read and verify one checkpoint (either format); any damage is a CheckpointError naming the file.

    `require`: state keys the caller needs beyond the format's own (the trainer: tokens, loader).
    Files in the folder that the manifest does not list are not read; they are named in `snap.warnings`."""
    folder = Path(path)
    listed = manifest.read(folder)
    snap = sharded.read(folder, listed) if sharded.is_sharded(listed) else full.read(folder, listed)
    lacking = missing_keys(snap.state, require)
    if lacking:
        raise manifest.damaged(folder, f"state.json lacks {', '.join(lacking)}")
    snap.listed = sorted(listed["files"])
    extra = manifest.unlisted(folder, listed)
    if extra:
        snap.warnings.append(manifest.unlisted_warning(folder, extra))
    return snap


def restore(snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a snapshot into a model (and optimizer) built from the same config."""
    if snap.sharded_dir is not None:
        return sharded.load_into(snap, model, optimizer)
    full.load_into(snap, model, optimizer)


def restore_full(snap: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """`restore` for a distributed run (DDP or FSDP2): a collective every rank calls with the same snapshot
    (each read the same files); each rank keeps its own shard of the weights and optimizer state."""
    if snap.sharded_dir is not None:
        return sharded.load_into(snap, model, optimizer)
    full.load_into_distributed(snap, model, optimizer)


def consolidate(checkpoint_dir: str | Path, out: str | Path) -> Path:
    """Write a sharded checkpoint as one full checkpoint folder (the single-file-per-kind format that
    `generate`, `export` and any resume read), in this process; returns the folder."""
    src = Path(checkpoint_dir)
    snap = read_checkpoint(src)
    if snap.sharded_dir is None:
        raise CheckpointError(f"{src} is already a full checkpoint (model.safetensors); use it as it is")
    return sharded.write_consolidated(sharded.consolidate_snapshot(snap), Path(out))


def yield_cores_to_training() -> None:
    """Lower the calling thread (the background writer) to nice 19, the thread alone (Linux priorities are per
    thread). Hashing and writing a checkpoint take CPU time that, at equal priority, the scheduler takes from
    the training threads, and a delayed thread stalls every thread of a parallel op waiting for it; at nice 19
    the write runs in the time training leaves idle and takes longer, which nobody waits for (durability and
    the order of renames are unchanged)."""
    if sys.platform.startswith("linux"):  # elsewhere setpriority(PRIO_PROCESS, tid) would name the whole process
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class Checkpointer:
    """Writes, lists, prunes and loads the checkpoints of one run directory.

    `save(step, state)` is the one call a training loop needs: given the model and optimizer (and how the
    run is laid out) at construction, it snapshots and writes in the configured format, in the
    background with `background=True`. `write`/`write_async` write a snapshot taken elsewhere.
    `require` names the state keys a checkpoint must hold to be loaded by `load_latest`."""

    def __init__(self, root: Path, keep: int, *, require: tuple[str, ...] = (),
                 model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 format: str = "full", background: bool = False, distributed: bool = False,
                 extra: Callable[[dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]] | None = None):
        self.root = Path(root)
        self.keep = keep
        self.require = tuple(require)
        self.model, self.optimizer = model, optimizer
        self.format, self.background, self.distributed, self.extra = format, background, distributed, extra
        self._thread: threading.Thread | None = None
        self._error: CheckpointError | None = None
        self.timings: list[dict[str, float]] = []  # per finished write: step, wall_s, cpu_s (its thread), bytes

    # ---- writing ---------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Checkpoint the model and optimizer given at construction, with `state` (tokens, loader, ...).

        Sharded: a collective every rank calls; full and distributed: every rank gathers, rank 0 writes.
        A failure is a CheckpointError (for a background write: raised by the next save or `wait`)."""
        if self.model is None or self.optimizer is None:
            raise TypeError("Checkpointer.save needs the model and optimizer given at construction")
        if self.format == "sharded":
            self.wait()  # a background full write still in flight (the format changed on resume)
            return self.save_sharded(step, self.model, self.optimizer, state)
        if self.distributed:
            snap = gather_snapshot(step, self.model, self.optimizer, state)
        else:
            snap = snapshot(step, self.model, self.optimizer, state)
        if snap is not None and self.extra is not None:
            snap.extra.update(self.extra(snap.model))
        if snap is not None and self.background:
            self.write_async(snap)
        elif snap is not None:
            self.write(snap)
        return self.path_for(step)

    def write_async(self, snap: Snapshot) -> None:
        """Write in a background thread; the snapshot is already a private copy, so training goes on.

        At most one write is in flight: a second call first waits for the one before. A failure
        is raised by the next `write_async` or `wait`.
        """
        self.wait()

        def work() -> None:
            yield_cores_to_training()
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

    def write(self, snap: Snapshot) -> Path:
        """Write a snapshot atomically (full format), move `latest` to it, then prune old ones.

        An OSError (disk full, permissions) leaves every earlier checkpoint as it was and
        is raised as a CheckpointError that says so.
        """
        t0, cpu0 = time.perf_counter(), time.thread_time()
        final = self.path_for(snap.step)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        try:
            self._prepare(tmp)
            files = full.write_files(tmp, snap)
            manifest.write(tmp, snap.step, files)
            self._commit(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._write_failed(final, e.strerror or str(e)) from None
        self.prune(final)
        self.timings.append({"step": snap.step, "wall_s": time.perf_counter() - t0,
                             "cpu_s": time.thread_time() - cpu0, "bytes": sum(f["bytes"] for f in files.values())})
        return final

    def save_sharded(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     state: dict[str, Any]) -> Path:
        """Write a sharded checkpoint; a collective every rank calls (in a single process: one rank).

        Rank 0 prepares the temporary folder and, once every rank's shards are in, writes state.json and
        the manifest, renames the folder into place, moves `latest` and prunes. Any rank's failure is a
        CheckpointError on every rank; earlier checkpoints stay intact.
        """
        final = self.path_for(step)
        tmp = self.root / f".tmp-{final.name}-{sharded.KIND}"  # one name all ranks agree on
        is_rank0 = sharded.rank() == 0
        problem = None
        if is_rank0:
            try:
                self._prepare(tmp)
            except OSError as e:
                problem = str(e.strerror or e)
        problem = sharded.from_rank0(problem)
        if problem is None:
            problem, osd = sharded.write_shards(tmp, model, optimizer)
        if problem is None and is_rank0:
            try:
                sharded.write_state(tmp, step, model, osd, state)
                self._commit(tmp, final)
                self.prune(final)
            except OSError as e:
                problem = str(e.strerror or e)
        problem = sharded.from_rank0(problem)
        if problem is not None:
            if is_rank0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise self._write_failed(final, problem)
        return final

    def _write_failed(self, final: Path, why: str) -> CheckpointError:
        return CheckpointError(f"could not save checkpoint {final.name} in {self.root}: {why}; earlier "
                               "checkpoints are intact; free disk space or fix permissions, then resume")

    def _prepare(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        tmp.mkdir()

    def _commit(self, tmp: Path, final: Path) -> None:
        """Make a whole checkpoint folder durable, rename it into place and point `latest` at it."""
        fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after a rollback)
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_durable(self.root / "latest", final.name + "\n")  # fsyncs the folder, so the rename too

    def _remove_leftovers(self) -> None:
        """Temp folders and pointer files of writes that died (killed mid-write, disk full). One
        writer per run directory, and at most one write in flight, so none of them is live."""
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(".latest.tmp"):
                p.unlink(missing_ok=True)

    def prune(self, newest: Path) -> None:
        """Keep the `keep` newest checkpoints up to `newest`, the one just written. Any past it are
        from a future the run abandoned when it resumed from an older one (the newest was damaged,
        or `latest` had not moved yet); left in place they would outrank `newest` in a fallback."""
        found = self.list()
        abandoned = [p for p in found if p.name > newest.name]
        kept_window = [p for p in found if p.name <= newest.name]
        for old in abandoned + kept_window[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- reading ---------------------------------------------------------------------------

    def path_for(self, step: int) -> Path:
        return self.root / f"{_PREFIX}{step:07d}"

    def list(self) -> list[Path]:
        """Complete checkpoints (renamed into place), oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.name.startswith(_PREFIX) and p.is_dir() and not p.is_symlink()]
        return sorted(found, key=lambda p: p.name)

    def load_latest(self) -> tuple[Path, Snapshot, list[str]] | None:
        """Newest loadable checkpoint, with one warning line per damaged one skipped (and per loaded one
        holding files its manifest does not list); None if none exist."""
        candidates = self.list()
        if not candidates:
            return None
        pointer = self.root / "latest"
        try:  # `latest` names the newest whole one; a newer dir without it was never pointed to
            named = pointer.read_text().strip()
            candidates.sort(key=lambda p: (p.name == named, p.name))
        except (OSError, UnicodeDecodeError):
            pass
        warnings = []
        for path in reversed(candidates):
            try:
                snap = read_checkpoint(path, self.require)
            except CheckpointError as e:
                warnings.append(str(e))
                continue
            return path, snap, warnings + snap.warnings
        raise CheckpointError(
            f"no usable checkpoint in {self.root}: {'; '.join(warnings)}; nothing was overwritten; "
            "start a new run with --restart or point --run-dir elsewhere")
