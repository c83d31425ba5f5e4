"""`leantrain compress` quantization on a real tiny trained run: every method from the CLI, reloaded from disk
(no re-quantizing, no pickle), greedy text stable across reloads, QAT then convert, export that transformers
loads back as the same quantized model, and the planner's serving sizes. Pruning: tests/test_prune.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import leantrain
from helpers import tiny_config
from leantrain.cli import main
from leantrain.model.quant import is_quantized


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    """A tiny run trained long enough to write something other than spaces (24 steps)."""
    run_dir = tmp_path_factory.mktemp("compress") / "run"
    leantrain.train(tiny_config(dataset, train__steps=24, train__eval_every=24, checkpoint__every=24), run_dir)
    return run_dir


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and p.name != ".lock"}


def _compress(run: Path, out: Path, method: str, *extra: str) -> dict:
    assert main(["compress", str(run), "--method", method, "--out", str(out), "--speed-tokens", "4", *extra]) == 0
    return json.loads((out / "compression.json").read_text())


@pytest.mark.parametrize("method,kind", [("int8", "Int8Tensor"), ("int8-dynamic", "Int8Tensor"),
                                         ("int4", "IntxUnpackedToInt8Tensor")])
def test_quantize_from_the_cli_reloads_and_generates(run, tmp_path, method, kind):
    before = _files(run)
    out = tmp_path / method
    record = _compress(run, out, method)
    assert _files(run) == before, "the source run was changed"
    assert record["method"] == method and record["source"]["step"] == 24
    ckpt = Path(record["source"]["checkpoint"])
    import hashlib

    assert record["source"]["model_sha256"] == hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    b, a = record["before"], record["after"]
    assert a["params"] == b["params"]
    # tiny model, dim 64: int8 ~ 1.08 bytes/param on disk vs 4, int4 (two per byte + group scales) smaller still
    assert a["weights_mb"] < b["weights_mb"] / (4.5 if method == "int4" else 3.0)
    assert abs(record["val_loss_delta"]) < (0.15 if method == "int4" else 0.03)
    assert a["tokens_per_s_b1"] > 0 and a["tokens_per_s_b8"] > 0

    m1 = leantrain.load_model(out)
    assert is_quantized(m1.model) == kind  # rebuilt as torchao tensors from disk, not re-quantized from floats
    assert leantrain.evaluate(m1) == pytest.approx(a["val_loss"], abs=1e-4)
    m2 = leantrain.load_model(out)  # a second, independent reload: the same numbers, the same greedy text
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(m1.model(ids), m2.model(ids))
    text = leantrain.generate(m1, "import os\n", max_new_tokens=16, temperature=0)
    assert text and text == leantrain.generate(m2, "import os\n", max_new_tokens=16, temperature=0)
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()


def test_rerun_needs_overwrite_and_a_quantized_run_is_not_quantized_again(run, tmp_path, capsys):
    out = tmp_path / "q"
    _compress(run, out, "int8", "--speed-tokens", "0", "--eval-batches", "1")
    capsys.readouterr()
    assert main(["compress", str(run), "--method", "int8", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    record = _compress(run, out, "int4", "--overwrite", "--speed-tokens", "0", "--eval-batches", "1")
    assert record["method"] == "int4" and not list(tmp_path.glob(".q.*"))  # no temporary or old folder left
    assert main(["compress", str(out), "--method", "int8", "--out", str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_qat_trains_fake_quantized_and_converts(dataset, tmp_path):
    qat = tmp_path / "qat"
    result = leantrain.train(tiny_config(dataset, train__steps=8, train__eval_every=8, checkpoint__every=8,
                                         quant__qat="int4"), qat)
    events = [json.loads(line) for line in (qat / "events.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "qat" and e["layers"] == 2 * 7 + 1 for e in events)  # 7 per block + output
    plain = leantrain.load_model(qat)  # the QAT checkpoint is a plain model's state dict
    assert is_quantized(plain.model) is None
    record = _compress(qat, tmp_path / "int4", "convert")
    assert record["info"]["scheme"] == "int4"
    # the converted model computes what the fake-quantized one trained with (the tied embedding lookup is
    # quantized too, which QAT did not fake): the trainer's last val loss, closely
    assert record["after"]["val_loss"] == pytest.approx(result.val_loss, abs=0.02)
    loaded = leantrain.load_model(tmp_path / "int4")
    assert is_quantized(loaded.model) == "IntxUnpackedToInt8Tensor"
    assert leantrain.generate(loaded, "def ", max_new_tokens=8, temperature=0) == \
        leantrain.generate(tmp_path / "int4", "def ", max_new_tokens=8, temperature=0)


def test_export_quantized_loads_in_transformers(run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "int4"
    _compress(run, out, "int4", "--speed-tokens", "0", "--eval-batches", "1")
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf.model.layers[0].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    ours = leantrain.load_model(out).model
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    capsys.readouterr()
    assert main(["export", str(out), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 2
    assert "--format hf" in capsys.readouterr().err and not (tmp_path / "onnx").exists()


def test_planner_serving_sizes_per_format():
    from leantrain.config import load_config
    from leantrain.model.flops import param_count
    from leantrain.plan.catalog import get_hardware
    from leantrain.plan.planner import describe, plan
    from leantrain.plan.serving import serving_memory

    cfg = load_config(recipe="tiny")
    s = serving_memory(cfg.model, batch=2, context=128)
    params = param_count(cfg.model)
    assert s["fp32"]["weights_bytes"] == 4 * params and s["bf16"]["weights_bytes"] == 2 * params
    assert params < s["int8"]["weights_bytes"] < 1.05 * params  # one byte + a scale and zero point per row
    assert s["int4"]["file_bytes"] < 0.7 * params < s["int8"]["file_bytes"]
    kv = 2 * cfg.model.n_layers * cfg.model.dim * 128 * 2 * 4  # k and v, every layer, 2 x 128 positions, fp32
    assert s["int8"]["kv_cache_bytes"] == kv and s["int8"]["total_bytes"] == s["int8"]["weights_bytes"] + kv
    p = plan(cfg, get_hardware("h100-sxm"))
    assert p.to_dict()["serving"]["int4"]["file_bytes"] > 0
    assert any(line.startswith("serving") and "int8" in line for line in describe(p))
