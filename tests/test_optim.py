"""Learning-rate schedules and parameter groups."""

import math

import pytest
import torch

from leantrain.config import ModelConfig, OptimConfig
from leantrain.model import Transformer
from leantrain.train.optim import build_optimizer, lr_at, param_groups


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, 110, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 50 / 99)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_wsd_holds_then_decays():
    cfg = OptimConfig(lr=2.0, warmup_steps=0, schedule="wsd", decay_fraction=0.25, min_lr_ratio=0.0)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[:75] == [2.0] * 75
    assert lrs[75] == pytest.approx(2.0 * (1 - 1 / 25))
    assert lrs[-1] == pytest.approx(0.0)


def test_constant_and_warmup_longer_than_run():
    cfg = OptimConfig(lr=0.5, warmup_steps=50, schedule="constant")
    assert lr_at(9, 10, cfg) == pytest.approx(0.5)  # warmup is clamped to the run length
    assert lr_at(0, 10, cfg) == pytest.approx(0.05)


def test_no_weight_decay_on_norms_and_embeddings():
    model = Transformer(ModelConfig(n_layers=1, dim=32, n_heads=2, n_kv_heads=2, seq_len=8, vocab_size=64))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in decay["params"])
    assert not any("norm" in names[id(p)] or "embed" in names[id(p)] for p in decay["params"])
    assert any("embed" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
