"""Export a run as one GGUF file for llama.cpp (and what builds on it: llama-cpp-python, Ollama, LM Studio).

Written with the `gguf` package's GGUFWriter, under the tensor and metadata names llama.cpp's
convert_hf_to_gguf.py writes for the same architecture (the names come from gguf's own tables):
`token_embd`, `blk.N.attn_norm / attn_q / attn_k / attn_v / attn_output / ffn_norm / ffn_gate / ffn_up /
ffn_down`, `output_norm`, `output` (left out when tied to the embedding, as llama.cpp expects). Llama and
Mistral go out as llama.cpp's `llama` architecture, whose rotary embedding rotates interleaved pairs
(x[2i], x[2i+1]); leantrain rotates the two halves (Hugging Face's layout), so the q and k rows are
permuted exactly as convert_hf_to_gguf.py does. Qwen2 (q/k/v biases) and Qwen3 (q/k norms) go out as
`qwen2` / `qwen3`, which llama.cpp rotates by halves: no permutation.

The tokenizer goes in as tokenizer.ggml.model = "gpt2" (byte-level BPE: tokens, merges, token types,
bos/eos ids, no automatic bos) with the GPT-2 pre-tokenizer, which is what leantrain's tokenizers use.
Types: f32, f16, bf16 (norms and biases stay f32, as llama.cpp keeps them) and q8_0 (gguf.quants; a tensor
whose rows are not a multiple of 32 falls back to f16, as in convert_hf_to_gguf.py).

Refused, in one line: GPT-2 and Phi-3 layouts (llama.cpp's gpt2/phi3 fuse q/k/v: export --format hf and
use convert_hf_to_gguf.py), a sliding window shorter than the context (llama.cpp's llama ignores it),
mixture-of-experts models, and tokenizers that are not plain byte-level BPE.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from leantrain.errors import ConfigError
from leantrain.model.flops import ffn_hidden_dim, head_size

GGUF_FILE = "model.gguf"
TYPES = ("f32", "f16", "bf16", "q8_0")  # what --dtype / --quantize pick
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_LEANTRAIN_TO_GGUF = {  # leantrain's per-block module -> gguf's MODEL_TENSOR name
    "attention_norm.weight": "ATTN_NORM", "attention.wq": "ATTN_Q", "attention.wk": "ATTN_K",
    "attention.wv": "ATTN_V", "attention.wo": "ATTN_OUT", "attention.q_norm.weight": "ATTN_Q_NORM",
    "attention.k_norm.weight": "ATTN_K_NORM", "ffn_norm.weight": "FFN_NORM", "feed_forward.w1": "FFN_GATE",
    "feed_forward.w3": "FFN_UP", "feed_forward.w2": "FFN_DOWN",
}


def gguf_type(dtype: str | None, quantize: str | None, default: str) -> str:
    """The file's weight type from --dtype (fp32, fp16, bf16) and --quantize (q8_0); refuses what GGUF lacks."""
    if quantize is not None and quantize != "q8_0":
        raise ConfigError(f"--quantize {quantize} is not allowed with --format gguf; expected q8_0 "
                          "(int8 is ONNX's dynamic quantization: --format onnx)")
    if quantize and dtype:
        raise ConfigError(f"--dtype {dtype} and --quantize {quantize} both set the GGUF weight type; pass one")
    if quantize:
        return quantize
    return {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}[dtype or default]


