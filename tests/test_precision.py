"""Numerics of the fast paths: bf16 and compiled runs track fp32; activation checkpointing is exact."""

import pytest
import torch

from helpers import tiny_config
from leantrain.config import ModelConfig
from leantrain.model import Transformer
from leantrain.parallel.parallelize import apply_activation_checkpointing
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer


def small_run_cfg(dataset, **train):
    train = {"steps": 10, "eval_every": 0, **train}
    return tiny_config(dataset, checkpoint__every=0, **{f"train__{k}": v for k, v in train.items()})
def run_losses(cfg, run_dir):
    Trainer(cfg, run_dir).fit()
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")]


def test_bf16_tracks_fp32(dataset, tmp_path):
    fp32 = run_losses(small_run_cfg(dataset), tmp_path / "fp32")
    cfg = small_run_cfg(dataset)
    cfg.precision.dtype = "bf16"
    bf16 = run_losses(cfg, tmp_path / "bf16")
    assert fp32 != bf16  # really a different path
    for a, b in zip(fp32, bf16, strict=True):
        assert abs(a - b) / a < 0.02
    assert bf16[-1] < bf16[0] - 0.3  # it learns (10 steps: 6.25 -> 5.79 here)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    cfg = ModelConfig(n_layers=3, dim=64, n_heads=4, n_kv_heads=2, seq_len=32, vocab_size=128)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    torch.manual_seed(0)
    wrapped = Transformer(cfg)
    assert apply_activation_checkpointing(wrapped, mode, every=2) == (3 if mode == "full" else 2)
    x = torch.randint(0, 128, (2, 32))
    y = torch.randint(0, 128, (2, 32))
    plain(x, y).backward()
    wrapped(x, y).backward()
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert list(plain.state_dict()) == list(wrapped.state_dict())  # names unchanged for checkpoints


def test_compiled_run_tracks_eager(dataset, tmp_path):
    eager = run_losses(small_run_cfg(dataset, steps=4), tmp_path / "eager")
    compiled = run_losses(small_run_cfg(dataset, steps=4, compile=True), tmp_path / "compiled")
    for a, b in zip(eager, compiled, strict=True):
        assert abs(a - b) / a < 1e-3
    events = [e["event"] for e in read_jsonl(tmp_path / "compiled" / "events.jsonl")]
    assert "compiled" in events


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_matmul_attention_matches_sdpa(n_kv_heads):
    from leantrain.device import choose_attention
    from leantrain.parallel.parallelize import set_attention_kernel

    cfg = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=n_kv_heads, seq_len=32, vocab_size=128)
    torch.manual_seed(0)
    model = Transformer(cfg)
    x, y = torch.randint(0, 128, (2, 32)), torch.randint(0, 128, (2, 32))
    logits_sdpa = model(x)
    model(x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    set_attention_kernel(model, "matmul")
    torch.testing.assert_close(model(x), logits_sdpa, rtol=1e-4, atol=1e-5)
    model(x, y).backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    cpu = torch.device("cpu")
    assert choose_attention("auto", cpu.type, "bf16", 256) == "matmul"
    assert choose_attention("auto", cpu.type, "fp32", 256) == "sdpa"
    assert choose_attention("auto", cpu.type, "bf16", 4096) == "sdpa"
    assert choose_attention("sdpa", cpu.type, "bf16", 256) == "sdpa"


def test_fp8_tracks_bf16(dataset, tmp_path):
    pytest.importorskip("torchao.float8")
    runs = {}
    for fp8 in (False, True):
        cfg = small_run_cfg(dataset, steps=8)
        cfg.precision.dtype, cfg.precision.fp8 = "bf16", fp8
        runs[fp8] = run_losses(cfg, tmp_path / f"fp8-{fp8}")
    assert runs[True] != runs[False]  # the float8 path really ran
    for a, b in zip(runs[False], runs[True], strict=True):
        assert abs(a - b) / a < 0.03
    event = next(e for e in read_jsonl(tmp_path / "fp8-True" / "events.jsonl") if e["event"] == "fp8")
    assert event["layers"] == 2 * 7  # wq wk wv wo w1 w2 w3 per block; the output projection stays bf16


def test_fp8_without_support_says_why_and_trains(dataset, tmp_path, monkeypatch):
    import leantrain.train.precision as precision

    monkeypatch.setattr(precision, "float8_unavailable", lambda device: "fp8 needs torchao: pip install torchao")
    cfg = small_run_cfg(dataset, steps=2)
    cfg.precision.fp8 = True
    losses = run_losses(cfg, tmp_path)
    assert len(losses) == 2
    event = next(e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "fp8")
    assert event["layers"] == 0 and "torchao" in event["message"]
