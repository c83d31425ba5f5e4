"""The Hugging Face checkpoint format, both ways: config.json <-> [model], state dicts <-> HF names.

`to_hf` maps leantrain's state dict to HF names and layouts; import checks a folder's tensors
against `to_hf` of a freshly built model (names and shapes) before `from_hf` maps them back, so every
mismatch is reported by its HF name. leantrain's RoPE uses HF's rotate-half layout, so Llama's q/k
projections need no permutation either way. Mistral, Qwen2 and Qwen3 use Llama's tensor names (plus
Qwen2's q/k/v biases and Qwen3's q_norm/k_norm); Phi-3 fuses q/k/v into `qkv_proj` and gate/up into
`gate_up_proj`, split here on import and fused on export. Mixture-of-experts models map to Mixtral,
Qwen2-MoE, Qwen3-MoE or GLM-4.5 MoE, whichever computes exactly what the [model] settings do (model/hf_moe.py). Only
safetensors are read: pickled `pytorch_model.bin` files could run code. It lives with the model (not in export/)
because training reads it too (`train.init_from`); export/hf.py writes the folders.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from leantrain.config import SLIDING_WINDOW_ARCHS, ModelConfig
from leantrain.errors import CheckpointError, ConfigError, LeantrainError
from leantrain.model.flops import ffn_hidden_dim, head_size, is_moe_layer
from leantrain.model.hf_moe import (
    MOE_FAMILIES,
    moe_config_json,
    moe_family,
    moe_fields_from_hf,
    moe_tensor_to_hf,
    moe_tensors_from_hf,
    unfuse_experts,
)

# model_type of config.json -> (model.arch, the transformers class export names, HF defaults of fields a
# config.json may leave out: what transformers would assume in their place)
_FAMILY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("llama", "LlamaForCausalLM", {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6}),
    "mistral": ("mistral", "MistralForCausalLM", {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
                                                  "sliding_window": 4096}),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6}),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                                            "head_dim": 128}),
    "phi3": ("phi3", "Phi3ForCausalLM", {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5}),
    # mixture of experts: Llama attention, MoE feed-forward (model/hf_moe.py reads the moe_* fields)
    "mixtral": ("llama", "MixtralForCausalLM", {"max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                                                "rope_theta": 1e6}),
    "qwen2_moe": ("llama", "Qwen2MoeForCausalLM", {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6}),
    "qwen3_moe": ("qwen3", "Qwen3MoeForCausalLM", {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6}),
    "glm4_moe": ("llama", "Glm4MoeForCausalLM", {"max_position_embeddings": 131072, "rms_norm_eps": 1e-5}),
    # the Llama block attending both ways, with a masked-token head: leantrain's model.objective = mlm
    "eurobert": ("llama", "EuroBertForMaskedLM", {"max_position_embeddings": 8192, "rms_norm_eps": 1e-5}),
}
SUPPORTED = ("Llama (LlamaForCausalLM), GPT-2 (GPT2LMHeadModel), Mistral (MistralForCausalLM), Qwen2 "
             "(Qwen2ForCausalLM), Qwen3 (Qwen3ForCausalLM), Phi-3 (Phi3ForCausalLM) and the mixtures of experts "
             "Mixtral (MixtralForCausalLM), Qwen2-MoE (Qwen2MoeForCausalLM), Qwen3-MoE (Qwen3MoeForCausalLM) and "
             "GLM-4.5 MoE (Glm4MoeForCausalLM), and the encoder EuroBERT (EuroBertForMaskedLM)")
# [model] fields that decide the weights' shapes or the function they compute: an explicit value must agree
# with the checkpoint. seq_len (a window, not a shape, except GPT-2's position table) and init_std may differ.
LOCKED_FIELDS = ("arch", "n_layers", "dim", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "rope_theta",
                 "norm_eps", "tie_embeddings", "head_dim", "sliding_window", "moe_experts", "moe_top_k", "moe_hidden",
                 "moe_every", "moe_shared_experts", "moe_shared_gate", "moe_router", "moe_gate_norm")
# buffers some HF versions saved next to the weights; they are functions of the config
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")
_LLAMA_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",
}
# Phi-3 stores q, k, v as one qkv_proj and gate, up as one gate_up_proj, concatenated along the output rows
_PHI3_FUSED = {"self_attn.qkv_proj": ("attention.wq", "attention.wk", "attention.wv"),
               "mlp.gate_up_proj": ("feed_forward.w1", "feed_forward.w3")}
_GPT2_NAMES = {"attention.wo": "attn.c_proj", "feed_forward.w1": "mlp.c_fc", "feed_forward.w2": "mlp.c_proj",
               "attention_norm": "ln_1", "ffn_norm": "ln_2"}


class HFFormatError(CheckpointError):
    """A Hugging Face folder that cannot be read: missing files, an unsupported architecture, mismatched shapes."""


# ---- config.json <-> [model] -------------------------------------------------------------------

def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """config.json of a local HF model folder (nothing is downloaded)."""
    d = Path(hf_dir)
    if not d.is_dir():
        raise HFFormatError(f"{d} is not a folder; --init-from takes a local Hugging Face model folder "
                            "(save one with model.save_pretrained(DIR))")
    p = d / "config.json"
    if not p.is_file():
        raise HFFormatError(f"{p} is missing; a Hugging Face model folder has config.json next to its weights")
    try:
        c = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise HFFormatError(f"{p} is not valid JSON ({type(e).__name__}); re-save the model with save_pretrained"
                            ) from None
    except OSError as e:
        raise HFFormatError(f"{p} cannot be read ({e.strerror or e}); check its permissions") from None
    if not isinstance(c, dict):
        raise HFFormatError(f"{p} holds a JSON {type(c).__name__}, not an object of config fields; re-save the "
                            "model with save_pretrained")
    return c


def _size(c: dict[str, Any], key: str, where: Path, default: int | None = None, low: int = 1) -> int:
    """An integer size of config.json: present (or defaulted), an integer, at least `low`."""
    if key not in c or c[key] is None:
        if default is None:
            raise HFFormatError(f"{where}: field {key} is missing; a Llama/GPT-2 config.json names it (re-save the "
                                "model with save_pretrained)")
        return default
    v = c[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise HFFormatError(f"{where}: {key} = {v!r} is not allowed; expected an integer >= {low}")
    return v


def _positive(c: dict[str, Any], key: str, where: Path, default: float) -> float:
    """A finite positive float of config.json (epsilons, rope_theta)."""
    v = c.get(key, default)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise HFFormatError(f"{where}: {key} = {v!r} is not allowed; expected a finite number > 0")
    return float(v)


def _check_heads(fields: dict[str, Any], names: tuple[str, str, str], where: Path) -> dict[str, Any]:
    """hidden size / heads / kv heads must divide as the model needs; named by config.json's own keys."""
    dim, heads, kv = fields["dim"], fields["n_heads"], fields["n_kv_heads"]
    if dim % heads:
        raise HFFormatError(f"{where}: {names[0]} = {dim} does not divide by {names[1]} = {heads}; the config is "
                            "inconsistent (re-save the model with save_pretrained)")
    if heads % kv:
        raise HFFormatError(f"{where}: {names[1]} = {heads} does not divide by {names[2]} = {kv}; the config is "
                            "inconsistent (re-save the model with save_pretrained)")
    return fields


