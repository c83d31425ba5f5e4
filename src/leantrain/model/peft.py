"""PEFT's LoRA adapter format, both ways: leantrain adapters <-> `adapter_config.json` + `adapter_model.safetensors`.

PEFT names an adapter tensor by the Hugging Face module it sits on
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so the mapping follows `model/hf.py`'s
`to_hf`: `peft_layout` runs `to_hf` once on one-column tensors that carry each linear's index, and reads
back which HF module (and which rows of it) every leantrain linear became. That covers fused HF modules
too (GPT-2's `c_attn` holds wq, wk and wv): leantrain's per-module adapters are stacked along the rank,
with B block-diagonal over the fused rows, which computes exactly the same update; an imported adapter on a
fused module gives each part the shared A and its own rows of B, exactly again. Because a PEFT config has
one rank, every module is padded to the largest stacked rank with zero rows/columns and `lora_alpha` is
scaled with it, so alpha / r (the scale) is unchanged.

Like the rest of `model/`, this knows nothing of training; export/peft.py writes the folders and the
trainer calls `load_adapter` for `finetune.adapter`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from leantrain.config import ModelConfig
from leantrain.errors import ConfigError
from leantrain.model.hf import HFFormatError, to_hf

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model


@dataclass(frozen=True)
class Slot:
    """Where a leantrain linear lives in the HF model: rows [lo, hi) of the `rows`-row module `hf`."""

    hf: str
    lo: int
    hi: int
    rows: int


def _linears(cfg: ModelConfig) -> dict[str, int]:
    """Every nn.Linear of the model that could hold an adapter: name -> out_features (built on meta)."""
    from leantrain.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    emb = model.tok_embeddings.weight
    return {n: m.out_features for n, m in model.named_modules()
            if type(m) is nn.Linear and m.weight is not emb}  # a tied output has no HF module of its own


def peft_layout(cfg: ModelConfig) -> dict[str, Slot]:
    """leantrain linear name -> its `Slot` in the HF model, for every layer (see the module docstring)."""
    linears = _linears(cfg)
    probe = {n: o for n, o in linears.items() if not n.startswith("layers.") or n.startswith("layers.0.")}
    ids = {n: i + 1 for i, n in enumerate(probe)}
    state = {f"{n}.weight": torch.full((o, 1), float(ids[n])) for n, o in probe.items()}
    try:
        hf = to_hf(state, cfg)
    except KeyError as e:
        raise ConfigError(f"adapters of model.arch = {cfg.arch} have no PEFT layout yet ({e} unmapped); export "
                          "the merged model with --format hf") from None
    slots0: dict[str, Slot] = {}
    for key, t in hf.items():
        if not key.endswith(".weight") or t.dim() != 2 or 1 not in t.shape:
            continue
        vals = t.flatten()
        for n, i in ids.items():
            rows = (vals == i).nonzero().flatten()
            if len(rows):
                lo, hi = int(rows[0]), int(rows[-1]) + 1
                if hi - lo != len(rows) or len(rows) != probe[n]:
                    raise ConfigError(f"adapters of model.arch = {cfg.arch}: {n} is not a row block of {key}; "
                                      "export the merged model with --format hf")
                slots0[n] = Slot(key.removesuffix(".weight"), lo, hi, len(vals))
    layout: dict[str, Slot] = {}
    for n in linears:
        if not n.startswith("layers."):
            if n in slots0:
                layout[n] = slots0[n]
            continue
        i, rest = n.split(".", 2)[1:]
        s = slots0.get(f"layers.0.{rest}")
        if s is not None:
            layout[n] = Slot(re.sub(r"(?<=\.)0(?=\.)", i, s.hf, count=1), s.lo, s.hi, s.rows)
    return layout


def _modules_of(tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """{module: (lora_a, lora_b)} of a leantrain state dict's adapter tensors."""
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for k in tensors:
        if k.endswith(".lora_a"):
            m = k.removesuffix(".lora_a")
            out[m] = (tensors[k], tensors[f"{m}.lora_b"])
    return out


