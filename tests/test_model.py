"""The model room on real tiny transformers: counts, causality, loss, init, precision, sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from leantrain.config import ModelConfig
from leantrain.model import (
    Transformer,
    ffn_hidden_dim,
    flops_per_token,
    generate,
    matmul_params,
    param_count,
    transformer,
)
from leantrain.model.transformer import apply_rope, rope_tables

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def tiny(**kw) -> ModelConfig:
    base = dict(n_layers=2, dim=32, n_heads=4, n_kv_heads=4, seq_len=16, vocab_size=64)
    return ModelConfig(**(base | kw))


def build(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**kw))


def unique_numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


# ---- counting ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {}, {"tie_embeddings": False}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "tie_embeddings": False},
    {"ffn_dim": 48, "n_layers": 3},
])
def test_param_count_matches_module(kw):
    model = build(**kw)
    assert param_count(model.cfg) == unique_numel(model)
    assert (model.output.weight is model.tok_embeddings.weight) == model.cfg.tie_embeddings


def test_param_count_by_hand():
    # dim 32, 4 heads of 8, 2 kv heads -> kv width 16; ffn 8/3*32 = 85.3 -> 128; vocab 64; 2 layers; untied.
    cfg = tiny(n_kv_heads=2, tie_embeddings=False)
    assert ffn_hidden_dim(cfg) == 128
    attention = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32  # wq wk wv wo = 3072
    feed_forward = 3 * 32 * 128  # 12288
    norms = 2 * 32
    per_layer = attention + feed_forward + norms  # 15424
    expected = 64 * 32 + 2 * per_layer + 32 + 64 * 32  # embedding, layers, final norm, output = 34976
    assert expected == 34976
    assert param_count(cfg) == expected
    assert param_count(tiny(n_kv_heads=2)) == expected - 64 * 32  # tied: output counted once


def test_ffn_hidden_rounding():
    assert ffn_hidden_dim(ModelConfig(dim=384)) == 1024  # 8/3*384 = 1024 exactly
    assert ffn_hidden_dim(ModelConfig(dim=256)) == 704  # 682.7 -> 704
    assert ffn_hidden_dim(ModelConfig(dim=256, ffn_dim=500)) == 500


def test_flops_per_token_by_hand():
    # The reference shape: 6 layers, dim 384, 6 heads, seq 256, vocab 8192, ffn 1024.
    cfg = ModelConfig(n_layers=6, dim=384, n_heads=6, n_kv_heads=6, seq_len=256, vocab_size=8192)
    per_layer = 4 * 384 * 384 + 3 * 384 * 1024  # 1,769,472
    mm = 6 * per_layer + 8192 * 384  # output projection counted although tied: 13,762,560
    assert matmul_params(cfg) == mm == 13_762_560
    assert flops_per_token(cfg) == 6 * mm + 12 * 6 * 384 * 256 == 89_653_248
    assert flops_per_token(cfg, seq_len=128) == 6 * mm + 12 * 6 * 384 * 128
    # GQA shrinks wk and wv only.
    gqa = ModelConfig(n_layers=6, dim=384, n_heads=6, n_kv_heads=2, seq_len=256, vocab_size=8192)
    assert matmul_params(gqa) == mm - 6 * 2 * 384 * (384 - 128)


# ---- forward -----------------------------------------------------------------------------------

def test_causal():
    model = build()
    idx = torch.randint(0, 64, (2, 12))  # shorter than seq_len on purpose
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 64
    a, b = model(idx), model(changed)
    assert a.shape == (2, 12, 64)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_grouped_query_attention(n_kv_heads):
    model = build(n_kv_heads=n_kv_heads)
    attn = model.layers[0].attention
    assert attn.wk.weight.shape == (n_kv_heads * 8, 32) == attn.wv.weight.shape
    idx = torch.randint(0, 64, (3, 16))
    assert model(idx).shape == (3, 16, 64)
    loss = model(idx, idx)
    loss.backward()
    assert attn.wk.weight.grad is not None and torch.isfinite(loss)


def test_gqa_equals_mha_with_repeated_kv_heads():
    # A GQA model is an MHA model whose k/v heads come in identical groups; check the grouping order.
    gqa = build(n_kv_heads=2)
    mha = build(n_kv_heads=4)
    state = gqa.state_dict()
    for i in range(2):
        for name in ("wk", "wv"):
            w = state[f"layers.{i}.attention.{name}.weight"].view(2, 8, 32)
            state[f"layers.{i}.attention.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(gqa(idx), mha(idx))


def test_rope_is_hf_rotate_half():
    x = torch.randn(2, 5, 3, 8)
    rope = rope_tables(8, 16, 10000.0)
    cos = torch.cat((rope[0], rope[0]), -1)[:5, None, :]
    sin = torch.cat((rope[1], rope[1]), -1)[:5, None, :]
    rotate_half = torch.cat((-x[..., 4:], x[..., :4]), -1)
    torch.testing.assert_close(apply_rope(x, rope), x * cos + rotate_half * sin)
    torch.testing.assert_close(apply_rope(x, rope)[:, 0], x[:, 0])  # position 0 is not rotated


@pytest.mark.parametrize("chunk_rows", [None, 5])  # one slice, and uneven slices of 5 rows
def test_loss_reductions_and_ignore_index(chunk_rows, monkeypatch):
    if chunk_rows:
        monkeypatch.setattr(transformer, "LOSS_CHUNK_ELEMENTS", chunk_rows * 64)
    model = build()
    idx = torch.randint(0, 64, (2, 16))
    targets = torch.randint(0, 64, (2, 16))
    targets[0, :5] = -100
    targets[1, 10:] = -100
    kept = targets != -100
    n = int(kept.sum())
    mean, total = model(idx, targets), model(idx, targets, reduction="sum")
    assert mean.dtype == total.dtype == torch.float32
    torch.testing.assert_close(total / n, mean)
    logits = model(idx)
    torch.testing.assert_close(mean, F.cross_entropy(logits[kept], targets[kept]))
    # Counting the ignored positions (here as token 0) would give another number.
    assert not torch.allclose(mean, F.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=0)))
    with pytest.raises(ValueError, match="reduction"):
        model(idx, targets, reduction="none")


def test_overfits_one_batch():
    model = build(seed=1)
    torch.manual_seed(2)
    idx = torch.randint(0, 64, (4, 16))
    targets = torch.roll(idx, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model(idx, targets).item()
    assert abs(first - math.log(64)) < 0.5  # small init: close to uniform
    for _ in range(40):
        opt.zero_grad(set_to_none=True)
        loss = model(idx, targets)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_bf16_autocast_close_to_fp32():
    model = build()
    idx = torch.randint(0, 64, (2, 16))
    ref_logits, ref_loss = model(idx), model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx), model(idx, idx)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(logits.float(), ref_logits, atol=0.02, rtol=0.02)
    assert abs(loss.item() - ref_loss.item()) < 0.005
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_too_long_sequence_is_an_error():
    with pytest.raises(ValueError, match="seq_len"):
        build()(torch.zeros(1, 17, dtype=torch.long))


# ---- init --------------------------------------------------------------------------------------

def test_meta_build_then_init_equals_normal_build():
    cfg = tiny(n_kv_heads=2)
    torch.manual_seed(5)
    normal = Transformer(cfg)
    torch.manual_seed(5)
    with torch.device("meta"):
        lazy = Transformer(cfg)
    assert lazy.tok_embeddings.weight.is_meta
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    assert lazy.output.weight is lazy.tok_embeddings.weight  # re-tied after to_empty
    for (name, a), b in zip(normal.state_dict().items(), lazy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(normal.rope, lazy.rope)
    torch.manual_seed(6)
    other = Transformer(cfg)
    assert not torch.equal(other.layers[0].attention.wq.weight, normal.layers[0].attention.wq.weight)


def test_init_scales_and_names():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=4, dim=128, n_heads=4, n_kv_heads=4, seq_len=16, vocab_size=256,
                      tie_embeddings=False)
    model = Transformer(cfg)
    block = model.layers[0]
    assert block.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.feed_forward.w2.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert block.attention.wo.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert torch.equal(block.ffn_norm.weight, torch.ones(128))
    assert set(model.state_dict()) == {
        "tok_embeddings.weight", "norm.weight", "output.weight",
        *(f"layers.{i}.{n}.weight" for i in range(4) for n in (
            "attention_norm", "ffn_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")),
    }  # Llama/torchtitan names; the rope buffer is not saved


# ---- generate ----------------------------------------------------------------------------------

def test_generate_deterministic_and_in_range():
    model = build()
    model.train()
    a = generate(model, [1, 2, 3], 20, seed=7)
    b = generate(model, [1, 2, 3], 20, seed=7)
    assert a == b and len(a) == 20
    assert all(isinstance(t, int) and 0 <= t < 64 for t in a)
    assert model.training  # mode restored
    assert generate(model, [1, 2, 3], 20, seed=8, temperature=1.5, top_k=None) != a
    long_prompt = list(range(40))  # longer than seq_len: cropped, not an error
    assert len(generate(model, long_prompt, 5, seed=0)) == 5


def test_generate_stops_at_eos():
    model = build()
    out = generate(model, [5], 20, seed=3, temperature=2.0, top_k=None)
    eos = out[4]
    stopped = generate(model, [5], 20, seed=3, temperature=2.0, top_k=None, eos_id=eos)
    assert stopped == out[: out.index(eos) + 1]


def test_generate_greedy():
    model = build()
    ids = [3, 1, 4]
    expected = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([ids[-16:]]))[0, -1].argmax())
            expected.append(nxt)
            ids.append(nxt)
    assert generate(model, [3, 1, 4], 6, temperature=0, seed=1) == expected
    assert generate(model, [3, 1, 4], 6, temperature=0, seed=2) == expected


def test_generate_leaves_global_rng_alone():
    model = build()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    generate(model, [1, 2], 10, seed=4)
    generate(model, [1, 2], 10)  # seed None must not draw from the global RNG either
    assert torch.equal(torch.get_rng_state(), state)


# ---- KV cache ----------------------------------------------------------------------------------

def set_kernel(model: Transformer, kernel: str) -> Transformer:
    for layer in model.layers:
        layer.attention.kernel = kernel
    return model


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("kw", [{"n_kv_heads": 2}, {"arch": "gpt2"}])
def test_kv_cache_greedy_200_tokens_identical(kernel, kw):
    """200 greedy tokens with the cache are the uncached path's tokens (GQA and GPT-2, both kernels)."""
    # init_std 0.5: logits that depend on the context, so greedy decoding does not settle on one token
    model = set_kernel(build(seed=1, seq_len=256, init_std=0.5, **kw), kernel)
    prompt = [7, 3, 9, 1]
    uncached = generate(model, prompt, 200, temperature=0, use_cache=False)
    assert generate(model, prompt, 200, temperature=0) == uncached
    assert len(uncached) == 200 and len(set(uncached[100:])) > 5  # a real sequence, not one repeated token


