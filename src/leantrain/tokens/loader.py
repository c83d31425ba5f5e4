"""Batches of random token windows: deterministic, resumable, and the same whatever the process layout.

The global batch of optimizer step `s` is G = micro_batch_size * grad_accum_steps * world_size
windows of seq_len+1 tokens, drawn from `np.random.default_rng([seed, s])` uniformly over every
valid window start of every shard (a window never crosses a shard end, so a shard gets windows in
proportion to its valid starts). Rank r's micro-batch m is windows [(m*world_size + r)*mb, +mb).

So the windows of a step depend only on (seed, step, G, data): resuming needs only the step
number, and a run may resume with another split of the same G (2 ranks x accum 1 instead of
1 rank x accum 2) and still see exactly the same data.

A mixed dataset (`tokens/mix.py`) passes `mix`: (name, weight, shard count) per source, its shards
consecutive in `shards`. Then each of the G windows first draws its source with probability = weight,
then a start uniformly over that source's valid starts, from the same `default_rng([seed, s])`; so
the mix, too, depends only on (seed, step, G, data, weights) and resumes from the step alone.

Chat data (`tokens/chat.py`) adds a uint8 loss mask per shard: given `masks`, a target whose mask
byte is 0 (a prompt token) becomes -100, which the model's loss ignores. Without masks nothing changes.

A `transform` (fill-in-the-middle, `tokens/fim.py`) rewrites each window as a pure function of its tokens
and its flat index, so it keeps every property above.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from leantrain.errors import DataError

_STATE_VERSION = 1


class WindowTransform(Protocol):
    """Rewrites gathered windows (n, seq_len+1) given their flat indices; same length, deterministic."""

    def __call__(self, windows: np.ndarray, flat: np.ndarray) -> np.ndarray: ...

    def state(self) -> dict[str, Any]: ...


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

    def starts_of(self, first: int, stop: int) -> tuple[int, int]:
        """(first flat index, count) of the valid window starts of shards [first, stop)."""
        lo = int(self._before[first]) if first < len(self.shards) else self.total
        return lo, (int(self._ends[stop - 1]) if stop > first else lo) - lo

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
                 masks: list[np.ndarray] | None = None,
                 mix: Sequence[tuple[str, float, int]] | None = None,
                 transform: WindowTransform | None = None) -> None:
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
        self.transform = transform
        self.mix: dict[str, float] | None = None
        if mix is not None:
            self._set_mix(mix, name)

    def _set_mix(self, mix: Sequence[tuple[str, float, int]], name: str) -> None:
        """Per source: its probability and the flat range of its window starts (shards are consecutive)."""
        if sum(n for _, _, n in mix) != len(self._w.shards):
            raise ValueError("the mix's shard counts must add up to the number of shards")
        total = sum(w for _, w, _ in mix)
        if not total > 0 or any(not w >= 0 for _, w, _ in mix):
            raise ValueError(f"mix weights must be >= 0 and sum to a positive number, got {[w for _, w, _ in mix]}")
        self.mix = {src: w / total for src, w, _ in mix}
        self._p = np.array(list(self.mix.values()), dtype=np.float64)
        lo, count, first = [], [], 0
        for src, w, n in mix:
            a, c = self._w.starts_of(first, first + n)
            if w > 0 and c == 0:
                lengths = [len(s) for s in self._w.shards[first:first + n]]
                raise _too_short(f"source {src!r} of {name}", lengths, self.seq_len)
            lo.append(a)
            count.append(max(c, 1))  # weight-0 sources are never drawn; 1 keeps integers() well defined
            first += n
        self._lo, self._count = np.array(lo, dtype=np.int64), np.array(count, dtype=np.int64)

    @property
    def tokens_per_step(self) -> int:
        """Tokens trained on per optimizer step, over all ranks."""
        return self.global_batch * self.seq_len

    def _draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, flat window start) of each of the step's G windows, in global batch order."""
        rng = np.random.default_rng([self.seed, step])
        if self.mix is None:
            flat = rng.integers(0, self._w.total, size=self.global_batch, dtype=np.int64)
            return np.zeros(self.global_batch, dtype=np.int64), flat
        src = rng.choice(len(self._p), size=self.global_batch, p=self._p)
        return src, self._lo[src] + rng.integers(0, self._count[src], dtype=np.int64)

    def _step_starts(self, step: int) -> np.ndarray:
        return self._draw(step)[1]

    def sources_of_step(self, step: int) -> np.ndarray:
        """The source index (in mix order; 0 without a mix) of each of the step's G windows, global batch order:
        what a report or a test counts to see the realised mix."""
        return self._draw(step)[0]

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `grad_accum_steps` micro-batches (x, y) of the next optimizer step."""
        flat = self._step_starts(self.step)
        mb, ws = self.micro_batch_size, self.world_size
        mine = np.concatenate([flat[(m * ws + self.rank) * mb:(m * ws + self.rank + 1) * mb]
                               for m in range(self.grad_accum_steps)])
        windows = self._w.gather(mine)
        if self.transform is not None:  # e.g. fill-in-the-middle: a pure function of each window and its index
            windows = self.transform(windows, mine)
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
            **({"mix": self.mix} if self.mix is not None else {}),
            **({"transform": self.transform.state()} if self.transform is not None else {}),
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
        if state.get("mix") != mine.get("mix"):
            raise DataError(f"loader state does not match: the source mix was {state.get('mix')}, now "
                            f"{mine.get('mix')}; resume with the same data.mix (and dataset) or start a new run")
        if state.get("transform") != mine.get("transform"):
            raise DataError(f"loader state does not match: the data transform was {state.get('transform')}, now "
                            f"{mine.get('transform')}; resume with the same data.fim_rate and data.fim_spm_rate "
                            "or start a new run")
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
