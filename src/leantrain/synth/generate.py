"""Candidates from a model: a trained run or an exported Hugging Face folder, sampled in batches with a KV cache.

Candidates that share a prompt are decoded together: the prompt is run once for the whole batch (one row per
candidate) into one `KVCache`, then every step feeds each row's last token at once. Each row has its own
`torch.Generator` seeded with the candidate's own seed and, when decoding is constrained, its own grammar
state (`model.constrained`), so a candidate's text depends on its prompt, seed and settings, not on which
other candidates shared its batch. A row stops at the end-of-text token, when the kind's stop rule says the
document is whole (a Python top-level block that ended), or when the cache is full.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from leantrain.errors import CheckpointError

STOP_CHECK_EVERY = 8  # decode steps between looks at the text for the stop rule (decoding text costs)


@dataclass
class Generator:
    """A model in eval mode, its tokenizer and end-of-text id, and where it came from (for provenance)."""

    model: Any  # leantrain.model.Transformer
    tokenizer: Tokenizer
    eos_id: int | None
    source: dict[str, Any]  # {"path", "kind": "run"|"hf", "step", "checkpoint"}
    vocab_size: int
    dataset: Path | None = None  # the run's token dataset (seed documents, reference corpus), if known
    warnings: tuple[str, ...] = ()


def load_generator(path: str | Path, *, checkpoint: str | Path | None = None,
                   load_model: Callable[..., Any] | None = None) -> Generator:
    """A run directory (its newest good checkpoint, or `checkpoint`) through `load_model` (`api.load_model`,
    handed in: synth sits above the API), or a `leantrain export --format hf` folder."""
    from leantrain.tokens.tokenizer import eot_id, hf_tokenizer_config, special_tokens, tokenizer_eos

    path = Path(path)
    is_run = (path / "config.toml").is_file() or (path.parent.name == "checkpoints"
                                                  and (path.parent.parent / "config.toml").is_file())
    if is_run:
        if load_model is None:
            raise ValueError("a run directory needs load_model=leantrain.api.load_model")
        m = load_model(path, checkpoint=checkpoint)
        eos = tokenizer_eos(m.run_dir / "tokenizer.json")
        step_dir = Path(checkpoint) if checkpoint is not None else None
        data = Path(m.config.data.path)
        if not data.is_absolute() and not data.is_dir():  # a relative path, written from the run's working folder
            data = m.run_dir.parent / data
        return Generator(m.model.eval(), m.tokenizer, eot_id(m.tokenizer, eos=eos),
                         {"path": str(m.run_dir.resolve()), "kind": "run", "step": m.step,
                          "checkpoint": str(step_dir.resolve()) if step_dir else None},
                         m.config.model.vocab_size, data if (data / "meta.json").is_file() else None,
                         tuple(m.warnings))
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory (`leantrain train`) or an exported "
                              "Hugging Face folder (`leantrain export --format hf`)")
    from leantrain.model.hf import load_hf_export

    model, tok = load_hf_export(path, checkpoint)
    eos = special_tokens(hf_tokenizer_config(path / "tokenizer.json") or {}).get("eos_token")
    step = None
    marker = path / ".leantrain-export.json"  # export.hf.EXPORT_MARKER
    if marker.is_file():  # the export's own record of the step it was written from
        try:
            step = json.loads(marker.read_text()).get("step")
        except (OSError, ValueError):
            step = None
    return Generator(model, tok, eot_id(tok, where=str(path / "tokenizer.json"), eos=eos),
                     {"path": str(path.resolve()), "kind": "hf", "step": step, "checkpoint": None},
                     int(model.cfg.vocab_size))


@dataclass
class Sampled:
    """One candidate's new tokens and why it stopped: "stop" (end-of-text or the stop rule), "length"."""

    ids: list[int]
    finish: str


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gens: list[torch.Generator]) -> list[int]:
    """One token per row: greedy at temperature 0, else top-k sampling with each row's own generator."""
    if temperature == 0:
        return logits.argmax(-1).tolist()
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return [int(torch.multinomial(probs[i], 1, generator=g)) for i, g in enumerate(gens)]


@torch.no_grad()
def sample_batch(gen: Generator, prompt_ids: list[int], seeds: list[int], max_new_tokens: int, *,
                 temperature: float, top_k: int | None, grammar: Any = None,
                 stop_rule: Callable[[str], bool] | None = None) -> list[Sampled]:
    """Continue `prompt_ids` once per seed, all rows decoded together with one KV cache.

    The prompt is cut from the left so that it and `max_new_tokens` fit the model's window (a candidate
    that still runs out of room ends with finish "length"). `grammar` (a `model.constrained.Grammar`) gives
    each row its own matcher; `stop_rule(text)` ends a row once its decoded text is whole."""
    model = gen.model
    seq_len = int(model.cfg.seq_len)
    keep = max(1, min(len(prompt_ids), seq_len - min(max_new_tokens, seq_len // 2)))
    prompt = prompt_ids[-keep:]
    budget = min(max_new_tokens, seq_len - len(prompt))
    device = next(model.parameters()).device
    rows = len(seeds)
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    matchers = [grammar.matcher() for _ in seeds] if grammar is not None else None
    eos = grammar.stop_ids[0] if grammar is not None else gen.eos_id
    out: list[list[int]] = [[] for _ in seeds]
    finish: list[str | None] = [None] * rows
    cache = model.new_cache(len(prompt) + budget)
    step_ids = torch.tensor([prompt] * rows, dtype=torch.long, device=device)
    with torch.compiler.set_stance("force_eager"):
        for t in range(budget):
            logits = model(step_ids, cache=cache)[:, -1].float()
            if matchers is not None:
                for i, m in enumerate(matchers):
                    if finish[i] is None:
                        m.mask_(logits[i])
            picked = _pick(logits, temperature, top_k, gens)
            for i, tok in enumerate(picked):
                if finish[i] is not None:
                    continue
                out[i].append(tok)
                if matchers is not None:
                    matchers[i].accept(tok)
                    if matchers[i].terminated:
                        finish[i] = "stop"
                if eos is not None and tok == eos:
                    finish[i] = "stop"
            if stop_rule is not None and (t + 1) % STOP_CHECK_EVERY == 0:
                for i in range(rows):
                    if finish[i] is None and stop_rule(gen.tokenizer.decode(out[i])):
                        finish[i] = "stop"
            if all(f is not None for f in finish):
                break
            step_ids = torch.tensor([[p] for p in picked], dtype=torch.long, device=device)
    results = []
    for ids, f in zip(out, finish, strict=True):
        if ids and eos is not None and ids[-1] == eos:
            ids = ids[:-1]
        results.append(Sampled(ids, f or "length"))
    return results