def _rope_theta(c: dict[str, Any], where: Path) -> float:
    """rope_theta from a transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`) config."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    for key, p in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(p, dict):
            raise HFFormatError(f"{where}: {key} = {p!r} is not allowed; expected an object or null")
        kind = p.get("rope_type", p.get("type", "default"))
        if kind != "default":
            raise HFFormatError(f"{where}: {key} has rope type {kind!r}, which is not supported; leantrain's RoPE "
                                "is the default (unscaled) kind")
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise HFFormatError(f"{where}: partial_rotary_factor = {partial!r} is not supported; leantrain rotates "
                            "the whole head (1.0)")
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    return _positive({"rope_theta": theta}, "rope_theta", where, 10000.0)


def _llama_family(c: dict[str, Any], kind: str, where: Path) -> dict[str, Any]:
    """[model] fields of a Llama, Mistral, Qwen2, Qwen3 or Phi-3 config.json; refuses, in one line naming the
    field, whatever these models would compute differently from leantrain's block of that arch."""
    arch, _, defaults = _FAMILY[kind]
    c = defaults | c
    heads, dim = _size(c, "num_attention_heads", where), _size(c, "hidden_size", where)
    wanted = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "use_sliding_window": False}
    problems = [f"{k} = {c[k]!r}" for k, ok in wanted.items() if k in c and c[k] != ok]
    layer_types = c.get("layer_types") or []
    if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types = {str(layer_types)[:60]}")
    if problems:
        raise HFFormatError(f"{where}: {', '.join(problems)} is not supported; leantrain's {kind} has SiLU gates, "
                            "no biases but Qwen2's q/k/v ones, and the same attention in every layer")
    head_dim = c.get("head_dim")
    if head_dim is not None:
        head_dim = _size(c, "head_dim", where)
        if not dim % heads and head_dim == dim // heads:
            head_dim = None  # the usual width: leave model.head_dim at 0
    elif dim % heads:
        raise HFFormatError(f"{where}: hidden_size = {dim} does not divide by num_attention_heads = {heads} and "
                            "there is no head_dim; the config is inconsistent (re-save the model with save_pretrained)")
    if (head_dim or dim // heads) % 2:
        raise HFFormatError(f"{where}: head_dim = {head_dim or dim // heads} is odd; rotary embeddings need an even "
                            "head size, so leantrain cannot express this model")
    window = c.get("sliding_window") if arch in SLIDING_WINDOW_ARCHS else None
    fields = {
        "arch": arch, "n_layers": _size(c, "num_hidden_layers", where), "dim": dim, "n_heads": heads,
        "n_kv_heads": _size(c, "num_key_value_heads", where, heads),
        "seq_len": _size(c, "max_position_embeddings", where, low=2), "vocab_size": _size(c, "vocab_size", where),
        "ffn_dim": _size(c, "intermediate_size", where), "rope_theta": _rope_theta(c, where),
        "norm_eps": _positive(c, "rms_norm_eps", where, 1e-6),
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)), "head_dim": head_dim or 0,
        "sliding_window": 0 if window is None else _size(c, "sliding_window", where)}
    if heads % fields["n_kv_heads"]:
        raise HFFormatError(f"{where}: num_attention_heads = {heads} does not divide by num_key_value_heads = "
                            f"{fields['n_kv_heads']}; the config is inconsistent (re-save it with save_pretrained)")
    return fields


