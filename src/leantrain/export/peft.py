"""Export a LoRA run's adapters in PEFT's layout, for `PeftModel.from_pretrained(base, DIR)`.

The folder holds `adapter_config.json` + `adapter_model.safetensors` (names and layout from model/peft.py)
next to nothing else. Its base is the Hugging Face folder the run started from
(`train.init_from`), named in `base_model_name_or_path`; a run that did not start from one gets its
(frozen, unmerged) base weights written as a Hugging Face folder in `DIR/base`, named there instead.
`--format hf` of the same run writes the merged model instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from leantrain.errors import ConfigError
from leantrain.export.hf import check_dtype, check_export_target, default_dtype, mark_export, publish, write_hf_folder
from leantrain.files import write_durable
from leantrain.model.lora import adapter_state_dict, is_adapter
from leantrain.model.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, to_peft

BASE = "base"


def export_peft(run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None,
                overwrite: bool = False, dtype: str | None = None) -> dict[str, Any]:
    """Write a LoRA run's adapters (newest good or given checkpoint) as a PEFT adapter folder; returns a summary.
    `dtype` applies to a written base (the adapter tensors stay float32, as PEFT keeps them)."""
    from safetensors.torch import save

    from leantrain.train.runs import load_trained

    out = Path(out_dir)
    if dtype is not None:
        check_dtype(dtype)
    check_export_target(out, run_dir, overwrite)
    model, tok, cfg, step, warnings = load_trained(run_dir, checkpoint, merge=False)
    if not cfg.finetune.lora_rank:
        raise ConfigError(f"{run_dir} has no LoRA adapters (finetune.lora_rank = 0); export the whole model with "
                          "--format hf")
    if cfg.model.moe_experts:  # PEFT's LoRA on 3-D expert weights has no layout here yet (docs/moe.md)
        raise ConfigError(f"{run_dir} is a mixture-of-experts model, whose adapters have no PEFT layout yet; export "
                          "the model with the adapters merged: --format hf")
    state = model.state_dict()
    tensors, fields = to_peft(adapter_state_dict(state), cfg.model, cfg.finetune.lora_alpha, cfg.finetune.lora_dropout)
    dtype = dtype or default_dtype(run_dir, cfg)
    base = Path(cfg.train.init_from).resolve() if cfg.train.init_from else None

    def fill(folder: Path) -> list[str]:
        files: list[str] = []
        if base is None:
            (folder / BASE).mkdir()
            base_state = {k: v for k, v in state.items() if not is_adapter(k)}
            files += [f"{BASE}/{f}" for f in write_hf_folder(folder / BASE, base_state, tok, cfg, run_dir, dtype)]
        where = str(base) if base is not None else str((out / BASE).resolve())
        write_durable(folder / ADAPTER_WEIGHTS, save({k: v.contiguous() for k, v in tensors.items()},
                                                     metadata={"format": "pt"}), sync_dir=False)
        write_durable(folder / ADAPTER_CONFIG, json.dumps({**fields, "base_model_name_or_path": where}, indent=2),
                      sync_dir=False)
        mark_export(folder, "peft", step, run_dir)
        return [*files, ADAPTER_CONFIG, ADAPTER_WEIGHTS]

    files = publish(out, fill)
    return {"out_dir": str(out), "step": step, "arch": cfg.model.arch, "files": sorted(files),
            "dtype": dtype, "base": str(base) if base is not None else str(out / BASE),
            "params": sum(t.numel() for t in tensors.values()), "warnings": warnings, "rank": fields["r"],
            "target_modules": fields["target_modules"]}
