"""Parameter and FLOP counts from a `ModelConfig` alone.

The planner sizes runs before any module exists (and without torch), so these mirror
`transformer.py` by arithmetic; the tests check them against a built module.
"""

from __future__ import annotations

from leantrain.config import ModelConfig


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    """SwiGLU width: `cfg.ffn_dim`, or 8/3*dim rounded up to a multiple of 64.

    8/3 keeps the three SwiGLU matrices at the parameter cost of a 4*dim GELU MLP; the multiple
    of 64 keeps matmul shapes friendly to vector units and tensor cores. Integer arithmetic, so
    no float rounding can make the planner and the module disagree. GPT-2's GELU MLP defaults to 4*dim.
    """
    if cfg.ffn_dim:
        return cfg.ffn_dim
    if cfg.arch == "gpt2":
        return 4 * cfg.dim
    return (8 * cfg.dim + 191) // 192 * 64


def _layer_matmul_params(cfg: ModelConfig) -> int:
    kv_dim = cfg.n_kv_heads * (cfg.dim // cfg.n_heads)
    attention = 2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv_dim  # wq, wo; wk, wv
    feed_forward = (2 if cfg.arch == "gpt2" else 3) * cfg.dim * ffn_hidden_dim(cfg)  # w1, w2(, w3)
    return attention + feed_forward


def param_count(cfg: ModelConfig) -> int:
    """Unique parameters of `Transformer(cfg)`; a tied output projection is counted once."""
    per_layer = _layer_matmul_params(cfg) + 2 * cfg.dim  # + attention_norm, ffn_norm
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    if cfg.arch == "gpt2":  # + norm biases, linear biases (wq, wk, wv, wo, w1, w2), position embeddings
        kv_dim = cfg.n_kv_heads * (cfg.dim // cfg.n_heads)
        per_layer += 2 * cfg.dim + 2 * cfg.dim + 2 * kv_dim + ffn_hidden_dim(cfg) + cfg.dim
        return embeddings + cfg.seq_len * cfg.dim + cfg.n_layers * per_layer + 2 * cfg.dim
    return embeddings + cfg.n_layers * per_layer + cfg.dim  # + final norm


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul for every token.

    The input embedding is a lookup and the norms are elementwise, so both are left out; the
    output projection is a real matmul and is counted even when its weight is the tied embedding.
    """
    return cfg.n_layers * _layer_matmul_params(cfg) + cfg.vocab_size * cfg.dim


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token, forward plus backward, as in PaLM (Chowdhery et al. 2022, app. B).

    6 * matmul_params: 2 FLOPs per multiply-add in the forward pass and twice that in the backward.
    12 * n_layers * dim * T: the attention score and value matmuls (QK^T and AV), counted over
    the full context T as PaLM does, although a causal mask makes half of that work redundant;
    keeping PaLM's convention makes MFU comparable with published numbers. `seq_len` defaults to
    `cfg.seq_len`.
    """
    t = cfg.seq_len if seq_len is None else seq_len
    return float(6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.dim * t)
