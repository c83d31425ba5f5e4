"""Masked language modelling's data: span masking of token windows, the same on every run and resume.

An MLM run (`[model] objective = "mlm"`, docs/objectives.md) reads the causal loader's windows and keeps
their first seq_len tokens. In each sequence `data.mask_rate` of the tokens (rounded, at least one) are
chosen in contiguous spans of mean length `data.mask_span`, with an unmasked token between spans, as
T5's random span corruption lays them out (but a sequence may start or end with a span). As in BERT,
80% of the chosen tokens become `<|mask|>`, 10% a random token, 10% stay; the labels are the original
tokens at the chosen positions and -100 (ignored by the loss) everywhere else.

The choice is counter-based: sequence `row` of the global batch of optimizer step `step` draws from
`np.random.default_rng([seed, 0, step, row])`, so it depends only on the step, not on the process
layout or on what ran before; a resumed run masks exactly what the uninterrupted one would. Validation
windows draw from the fixed key `[VAL_SEED, 1, batch, row]`, the same for every run, so masked-token
accuracies of different runs are measured on the same positions; there every chosen token becomes `<|mask|>`
(the 10% kept in training would let a model score by copying its input: an untrained model with tied
embeddings does), so validation loss and accuracy measure tokens the model could not see.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer

from leantrain.errors import DataError
from leantrain.tokens.tokenizer import MASK

VAL_SEED = 0
_TRAIN, _VAL = 0, 1  # the RNG key's stream tag: training and validation masks never share draws
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens; the rest keep their own token (BERT)


def add_mask_token(tok: Tokenizer) -> int:
    """The id of `<|mask|>` in `tok` (every tokenizer `data prepare` trains reserves it), added as a special token
    after the last id when it is not there; refused when it is an ordinary token, which text could spell."""
    found = tok.token_to_id(MASK)
    if found is not None:
        if not any(t.content == MASK and t.special for t in tok.get_added_tokens_decoder().values()):
            raise DataError(f"the tokenizer has {MASK} as an ordinary token, so text could spell the mask; "
                            "prepare the data with a tokenizer that has it as a special token (or none)")
        return found
    tok.add_special_tokens([AddedToken(MASK, special=True, normalized=False)])
    return tok.token_to_id(MASK)


def _segments(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive integers summing to `total` (>= parts), uniformly over such compositions."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
    return np.diff(np.concatenate(([0], cuts, [total]))).astype(np.int64)


def span_mask(length: int, rate: float, mean_span: int, rng: np.random.Generator) -> np.ndarray:
    """A bool [length] with round(rate * length) (at least 1) True positions in spans of mean length
    `mean_span`, separated by at least one False; the leading and trailing gaps may be empty."""
    n = min(length, max(1, round(rate * length)))
    spans = max(1, min(round(n / mean_span), length - n + 1))
    span_lengths = _segments(n, spans, rng)
    gaps = _segments(length - n + 2, spans + 1, rng)  # the first and last gap may be empty: one less each
    gaps[0] -= 1
    gaps[-1] -= 1
    starts = np.cumsum(gaps[:-1]) + np.concatenate(([0], np.cumsum(span_lengths)[:-1]))
    mask = np.zeros(length, dtype=bool)
    for start, size in zip(starts.tolist(), span_lengths.tolist(), strict=True):
        mask[start:start + size] = True
    return mask


class SpanMasker:
    """Turns token windows into (inputs with masked spans, labels) for MLM; see the module docstring."""

    def __init__(self, mask_id: int, vocab_size: int, rate: float, mean_span: int, seed: int) -> None:
        self.mask_id, self.vocab_size = mask_id, vocab_size
        self.rate, self.mean_span, self.seed = rate, mean_span, seed

    def mask_rows(self, x: torch.Tensor, key: tuple[int, ...],
                  hide_all: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `x` [B, T] masked; row j draws from default_rng([*key, j]). `hide_all`: every chosen token
        becomes <|mask|> (validation), not 80/10/10."""
        rows, labels = x.numpy().copy(), np.full(tuple(x.shape), -100, dtype=np.int64)
        for j, row in enumerate(rows):
            rng = np.random.default_rng([*key, j])
            chosen = span_mask(len(row), self.rate, self.mean_span, rng)
            labels[j, chosen] = row[chosen]
            roll = rng.random(len(row))
            random_ids = rng.integers(0, self.vocab_size, size=len(row))
            if hide_all:
                roll[:] = 0.0
            row[chosen & (roll < MASK_SHARE)] = self.mask_id
            swap = chosen & (roll >= MASK_SHARE) & (roll < MASK_SHARE + RANDOM_SHARE)
            row[swap] = random_ids[swap]
        return torch.from_numpy(rows), torch.from_numpy(labels)

    def train_rows(self, x: torch.Tensor, step: int, first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of global rows first_row.. of optimizer step `step` (the same whatever the process layout)."""
        inputs, labels = zip(*(self.mask_rows(x[j:j + 1], (self.seed, _TRAIN, step, first_row + j))
                               for j in range(len(x))), strict=True)
        return torch.cat(inputs), torch.cat(labels)

    def val_batches(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed validation windows (`tokens.loader.val_batches`), masked by the run-independent key, every
        chosen token hidden."""
        return [self.mask_rows(x, (VAL_SEED, _VAL, i), hide_all=True) for i, (x, _) in enumerate(batches)]


class MaskedLoader:
    """A `BatchLoader` whose micro-batches come masked: (inputs, labels) of seq_len tokens each.

    The masks are a function of the step, so the state is the wrapped loader's plus the masking settings,
    which a resumed run must share; every other attribute is the wrapped loader's.
    """

    def __init__(self, loader: Any, masker: SpanMasker) -> None:
        self.loader, self.masker = loader, masker

    def __getattr__(self, name: str) -> Any:  # step, tokens_per_step, global_batch, skip_step, ...
        return getattr(self.__dict__["loader"], name)

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        step, mb = self.loader.step, self.loader.micro_batch_size
        ws, rank = self.loader.world_size, self.loader.rank
        return [self.masker.train_rows(x, step, (m * ws + rank) * mb)
                for m, (x, _) in enumerate(self.loader.next_step())]

    def _settings(self) -> dict[str, Any]:
        m = self.masker
        return {"mask_id": m.mask_id, "rate": m.rate, "mean_span": m.mean_span}

    def state_dict(self) -> dict[str, Any]:
        return {**self.loader.state_dict(), "mlm": self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mlm") != self._settings():
            raise DataError(f"loader state does not match: the MLM masking was {state.get('mlm')}, now "
                            f"{self._settings()}; resume with the same data.mask_rate, data.mask_span and "
                            "model.objective, or start a new run")
        self.loader.load_state_dict({k: v for k, v in state.items() if k != "mlm"})


def masked_scores(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[summed cross-entropy, correct predictions, masked tokens] of one masked batch, in float32."""
    logits = model(x).float()
    scored = labels != -100
    picked, target = logits[scored], labels[scored]
    loss = torch.nn.functional.cross_entropy(picked, target, reduction="sum")
    correct = (picked.argmax(-1) == target).sum().float()
    return torch.stack([loss, correct, scored.sum().float()])


def mlm_tokenizer(tok: Tokenizer, model_vocab: int) -> tuple[Tokenizer, int]:
    """(the run's tokenizer: `tok` plus `<|mask|>`, the mask id); refuses a model vocabulary without room for it."""
    mask_id = add_mask_token(tok)
    if mask_id >= model_vocab:
        raise DataError(f"model.objective = mlm adds the token {MASK} to the tokenizer as id {mask_id}, but "
                        f"model.vocab_size = {model_vocab} has no room for it; set --model.vocab_size={mask_id + 1} "
                        "or more")
    return tok, mask_id
