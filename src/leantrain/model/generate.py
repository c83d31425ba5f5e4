"""Sampling text from a trained model.

Recomputes the whole (cropped) context for every new token instead of keeping a KV cache: the
model stays one readable forward, and samples of a few hundred tokens from small models take
seconds. Randomness comes from a local generator so that sampling mid-run never shifts the
global RNG stream a resumed run must reproduce.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.8,
             top_k: int | None = 50, eos_id: int | None = None, seed: int | None = None) -> list[int]:
    """Return up to `max_new_tokens` new token ids continuing `prompt_ids` (stopping after `eos_id`).

    temperature 0 is greedy decoding; top_k None samples from the whole vocabulary; seed None draws
    a fresh nondeterministic seed for the local generator. The context is cropped to the model's
    seq_len. Runs on the device of the model's parameters, in eval mode, and restores the mode.
    """
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, not {temperature}")
    device = next(model.parameters()).device
    seq_len = model.cfg.seq_len
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits = model(ids[:, -seq_len:])[0, -1].float()
            if temperature == 0:
                next_id = logits.argmax()
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.numel():
                    kth = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(logits.softmax(-1), 1, generator=gen)[0]
            new.append(int(next_id))
            if eos_id is not None and new[-1] == eos_id:
                break
            ids = torch.cat((ids, next_id.view(1, 1)), dim=1)
    finally:
        model.train(was_training)
    return new
