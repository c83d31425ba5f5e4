"""The model room: a plain-PyTorch transformer, its parameter and FLOP counts, and KV-cache sampling."""

from leantrain.model.flops import ffn_hidden_dim, flops_per_token, matmul_params, param_count
from leantrain.model.generate import generate
from leantrain.model.transformer import Attention, Block, FeedForward, KVCache, RMSNorm, Transformer

__all__ = [
    "Attention", "Block", "FeedForward", "KVCache", "RMSNorm", "Transformer",
    "ffn_hidden_dim", "flops_per_token", "generate", "matmul_params", "param_count",
]
