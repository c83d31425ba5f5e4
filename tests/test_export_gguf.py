"""GGUF export (export/gguf.py) checked with the `gguf` package's reader, since llama-cpp-python has no wheel
for this platform (no compiling in CI): every tensor present with its shape and type, values equal to the
model's, the tokenizer round-tripping, and a forward pass written the way llama.cpp's llama graph computes it
(interleaved-pair RoPE on the file's q/k rows) giving leantrain's logits and greedy text. When llama_cpp is
importable, the file also goes through llama.cpp itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config
from leantrain.cli import main
from leantrain.export.gguf import export_gguf
from leantrain.model.generate import generate
from leantrain.train.runs import load_trained
from leantrain.train.trainer import Trainer

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    """A tiny Llama (dim 32, 2 layers, GQA, tied output) after a few steps: varied greedy text, real weights."""
    run = tmp_path_factory.mktemp("gguf") / "run"
    Trainer(tiny_config(dataset, train__steps=4, checkpoint__every=0, train__eval_every=0, model__dim=32,
                        model__seq_len=64, model__init_std=0.5), run).fit()
    return run


def _read(path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def _value(t) -> torch.Tensor:
    """A tensor of the file in torch's [out, in] layout, dequantized to float32."""
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).copy())


def _field(reader, key):
    return reader.fields[key].contents()


