"""Mixture-of-experts models in the Hugging Face format, both ways (docs/moe.md, "Export and import").

leantrain's MoE block (model/moe.py) computes exactly what one of four transformers architectures computes,
depending on its settings, so export picks that one and import reads all four (`norm_topk_prob` is always
whether the chosen gates are normalised: moe_gate_norm, auto = top_k > 1):

- Mixtral (MixtralForCausalLM): arch llama, softmax router, normalised gates, every block MoE, no shared experts.
- Qwen2-MoE (Qwen2MoeForCausalLM): arch llama (`qkv_bias` false) or qwen2 (true), softmax router, every N-th block
  MoE (`decoder_sparse_step`), a shared expert scaled by sigmoid(`shared_expert_gate`) (moe_shared_gate), or none:
  then a zero-width shared expert, which adds exactly 0.
- Qwen3-MoE (Qwen3MoeForCausalLM): arch qwen3 (q/k norms), softmax router, every N-th block MoE, no shared experts.
- GLM-4.5 MoE (Glm4MoeForCausalLM): arch llama, sigmoid router whose choice adds DeepSeek-V3's per-expert bias
  (`e_score_correction_bias`: our `expert_bias`; one group, routed_scaling_factor 1), ungated shared experts, MoE
  from block `first_k_dense_replace` on.

Any other combination is refused in one line naming the setting and the change that makes it exportable. The
expert tensors are written in the per-expert layout of transformers' checkpoints (`experts.{e}.gate_proj.weight`,
`[hidden, dim]`; transformers 5 fuses them on load); import reads that layout and the fused one that
`save_pretrained(save_original_format=False)` writes. model/hf.py calls this for the MoE blocks and does the rest.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from leantrain.config import ModelConfig
from leantrain.errors import ConfigError
from leantrain.model.flops import is_moe_layer, moe_hidden_dim

# model_type of config.json -> the transformers class
MOE_FAMILIES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                "glm4_moe": "Glm4MoeForCausalLM"}
# per family: the MoE block's module name, its experts' (gate, up, down) names, the shared experts' module name
_LAYOUT = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2"), None),
           "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), "mlp.shared_expert"),
           "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), None),
           "glm4_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), "mlp.shared_experts")}
_OURS = ("w1", "w3", "w2")  # gate, up, down: [experts, in, out]


def _first_moe_layer(cfg: ModelConfig) -> int:
    return next((i for i in range(cfg.n_layers) if is_moe_layer(cfg, i)), cfg.n_layers)


def gates_normalised(cfg: ModelConfig) -> bool:
    """Whether the chosen gates are normalised to sum to 1 (model/moe.py): transformers' `norm_topk_prob`."""
    return cfg.moe_gate_norm == "on" or (cfg.moe_gate_norm == "auto" and cfg.moe_top_k > 1)