def _target_modules(adapted: set[str], every: set[str]) -> list[str]:
    """PEFT's target_modules for exactly the `adapted` HF modules: leaf names (q_proj) where they select
    exactly those, else two-part names (attn.c_proj), else the full module names."""
    for depth in (1, 2):
        names = {".".join(h.split(".")[-depth:]) for h in adapted}
        if {h for h in every if any(h == s or h.endswith("." + s) for s in names)} == adapted:
            return sorted(names)
    return sorted(adapted)


def to_peft(tensors: dict[str, Tensor], cfg: ModelConfig, alpha: float, dropout: float) -> tuple[
        dict[str, Tensor], dict[str, Any]]:
    """leantrain adapter tensors (`...wq.lora_a`, `...wq.lora_b`) -> (PEFT tensors, adapter_config fields)."""
    layout = peft_layout(cfg)
    modules = _modules_of(tensors)
    if not modules:
        raise ConfigError("the checkpoint holds no LoRA adapter tensors; export it with --format hf")
    unmapped = [m for m in modules if m not in layout]
    if unmapped:
        raise ConfigError(f"the adapter on {unmapped[0]} has no Hugging Face module to sit on; export the merged "
                          "model with --format hf")
    ranks = {a.shape[0] for a, _ in modules.values()}
    if len(ranks) != 1:
        raise ConfigError(f"adapters of several ranks {sorted(ranks)} do not fit one PEFT config; export the "
                          "merged model with --format hf")
    r = ranks.pop()
    groups: dict[str, list[str]] = {}
    for m in modules:
        groups.setdefault(layout[m].hf, []).append(m)
    big = r * max(len(g) for g in groups.values())
    out: dict[str, Tensor] = {}
    for hf, members in groups.items():
        a0 = modules[members[0]][0]
        a = torch.zeros(big, a0.shape[1], dtype=torch.float32)
        b = torch.zeros(layout[members[0]].rows, big, dtype=torch.float32)
        for j, m in enumerate(members):
            lora_a, lora_b = modules[m]
            s = layout[m]
            a[j * r:(j + 1) * r] = lora_a.float()
            b[s.lo:s.hi, j * r:(j + 1) * r] = lora_b.float()
        out[f"{PREFIX}{hf}.lora_A.weight"] = a
        out[f"{PREFIX}{hf}.lora_B.weight"] = b
    every = {s.hf for s in layout.values()}
    fields = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": big, "lora_alpha": alpha * big / r,
              "lora_dropout": dropout, "target_modules": _target_modules(set(groups), every), "bias": "none",
              "fan_in_fan_out": cfg.arch == "gpt2", "modules_to_save": None, "init_lora_weights": True,
              "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
              "layers_to_transform": None, "layers_pattern": None, "inference_mode": True}
    return out, fields


# ---- reading a PEFT folder ------------------------------------------------------------------------

@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter in leantrain's terms: the [finetune] fields it implies and its tensors."""

    rank: int
    alpha: float
    dropout: float
    targets: str
    tensors: dict[str, Tensor]  # leantrain names: layers.0.attention.wq.lora_a / .lora_b
    # base weights PEFT saved beside the adapters (`save_embedding_layers`: lm_head, ...), leantrain names;
    # PeftModel.from_pretrained puts them into the base model, and so does `load_adapter`
    base: dict[str, Tensor] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        return {"lora_rank": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "lora_targets": self.targets}


