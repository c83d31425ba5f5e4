"""ONNX export (export/onnx.py) run by ONNX Runtime (export/onnx_runtime.py): logits within 1e-4 of leantrain
on the same tokens, greedy text of 64 tokens identical with and without the KV cache (and for a left-padded
batch), int8 dynamic quantization smaller with a small loss change, and a mixture-of-experts model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import tiny_config
from leantrain.cli import main
from leantrain.export.onnx import export_onnx
from leantrain.model.generate import generate
from leantrain.train.runs import load_trained
from leantrain.train.trainer import Trainer

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from leantrain.export.onnx_runtime import OnnxLM  # noqa: E402


def _train(dataset, folder, **over):
    """A tiny run (dim 32, 2 layers, GQA) after a few steps from a wide init: varied greedy text, real weights."""
    Trainer(tiny_config(dataset, train__steps=4, checkpoint__every=0, train__eval_every=0, model__dim=32,
                        model__seq_len=64, model__init_std=0.5, **over), folder).fit()
    return folder


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    return _train(dataset, tmp_path_factory.mktemp("onnx") / "run")


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-out") / "onnx"
    return export_onnx(run, out), out


def test_onnx_logits_and_greedy_text_match_leantrain(run, exported):
    info, out = exported
    assert {"model.onnx", "genai_config.json", "tokenizer.json", ".leantrain-export.json"} <= {
        p.name for p in out.iterdir()}
    model, tok, cfg, *_ = load_trained(run)
    lm = OnnxLM(out)
    # dynamic batch and sequence: two shapes through the one graph
    for shape in [(1, 7), (3, 50)]:
        x = torch.randint(0, cfg.model.vocab_size, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            ref = model(x).numpy()
        assert np.abs(lm.logits(x.numpy()) - ref).max() < 1e-4
    prompts = [tok.encode(p).ids for p in ["import os\n", "def f(x):\n    return", "class"]]
    for prompt in prompts:  # prompt + 64 > seq_len: the sliding-window recompute is exercised too
        ours = generate(model, prompt, 64, temperature=0)
        assert len(set(ours)) > 3, "too repetitive to tell implementations apart"
        assert lm.generate([prompt], 64, eos_id=None)[0] == ours
        assert lm.generate([prompt], 64, eos_id=None, use_cache=False)[0] == ours
    # a left-padded batch of different lengths decodes each row as alone
    batch = lm.generate(prompts, 20, eos_id=None)
    assert batch == [generate(model, p, 20, temperature=0) for p in prompts]


def test_onnx_genai_config_names_the_graph(run, exported):
    import onnx

    info, out = exported
    cfg = json.loads((out / "genai_config.json").read_text())["model"]
    _, tok, run_cfg, *_ = load_trained(run)
    m = run_cfg.model
    assert cfg["eos_token_id"] == tok.token_to_id("<|endoftext|>")
    assert (cfg["context_length"], cfg["vocab_size"]) == (m.seq_len, m.vocab_size)
    d = cfg["decoder"]
    assert (d["num_hidden_layers"], d["num_attention_heads"], d["num_key_value_heads"], d["head_size"]) == (
        m.n_layers, m.n_heads, m.n_kv_heads, m.dim // m.n_heads)
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    names = [i.name for i in graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [d["inputs"][f"past_{kv}_names"] % i for i in range(m.n_layers) for kv in ("key", "value")]
    assert [o.name for o in graph.output] == ["logits", *[d["outputs"][f"present_{kv}_names"] % i
                                                          for i in range(m.n_layers) for kv in ("key", "value")]]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert all(dim.dim_param and not dim.dim_value for dim in dims)  # batch and sequence are symbolic


def test_onnx_int8_is_smaller_and_close(run, exported, dataset, tmp_path):
    from leantrain.tokens.dataset import TokenDataset
    from leantrain.tokens.loader import val_batches

    _, fp32 = exported
    out = tmp_path / "int8"
    assert main(["export", str(run), "--format", "onnx", "--quantize", "int8", "--out", str(out)]) == 0
    assert json.loads((out / ".leantrain-export.json").read_text())["format"] == "onnx-int8"
    assert not [p for p in out.iterdir() if p.is_dir()]  # the fp32 intermediate is gone
    import onnx

    ops = {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    assert (out / "model.onnx").stat().st_size < 0.6 * (fp32 / "model.onnx").stat().st_size
    ds = TokenDataset(dataset)
    (x, y), = val_batches(ds.shards("val"), 64, 4, 1, name="val")
    a, b = OnnxLM(fp32).loss(x.numpy(), y.numpy()), OnnxLM(out).loss(x.numpy(), y.numpy())
    assert np.isfinite(b) and abs(b - a) < 0.05 * a


def test_onnx_exports_a_moe_model(dataset, tmp_path):
    run = _train(dataset, tmp_path / "moe", model__moe_experts=4, model__moe_top_k=2, model__n_layers=1)
    export_onnx(run, tmp_path / "out")
    model, tok, *_ = load_trained(run)
    x = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x).numpy()
    lm = OnnxLM(tmp_path / "out")
    assert np.abs(lm.logits(x.numpy()) - ref).max() < 1e-4
    prompt = tok.encode("def ").ids
    assert lm.generate([prompt], 16, eos_id=None)[0] == generate(model, prompt, 16, temperature=0)


def test_onnx_export_keeps_folder_safety(run, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--overwrite"]) == 2
    assert (out / "mine.txt").read_text() == "keep" and not (out / "model.onnx").exists()


@pytest.mark.parametrize("over", [{}, {"arch": "gpt2", "n_kv_heads": 4}, {"arch": "mistral", "sliding_window": 8},
                                  {"arch": "qwen2"}, {"arch": "qwen3", "head_dim": 12},
                                  {"moe_experts": 4, "moe_shared_experts": 1, "moe_shared_gate": True}])
def test_cached_decoder_equals_the_model_for_every_arch(over):
    """The traced wrapper's math (no export: fast) against Transformer.forward, whole and split over a past."""
    from leantrain.config import ModelConfig
    from leantrain.export.onnx import CachedDecoder
    from leantrain.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{"n_layers": 2, "dim": 32, "n_heads": 4, "n_kv_heads": 2, "seq_len": 32,
                                       "vocab_size": 64, "init_std": 0.3, **over})).eval()
    dec = CachedDecoder(model)
    cfg = model.cfg
    x = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    D = cfg.head_dim or cfg.dim // cfg.n_heads
    empty = [torch.zeros(2, cfg.n_kv_heads, 0, D) for _ in range(2 * cfg.n_layers)]
    with torch.no_grad():
        ref = model(x)
        whole, *_ = dec(x, torch.ones(2, 20, dtype=torch.long), torch.arange(20).repeat(2, 1), *empty)
        first, *past = dec(x[:, :13], torch.ones(2, 13, dtype=torch.long), torch.arange(13).repeat(2, 1), *empty)
        rest, *_ = dec(x[:, 13:], torch.ones(2, 20, dtype=torch.long), torch.arange(13, 20).repeat(2, 1), *past)
    assert (whole - ref).abs().max() < 1e-4
    assert (torch.cat((first, rest), 1) - ref).abs().max() < 1e-4