def test_kv_cache_sampling_with_seed_identical():
    model = build(seed=2, seq_len=128, n_kv_heads=1)
    a = generate(model, [1, 2], 100, temperature=1.3, top_k=20, seed=5, use_cache=False)
    assert generate(model, [1, 2], 100, temperature=1.3, top_k=20, seed=5) == a


def test_kv_cache_past_seq_len_slides_the_window_as_uncached():
    """Past seq_len (16) every token is computed from the last 16 tokens, exactly as without the cache;
    a prompt longer than seq_len is cropped the same way."""
    model = build(seed=3, n_kv_heads=2)
    for prompt in ([4, 5, 6], list(range(15)), list(range(40))):
        for temperature in (0, 1.0):
            a = generate(model, prompt, 40, temperature=temperature, seed=1, use_cache=False)
            assert generate(model, prompt, 40, temperature=temperature, seed=1) == a


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_kv_cache_logits_match_full_forward_in_chunks(kernel):
    """Prefill 5 tokens, then a chunk of 4 (a block of queries after cached keys), then single tokens:
    every position's logits are the full forward's."""
    model = set_kernel(build(seed=4, n_kv_heads=2), kernel).eval()
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache()
        parts = [model(idx[:, a:b], cache=cache) for a, b in ((0, 5), (5, 9), (9, 10), (10, 11), (11, 12))]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_overflow_is_an_error_and_training_forward_unchanged():
    model = build(seed=5).eval()
    cache = model.new_cache(max_len=8)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="do not fit"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    assert model.new_cache(max_len=1000).max_len == 16  # never beyond the rope table / seq_len
    x = torch.randint(0, 64, (2, 16))
    loss = model(x, x)  # the training path takes no cache and still scores
    assert loss.ndim == 0 and torch.isfinite(loss)
