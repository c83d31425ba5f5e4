"""The prefetching wrapper gives exactly the loader's batches and the loader's resumable state."""

import numpy as np
import pytest
import torch

from leantrain.errors import DataError
from leantrain.tokens.loader import BatchLoader
from leantrain.tokens.prefetch import Prefetcher


def make_loader():
    shards = [np.arange(5000, dtype=np.uint16) % 701, np.arange(3000, dtype=np.uint16) % 397]
    return BatchLoader(shards, seq_len=16, micro_batch_size=3, grad_accum_steps=2, seed=7)


def same(a, b):
    assert len(a) == len(b)
    for (x1, y1), (x2, y2) in zip(a, b, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_prefetched_batches_and_state_match_the_loader():
    plain, ahead = make_loader(), Prefetcher(make_loader(), depth=3)
    try:
        for _ in range(5):
            same(plain.next_step(), ahead.next_step())
        assert ahead.state_dict() == plain.state_dict()  # consumed steps, not the ones prepared ahead
        plain.skip_step()
        ahead.skip_step()
        same(plain.next_step(), ahead.next_step())
        state = plain.state_dict()
        expected = [plain.next_step() for _ in range(3)]
        ahead.load_state_dict(state)  # e.g. a rollback
        for batches in expected:
            same(batches, ahead.next_step())
        assert ahead.tokens_per_step == plain.tokens_per_step
    finally:
        ahead.close()


def test_a_mismatched_state_is_refused():
    ahead = Prefetcher(make_loader())
    try:
        with pytest.raises(DataError):
            ahead.load_state_dict({**ahead.state_dict(), "seed": 8})
    finally:
        ahead.close()


class BreaksAfter:
    """A loader whose data goes bad after some steps (e.g. a shard vanished)."""

    def __init__(self, loader, steps):
        self.loader, self.left = loader, steps

    def state_dict(self):
        return self.loader.state_dict()

    def next_step(self):
        if self.left == 0:
            raise DataError("shard 3 is unreadable")
        self.left -= 1
        return self.loader.next_step()


def test_an_error_in_the_thread_reaches_the_trainer_at_its_step():
    ahead = Prefetcher(BreaksAfter(make_loader(), 2))
    try:
        ahead.next_step()
        ahead.next_step()
        with pytest.raises(DataError, match="unreadable"):
            ahead.next_step()
    finally:
        ahead.close()
