"""Memory to serve a model after compression: its weights in each format, plus the KV cache of a batch.

Bytes per parameter follow what `leantrain compress` writes (model/quant.py): int8 keeps one int8 per weight
plus an fp32 scale and an int8 zero point per output row; int4 one fp32 scale and one int8 zero point per group
of `group_size` inputs, with the values packed two per byte on disk but held one per int8 in memory by torchao's
CPU layout (torchao 0.18 has no CPU int4 kernel for fp32 activations); fp8 one byte per weight plus an fp32
scale per row. Norms stay in full precision (a few thousand parameters; counted at 4 bytes with the rest).
Pruning changes the parameter count, not the bytes per parameter: plan the pruned config itself.
"""

from __future__ import annotations

from typing import Any

from leantrain.config import ModelConfig
from leantrain.model.flops import head_size, param_count

SERVING_FORMATS = ("fp32", "bf16", "int8", "int4", "fp8")


def bytes_per_param(fmt: str, m: ModelConfig, group_size: int = 32, *, on_disk: bool = False) -> float:
    """Average bytes per weight of format `fmt` (fp32, bf16, int8, int4, fp8) for model `m`."""
    per_row = 5 / m.dim  # fp32 scale + int8 zero point per output row, over the row's dim inputs (roughly)
    table = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0 + per_row, "fp8": 1.0 + 4 / m.dim,
             "int4": (0.5 if on_disk else 1.0) + 5 / group_size}
    if fmt not in table:
        raise ValueError(f"unknown serving format {fmt!r}; expected one of {', '.join(SERVING_FORMATS)}")
    return table[fmt]


def kv_cache_bytes(m: ModelConfig, batch: int = 1, context: int | None = None, dtype_bytes: int = 4) -> int:
    """Keys and values of every layer for `batch` sequences of `context` tokens (default: seq_len)."""
    return 2 * m.n_layers * m.n_kv_heads * head_size(m) * (context or m.seq_len) * batch * dtype_bytes


def serving_memory(m: ModelConfig, batch: int = 1, context: int | None = None, group_size: int = 32,
                   kv_dtype_bytes: int = 4) -> dict[str, Any]:
    """{format: {"weights_bytes", "file_bytes", "kv_cache_bytes", "total_bytes"}} for each serving format."""
    params = param_count(m)
    kv = kv_cache_bytes(m, batch, context, kv_dtype_bytes)
    out: dict[str, Any] = {}
    for fmt in SERVING_FORMATS:
        weights = params * bytes_per_param(fmt, m, group_size)
        out[fmt] = {"weights_bytes": int(weights), "file_bytes": int(params * bytes_per_param(fmt, m, group_size,
                                                                                             on_disk=True)),
                    "kv_cache_bytes": kv, "total_bytes": int(weights + kv)}
    return out
