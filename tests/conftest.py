"""Shared fixtures: one small real token dataset, cut from the built-in corpus, made once per session."""

import itertools

import pytest
import torch

from leantrain.corpus.readers import read_builtin
from leantrain.tokens.prepare import prepare_dataset


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """~150k tokens of real Python source with a 512-token BPE vocabulary."""
    out = tmp_path_factory.mktemp("data") / "stdlib-small"

    def documents():
        return itertools.islice(read_builtin("stdlib"), 60)

    prepare_dataset(documents, out, vocab_size=512, val_fraction=0.1)
    return out


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep the CPU peak-FLOP probe cache out of the user's home during tests."""
    monkeypatch.setenv("LEANTRAIN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and while other processes share the two cores,
    OpenMP threads waiting on each other make their tests many times slower. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