def moe_family(cfg: ModelConfig) -> str:
    """The model_type of the transformers architecture that computes what this MoE config computes; a
    ConfigError naming the setting and the fix where none does."""
    where = "config: Hugging Face export of this mixture-of-experts model:"
    if cfg.arch in ("qwen2", "qwen3"):  # their attention: Qwen2-MoE (q/k/v biases), Qwen3-MoE (q/k norms)
        name = {"qwen2": "Qwen2-MoE", "qwen3": "Qwen3-MoE"}[cfg.arch]
        if cfg.moe_router == "sigmoid" or cfg.moe_balance == "bias":
            setting = "moe_router = sigmoid" if cfg.moe_router == "sigmoid" else "moe_balance = bias"
            raise ConfigError(f"{where} model.arch = {cfg.arch} with {setting} has no transformers architecture "
                              f"({name} routes by a softmax, without a selection bias); train with moe_router = "
                              "softmax and moe_balance = aux, or arch = llama (exports as GLM-4.5 MoE)")
        if cfg.moe_shared_experts and (cfg.arch == "qwen3" or not cfg.moe_shared_gate):
            fix = "arch = qwen2 with moe_shared_gate = true" if cfg.arch == "qwen3" else "moe_shared_gate = true"
            raise ConfigError(f"{where} model.moe_shared_experts = {cfg.moe_shared_experts} with arch = {cfg.arch} "
                              f"has no transformers architecture ({name} has {'no' if cfg.arch == 'qwen3' else 'gated'}"
                              f" shared experts); train with moe_shared_experts = 0 or {fix}")
        return f"{cfg.arch}_moe"
    if cfg.moe_router == "sigmoid":
        if cfg.moe_shared_gate:
            raise ConfigError(f"{where} model.moe_shared_gate = true with moe_router = sigmoid has no transformers "
                              "architecture (GLM-4.5 MoE, the sigmoid one, does not gate its shared experts); set "
                              "moe_shared_gate = false, or moe_router = softmax (Qwen2-MoE)")
        first = _first_moe_layer(cfg)
        if not all(is_moe_layer(cfg, i) for i in range(first, cfg.n_layers)):
            raise ConfigError(f"{where} model.moe_every = {cfg.moe_every} with moe_router = sigmoid has no "
                              "transformers architecture (GLM-4.5 MoE makes every block MoE after the first dense "
                              "ones); set moe_every = 1, or moe_router = softmax (Qwen2-MoE's decoder_sparse_step)")
        return "glm4_moe"
    if cfg.moe_balance == "bias":
        raise ConfigError(f"{where} model.moe_balance = bias with moe_router = softmax has no transformers "
                          "architecture (Mixtral and Qwen2-MoE choose experts without a bias); train with "
                          "moe_balance = aux, or moe_router = sigmoid (exports as GLM-4.5 MoE)")
    if cfg.moe_shared_experts and not cfg.moe_shared_gate:
        raise ConfigError(f"{where} model.moe_shared_experts = {cfg.moe_shared_experts} with moe_router = softmax "
                          "and no shared gate has no transformers architecture (Qwen2-MoE gates its shared expert); "
                          "train with moe_shared_gate = true, or moe_router = sigmoid (exports as GLM-4.5 MoE)")
    if cfg.moe_shared_experts or cfg.moe_every > 1 or not gates_normalised(cfg):
        return "qwen2_moe"
    return "mixtral"


def moe_config_json(cfg: ModelConfig, base: dict[str, Any]) -> dict[str, Any]:
    """config.json of the MoE model: the Llama-family fields of `base` (hf_config's) turned into `moe_family`'s."""
    kind = moe_family(cfg)
    E, k, hidden, shared = cfg.moe_experts, cfg.moe_top_k, moe_hidden_dim(cfg), cfg.moe_shared_experts
    c = base | {"architectures": [MOE_FAMILIES[kind]], "model_type": kind, "num_experts_per_tok": k,
                "router_aux_loss_coef": cfg.moe_aux_weight, "output_router_logits": False}
    if kind == "mixtral":
        return c | {"num_local_experts": E, "intermediate_size": hidden, "sliding_window": None,
                    "router_jitter_noise": 0.0}
    norm = gates_normalised(cfg)
    if kind in ("qwen2_moe", "qwen3_moe"):
        c |= {"num_experts": E, "moe_intermediate_size": hidden, "decoder_sparse_step": cfg.moe_every,
              "mlp_only_layers": [], "norm_topk_prob": norm, "use_sliding_window": False, "sliding_window": None}
        if kind == "qwen3_moe":
            return c | {"attention_bias": False}
        return c | {"shared_expert_intermediate_size": hidden * shared, "qkv_bias": cfg.arch == "qwen2"}
    c.pop("rope_scaling", None)
    return c | {"n_routed_experts": E, "moe_intermediate_size": hidden, "n_shared_experts": shared,
                "first_k_dense_replace": _first_moe_layer(cfg), "norm_topk_prob": norm, "routed_scaling_factor": 1.0,
                "n_group": 1, "topk_group": 1, "use_qk_norm": False, "attention_bias": False,
                "num_nextn_predict_layers": 0,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0}}