def _compress(names: list[str], layout: dict[str, Slot]) -> str:
    """leantrain lora_targets for exactly `names`: leaf names (wq) where every layer has them, else full names."""
    chosen = set(names)
    out: list[str] = []
    for leaf in dict.fromkeys(n.rsplit(".", 1)[-1] for n in names):
        every = {n for n in layout if n.rsplit(".", 1)[-1] == leaf}
        mine = {n for n in chosen if n.rsplit(".", 1)[-1] == leaf}
        out += [leaf] if mine == every else sorted(mine)
    return ",".join(out)


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json of a local PEFT adapter folder, with both files checked to be there."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise HFFormatError(f"adapter {d} is not a folder; pass a PEFT adapter folder (model.save_pretrained(DIR) "
                            "of a PeftModel)")
    p = d / ADAPTER_CONFIG
    if not p.is_file():
        raise HFFormatError(f"adapter {d} has no {ADAPTER_CONFIG}; a PEFT adapter folder holds {ADAPTER_CONFIG} "
                            f"and {ADAPTER_WEIGHTS}")
    if not (d / ADAPTER_WEIGHTS).is_file():
        pickled = " (adapter_model.bin is pickled and not loaded: re-save with safe_serialization=True)" \
            if (d / "adapter_model.bin").is_file() else ""
        raise HFFormatError(f"adapter {d} has no {ADAPTER_WEIGHTS}{pickled}; save the adapter with "
                            "model.save_pretrained(DIR)")
    try:
        c = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise HFFormatError(f"{p} is not valid JSON ({type(e).__name__}); re-save the adapter") from None
    except OSError as e:
        raise HFFormatError(f"{p} cannot be read ({e.strerror or e}); check its permissions") from None
    if not isinstance(c, dict):
        raise HFFormatError(f"{p} holds a JSON {type(c).__name__}, not an object; re-save the adapter")
    return c


