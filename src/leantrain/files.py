"""Writing a folder so that readers see the old one or the new one, never half of either.

Every stage that writes a folder (a token dataset, an export) builds it under a hidden sibling name
on the same filesystem and renames it into place when whole; the old folder goes only after.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fresh_sibling(out: Path, tag: str = "tmp") -> Path:
    """An empty folder `.NAME.TAG-PID` next to `out` (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{tag}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with renames, so the old folder is only removed once the new one is in."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
