"""Guard rails of a run directory: one writer at a time, only folders leantrain owns, no planted symlinks.

A trainer claims its run directory before it writes anything there: the folder must be new, empty or
a leantrain run (never a project folder that happens to hold a `config.toml`), none of the names
leantrain writes may be a symlink someone else placed, and an OS lock on `RUN_DIR/.lock` (flock, held
as long as the process keeps the claim, released by the kernel when the process dies) keeps a second
trainer out. Under torchrun only rank 0 claims; every rank gets its verdict, so they fail together.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Any

from leantrain.errors import CheckpointError
from leantrain.files import remove_stale_temps, write_durable

MARKER = ".leantrain-run"
LOCK = ".lock"
# names leantrain writes in a run directory; none of them may be a symlink
RUN_FILES = ("config.toml", "plan.json", "metrics.jsonl", "metrics.discarded.jsonl", "events.jsonl", "samples.txt",
             "report.html", "tokenizer.json", "tokenizer_config.json", "chat_template.txt", "lr_find.json",
             "lr_find.png", "checkpoints", "checkpoints/latest", "trackers.json", "tensorboard", "mlflow", "wandb",
             MARKER, LOCK)

_held: weakref.WeakValueDictionary[str, RunDirLock] = weakref.WeakValueDictionary()


def is_run_dir(path: str | Path) -> bool:
    """A folder leantrain trains into: it has the run marker, or (runs from before the marker) checkpoints/
    and metrics.jsonl, or a config.toml next to events.jsonl."""
    p = Path(path)
    return ((p / MARKER).is_file() or ((p / "checkpoints").is_dir() and (p / "metrics.jsonl").is_file())
            or ((p / "config.toml").is_file() and (p / "events.jsonl").is_file()))


def check_run_dir(path: str | Path) -> None:
    """Raise a one-line CheckpointError unless `path` is a new or empty folder or a leantrain run whose
    own file names are not symlinks. Reads only: a refused folder is left exactly as it was."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CheckpointError(f"run directory {p} is a file, not a folder; pass a folder path with --run-dir")
    if not p.is_dir():
        return
    entries = sorted(e.name for e in p.iterdir() if e.name not in (LOCK, MARKER))  # a claim that got no further
    if entries and not is_run_dir(p):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise CheckpointError(f"{p} holds files leantrain did not write ({shown}) and is not a leantrain run; "
                              "train into a new or empty folder (--run-dir) so nothing of yours is overwritten")
    for name in RUN_FILES:
        if (p / name).is_symlink():
            raise CheckpointError(f"{p / name} is a symbolic link, and leantrain does not write through links "
                                  f"placed in a run directory; remove it (rm {p / name}) and run again")


def lock_holder(path: str | Path) -> str | None:
    """Who holds the run directory's lock ('pid N on HOST'), or None when it is free. Takes nothing."""
    lock = Path(path) / LOCK
    mine = _held.get(str(Path(path).resolve()))
    if not lock.is_file() or lock.is_symlink() or (mine is not None and mine.fd >= 0):
        return None
    fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (pid unknown)"


def check_restartable(path: str | Path) -> None:
    """Before `--restart` moves a run aside: it must be a leantrain run that no live process trains into."""
    check_run_dir(path)
    holder = lock_holder(path)
    if holder is not None:
        raise CheckpointError(f"{path} is in use: another leantrain process ({holder}) is training into it; "
                              "wait for it to end or stop it before --restart")


class RunDirLock:
    """An exclusive flock on RUN_DIR/.lock; the file holds the holder's pid and host for the message of
    whoever comes second. Released by `release()`, when the last reference goes, or by the kernel."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.fd = -1
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if self.path.is_symlink():
                raise CheckpointError(f"{self.path} is a symbolic link, and leantrain does not write through links "
                                      f"placed in a run directory; remove it (rm {self.path}) and run again") from None
            raise CheckpointError(f"cannot create the lock file {self.path}: {e.strerror or e}; check the "
                                  "permissions of the run directory") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(self.fd)
            self.release()
            raise CheckpointError(f"{run_dir} is in use: another leantrain process ({holder}) is training into it; "
                                  "wait for it to end or stop it, or pass another --run-dir") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time(), 3)})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (info + "\n").encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1

    def __del__(self) -> None:
        self.release()


def claim_run_dir(run_dir: str | Path, layout: Any = None) -> RunDirLock | None:
    """Check, lock and mark `run_dir` for training (rank 0 of `layout`, if given); returns the lock, which
    the trainer keeps for its lifetime. A process that already holds the lock shares it (a resumed
    Trainer in the same Python session). Raises a one-line CheckpointError on every rank when refused."""
    run_dir = Path(run_dir)
    rank0 = layout is None or layout.is_rank0
    lock, error = None, None
    if rank0:
        try:
            lock = _claim(run_dir)
        except CheckpointError as e:
            error = str(e)
    if layout is not None:
        error = layout.from_rank0(error)
    if error is not None:
        raise CheckpointError(error)
    if not rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
    return lock


def _claim(run_dir: Path) -> RunDirLock:
    check_run_dir(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the run directory {run_dir}: {e.strerror or e}; pick another "
                              "--run-dir or fix its permissions") from None
    key = str(run_dir.resolve())
    lock = _held.get(key)
    if lock is None or lock.fd < 0:
        lock = RunDirLock(run_dir)
        _held[key] = lock
    remove_stale_temps(run_dir)  # the lock is ours: temp files of a killed writer are not live
    marker = run_dir / MARKER
    if not marker.exists():
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"leantrain_run": 1, "created": round(time.time(), 3)}) + "\n")
    return lock


def write_run_file(run_dir: str | Path, name: str, data: str | bytes) -> None:
    """Replace RUN_DIR/NAME durably (temp, fsync, rename: a kill or full disk leaves the old file whole),
    skipping the write when the content is already there. A failure is one line that says the run is
    still as it was, so the same command can be run again once the cause is fixed."""
    path = Path(run_dir) / name
    new = data.encode() if isinstance(data, str) else data
    try:
        if path.is_file() and not path.is_symlink() and path.read_bytes() == new:
            return
        write_durable(path, new)
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {e.strerror or e}; the run directory is unchanged and "
                              "resumable: free disk space or fix permissions, then run the same command") from None
