"""The run's written record: metrics.jsonl and events.jsonl, one JSON object per line.

Every line is flushed as it is written, so a killed run keeps everything up to its last step.
On resume, metric lines from steps after the checkpoint (work that was lost with the process)
move to metrics.discarded.jsonl, so metrics.jsonl reads as one clean run.

Observers of a run (this file log, the terminal display of the CLI, later the energy meter)
implement three methods: on_step(record), on_event(event), on_end(summary).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from leantrain.files import open_append, write_durable


class Observer(Protocol):
    def on_step(self, record: dict[str, Any]) -> None: ...
    def on_event(self, event: dict[str, Any]) -> None: ...
    def on_end(self, summary: dict[str, Any]) -> None: ...


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All whole lines of a JSONL file; a torn last line (killed mid-write) is ignored."""
    out = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _open_appending(path: Path):
    """Open a JSONL file for appending; a torn last line (the process was killed mid-write) is ended
    first, so the next record starts on a line of its own instead of being glued to the fragment.
    A symlink at `path` (placed by someone else) is refused, never written through."""
    f = open_append(path)
    if f.tell() > 0:
        with open(path, "rb") as r:
            r.seek(-1, os.SEEK_END)
            if r.read(1) != b"\n":
                f.write("\n")
                f.flush()
    return f


class RunLog:
    """Appends metrics and events to the run directory. `lock` (the run directory's, see train/rundir.py)
    is released when the record is closed at the end of training, so a later process may resume."""

    def __init__(self, run_dir: Path, lock: Any = None):
        self.run_dir = Path(run_dir)
        self.lock = lock
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.events_path = self.run_dir / "events.jsonl"
        self._metrics = _open_appending(self.metrics_path)
        self._events = _open_appending(self.events_path)

    def discard_after(self, step: int) -> int:
        """Move metric lines with step > `step` to metrics.discarded.jsonl; returns how many."""
        self._metrics.close()
        records = read_jsonl(self.metrics_path)
        keep = [r for r in records if r.get("step", 0) <= step]
        lost = [r for r in records if r.get("step", 0) > step]
        if lost:
            with open_append(self.run_dir / "metrics.discarded.jsonl") as f:
                f.writelines(json.dumps(r) + "\n" for r in lost)
        write_durable(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))
        self._metrics = open_append(self.metrics_path)
        return len(lost)

    def on_step(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def on_event(self, event: dict[str, Any]) -> None:
        self._events.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")
        self._events.flush()

    def on_end(self, summary: dict[str, Any]) -> None:
        self._metrics.close()
        self._events.close()
        if self.lock is not None:
            self.lock.release()
