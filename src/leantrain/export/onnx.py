"""Export a run as an ONNX decoder with past key/values in and present key/values out, for ONNX Runtime.

The graph is traced by the torch exporter (dynamo) from `CachedDecoder`, a thin wrapper over the trained
`Transformer`'s own modules whose attention is written with the cache as explicit tensors: the inputs are
`input_ids` [B, T], `attention_mask` [B, P + T] (1: a real token; 0: left padding), `position_ids` [B, T]
and `past_key_values.N.key/value` [B, n_kv_heads, P, head_dim] per layer (P = 0 for the first call); the
outputs `logits` [B, T, vocab] and `present.N.key/value` [B, n_kv_heads, P + T, head_dim]. Batch, sequence
and past length are dynamic. These are the names of Hugging Face Optimum / onnxruntime-genai decoders, and
genai_config.json beside the model says them (with eos, context length, vocab, layers, heads, head size),
together with tokenizer.json and tokenizer_config.json. `quantize="int8"` runs onnxruntime's dynamic
quantization (int8 weights of the MatMuls, activations quantized on the fly) on the exported graph and
ships only the quantized model. export/onnx_runtime.py runs the result.

Mixture-of-experts layers are exported as every expert on every token with the routed gates as weights
(the same numbers as the sparse kernel, which has data-dependent shapes ONNX cannot hold): right for small
edge models, wasteful for wide ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leantrain.errors import ConfigError, LeantrainError
from leantrain.files import write_durable
from leantrain.model.flops import head_size
from leantrain.model.moe import MoEFeedForward
from leantrain.model.transformer import Transformer, window_mask

OPSET = 18
MODEL_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"
QUANTIZE = ("int8",)


def input_names(n_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids",
            *[f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]]


def output_names(n_layers: int) -> list[str]:
    return ["logits", *[f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]]


def dense_moe(moe: MoEFeedForward, x: Tensor) -> Tensor:
    """The MoE layer as dense tensor algebra: every expert on every token, weighted by the routed gates
    (0 for experts a token did not pick). Same routing as `MoEFeedForward.route`, no data-dependent shapes."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    _, _, experts, gates = moe.route(x)
    weights = torch.zeros(x.size(0), moe.n_experts, dtype=x.dtype, device=x.device).scatter(1, experts,
                                                                                            gates.to(x.dtype))
    h = F.silu(torch.einsum("nd,edh->enh", x, moe.w1)) * torch.einsum("nd,edh->enh", x, moe.w3)
    out = torch.einsum("ne,end->nd", weights, torch.einsum("enh,ehd->end", h, moe.w2))
    if moe.shared is not None:
        out = out + moe.shared_output(x)
    return out.view(shape)


