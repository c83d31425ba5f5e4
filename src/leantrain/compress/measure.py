"""What a compression costs and gains, measured the same way before and after: validation loss on the run's
own validation windows, parameters, bytes of the weights, and decoding speed with the KV cache."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from leantrain.config import Config
from leantrain.errors import DataError


def val_windows(cfg: Config, batches: int, batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The trainer's first `batches` validation windows of the run's dataset (the same tokens for every model)."""
    from leantrain.tokens.dataset import TokenDataset
    from leantrain.tokens.loader import val_batches

    ds = TokenDataset(cfg.data.path)
    if ds.vocab_size > cfg.model.vocab_size:
        raise DataError(f"the dataset's tokenizer has {ds.vocab_size} tokens but the model only "
                        f"{cfg.model.vocab_size}; compress a run next to the dataset it was trained on")
    return list(val_batches(ds.shards("val"), cfg.model.seq_len, batch_size or cfg.train.micro_batch_size, batches,
                            name="the val split", masks=ds.masks("val")))


@torch.no_grad()
def val_loss(model: nn.Module, windows: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy (nats per token) over the windows, in eval mode."""
    was = model.training
    model.eval()
    try:
        losses = [model(x, y).float() for x, y in windows]
    finally:
        model.train(was)
    return torch.stack(losses).mean().item()


def params(model: nn.Module) -> int:
    """Parameters (logical elements: an int4 weight counts once per value), tied ones once."""
    return sum(p.numel() for p in model.parameters())


def weight_bytes(folder: Path) -> int:
    """Bytes of the weights file(s) in a checkpoint folder."""
    return sum(p.stat().st_size for p in folder.glob("model*.safetensors"))


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, batch: int, new_tokens: int, prompt_len: int = 16, vocab: int = 256,
                        repeats: int = 1) -> float:
    """Greedy decoding speed with the KV cache: `batch` sequences, `new_tokens` each after a `prompt_len` prompt;
    generated tokens per second over all sequences (the best of `repeats`)."""
    if not hasattr(model, "new_cache"):
        raise TypeError("decode speed needs a leantrain Transformer (with new_cache)")
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    prompt = torch.randint(0, min(vocab, model.cfg.vocab_size), (batch, prompt_len), generator=gen).to(device)
    steps = max(1, min(new_tokens, model.cfg.seq_len - prompt_len))
    was = model.training
    model.eval()
    best = float("inf")
    try:
        for _ in range(repeats):
            cache = model.new_cache()
            t0 = time.perf_counter()
            logits = model(prompt, cache=cache)[:, -1]
            for _ in range(steps - 1):
                nxt = logits.argmax(-1, keepdim=True)
                logits = model(nxt, cache=cache)[:, -1]
            best = min(best, time.perf_counter() - t0)
    finally:
        model.train(was)
    return batch * steps / best