def moe_fields_from_hf(c: dict[str, Any], kind: str) -> tuple[dict[str, Any], list[str]]:
    """The [model] moe_* fields (and the arch, where the attention tells) of an MoE config.json (`kind` in
    MOE_FAMILIES), and what leantrain's MoE would compute differently (each a phrase naming the config.json
    field; empty when the model maps exactly)."""
    problems: list[str] = []

    def size(key: str, default: int | None = None, low: int = 1) -> int:
        v = c.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            problems.append(f"{key} = {v!r} is not allowed (expected an integer >= {low})")
            return max(low, 1)
        return v

    top_k = size("num_experts_per_tok", 2)
    norm = bool(c.get("norm_topk_prob", kind in ("mixtral", "glm4_moe")))  # Mixtral always normalises
    fields: dict[str, Any] = {"moe_router": "softmax", "moe_shared_gate": False, "moe_every": 1,
                              "moe_shared_experts": 0, "moe_top_k": top_k,
                              "moe_gate_norm": "auto" if norm == (top_k > 1) else "on" if norm else "off"}
    if kind == "mixtral":
        fields |= {"moe_experts": size("num_local_experts", 8), "moe_hidden": size("intermediate_size")}
        window = c.get("sliding_window")
        if window is not None and window < c.get("max_position_embeddings", 131072):
            problems.append(f"sliding_window = {window!r} is not supported (leantrain's MoE model attends to every "
                            "earlier position)")
    elif kind in ("qwen2_moe", "qwen3_moe"):
        hidden = size("moe_intermediate_size")
        experts = "num_experts" if "num_experts" in c or kind == "qwen2_moe" else "num_local_experts"
        fields |= {"moe_experts": size(experts, 60 if kind == "qwen2_moe" else 128), "moe_hidden": hidden,
                   "moe_every": size("decoder_sparse_step", 1), "arch": "qwen3"}
        if kind == "qwen2_moe":
            width = size("shared_expert_intermediate_size", 0, low=0)
            if width % hidden:
                problems.append(f"shared_expert_intermediate_size = {width} is not a multiple of "
                                f"moe_intermediate_size = {hidden} (leantrain's shared experts are expert-wide)")
            fields |= {"moe_shared_experts": width // hidden, "moe_shared_gate": width > 0,
                       "arch": "qwen2" if c.get("qkv_bias", True) else "llama"}
        if c.get("mlp_only_layers"):
            problems.append(f"mlp_only_layers = {str(c['mlp_only_layers'])[:40]} is not supported (leantrain's MoE "
                            "blocks are every decoder_sparse_step-th one)")
    else:
        first, layers = size("first_k_dense_replace", 1, low=0), c.get("num_hidden_layers")
        every = 1 if first == 0 else layers if isinstance(layers, int) and first == layers - 1 else None
        if every is None:
            problems.append(f"first_k_dense_replace = {first} is not supported (leantrain's MoE blocks are every "
                            "moe_every-th one: first_k_dense_replace 0, or all but the last block dense)")
        fields |= {"moe_experts": size("n_routed_experts"), "moe_hidden": size("moe_intermediate_size"),
                   "moe_every": every or 1, "moe_shared_experts": size("n_shared_experts", 1, low=0),
                   "moe_router": "sigmoid", "moe_balance": "bias"}
        for key, ok in (("routed_scaling_factor", 1.0), ("n_group", 1), ("topk_group", 1), ("use_qk_norm", False)):
            if key in c and c[key] != ok:
                problems.append(f"{key} = {c[key]!r} is not supported (leantrain's sigmoid router has {key} = {ok})")
    if top_k > fields["moe_experts"]:
        problems.append(f"num_experts_per_tok = {top_k} is more than the {fields['moe_experts']} experts")
    return fields, problems


# ---- tensors -----------------------------------------------------------------------------------