def model_config_from_hf(hf_dir: str | Path) -> dict[str, Any]:
    """The [model] fields that rebuild the architecture of a local HF folder (`SUPPORTED` names the kinds).

    seq_len is the checkpoint's position limit; a shorter training window is fine (`--model.seq_len`).
    Anything leantrain's model would compute differently (biases, activations, scaled RoPE) is refused.
    """
    c = read_hf_config(hf_dir)
    where = Path(hf_dir) / "config.json"
    kind = c.get("model_type")
    if kind in MOE_FAMILIES:
        fields, problems = moe_fields_from_hf(_FAMILY[kind][2] | c, kind)
        if problems:
            raise HFFormatError(f"{where}: {problems[0]}; leantrain cannot express this {MOE_FAMILIES[kind]}")
        return _llama_family(c, kind, where) | fields
    if kind == "eurobert":  # an encoder: model.objective = mlm
        return _llama_family(c, kind, where) | {"objective": "mlm"}
    if kind in _FAMILY:
        return _llama_family(c, kind, where)
    if kind == "gpt2":
        act = c.get("activation_function", "gelu_new")
        problems = [f"activation_function = {act!r}"] if act not in ("gelu_new", "gelu_pytorch_tanh") else []
        problems += [f"{k} = {c[k]!r}" for k, ok in (("scale_attn_weights", True), ("add_cross_attention", False),
                                                     ("scale_attn_by_inverse_layer_idx", False))
                     if k in c and c[k] != ok]
        if problems:
            raise HFFormatError(f"{where}: {', '.join(problems)} is not supported; leantrain's GPT-2 has a tanh "
                                "GELU and 1/sqrt(head_dim) attention scaling")
        dim, heads = _size(c, "n_embd", where, 768), _size(c, "n_head", where, 12)
        return _check_heads({
            "arch": "gpt2", "n_layers": _size(c, "n_layer", where, 12), "dim": dim, "n_heads": heads,
            "n_kv_heads": heads, "seq_len": _size(c, "n_positions", where, 1024, low=2),
            "vocab_size": _size(c, "vocab_size", where, 50257), "ffn_dim": _size(c, "n_inner", where, 4 * dim),
            "rope_theta": ModelConfig.rope_theta, "norm_eps": _positive(c, "layer_norm_epsilon", where, 1e-5),
            "tie_embeddings": bool(c.get("tie_word_embeddings", True)), "head_dim": 0, "sliding_window": 0},
            ("n_embd", "n_head", "n_head"), where)
    arch = ", ".join(map(str, c.get("architectures") or [])) if isinstance(c.get("architectures"), list) else ""
    arch = arch or "unknown"
    raise HFFormatError(f"{where}: architecture {kind!r} ({arch}) is not supported; leantrain imports {SUPPORTED}")


