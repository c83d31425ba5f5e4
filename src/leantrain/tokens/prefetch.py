"""Batches prepared ahead in a background thread, so a GPU never waits on the host for its next step.

The thread gathers the next steps' windows (and pins them in page-locked memory, so the trainer's
`.to(device, non_blocking=True)` copies overlap with compute) while the current step runs. The
wrapper keeps the loader's contract: `state_dict()` reports the steps the trainer *consumed*, not
the ones prepared ahead, so a checkpoint resumes exactly where training was. On CPU the trainer
does not use it: gathering costs < 0.1% of a step there and a thread would compete for the cores.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

Batches = list[tuple[torch.Tensor, torch.Tensor]]


class Prefetcher:
    """Wraps a `BatchLoader` (same methods) and keeps `depth` steps ready."""

    def __init__(self, loader: Any, depth: int = 2, pin: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.loader, self.depth, self.pin = loader, depth, pin
        self._consumed = loader.state_dict()["step"]
        self._start()

    def __getattr__(self, name: str) -> Any:  # tokens_per_step, global_batch, ...
        return getattr(self.__dict__["loader"], name)

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(self._queue, self._stop), daemon=True,
                                        name="leantrain-prefetch")
        self._thread.start()

    def _work(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                item: Batches | BaseException = self.loader.next_step()
                if self.pin:
                    item = [(x.pin_memory(), y.pin_memory()) for x, y in item]
                self._put(q, stop, item)
        except BaseException as e:  # handed to the trainer, which raises it at its next step
            self._put(q, stop, e)

    @staticmethod
    def _put(q: queue.Queue, stop: threading.Event, item: Any) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next_step(self) -> Batches:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._consumed += 1
        return item

    def _restart_at(self, state: dict[str, Any]) -> None:
        self.close()
        self.loader.load_state_dict(state)
        self._consumed = state["step"]
        self._start()

    def skip_step(self) -> None:
        state = self.state_dict()
        state["step"] += 1
        self._restart_at(state)

    def state_dict(self) -> dict[str, Any]:
        return {**self.loader.state_dict(), "step": self._consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restart_at(state)

    def close(self) -> None:
        """Stop the thread (the loader is then positioned past the prefetched steps; restart to reuse)."""
        self._stop.set()
        self._thread.join()