def moe_tensor_to_hf(kind: str, prefix: str, rest: str, t: Tensor, cfg: ModelConfig) -> dict[str, Tensor]:
    """One tensor of an MoE block (`rest`: its name under `layers.N.`, e.g. feed_forward.w1) -> its HF tensors
    under `prefix` (model.layers.N.): one per expert for the 3-D expert weights."""
    block, names, shared = _LAYOUT[kind]
    leaf = rest.removeprefix("feed_forward.")
    if leaf == "router.weight":
        out = {f"{prefix}{block}.gate.weight": t}
        dim = t.size(1)
        if shared and not cfg.moe_shared_experts:  # a zero-width shared expert: adds exactly 0
            out |= {f"{prefix}{shared}.{names[0]}.weight": t.new_zeros(0, dim),
                    f"{prefix}{shared}.{names[1]}.weight": t.new_zeros(0, dim),
                    f"{prefix}{shared}.{names[2]}.weight": t.new_zeros(dim, 0)}
            if kind == "qwen2_moe":
                out[f"{prefix}mlp.shared_expert_gate.weight"] = t.new_zeros(1, dim)
        return out
    if leaf in _OURS:
        name = names[_OURS.index(leaf)]
        return {f"{prefix}{block}.experts.{e}.{name}.weight": t[e].t() for e in range(t.size(0))}
    if leaf.startswith("shared.") and shared:  # shared.w1.weight: a dense SwiGLU's Linear, already [out, in]
        return {f"{prefix}{shared}.{names[_OURS.index(leaf.split('.')[1])]}.weight": t}
    if leaf == "shared_gate.weight" and kind == "qwen2_moe":
        return {f"{prefix}mlp.shared_expert_gate.weight": t}
    if leaf == "expert_bias":  # the selection bias: GLM-4.5 MoE has it; the others choose without one (zero here)
        return {f"{prefix}mlp.gate.e_score_correction_bias": t} if kind == "glm4_moe" else {}
    raise ConfigError(f"config: the MoE tensor {rest} has no place in a {MOE_FAMILIES[kind]} checkpoint")


def moe_tensors_from_hf(hf: dict[str, Tensor], kind: str, prefix: str, cfg: ModelConfig) -> dict[str, Tensor]:
    """The leantrain tensors (names under `layers.N.`) of one MoE block from HF tensors (names checked)."""
    block, names, shared = _LAYOUT[kind]
    out = {"feed_forward.router.weight": hf[f"{prefix}{block}.gate.weight"]}
    for ours, theirs in zip(_OURS, names, strict=True):
        out[f"feed_forward.{ours}"] = torch.stack([hf[f"{prefix}{block}.experts.{e}.{theirs}.weight"].t()
                                                  for e in range(cfg.moe_experts)])
        if shared and cfg.moe_shared_experts:
            out[f"feed_forward.shared.{ours}.weight"] = hf[f"{prefix}{shared}.{theirs}.weight"]
    if cfg.moe_shared_gate:
        out["feed_forward.shared_gate.weight"] = hf[f"{prefix}mlp.shared_expert_gate.weight"]
    bias = f"{prefix}mlp.gate.e_score_correction_bias"
    out["feed_forward.expert_bias"] = hf[bias].float() if kind == "glm4_moe" else torch.zeros(cfg.moe_experts)
    return out


_FUSED = re.compile(r"(.*\.layers\.\d+\.)mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)")


def unfuse_experts(hf: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """transformers 5's in-memory layout (`mlp.experts.gate_up_proj` [E, 2*hidden, dim], `down_proj`
    [E, dim, hidden]; Mixtral's block renamed `mlp`), as save_pretrained(save_original_format=False) writes it,
    -> the per-expert checkpoint layout; other tensors pass as they are."""
    block, (gate, up, down), _ = _LAYOUT[kind]
    out: dict[str, Tensor] = {}
    for key, t in hf.items():
        m = _FUSED.fullmatch(key)
        if not m or (m.group(2) == "gate.weight" and kind != "mixtral"):
            out[key] = t
            continue
        p = f"{m.group(1)}{block}."
        if m.group(2) == "gate.weight":
            out[f"{p}gate.weight"] = t
        elif m.group(2) == "experts.gate_up_proj":
            g, u = t.chunk(2, dim=1)
            for e in range(t.size(0)):
                out[f"{p}experts.{e}.{gate}.weight"], out[f"{p}experts.{e}.{up}.weight"] = g[e], u[e]
        else:
            out |= {f"{p}experts.{e}.{down}.weight": t[e] for e in range(t.size(0))}
    return out