def init_model_fields(hf_dir: str | Path, explicit: dict[str, Any]) -> dict[str, Any]:
    """[model] fields to apply for `train.init_from`: the checkpoint's, minus those the user set explicitly.

    `explicit` holds the [model] values from the user's config file and overrides; one that contradicts
    the checkpoint on a LOCKED_FIELDS key is a ConfigError (the weights could not load into that model).
    """
    hf = model_config_from_hf(hf_dir)
    hf.setdefault("moe_experts", 0)  # a dense checkpoint: dense, whatever a recipe says
    for key in LOCKED_FIELDS:
        if key in explicit and key in hf and explicit[key] != hf[key]:
            raise ConfigError(f"config: model.{key} = {explicit[key]!r} contradicts --init-from {hf_dir} "
                              f"(its config.json gives {hf[key]!r}); drop that model setting")
    if hf["arch"] == "gpt2" and explicit.get("seq_len", 0) > hf["seq_len"]:
        raise ConfigError(f"config: model.seq_len = {explicit['seq_len']} exceeds the {hf['seq_len']} learned "
                          f"positions of --init-from {hf_dir}; use model.seq_len <= {hf['seq_len']}")
    return {k: v for k, v in hf.items() if k not in explicit}


def hf_config(cfg: ModelConfig, eot_id: int) -> dict[str, Any]:
    """config.json for transformers: GPT2LMHeadModel for arch gpt2, else the Llama-family class of the arch
    (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM)."""
    if cfg.arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": cfg.n_layers,
                "n_embd": cfg.dim, "n_head": cfg.n_heads, "n_inner": ffn_hidden_dim(cfg), "n_positions": cfg.seq_len,
                "vocab_size": cfg.vocab_size, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
                "initializer_range": cfg.init_std, "bos_token_id": eot_id, "eos_token_id": eot_id,
                "torch_dtype": "float32"}
    family = {"architectures": [_FAMILY[cfg.arch][1]], "model_type": cfg.arch, "num_hidden_layers": cfg.n_layers,
              "hidden_size": cfg.dim, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
              "head_dim": head_size(cfg), "intermediate_size": ffn_hidden_dim(cfg), "vocab_size": cfg.vocab_size,
              "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
              "rope_scaling": None, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
              "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
              "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32"}
    if cfg.arch in SLIDING_WINDOW_ARCHS:  # null: full causal attention (Mistral's default would be 4096)
        family["sliding_window"] = cfg.sliding_window or None
    if cfg.arch in ("qwen2", "qwen3"):
        family |= {"use_sliding_window": False, "sliding_window": None}
    if cfg.arch == "phi3":  # Phi-3's default pad id (32000) must lie inside the vocabulary
        family["pad_token_id"] = eot_id
    if cfg.objective == "mlm":  # the Llama block attending both ways, its output the MLM head: EuroBERT exactly
        family |= {"architectures": ["EuroBertForMaskedLM"], "model_type": "eurobert", "pad_token_id": eot_id}
    return moe_config_json(cfg, family) if cfg.moe_experts else family


