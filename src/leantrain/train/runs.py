"""Reading a finished (or interrupted) run directory back: its config, tokenizer and weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from leantrain.config import Config, load_config
from leantrain.errors import CheckpointError, ConfigError
from leantrain.model import Transformer
from leantrain.model.lora import apply_lora, merge_lora
from leantrain.train.checkpoint import Checkpointer, read_checkpoint, restore


def load_trained(run_dir: str | Path, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                 merge: bool = True) -> tuple[Transformer, Tokenizer, Config, int, list[str]]:
    """(model in eval mode, tokenizer, config, step, warnings) from a run's newest good checkpoint.

    The model is a plain Transformer: a LoRA run's adapters come back merged into the weights, unless
    `merge` is False (PEFT export wants base and adapters apart)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.toml); pass the folder "
                              "that `leantrain train` printed")
    cfg = load_config(run_dir / "config.toml")
    warnings: list[str] = []
    if checkpoint is not None:
        if not Path(checkpoint).is_dir():  # a typo, not a damaged checkpoint
            raise CheckpointError(f"checkpoint {checkpoint} is not a folder; pass one of "
                                  f"{run_dir / 'checkpoints'}/step-*, or drop --checkpoint for the newest")
        snap = read_checkpoint(Path(checkpoint))
        warnings = list(snap.warnings)
    else:
        found = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep).load_latest()
        if found is None:
            raise CheckpointError(f"{run_dir} has no checkpoint yet; train it first (checkpoint.every sets how often)")
        _, snap, warnings = found
    model = Transformer(cfg.model)
    if cfg.finetune.lora_rank:  # a LoRA run: load base + adapters, then fold the adapters in
        apply_lora(model, cfg.finetune.lora_rank, cfg.finetune.lora_alpha, 0.0, cfg.finetune.lora_targets)
    if "quantization" in snap.state:  # a `leantrain compress` output: torchao tensors, rebuilt as saved
        from leantrain.model.quant import load_quantized

        try:
            load_quantized(model, snap.model, snap.state["quantization"])
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"the quantized checkpoint of {run_dir} does not load ({str(e).splitlines()[0]}); "
                                  "compress the source run again") from None
    else:
        restore(snap, model, None)
    if cfg.finetune.lora_rank and merge:
        merge_lora(model).requires_grad_(True)
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{tok_path} is missing; copy the dataset's tokenizer.json into the run directory")
    return model.to(device).eval(), Tokenizer.from_file(str(tok_path)), cfg, snap.step, warnings


def run_model_fields(run_dir: str | Path, explicit: dict[str, Any]) -> dict[str, Any]:
    """[model] fields for `train.init_from` = a leantrain run (or `compress` output) folder: its config's, minus
    those the user set explicitly; one that contradicts the run on a shape-giving key is a ConfigError."""
    from leantrain.model.hf import LOCKED_FIELDS

    src = dataclasses.asdict(load_config(Path(run_dir) / "config.toml").model)
    for key in (*LOCKED_FIELDS, *(("seq_len",) if src["arch"] == "gpt2" else ())):
        if key in explicit and explicit[key] != src[key]:
            raise ConfigError(f"config: model.{key} = {explicit[key]!r} contradicts train.init_from {run_dir} (its "
                              f"config.toml gives {src[key]!r}); drop that model setting")
    return {k: v for k, v in src.items() if k not in explicit}


def init_from_run(model: torch.nn.Module, run_dir: str | Path) -> None:
    """Copy a leantrain run's newest good weights into `model` (built from `run_model_fields`): fine-tuning a
    pruned or distilled model goes through the normal trainer. Quantized weights cannot be trained on."""
    src = load_trained(run_dir)[0]
    if any(type(p.data) is not torch.Tensor for p in src.parameters()):
        raise ConfigError(f"train.init_from {run_dir} holds quantized weights, which cannot be trained; fine-tune "
                          "the source run before quantizing (or train with [quant] qat)")
    try:
        model.load_state_dict(src.state_dict(), strict=True)
    except RuntimeError as e:
        raise ConfigError(f"train.init_from {run_dir} does not fit this model ({str(e).splitlines()[0][:200]}); "
                          "leave the [model] section to the run's config.toml") from None