class CachedDecoder(nn.Module):
    """The trained model as one stateless step: (ids, mask, positions, past K/V) -> (logits, present K/V).

    Uses the model's own embedding, norm, projection and MLP modules; only the attention is restated, over
    the explicit past tensors, with a mask that is causal in cache order, honours `attention_mask` (left
    padding) and the sliding window, and is a large negative (not -inf) so all-padding rows stay finite.
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        self.cfg = model.cfg

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor
                ) -> tuple[Tensor, ...]:
        m, cfg = self.model, self.cfg
        T = input_ids.size(1)
        x = m.tok_embeddings(input_ids)
        if cfg.arch == "gpt2":
            x = x + m.pos_embeddings(position_ids)
            rope = None
        else:
            rope = m.rope[:, position_ids].unsqueeze(3)  # [2, B, T, 1, D/2]: per-row positions (left padding)
        S = attention_mask.size(1)
        # key j is visible to new query t (cache index S - T + t) when j <= S - T + t, it is not padding, and
        # (with a sliding window) it lies within the window before the query
        layer0 = m.layers[0].attention
        if layer0.window:
            visible = window_mask(T, S, layer0.window, x.device)
        else:
            visible = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        visible = visible[None, None] & attention_mask[:, None, None, :].bool()  # [B, 1, T, S]
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=x.device).masked_fill(
            ~visible, torch.finfo(torch.float32).min)
        present: list[Tensor] = []
        for i, layer in enumerate(m.layers):
            h = layer.attention_norm(x)
            y, k, v = self._attention(layer.attention, h, rope, past[2 * i], past[2 * i + 1], bias)
            present += [k, v]
            x = x + y
            h = layer.ffn_norm(x)
            ff = layer.feed_forward
            x = x + (dense_moe(ff, h) if isinstance(ff, MoEFeedForward) else ff(h))
        return (m.output(m.norm(x)), *present)

    @staticmethod
    def _attention(attn: nn.Module, x: Tensor, rope: Tensor | None, past_k: Tensor, past_v: Tensor,
                   bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q = attn.wq(x).view(B, T, attn.n_heads, attn.head_dim)
        k = attn.wk(x).view(B, T, attn.n_kv_heads, attn.head_dim)
        if attn.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:  # rotate-half RoPE at each row's own positions, as model/transformer.apply_rope
            cos, sin = rope[0], rope[1]
            q1, q2 = q.chunk(2, dim=-1)
            k1, k2 = k.chunk(2, dim=-1)
            q = torch.cat((q1 * cos - q2 * sin, q2 * cos + q1 * sin), dim=-1)
            k = torch.cat((k1 * cos - k2 * sin, k2 * cos + k1 * sin), dim=-1)
        v = attn.wv(x).view(B, T, attn.n_kv_heads, attn.head_dim)
        k = torch.cat((past_k, k.transpose(1, 2)), dim=2)
        v = torch.cat((past_v, v.transpose(1, 2)), dim=2)
        group = attn.n_heads // attn.n_kv_heads
        kk, vv = (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)) if group > 1 else (k, v)
        scores = q.transpose(1, 2) @ kk.transpose(2, 3) * attn.head_dim ** -0.5 + bias
        y = torch.softmax(scores, dim=-1) @ vv  # [B, H, T, D]
        return attn.wo(y.transpose(1, 2).reshape(B, T, -1)), k, v


def example_inputs(model: Transformer, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[Tensor, ...]:
    """Inputs for tracing, with sizes > 1 so that no dynamic axis is specialised to 0 or 1."""
    cfg = model.cfg
    kv = (batch, cfg.n_kv_heads, past, head_size(cfg))
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen),
            torch.ones(batch, past + seq, dtype=torch.long),
            torch.arange(past, past + seq).repeat(batch, 1),
            *[torch.randn(kv, generator=gen) for _ in range(2 * cfg.n_layers)])


def export_onnx_model(model: Transformer, path: Path) -> None:
    """Trace `model` (float32, eval) through `CachedDecoder` and write one ONNX file (weights inside it when
    under 2 GB, else in `path`.data beside it)."""
    model = model.float().eval()
    n = model.cfg.n_layers
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, tuple({0: dyn, 2: dyn} for _ in range(2 * n)))
    big = sum(p.numel() * 4 for p in model.parameters()) > 1_800_000_000
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" and other registration chatter
    with warnings.catch_warnings(), torch.no_grad(), contextlib.ExitStack() as stack:
        stack.callback(quiet.setLevel, level)
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
        program = torch.onnx.export(CachedDecoder(model), example_inputs(model), dynamo=True, opset_version=OPSET,
                                    input_names=input_names(n), output_names=output_names(n),
                                    dynamic_shapes=shapes, optimize=True, verbose=False, report=False)
    program.save(str(path), external_data=big)


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic quantization: int8 MatMul weights, activations quantized per call. The graph is
    first optimised by onnxruntime (`quant_pre_process`, the step its docs ask for; symbolic shape inference
    skipped, it does not follow the dynamic past length): int8 decoding then ran 1.8x faster than without it
    (bench/export.py, docs/export.md). Writes an intermediate file next to `src`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = src.with_name("preprocessed.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process, printed even when we have
    try:
        # a model past protobuf's 2 GB keeps its weights in files beside the graph, at every step
        big = any(p.name != src.name for p in src.parent.iterdir())
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=big)
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, use_external_data_format=big)
    finally:
        root.setLevel(level)


def genai_config(cfg: Any, bos: int, eos: int, filename: str = MODEL_FILE) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json shape: the decoder's geometry and its input/output names."""
    m = cfg.model
    return {
        "model": {
            "type": m.arch, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos,
            "context_length": m.seq_len, "vocab_size": m.vocab_size,
            "decoder": {
                "filename": filename, "session_options": {"provider_options": []},
                "hidden_size": m.dim, "head_size": head_size(m), "num_attention_heads": m.n_heads,
                "num_key_value_heads": m.n_kv_heads, "num_hidden_layers": m.n_layers,
                "sliding_window": m.sliding_window if 0 < m.sliding_window < m.seq_len else 0,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"max_length": m.seq_len, "do_sample": False, "num_beams": 1, "past_present_share_buffer": False},
    }


def need_packages(*names: str) -> None:
    """One line naming the extra to install when an exporter's library is missing (not a traceback mid-export)."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise LeantrainError(f"this export needs {', '.join(missing)}; install the extra: pip install "
                             "'leantrain[export]'")


def check_onnx_options(dtype: str | None, quantize: str | None) -> None:
    """Refuse what the ONNX export does not write, before loading anything."""
    if dtype not in (None, "fp32"):
        raise ConfigError(f"--dtype {dtype} is not allowed with --format onnx (it writes float32, what ONNX Runtime "
                          "runs fastest on CPU); drop --dtype, or add --quantize int8 for a 4x smaller model")
    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(f"--quantize {quantize} is not allowed with --format onnx; expected int8 "
                          "(q8_0 is a GGUF type: --format gguf)")


def export_onnx(run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None,
                overwrite: bool = False, dtype: str | None = None, quantize: str | None = None) -> dict[str, Any]:
    """Write a run's newest good (or the given) checkpoint as an ONNX decoder folder; returns a summary
    (out_dir, files, step, arch, params, dtype, warnings). Built under a temporary name and renamed when
    whole; a non-empty `out_dir` is replaced only with `overwrite`, and only if leantrain wrote it."""
    from leantrain.export.hf import check_export_target, mark_export, publish
    from leantrain.tokens.tokenizer import eot_id, hf_tokenizer_config, special_tokens
    from leantrain.train.runs import load_trained

    check_onnx_options(dtype, quantize)
    need_packages("onnx", "onnxscript", "onnxruntime")
    out = Path(out_dir)
    check_export_target(out, run_dir, overwrite)
    model, tok, cfg, step, warns = load_trained(run_dir, checkpoint)
    hf_tok = hf_tokenizer_config(Path(run_dir) / "tokenizer.json") or {}
    specials = special_tokens(hf_tok)
    eos = eot_id(tok, where=f"{run_dir}/tokenizer.json", eos=specials.get("eos_token"))
    bos = tok.token_to_id(specials["bos_token"]) if "bos_token" in specials else None
    bos = eos if bos is None else bos
    eos_token = tok.id_to_token(eos)

    def fill(folder: Path) -> list[str]:
        if quantize:
            with tempfile.TemporaryDirectory(dir=folder) as tmp:  # the fp32 graph is an intermediate only
                export_onnx_model(model, Path(tmp) / MODEL_FILE)
                quantize_int8(Path(tmp) / MODEL_FILE, folder / MODEL_FILE)
        else:
            export_onnx_model(model, folder / MODEL_FILE)
        files = sorted(p.name for p in folder.iterdir())
        write_durable(folder / CONFIG_FILE, json.dumps(genai_config(cfg, bos, eos), indent=2), sync_dir=False)
        write_durable(folder / "tokenizer.json", tok.to_str(pretty=True), sync_dir=False)
        write_durable(folder / "tokenizer_config.json", json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.id_to_token(bos), "eos_token": eos_token,
             "pad_token": eos_token, "clean_up_tokenization_spaces": False, **hf_tok,
             "model_max_length": cfg.model.seq_len}, indent=2), sync_dir=False)
        mark_export(folder, "onnx-int8" if quantize else "onnx", step, run_dir)
        return [*files, CONFIG_FILE, "tokenizer.json", "tokenizer_config.json"]

    files = publish(out, fill)
    return {"out_dir": str(out), "step": step, "arch": cfg.model.arch, "files": sorted(files),
            "dtype": f"{quantize} weights" if quantize else "fp32", "quantize": quantize,
            "params": sum(p.numel() for p in model.parameters()), "warnings": warns,
            "bytes": sum((out / f).stat().st_size for f in files)}
