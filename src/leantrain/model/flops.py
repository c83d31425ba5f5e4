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


def head_size(cfg: ModelConfig) -> int:
    """Width of one attention head: `cfg.head_dim`, or dim / n_heads when it is 0."""
    return cfg.head_dim or cfg.dim // cfg.n_heads


def moe_hidden_dim(cfg: ModelConfig) -> int:
    """Width of one expert: `cfg.moe_hidden`, or the dense width split over the experts a token uses (routed
    top_k plus shared), rounded up to a multiple of 8, so an MoE layer costs about the FLOPs of a dense one
    (8: the grouped matmul wants 16-byte strides in bf16)."""
    if cfg.moe_hidden:
        return cfg.moe_hidden
    per = -(-ffn_hidden_dim(cfg) // (cfg.moe_top_k + cfg.moe_shared_experts))
    return (per + 7) // 8 * 8


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """Block `layer` (0-based) has a mixture-of-experts feed-forward: every `moe_every`-th block."""
    return cfg.moe_experts > 0 and (layer + 1) % cfg.moe_every == 0


def _moe_extra(cfg: ModelConfig, experts: int) -> int:
    """Parameters an MoE feed-forward adds over the dense one it replaces, summed over the MoE blocks, when
    `experts` of its routed experts count (all of them for memory, top_k for the compute of one token)."""
    n_moe = sum(is_moe_layer(cfg, i) for i in range(cfg.n_layers))
    if not n_moe:
        return 0
    moe = cfg.dim * cfg.moe_experts + 3 * cfg.dim * moe_hidden_dim(cfg) * (experts + cfg.moe_shared_experts)
    moe += cfg.dim if cfg.moe_shared_gate and cfg.moe_shared_experts else 0  # Qwen2-MoE's shared_expert_gate
    return n_moe * (moe - 3 * cfg.dim * ffn_hidden_dim(cfg))  # router + experts - the dense SwiGLU


def _layer_matmul_params(cfg: ModelConfig) -> int:
    q_dim, kv_dim = cfg.n_heads * head_size(cfg), cfg.n_kv_heads * head_size(cfg)
    attention = 2 * cfg.dim * q_dim + 2 * cfg.dim * kv_dim  # wq, wo; wk, wv
    feed_forward = (2 if cfg.arch == "gpt2" else 3) * cfg.dim * ffn_hidden_dim(cfg)  # w1, w2(, w3)
    return attention + feed_forward


def param_count(cfg: ModelConfig) -> int:
    """Unique parameters of `Transformer(cfg)`; a tied output projection is counted once."""
    per_layer = _layer_matmul_params(cfg) + 2 * cfg.dim  # + attention_norm, ffn_norm
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    q_dim, kv_dim = cfg.n_heads * head_size(cfg), cfg.n_kv_heads * head_size(cfg)
    if cfg.arch == "gpt2":  # + norm biases, linear biases (wq, wk, wv, wo, w1, w2), position embeddings
        per_layer += 2 * cfg.dim + q_dim + cfg.dim + 2 * kv_dim + ffn_hidden_dim(cfg) + cfg.dim
        return embeddings + cfg.seq_len * cfg.dim + cfg.n_layers * per_layer + 2 * cfg.dim
    if cfg.arch == "qwen2":  # + q, k, v biases
        per_layer += q_dim + 2 * kv_dim
    elif cfg.arch == "qwen3":  # + the per-head q and k norms
        per_layer += 2 * head_size(cfg)
    return embeddings + cfg.n_layers * per_layer + cfg.dim + _moe_extra(cfg, cfg.moe_experts)  # + final norm


def active_param_count(cfg: ModelConfig) -> int:
    """Parameters one token computes with: `param_count` with only top_k of each MoE layer's routed experts
    (equal to it for a dense model)."""
    return param_count(cfg) - _moe_extra(cfg, cfg.moe_experts) + _moe_extra(cfg, cfg.moe_top_k)


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul for every token.

    The input embedding is a lookup and the norms are elementwise, so both are left out; the
    output projection is a real matmul and is counted even when its weight is the tied embedding. An MoE
    layer counts its router and the top_k routed plus shared experts a token goes through (active FLOPs).
    """
    return cfg.n_layers * _layer_matmul_params(cfg) + cfg.vocab_size * cfg.dim + _moe_extra(cfg, cfg.moe_top_k)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token, forward plus backward, as in PaLM (Chowdhery et al. 2022, app. B).

    6 * matmul_params: 2 FLOPs per multiply-add in the forward pass and twice that in the backward.
    12 * n_layers * dim * T: the attention score and value matmuls (QK^T and AV), counted over
    the full context T as PaLM does, although a causal mask makes half of that work redundant;
    keeping PaLM's convention makes MFU comparable with published numbers. A sliding window is
    not subtracted either: the masked kernels still compute every score. dim there is n_heads * head
    size (they differ when `head_dim` is set). `seq_len` defaults to `cfg.seq_len`.
    """
    t = cfg.seq_len if seq_len is None else seq_len
    return float(6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.n_heads * head_size(cfg) * t)