# ---- state dicts ---------------------------------------------------------------------------------

def to_hf(state: dict[str, Tensor], cfg: ModelConfig, moe_kind: str | None = None) -> dict[str, Tensor]:
    """leantrain state dict -> HF state dict (names, GPT-2's fused and transposed Conv1D layouts, Phi-3's fused
    qkv_proj and gate_up_proj, MoE blocks in the layout of `moe_kind` or else of `moe_family(cfg)`).

    A tied output projection is left out, as transformers saves it.
    """
    out: dict[str, Tensor] = {}
    moe_kind = (moe_kind or moe_family(cfg)) if cfg.moe_experts else None
    gpt2 = cfg.arch == "gpt2"
    root = "transformer." if gpt2 else "model."
    table = _GPT2_NAMES if gpt2 else _LLAMA_NAMES
    for name, t in state.items():
        if name == "output.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = t
            continue
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            module, leaf = rest.rsplit(".", 1)
            prefix = f"{root}{'h' if gpt2 else 'layers'}.{i}."
            if moe_kind and rest.startswith("feed_forward.") and is_moe_layer(cfg, int(i)):
                out.update(moe_tensor_to_hf(moe_kind, prefix, rest, t, cfg))
                continue
            if gpt2 and module in ("attention.wq", "attention.wk", "attention.wv"):
                if module == "attention.wq":  # q, k, v fused into c_attn, Conv1D weights are [in, out]
                    parts = [state[f"layers.{i}.attention.{w}.{leaf}"] for w in ("wq", "wk", "wv")]
                    fused = torch.cat(parts, dim=0)
                    out[f"{prefix}attn.c_attn.{leaf}"] = fused.t() if leaf == "weight" else fused
                continue
            fused_into = _phi3_fused_into(module) if cfg.arch == "phi3" else None
            if fused_into:
                hf_module, parts = fused_into
                if module == parts[0]:
                    out[f"{prefix}{hf_module}.{leaf}"] = torch.cat([state[f"layers.{i}.{p}.{leaf}"] for p in parts])
                continue
            hf_t = t.t() if gpt2 and leaf == "weight" and module.split(".")[0] in ("attention", "feed_forward") else t
            out[f"{prefix}{table[module]}.{leaf}"] = hf_t
        elif gpt2:
            hf_name = {"tok_embeddings": "wte", "pos_embeddings": "wpe", "norm": "ln_f"}[name.split(".")[0]]
            out[f"{root}{hf_name}.{name.split('.', 1)[1]}"] = t
        else:
            out[{"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}[name]] = t
    return out


def from_hf(hf: dict[str, Tensor], cfg: ModelConfig, moe_kind: str | None = None) -> dict[str, Tensor]:
    """HF state dict (already checked against `to_hf` names and shapes) -> leantrain state dict; MoE blocks are
    read in the layout of `moe_kind` (the folder's model_type) or else of `moe_family(cfg)`."""
    moe_kind = (moe_kind or moe_family(cfg)) if cfg.moe_experts else None
    gpt2 = cfg.arch == "gpt2"
    root = "transformer." if gpt2 else "model."
    table = _GPT2_NAMES if gpt2 else _LLAMA_NAMES
    out: dict[str, Tensor] = {}
    emb = hf[f"{root}{'wte' if gpt2 else 'embed_tokens'}.weight"]
    out["tok_embeddings.weight"] = emb
    out["output.weight"] = emb if cfg.tie_embeddings else hf["lm_head.weight"]
    if gpt2:
        out["pos_embeddings.weight"] = hf[f"{root}wpe.weight"]
        out["norm.weight"], out["norm.bias"] = hf[f"{root}ln_f.weight"], hf[f"{root}ln_f.bias"]
    else:
        out["norm.weight"] = hf["model.norm.weight"]
    q, kv = cfg.n_heads * head_size(cfg), cfg.n_kv_heads * head_size(cfg)
    for i in range(cfg.n_layers):
        prefix = f"{root}{'h' if gpt2 else 'layers'}.{i}."
        for module, hf_module in table.items():
            for leaf in ("weight", "bias"):  # the Llama family's tensors present (load_hf_weights checked them)
                key = f"{prefix}{hf_module}.{leaf}"
                if key not in hf and not gpt2:
                    continue
                t = hf[key]
                linear = leaf == "weight" and module.split(".")[0] in ("attention", "feed_forward")
                out[f"layers.{i}.{module}.{leaf}"] = t.t() if gpt2 and linear else t
        if moe_kind and is_moe_layer(cfg, i):  # the dense names above were absent; the experts' are here
            out |= {f"layers.{i}.{k}": v for k, v in moe_tensors_from_hf(hf, moe_kind, prefix, cfg).items()}
        if cfg.arch == "phi3":
            for hf_module, parts in _PHI3_FUSED.items():
                fused = hf[f"{prefix}{hf_module}.weight"]
                sizes = [q, kv, kv] if len(parts) == 3 else [fused.size(0) // 2] * 2
                for p, part in zip(parts, fused.split(sizes), strict=True):
                    out[f"layers.{i}.{p}.weight"] = part
        if gpt2:
            for leaf in ("weight", "bias"):
                fused = hf[f"{prefix}attn.c_attn.{leaf}"]
                fused = fused.t() if leaf == "weight" else fused
                for w, part in zip(("wq", "wk", "wv"), fused.split([q, kv, kv]), strict=True):
                    out[f"layers.{i}.attention.{w}.{leaf}"] = part
    return out


def _phi3_fused_into(module: str) -> tuple[str, tuple[str, ...]] | None:
    """The Phi-3 fused tensor a leantrain linear is part of (its HF name and all its parts), or None."""
    return next(((name, parts) for name, parts in _PHI3_FUSED.items() if module in parts), None)


# ---- reading and writing safetensors folders ------------------------------------------------------

def read_hf_weights(hf_dir: str | Path) -> dict[str, Tensor]:
    """Every tensor of a folder's model.safetensors, or of the shards its index names."""
    from safetensors.torch import load_file

    d = Path(hf_dir)
    index, single = d / "model.safetensors.index.json", d / "model.safetensors"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, UnicodeDecodeError) as e:
            raise HFFormatError(f"{index} is not a safetensors index ({type(e).__name__}); re-save the model") from None
    elif single.is_file():
        files = [single.name]
    elif (d / "pytorch_model.bin").is_file() or (d / "pytorch_model.bin.index.json").is_file():
        raise HFFormatError(f"{d} holds pickled pytorch_model.bin weights, which leantrain does not load; "
                            "re-save them with model.save_pretrained(DIR, safe_serialization=True)")
    else:
        raise HFFormatError(f"{d} has no model.safetensors or model.safetensors.index.json; "
                            "save the model with model.save_pretrained(DIR)")
    tensors: dict[str, Tensor] = {}
    for name in files:
        p = d / name
        if not p.is_file():
            raise HFFormatError(f"{p} is missing but {index.name} names it; copy the whole model folder")
        try:
            tensors.update(load_file(str(p)))
        except Exception as e:  # the Rust reader raises its own types on damage  # noqa: BLE001
            raise HFFormatError(f"{p} cannot be read as safetensors ({str(e).splitlines()[0][:200]}); "
                                "re-save or re-copy it") from None
    return tensors


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path) -> None:
    """Copy the weights of a local HF folder into `model` (a plain, unwrapped leantrain Transformer).

    Names and shapes are checked against what `to_hf` of this model expects, so a mismatch names the HF
    tensor and both shapes. GPT-2 position tables longer than model.seq_len are cut to it.
    """
    cfg: ModelConfig = model.cfg
    expected_cfg = model_config_from_hf(hf_dir)  # refuses unsupported architectures first
    if expected_cfg["arch"] != cfg.arch:
        raise HFFormatError(f"{hf_dir} is a {expected_cfg['arch']} checkpoint but model.arch = {cfg.arch}; "
                            f"set --model.arch={expected_cfg['arch']} (--init-from does)")
    kind = read_hf_config(hf_dir).get("model_type")
    moe_kind = kind if kind in MOE_FAMILIES else None
    if bool(moe_kind) != bool(cfg.moe_experts):
        what = f"a mixture-of-experts {kind}" if moe_kind else "a dense"
        raise HFFormatError(f"{hf_dir} is {what} checkpoint but model.moe_experts = {cfg.moe_experts}; drop the "
                            "moe_* settings so they come from its config.json (--init-from does)")
    hf = read_hf_weights(hf_dir)
    if moe_kind:
        hf = unfuse_experts(hf, moe_kind)
    gpt2 = cfg.arch == "gpt2"
    root = "transformer." if gpt2 else "model."
    if hf and not any(k.startswith(root) for k in hf):  # saved from the bare GPT2Model / LlamaModel
        hf = {k if k.startswith("lm_head.") else root + k: v for k, v in hf.items()}
    # names and shapes only: mapped on meta tensors, so no weight is copied for the check
    meta = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict().items()}
    want = {k: _shape(v) for k, v in to_hf(meta, cfg, moe_kind).items()}
    wpe = f"{root}wpe.weight"
    if gpt2 and wpe in hf and hf[wpe].dim() == 2 and hf[wpe].size(0) > cfg.seq_len:
        hf[wpe] = hf[wpe][: cfg.seq_len]
    missing = [k for k in want if k not in hf]
    if missing:
        hint = " (the checkpoint ties its embeddings: set model.tie_embeddings = true)" if missing == [
            "lm_head.weight"] else ""
        raise HFFormatError(f"{hf_dir}: {len(missing)} tensors the model needs are missing, first "
                            f"{missing[0]}{hint}; the folder does not match the [model] config")
    extra = [k for k in hf if k not in want and not _IGNORED.match(k) and not (k == "lm_head.weight"
                                                                               and cfg.tie_embeddings)]
    if extra:
        raise HFFormatError(f"{hf_dir}: {len(extra)} tensors the model has no place for, first {extra[0]}; "
                            f"the folder does not match the [model] config (n_layers = {cfg.n_layers}?)")
    for k, shape in want.items():
        if _shape(hf[k]) != shape:
            raise HFFormatError(f"{hf_dir}: {k} has shape {_shape(hf[k])} but the model expects {shape}; "
                                "make the [model] config match the checkpoint's config.json (--init-from does)")
    ours = from_hf(hf, cfg, moe_kind)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.copy_(ours[name])


def load_hf_export(hf_dir: str | Path, checkpoint: str | None = None) -> tuple[torch.nn.Module, Any]:
    """A `leantrain export --format hf` folder (or another Llama-family HF folder) as a leantrain Transformer in
    eval mode and its `tokenizers` Tokenizer, for the commands that generate from a run or an export (serve,
    synth), which come here once the folder is not a run; `checkpoint` is their --checkpoint, refused here."""
    from tokenizers import Tokenizer

    from leantrain.model import Transformer

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir} is neither a run directory (config.toml) nor a Hugging Face export "
                              "(config.json); pass the folder `leantrain train` or `leantrain export` wrote")
    if checkpoint is not None:
        raise LeantrainError("--checkpoint applies to a run directory, not to an exported folder; drop it")
    with torch.device("cpu"):
        model = Transformer(ModelConfig(**model_config_from_hf(hf_dir)))
    load_hf_weights(model, hf_dir)
    if not (hf_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{hf_dir / 'tokenizer.json'} is missing; export the run again with "
                              "`leantrain export RUN --format hf`")
    return model.eval(), Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