def check_gguf_model(cfg: Any, run_dir: str | Path) -> None:
    """Refuse the models llama.cpp's llama/qwen2/qwen3 graphs would compute differently, before loading."""
    m = cfg.model
    if m.moe_experts:
        raise ConfigError(f"{run_dir} is a mixture-of-experts model (model.moe_experts = {m.moe_experts}) and GGUF "
                          "export writes dense models only; export it with --format onnx (it holds the experts)")
    if m.arch not in ARCHS:
        raise ConfigError(f"GGUF export supports model.arch = llama, mistral, qwen2 or qwen3, not {m.arch}; export "
                          "--format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    if 0 < m.sliding_window < m.seq_len:
        raise ConfigError(f"{run_dir} attends through a sliding window of {m.sliding_window} < seq_len {m.seq_len}, "
                          "which llama.cpp's llama graph ignores; export --format onnx or --format hf")


def permute_rotary(w: Tensor, n_heads: int) -> Tensor:
    """Rows of a q/k projection (or bias) from rotate-half order to interleaved pairs, per head: the
    `permute` of llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """leantrain's state dict -> {gguf tensor name: float32 tensor in torch [out, in] layout}."""
    import gguf

    m = cfg.model
    arch = gguf.MODEL_ARCH[ARCHS[m.arch].upper()]
    names = gguf.TENSOR_NAMES
    permute = ARCHS[m.arch] == "llama"
    out = {names[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight": state["tok_embeddings.weight"]}
    for i in range(m.n_layers):
        for ours, theirs in _LEANTRAIN_TO_GGUF.items():
            for suffix in ((".weight", ".bias") if not ours.endswith(".weight") else ("",)):
                t = state.get(f"layers.{i}.{ours}{suffix}")
                if t is None:
                    continue
                if permute and ours in ("attention.wq", "attention.wk"):
                    t = permute_rotary(t, m.n_heads if ours == "attention.wq" else m.n_kv_heads)
                tensor = gguf.MODEL_TENSOR[theirs]
                assert tensor in gguf.MODEL_TENSORS[arch], (theirs, arch)
                out[names[tensor].format(bid=i) + (suffix or ".weight")] = t
    out[names[gguf.MODEL_TENSOR.OUTPUT_NORM] + ".weight"] = state["norm.weight"]
    if not m.tie_embeddings:
        out[names[gguf.MODEL_TENSOR.OUTPUT] + ".weight"] = state["output.weight"]
    return {k: v.detach().float().cpu() for k, v in out.items()}


def tokenizer_fields(tok: Any, vocab_size: int, run_dir: str | Path) -> dict[str, Any]:
    """tokens, token types, merges and special ids of a byte-level BPE tokenizer, as llama.cpp's gpt2 vocab."""
    import gguf

    spec = json.loads(tok.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get(
            "add_prefix_space"):
        raise ConfigError(f"{run_dir}/tokenizer.json is not plain byte-level BPE (model {model.get('type')}, "
                          f"pre-tokenizer {pre.get('type')}), so the GGUF vocabulary would tokenize differently; "
                          "export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    vocab = tok.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise ConfigError(f"{run_dir}/tokenizer.json has {len(vocab)} tokens but the model only {vocab_size}; "
                          "the run's tokenizer does not match its model")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["content"]: a.get("special", False) for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:  # rows of the embedding no token uses (a vocab padded for speed)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL if t not in added else
                         gguf.TokenType.CONTROL if added[t] else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(path: Path, model: Any, tok: Any, cfg: Any, run_dir: str | Path, kind: str, bos: int, eos: int,
               chat_template: str | None = None, name: str = "leantrain") -> int:
    """Write the GGUF file; returns how many tensors it holds."""
    import gguf

    m = cfg.model
    arch = ARCHS[m.arch]
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    vocab = tokenizer_fields(tok, m.vocab_size, run_dir)
    tensors = gguf_tensors(model.state_dict(), cfg)
    w = gguf.GGUFWriter(path, arch)
    try:
        w.add_name(name)
        w.add_context_length(m.seq_len)
        w.add_embedding_length(m.dim)
        w.add_block_count(m.n_layers)
        w.add_feed_forward_length(ffn_hidden_dim(m))
        w.add_head_count(m.n_heads)
        w.add_head_count_kv(m.n_kv_heads)
        w.add_key_length(head_size(m))
        w.add_value_length(head_size(m))
        w.add_rope_dimension_count(head_size(m))
        w.add_rope_freq_base(m.rope_theta)
        w.add_layer_norm_rms_eps(m.norm_eps)
        w.add_vocab_size(m.vocab_size)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        w.add_bos_token_id(bos)
        w.add_eos_token_id(eos)
        w.add_pad_token_id(eos)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        if chat_template:
            w.add_chat_template(chat_template)
        for tname, t in tensors.items():
            data = t.numpy()
            if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
                w.add_tensor(tname, data.astype(np.float32))
                continue
            this = qtype
            if this == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[this][0]:
                this = gguf.GGMLQuantizationType.F16
            w.add_tensor(tname, gguf.quants.quantize(data, this), raw_dtype=this)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    fd = os.open(path, os.O_RDONLY)  # on disk before the folder is renamed into place
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(tensors)


def export_gguf(run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None,
                overwrite: bool = False, dtype: str | None = None, quantize: str | None = None) -> dict[str, Any]:
    """Write a run's newest good (or the given) checkpoint as `out_dir`/model.gguf; returns a summary (out_dir,
    files, step, arch, params, dtype, warnings). Same folder safety as the HF export (export/hf.py)."""
    from leantrain.config import load_config
    from leantrain.export.hf import check_export_target, default_dtype, mark_export, publish
    from leantrain.export.onnx import need_packages
    from leantrain.tokens.chat import jinja_template
    from leantrain.tokens.tokenizer import eot_id, hf_tokenizer_config, special_tokens
    from leantrain.train.runs import load_trained

    if dtype is not None and dtype not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"--dtype {dtype!r} is not allowed; expected fp32, fp16 or bf16")
    gguf_type(dtype, quantize, "fp32")  # refuse bad combinations before anything is loaded
    need_packages("gguf")
    out = Path(out_dir)
    run_cfg = Path(run_dir) / "config.toml"
    if run_cfg.is_file():
        check_gguf_model(load_config(run_cfg), run_dir)
    check_export_target(out, run_dir, overwrite)
    model, tok, cfg, step, warns = load_trained(run_dir, checkpoint)
    kind = gguf_type(dtype, quantize, default_dtype(run_dir, cfg))
    hf_tok = hf_tokenizer_config(Path(run_dir) / "tokenizer.json") or {}
    specials = special_tokens(hf_tok)
    eos = eot_id(tok, where=f"{run_dir}/tokenizer.json", eos=specials.get("eos_token"))
    bos = tok.token_to_id(specials["bos_token"]) if "bos_token" in specials else None
    bos = eos if bos is None else bos
    chat = Path(run_dir) / "chat_template.txt"
    template = jinja_template(chat.read_text(), tok.id_to_token(eos)) if chat.is_file() else None
    tokenizer_fields(tok, cfg.model.vocab_size, run_dir)  # refuse a foreign tokenizer before writing

    def fill(folder: Path) -> list[str]:
        write_gguf(folder / GGUF_FILE, model, tok, cfg, run_dir, kind, bos, eos, template,
                   name=Path(run_dir).resolve().name)
        mark_export(folder, f"gguf-{kind}", step, run_dir)
        return [GGUF_FILE]

    files = publish(out, fill)
    return {"out_dir": str(out), "step": step, "arch": cfg.model.arch, "files": files, "dtype": kind,
            "params": sum(p.numel() for p in model.parameters()), "bytes": (out / GGUF_FILE).stat().st_size,
            "warnings": warns}
