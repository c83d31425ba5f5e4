"""Sampling text from a trained model, with a KV cache.

The prompt is run once and its keys and values kept (`Transformer.new_cache`); each new token then
costs one single-position forward instead of recomputing the whole context. Once the text outgrows
the model's seq_len, each further token is computed from the last seq_len tokens afresh (a sliding
window: the dropped token changes every later hidden state, so no cache can be reused), exactly as
the uncached path does; `use_cache=False` is that path throughout, kept as the reference the cache
is tested against. Randomness comes from a local generator so that sampling mid-run never shifts
the global RNG stream a resumed run must reproduce.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from leantrain.errors import ConfigError

if TYPE_CHECKING:
    from leantrain.model.constrained import Constraint


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """Refuse sampling settings that would crash or silently do nothing; the CLI calls it before loading a model."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max-new-tokens = {max_new_tokens!r} is not allowed; expected an integer >= 1")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature = {temperature!r} is not allowed; expected a finite number >= 0 "
                          "(0 is greedy decoding)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ConfigError(f"top-k = {top_k!r} is not allowed; expected an integer >= 0 (0 disables top-k)")


def check_can_generate(model: nn.Module) -> None:
    """An MLM encoder (model.objective = mlm) predicts masked tokens from both sides; it cannot continue a text."""
    if getattr(getattr(model, "cfg", None), "objective", "causal") == "mlm":
        raise ConfigError("this model is a masked language model (model.objective = mlm): it fills in <|mask|> "
                          "tokens and cannot generate text; generate with a causal run (model.objective = causal)")


def _next_token(logits: Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> Tensor:
    if temperature == 0:
        return logits.argmax()
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[0]


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.8,
             top_k: int | None = 50, eos_id: int | None = None, seed: int | None = None,
             use_cache: bool = True, constraint: Constraint | None = None) -> list[int]:
    """Return up to `max_new_tokens` new token ids continuing `prompt_ids` (stopping after `eos_id`).

    temperature 0 is greedy decoding; top_k None samples from the whole vocabulary; seed None draws
    a fresh nondeterministic seed for the local generator. The context is cropped to the model's
    seq_len. Runs on the device of the model's parameters, in eval mode, and restores the mode.
    `model` is a `Transformer` or a module sharing its forward (FSDP2 in place, activation
    checkpointing); `use_cache=False` recomputes the whole context for every token. `constraint` (from
    `model.constrained`) masks every token that would leave its regex/schema/grammar, and generation ends
    when it takes its end-of-text token.
    """
    check_can_generate(model)
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    check_sampling(max_new_tokens, temperature, top_k)
    device = next(model.parameters()).device
    seq_len = model.cfg.seq_len
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = model.new_cache() if use_cache and hasattr(model, "new_cache") and ids.size(1) < seq_len else None
    new: list[int] = []
    was_training = model.training
    model.eval()
    try:
        # compiled blocks would recompile for every cache length; decoding runs them eagerly
        with torch.compiler.set_stance("force_eager"):
            for _ in range(max_new_tokens):
                if cache is not None and ids.size(1) <= seq_len:
                    step_ids = ids if cache.length == 0 else ids[:, cache.length:]
                    logits = model(step_ids, cache=cache)[0, -1].float()
                else:  # uncached, or past seq_len: the last seq_len tokens from scratch
                    logits = model(ids[:, -seq_len:])[0, -1].float()
                if constraint is not None:
                    constraint.mask_(logits)
                next_id = _next_token(logits, temperature, top_k, gen)
                new.append(int(next_id))
                if constraint is not None:
                    constraint.accept(new[-1])
                    if constraint.terminated:
                        break
                if eos_id is not None and new[-1] == eos_id:
                    break
                ids = torch.cat((ids, next_id.view(1, 1)), dim=1)
    finally:
        model.train(was_training)
    return new