def read_peft(adapter_dir: str | Path, cfg: ModelConfig) -> PeftAdapter:
    """A PEFT LoRA adapter folder as leantrain adapters for a model of `cfg`; anything leantrain's LoRA would
    compute differently (DoRA, trained biases, per-module ranks, extra trained modules) is refused by name."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    c = read_adapter_config(d)
    where = d / ADAPTER_CONFIG
    if c.get("peft_type") != "LORA":
        raise HFFormatError(f"{where}: peft_type = {c.get('peft_type')!r} is not supported; leantrain loads LoRA "
                            "adapters (peft_type LORA)")
    problems = [f"{k} = {c[k]!r}" for k, ok in (("use_dora", False), ("bias", "none"), ("modules_to_save", None),
                                                ("rank_pattern", {}), ("alpha_pattern", {}),
                                                ("layers_to_transform", None), ("target_parameters", None))
                if c.get(k) not in (ok, None, [] if ok is None else ok)]
    if problems:
        raise HFFormatError(f"{where}: {', '.join(problems)} is not supported; leantrain's LoRA has one rank and "
                            "alpha, no DoRA, no trained biases or extra modules")
    r, alpha = c.get("r"), c.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise HFFormatError(f"{where}: r = {r!r} is not allowed; expected an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise HFFormatError(f"{where}: lora_alpha = {alpha!r} is not allowed; expected a number > 0")
    dropout = c.get("lora_dropout") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout <= 1:
        raise HFFormatError(f"{where}: lora_dropout = {dropout!r} is not allowed; expected a number in [0, 1]")
    if c.get("use_rslora"):  # scale alpha / sqrt(r) == (alpha * sqrt(r)) / r
        alpha = alpha * math.sqrt(r)
    layout = peft_layout(cfg)
    by_hf: dict[str, list[str]] = {}
    for n, s in layout.items():
        by_hf.setdefault(s.hf, []).append(n)
    leaves = sorted({h.rsplit(".", 1)[-1] for h in by_hf})
    targets = c.get("target_modules")
    if isinstance(targets, list):
        for t in targets:
            if not any(h == t or h.endswith(f".{t}") for h in by_hf):
                raise HFFormatError(f"{where}: target module {t!r} is not a linear layer leantrain can map for "
                                    f"model.arch = {cfg.arch} (it maps {', '.join(leaves)}); retrain the adapter "
                                    "on those modules")
    try:
        raw = load_file(str(d / ADAPTER_WEIGHTS))
    except Exception as e:  # the Rust reader raises its own types on damage  # noqa: BLE001
        raise HFFormatError(f"{d / ADAPTER_WEIGHTS} cannot be read as safetensors "
                            f"({str(e).splitlines()[0][:200]}); re-save or re-copy it") from None
    pairs: dict[str, dict[str, Tensor]] = {}
    saved_base: dict[str, Tensor] = {}
    for key, t in raw.items():
        b = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.base_layer\.weight", key)
        if b is not None and b.group(1) in by_hf and t.dim() == 2:
            saved_base[b.group(1)] = t
            continue
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None or m.group(1) not in by_hf:
            raise HFFormatError(f"{d / ADAPTER_WEIGHTS}: tensor {key} is on a module leantrain cannot map for "
                                f"model.arch = {cfg.arch} (it maps {', '.join(leaves)}); retrain the adapter on "
                                "those modules")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise HFFormatError(f"{d / ADAPTER_WEIGHTS} holds no LoRA tensors; re-save the adapter")
    tensors: dict[str, Tensor] = {}
    for hf, ab in sorted(pairs.items()):
        first = layout[by_hf[hf][0]]
        if set(ab) != {"A", "B"} or ab["A"].dim() != 2 or list(ab["B"].shape) != [first.rows, ab["A"].shape[0]] \
                or ab["A"].shape[0] != r:
            shapes = {k: list(v.shape) for k, v in ab.items()}
            raise HFFormatError(f"{d / ADAPTER_WEIGHTS}: {hf} has lora tensors {shapes} but r = {r} and the module "
                                f"has {first.rows} outputs; the adapter does not fit this model")
    base: dict[str, Tensor] = {}
    for n, s in layout.items():  # in the model's order
        if s.hf in saved_base:
            w = saved_base[s.hf]
            base[f"{n}.weight"] = (w if w.shape[0] == s.rows else w.t())[s.lo:s.hi].float().clone()
        if s.hf in pairs:
            tensors[f"{n}.lora_a"] = pairs[s.hf]["A"].float().clone()
            tensors[f"{n}.lora_b"] = pairs[s.hf]["B"][s.lo:s.hi].float().clone()
    names = [k.removesuffix(".lora_a") for k in tensors if k.endswith(".lora_a")]
    return PeftAdapter(r, float(alpha), float(dropout), _compress(names, layout), tensors, base)


def adapter_fields(adapter_dir: str | Path, cfg: ModelConfig, explicit: dict[str, Any]) -> dict[str, Any]:
    """[finetune] fields to apply for `finetune.adapter`: the adapter's, minus those set explicitly. An explicit
    rank, alpha or target list that contradicts the adapter is a ConfigError (its tensors would not fit)."""
    fields = read_peft(adapter_dir, cfg).fields()
    for key in ("lora_rank", "lora_alpha", "lora_targets"):
        if key in explicit and explicit[key] != fields[key]:
            raise ConfigError(f"config: finetune.{key} = {explicit[key]!r} contradicts finetune.adapter {adapter_dir} "
                              f"(its {ADAPTER_CONFIG} gives {fields[key]!r}); drop that finetune setting")
    return {k: v for k, v in fields.items() if k not in explicit}


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str | Path) -> int:
    """Copy a PEFT adapter's tensors into `model`'s LoRA modules (applied with the fields `adapter_fields`
    gave); returns the number of modules filled. The adapted modules must be exactly the adapter's."""
    from leantrain.model.lora import LoRALinear

    adapter = read_peft(adapter_dir, model.cfg)
    mine = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    theirs = {k.removesuffix(".lora_a") for k in adapter.tensors if k.endswith(".lora_a")}
    if set(mine) != theirs:
        extra = sorted(set(mine) ^ theirs)[0]
        raise ConfigError(f"finetune.lora_targets adapts other modules than finetune.adapter {adapter_dir} "
                          f"(first difference: {extra}); drop finetune.lora_targets so the adapter sets it")
    params = dict(model.named_parameters())
    for name, w in adapter.base.items():
        if name not in params or params[name].shape != w.shape:
            raise ConfigError(f"finetune.adapter {adapter_dir} saves a base weight for {name} of shape "
                              f"{list(w.shape)} that the model does not have; the adapter does not fit the model")
        params[name].copy_(w)
    for n, m in mine.items():
        a, b = adapter.tensors[f"{n}.lora_a"], adapter.tensors[f"{n}.lora_b"]
        if m.lora_a.shape != a.shape:
            raise ConfigError(f"finetune.lora_rank = {m.rank} but finetune.adapter {adapter_dir} has rank "
                              f"{a.shape[0]}; drop finetune.lora_rank so the adapter sets it")
        m.lora_a.copy_(a)
        m.lora_b.copy_(b)
    return len(mine)