def llama_cpp_logits(tensors, meta, ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] computed from the GGUF tensors as llama.cpp's llama graph does (RMSNorm, rope mode
    NORM: pairs (x[2i], x[2i+1]) rotated by pos * base^(-2i/n_rot), GQA head h reading kv head h // group,
    SwiGLU, output = token_embd when absent)."""
    W = {k: _value(t) for k, t in tensors.items()}
    T, eps = len(ids), meta["eps"]
    H, KV, D = meta["heads"], meta["kv_heads"], meta["head_dim"]
    rms = lambda x, w: F.rms_norm(x, (x.size(-1),), w, eps)  # noqa: E731
    inv = meta["base"] ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv  # [T, D/2]

    def rope(x):  # [T, heads, D]
        a, b = x[..., 0::2], x[..., 1::2]
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)

    x = W["token_embd.weight"][torch.tensor(ids)]
    for i in range(meta["layers"]):
        p = f"blk.{i}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = rope((h @ W[p + "attn_q.weight"].T).view(T, H, D))
        k = rope((h @ W[p + "attn_k.weight"].T).view(T, KV, D)).repeat_interleave(H // KV, dim=1)
        v = (h @ W[p + "attn_v.weight"].T).view(T, KV, D).repeat_interleave(H // KV, dim=1)
        s = torch.einsum("thd,shd->hts", q, k) * D ** -0.5
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        x = x + torch.einsum("hts,shd->thd", s.softmax(-1), v).reshape(T, H * D) @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        x = x + (F.silu(h @ W[p + "ffn_gate.weight"].T) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
    out = W.get("output.weight", W["token_embd.weight"])
    return rms(x, W["output_norm.weight"]) @ out.T


def _meta(reader):
    return {"eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
            "heads": int(_field(reader, "llama.attention.head_count")),
            "kv_heads": int(_field(reader, "llama.attention.head_count_kv")),
            "head_dim": int(_field(reader, "llama.rope.dimension_count")),
            "base": float(_field(reader, "llama.rope.freq_base")),
            "layers": int(_field(reader, "llama.block_count"))}


def test_f32_gguf_tensors_metadata_and_llama_cpp_semantics(run, tmp_path):
    out = tmp_path / "gguf"
    info = export_gguf(run, out, dtype="fp32")
    assert info["files"] == ["model.gguf"] and info["dtype"] == "f32"
    reader, tensors = _read(out / "model.gguf")
    model, tok, cfg, *_ = load_trained(run)
    m = cfg.model
    assert _field(reader, "general.architecture") == "llama"
    assert int(_field(reader, "llama.context_length")) == m.seq_len
    assert int(_field(reader, "llama.embedding_length")) == m.dim
    assert int(_field(reader, "llama.feed_forward_length")) == model.layers[0].feed_forward.w1.out_features
    # every tensor, named as convert_hf_to_gguf.py names it, with the model's shape (ne reversed) and f32
    sd = model.state_dict()
    want = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
            "output.weight": "output.weight"}
    for i in range(m.n_layers):
        for g, ours in [("attn_norm", "attention_norm"), ("attn_q", "attention.wq"), ("attn_k", "attention.wk"),
                        ("attn_v", "attention.wv"), ("attn_output", "attention.wo"), ("ffn_norm", "ffn_norm"),
                        ("ffn_gate", "feed_forward.w1"), ("ffn_up", "feed_forward.w3"),
                        ("ffn_down", "feed_forward.w2")]:
            want[f"blk.{i}.{g}.weight"] = f"layers.{i}.{ours}.weight"
    if m.tie_embeddings:  # llama.cpp reads token_embd for the output when `output` is absent
        del want["output.weight"]
    assert set(tensors) == set(want)
    for g, ours in want.items():
        t = tensors[g]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == list(reversed(sd[ours].shape)), g
        if ".attn_q." in g or ".attn_k." in g:  # permuted rows: the same values, another order
            assert torch.equal(_value(t).sort(0).values, sd[ours].sort(0).values)
            assert not torch.equal(_value(t), sd[ours])
        else:
            assert torch.equal(_value(t), sd[ours]), g
    # the forward pass as llama.cpp computes it from the file: leantrain's logits and greedy text
    meta = _meta(reader)
    ids = tok.encode("def main(argv):\n    return 0\n").ids
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0]
        assert (llama_cpp_logits(tensors, meta, ids) - ref).abs().max().item() < 1e-4
        prompt = tok.encode("import ").ids
        ours = generate(model, prompt, 64, temperature=0)
        seq = list(prompt)
        for _ in range(64):
            # past seq_len leantrain recomputes the last seq_len tokens afresh: so does this loop
            seq.append(int(llama_cpp_logits(tensors, meta, seq[-cfg.model.seq_len:])[-1].argmax()))
    assert seq[len(prompt):] == ours
    assert len(set(ours)) > 3, "the greedy text is too repetitive to tell implementations apart"


def test_gguf_tokenizer_metadata_round_trips(run, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    export_gguf(run, tmp_path / "g", dtype="fp32")
    reader, _ = _read(tmp_path / "g" / "model.gguf")
    _, tok, cfg, *_ = load_trained(run)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges")
    assert len(tokens) == cfg.model.vocab_size == len(types)
    eot = tok.token_to_id("<|endoftext|>")
    assert int(_field(reader, "tokenizer.ggml.eos_token_id")) == eot
    assert int(_field(reader, "tokenizer.ggml.bos_token_id")) == eot
    assert types[eot] == gguf.TokenType.CONTROL and types[tok.encode("d").ids[0]] == gguf.TokenType.NORMAL
    assert bool(_field(reader, "tokenizer.ggml.add_bos_token")) is False
    # a tokenizer rebuilt from the file's vocabulary and merges encodes as the run's does
    rebuilt = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rebuilt.decoder = decoders.ByteLevel()
    for text in ["def f(x):\n    return x ** 2  # square\n", "héllo wörld — ünïcode ✓ 123", "  spaces\t\ttabs"]:
        assert rebuilt.encode(text).ids == tok.encode(text).ids
        assert rebuilt.decode(rebuilt.encode(text).ids) == text


@pytest.mark.parametrize("flags,kind,tol", [(["--dtype", "fp16"], "F16", 1e-2), (["--quantize", "q8_0"], "Q8_0", 5e-2)])
def test_f16_and_q8_0_gguf_through_the_cli(run, tmp_path, flags, kind, tol):
    out = tmp_path / "g"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out), *flags]) == 0
    reader, tensors = _read(out / "model.gguf")
    assert json.loads((out / ".leantrain-export.json").read_text())["format"] == f"gguf-{kind.lower()}"
    qtype = gguf.GGMLQuantizationType[kind]
    assert tensors["blk.0.ffn_up.weight"].tensor_type == qtype
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
    model, tok, *_ = load_trained(run)
    ids = tok.encode("class A:\n    pass\n").ids
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0]
        diff = (llama_cpp_logits(tensors, _meta(reader), ids) - ref).abs().max().item() / ref.abs().max().item()
    assert 0 < diff < tol, diff  # relative to the largest logit: rounding, not a wrong layout
    f32 = tmp_path / "f32"
    export_gguf(run, f32, dtype="fp32")
    assert (out / "model.gguf").stat().st_size < 0.7 * (f32 / "model.gguf").stat().st_size


def test_gguf_export_keeps_folder_safety(run, tmp_path):
    out = tmp_path / "g"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["export", str(run), "--format", "gguf", "--out", str(out), "--overwrite"]) == 2
    assert (out / "mine.txt").read_text() == "keep" and not (out / "model.gguf").exists()


def test_llama_cpp_greedy_text_equals_leantrain(run, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python has no wheel here; bench/export.py "
                                    "--llama-cpp runs this check where it is installed")
    export_gguf(run, tmp_path / "g", dtype="fp32")
    model, tok, *_ = load_trained(run)
    prompt = tok.encode("import ").ids
    llm = llama_cpp.Llama(str(tmp_path / "g" / "model.gguf"), n_ctx=64, verbose=False)
    got = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        got.append(t)
        if len(got) == 32:
            break
    assert got == generate(model, prompt, 32, temperature=0)
