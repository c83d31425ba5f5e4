"""Reading a finished (or interrupted) run directory back: its config, tokenizer and weights."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from leantrain.config import Config, load_config
from leantrain.errors import CheckpointError
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
    restore(snap, model, None)
    if cfg.finetune.lora_rank and merge:
        merge_lora(model).requires_grad_(True)
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{tok_path} is missing; copy the dataset's tokenizer.json into the run directory")
    return model.to(device).eval(), Tokenizer.from_file(str(tok_path)), cfg, snap.step, warnings
