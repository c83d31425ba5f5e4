"""Batches of random token windows: deterministic, resumable, and the same whatever the process layout.

The global batch of optimizer step `s` is G = micro_batch_size * grad_accum_steps * world_size
windows of seq_len+1 tokens, drawn from `np.random.default_rng([seed, s])` uniformly over every
valid window start of every shard (a window never crosses a shard end, so a shard gets windows in
proportion to its valid starts). Rank r's micro-batch m is windows [(m*world_size + r)*mb, +mb).

So the windows of a step depend only on (seed, step, G, data): resuming needs only the step
number, and a run may resume with another split of the same G (2 ranks x accum 1 instead of
1 rank x accum 2) and still see exactly the same data.

Chat data (`tokens/chat.py`) adds a uint8 loss mask per shard: given `masks`, a target whose mask
byte is 0 (a prompt token) becomes -100, which the model's loss ignores. Without masks nothing changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from leantrain.errors import DataError

_STATE_VERSION = 1


def _too_short(name: str, lengths: Sequence[int], seq_len: int) -> DataError:
    longest = max(lengths, default=0)
    where = f"{name} has" if len(lengths) <= 1 else f"{name}: its longest shard has"
    return DataError(f"{where} {longest} tokens, fewer than seq_len+1 = {seq_len + 1}; "
                     "lower model.seq_len or add data")


class _Windows:
    """Maps a flat index over all valid window starts to (shard, offset) and gathers windows."""

    def __init__(self, shards: Sequence[np.ndarray], seq_len: int, name: str,
                 masks: Sequence[np.ndarray] | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.shards = list(shards)
        self.masks = list(masks) if masks is not None else None
        if self.masks is not None and [len(m) for m in self.masks] != [len(s) for s in self.shards]:
            raise ValueError("loss masks must match the token shards one for one, in length")
        self.width = seq_len + 1
        lengths = [len(s) for s in self.shards]
        starts = np.array([max(0, n - seq_len) for n in lengths], dtype=np.int64)
        self.total = int(starts.sum())
        if self.total == 0:
            raise _too_short(name, lengths, seq_len)
        self.tokens = int(sum(lengths))
        self._ends = np.cumsum(starts)  # flat index i belongs to the first shard with _ends > i
        self._before = self._ends - starts

    def gather(self, flat: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self._ends, flat, side="right")
        offset = flat - self._before[shard]
        out = np.empty((len(flat), self.width), dtype=np.int64)
        w = self.width
        for j, (si, st) in enumerate(zip(shard.tolist(), offset.tolist(), strict=True)):
            out[j] = self.shards[si][st:st + w]
        return out

    def gather_masks(self, flat: np.ndarray) -> np.ndarray | None:
        """The loss masks of the same windows as `gather(flat)`; None without masks."""
        if self.masks is None:
            return None
        shard = np.searchsorted(self._ends, flat, side="right")
        offset = flat - self._before[shard]
        out = np.empty((len(flat), self.width), dtype=np.uint8)
        for j, (si, st) in enumerate(zip(shard.tolist(), offset.tolist(), strict=True)):
            out[j] = self.masks[si][st:st + self.width]
        return out


def _xy(windows: np.ndarray, masks: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets); a target whose mask byte is 0 (a prompt token of chat data) becomes -100."""
    t = torch.from_numpy(windows)
    x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    if masks is not None:
        y[torch.from_numpy(masks[:, 1:] == 0)] = -100
    return x, y


class BatchLoader:
    """Random training windows for one rank; see the module docstring for the exact contract."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, micro_batch_size: int, grad_accum_steps: int,
                 seed: int, rank: int = 0, world_size: int = 1, *, name: str = "the train split",
                 masks: list[np.ndarray] | None = None) -> None:
        for key, v in (("micro_batch_size", micro_batch_size), ("grad_accum_steps", grad_accum_steps),
                       ("world_size", world_size)):
            if v < 1:
                raise ValueError(f"{key} must be >= 1, got {v}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self._w = _Windows(shards, seq_len, name, masks)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        self.step = 0

    @property
    def tokens_per_step(self) -> int:
        """Tokens trained on per optimizer step, over all ranks."""
        return self.global_batch * self.seq_len

    def _step_starts(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self._w.total, size=self.global_batch, dtype=np.int64)

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `grad_accum_steps` micro-batches (x, y) of the next optimizer step."""
        flat = self._step_starts(self.step)
        mb, ws = self.micro_batch_size, self.world_size
        mine = np.concatenate([flat[(m * ws + self.rank) * mb:(m * ws + self.rank + 1) * mb]
                               for m in range(self.grad_accum_steps)])
        windows = self._w.gather(mine)
        self.step += 1
        if self._w.masks is not None:
            masks = self._w.gather_masks(mine)
            return [_xy(windows[m * mb:(m + 1) * mb], masks[m * mb:(m + 1) * mb]) for m in range(self.grad_accum_steps)]
        return [_xy(windows[m * mb:(m + 1) * mb]) for m in range(self.grad_accum_steps)]

    def skip_step(self) -> None:
        """Advance past a step without reading it (a dropped bad batch still consumes its step)."""
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
            "global_batch": self.global_batch, "micro_batch_size": self.micro_batch_size,
            "grad_accum_steps": self.grad_accum_steps, "world_size": self.world_size, "rank": self.rank,
            "window_starts": self._w.total, "tokens": self._w.tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state["step"]`. The seed, seq_len, global batch and data must match; the split of
        the global batch (micro_batch_size x grad_accum_steps x world_size) may change freely."""
        mine = self.state_dict()
        for key in ("seed", "seq_len", "global_batch", "tokens", "window_starts"):
            if key not in state:
                raise DataError(f"loader state lacks {key!r}; it was not written by this leantrain version "
                                "or is damaged")
            if state[key] != mine[key]:
                what = {"tokens": "tokens in the train split", "window_starts": "window starts in the train split",
                        "global_batch": "global batch (micro_batch_size*grad_accum_steps*world_size)"}.get(key, key)
                raise DataError(f"loader state does not match: {what} was {state[key]}, now {mine[key]}; "
                                "resume with the same data, seed and batch shape or start a new run")
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise DataError(f"loader state has a bad step {step!r}; the checkpoint is damaged")
        self.step = step


def val_batches(shards: list[np.ndarray], seq_len: int, batch_size: int, n_batches: int,
                *, name: str = "the val split",
                masks: list[np.ndarray] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of evenly spaced windows over the split, identical on every call and every run,
    so that val losses are comparable across steps and runs.

    If the split has fewer window starts than batch_size*n_batches, every start is used once (the
    windows overlap) and the last batch may be smaller.
    """
    if batch_size < 1 or n_batches < 1:
        raise ValueError(f"batch_size and n_batches must be >= 1, got {batch_size}, {n_batches}")
    w = _Windows(shards, seq_len, name, masks)
    k = min(batch_size * n_batches, w.total)
    flat = (np.arange(k, dtype=np.int64) * w.total + w.total // 2) // k  # centred in k equal parts
    windows = w.gather(flat)
    m = w.gather_masks(flat)
    return [_xy(windows[i:i + batch_size], None if m is None else m[i:i + batch_size]) for i in range(0, k, batch_size)]
