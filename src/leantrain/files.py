"""Writing files and folders so that readers see the old one or the new one, never half of either.

`write_durable` is the one way leantrain replaces a file (checkpoints, `latest`, manifests, config.toml,
plan.json, reports, exports): the bytes go to a temporary name in the same folder, are fsynced, renamed
over the target, and the folder is fsynced, so a kill or a full disk leaves the old file whole. The
rename replaces a symlink found at the target instead of writing through it. Files get ordinary
permissions (0666 less the umask, as `open` would give), not mkstemp's 0600.

Every stage that writes a folder (a token dataset, an export) builds it under a hidden sibling name
on the same filesystem and renames it into place when whole; the old folder goes only after.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from leantrain.errors import CheckpointError

Chunks = bytes | bytearray | memoryview | str | Iterable[bytes | bytearray | memoryview]


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | Path, data: Chunks, *, sync_dir: bool = True) -> tuple[int, str]:
    """Replace `path` atomically with `data` (bytes, text as UTF-8, or a list of buffers written in
    turn, uncopied); returns (bytes written, sha256 hex).

    Temp file in the same folder -> write -> fsync -> rename over `path` -> fsync the folder
    (`sync_dir=False` when the caller fsyncs the folder itself once, after writing many files).
    On any error the temporary file is removed and `path` is as it was. Hashing and writing large
    buffers release the GIL, so a background write barely competes with the training thread."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(3).hex()}")
    digest, size = hashlib.sha256(), 0
    # O_EXCL + O_NOFOLLOW: never write through a file or symlink someone else put at the temporary name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
                size += memoryview(chunk).nbytes
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return size, digest.hexdigest()


def write_text_durable(path: str | Path, text: str) -> None:
    """`write_durable` for a text file (UTF-8)."""
    write_durable(path, text.encode())


def write_json_durable(path: str | Path, obj: Any, indent: int | None = 1, newline: bool = True) -> None:
    """`write_durable` for a JSON file."""
    write_durable(path, (json.dumps(obj, indent=indent) + ("\n" if newline else "")).encode())


def open_append(path: str | Path) -> TextIO:
    """Open a text file for appending (created 0666 less umask) without following a symlink at `path`:
    a link someone placed among leantrain's files is refused in one line instead of written through."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0),
                     0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path} is a symbolic link, and leantrain does not write through links placed "
                                  f"among its files; remove it (rm {path}) and run again") from None
        raise
    return os.fdopen(fd, "a")


# temporary names of write_durable (.NAME.tmp-PID-HEX), fresh_sibling (.NAME.TAG-PID) and swap_in (.NAME.old-PID)
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<tag>tmp|old|curate)-(?P<pid>\d+)(?:-[0-9a-f]{6})?")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temps(folder: str | Path, name: str | None = None) -> list[str]:
    """Remove what leantrain's writers left in `folder` when their process died (killed, power cut): only
    names of their own temporary pattern (for target `name` if given) whose pid is gone. An `.old-` folder
    whose target is missing (a swap_in killed between its two renames) is renamed back, not removed.
    Returns the names removed or restored, for a warning."""
    folder = Path(folder)
    done: list[str] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return done
    for p in entries:
        m = _TEMP_NAME.fullmatch(p.name)
        if not m or (name is not None and m["name"] != name) or pid_alive(int(m["pid"])):
            continue
        target = folder / m["name"]
        if m["tag"] == "old" and not target.exists() and not target.is_symlink():
            os.replace(p, target)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(p.name)
    return done


def fresh_sibling(out: Path, tag: str = "tmp") -> Path:
    """An empty folder `.NAME.TAG-PID` next to `out` (same filesystem, so the final rename is atomic).
    Leftovers of a killed earlier writer of `out` go first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent, out.name)
    tmp = out.parent / f".{out.name}.{tag}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with renames, so the old folder is only removed once the new one is in."""
    fsync_dir(tmp)
    if not out.exists():
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
