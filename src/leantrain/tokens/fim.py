"""Fill-in-the-middle (FIM): training windows rearranged so a causal model learns to infill.

Bavarian et al. 2022 ("Efficient Training of Language Models to Fill in the Middle"), as StarCoder's
Megatron code applies it: each document piece in a training window is, with probability `rate`, cut at
two token positions drawn uniformly into prefix, middle and suffix, and laid out as

    PSM:  <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
    SPM:  <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle     (with probability spm_rate)

followed by the piece's end-of-text token where the window holds one, so the model learns to end the
middle there. The three sentinels add 3 tokens per rearranged piece; the window keeps its length by
dropping that many tokens from its end. SPM is the paper's "variant 2": prefix and middle stay one run
of text, which is why the prefix sentinel leads both layouts.

Applied when batches are drawn, not when the dataset is prepared: one token dataset trains with and
without FIM, and the transform of a window is a pure function of (seed, the window's index in the
split), through a random generator keyed on both, so a resumed run sees exactly the batches it would
have seen, whatever the process layout. Validation windows stay plain text, so val loss measures
next-token prediction alike with and without FIM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from leantrain.errors import DataError
from leantrain.tokens.dataset import TokenDataset
from leantrain.tokens.tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

# sentinel names in use: leantrain's and Qwen's first; StarCoder's and SantaCoder's when a tokenizer has those
FIM_SCHEMES = ((FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE), ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))
FIM_MODES = ("psm", "spm")
_STREAM = 0x46494D  # "FIM": keeps this generator's stream apart from the loader's window draws


@dataclass(frozen=True)
class FimTokens:
    """The ids of the three sentinels."""

    prefix: int
    suffix: int
    middle: int

    def ids(self) -> tuple[int, int, int]:
        return self.prefix, self.suffix, self.middle


def _special_ids(tok: Tokenizer) -> dict[str, int]:
    return {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}


def find_fim_tokens(tok: Tokenizer) -> FimTokens | None:
    """The sentinels of the first scheme in FIM_SCHEMES whose three tokens are special tokens of `tok`."""
    special = _special_ids(tok)
    for scheme in FIM_SCHEMES:
        if all(name in special for name in scheme):
            return FimTokens(*(special[name] for name in scheme))
    return None


def add_fim_tokens(tok: Tokenizer, eot: int, where: str) -> tuple[FimTokens, bool]:
    """The sentinels of `tok`, adding leantrain's as special tokens (new ids at the end) where it has none;
    returns them and whether `tok` was changed. A sentinel's text that is already an ordinary token (a
    learned merge, a non-special added token) or the end-of-text token would make text and sentinel one
    id: that is an error, not something to paper over."""
    found = find_fim_tokens(tok)
    if found is not None:
        if eot in found.ids():
            raise DataError(f"{where}: a fill-in-the-middle sentinel is also the end-of-text token (id {eot}); "
                            "give the tokenizer distinct sentinels or prepare the data with a leantrain tokenizer")
        return found, False
    special = _special_ids(tok)
    for name in FIM_SCHEMES[0]:
        i = tok.token_to_id(name)
        if i is not None and name not in special:
            raise DataError(f"{where}: the fill-in-the-middle sentinel {name!r} is already an ordinary token "
                            f"(id {i}), so text would collide with it; prepare the data with a leantrain-trained "
                            "tokenizer (it reserves the sentinels) or one that has them as special tokens")
    missing = [name for name in FIM_SCHEMES[0] if name not in special]
    tok.add_special_tokens(missing)
    tokens = FimTokens(*(tok.token_to_id(name) for name in FIM_SCHEMES[0]))
    if eot in tokens.ids():
        raise DataError(f"{where}: a fill-in-the-middle sentinel is also the end-of-text token (id {eot}); "
                        "give the tokenizer distinct sentinels or prepare the data with a leantrain tokenizer")
    return tokens, bool(missing)


def fim_split(doc: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prefix, middle, suffix) of `doc`, cut at two positions drawn uniformly from 0..len(doc); any may be empty."""
    lo, hi = sorted(int(x) for x in rng.integers(0, len(doc) + 1, size=2))
    return doc[:lo], doc[lo:hi], doc[hi:]


def fim_layout(prefix: np.ndarray, middle: np.ndarray, suffix: np.ndarray, tokens: FimTokens,
               spm: bool = False) -> np.ndarray:
    """The training sequence of one piece in PSM or SPM order (see the module docstring)."""
    p, s, m = (np.array([i], dtype=np.int64) for i in tokens.ids())
    parts = (p, s, suffix, m, prefix, middle) if spm else (p, prefix, s, suffix, m, middle)
    return np.concatenate([np.asarray(x, dtype=np.int64) for x in parts])


class FimTransform:
    """Rearranges training windows (n, seq_len+1) given their flat indices; the loader's `transform`."""

    def __init__(self, tokens: FimTokens, eot: int, rate: float, spm_rate: float, seed: int) -> None:
        for key, v in (("fim_rate", rate), ("fim_spm_rate", spm_rate)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {v}")
        self.tokens, self.eot, self.rate, self.spm_rate, self.seed = tokens, eot, rate, spm_rate, seed

    def window(self, window: np.ndarray, index: int) -> np.ndarray:
        """One window rearranged: the same (seed, index, tokens) always give the same result."""
        rng = np.random.default_rng([self.seed, _STREAM, int(index)])
        width = len(window)
        ends = np.flatnonzero(window == self.eot).tolist()
        pieces, start = [], 0
        for end in [*ends, width]:
            piece = window[start:end]
            if len(piece) and rng.random() < self.rate:
                spm = bool(rng.random() < self.spm_rate)
                piece = fim_layout(*fim_split(piece, rng), self.tokens, spm)
            pieces.append(np.asarray(piece, dtype=np.int64))
            if end < width:
                pieces.append(window[end:end + 1].astype(np.int64))
            start = end + 1
        return np.concatenate(pieces)[:width]

    def __call__(self, windows: np.ndarray, flat: np.ndarray) -> np.ndarray:
        if self.rate == 0.0:
            return windows
        return np.stack([self.window(w, i) for w, i in zip(windows, flat.tolist(), strict=True)])

    def state(self) -> dict[str, Any]:
        """What decides the transform besides the window, for the loader's resume check."""
        return {"kind": "fim", "rate": self.rate, "spm_rate": self.spm_rate, "sentinels": list(self.tokens.ids())}


def fim_for_dataset(data: TokenDataset, rate: float, spm_rate: float, seed: int,
                    vocab_size: int) -> tuple[FimTransform, Tokenizer | None]:
    """The transform a FIM run on `data` trains with, and the dataset's tokenizer with the sentinels added
    when it lacked them (the run keeps that one; None when unchanged). Refuses chat data (its loss masks
    follow the template, not a rearranged window) and a model whose embedding has no rows for the sentinels."""
    where = str(data.path)
    if data.masks("train") is not None:
        raise DataError(f"data.fim_rate applies to plain text; {where} is chat data (prompt/response pairs with "
                        "a loss mask); set --data.fim_rate=0 or prepare the documents without --format chat")
    tok = data.tokenizer()
    tokens, added = add_fim_tokens(tok, data.eot_id, where)
    if max(tokens.ids()) >= vocab_size:
        need = max(tokens.ids()) + 1
        raise DataError(f"model.vocab_size = {vocab_size} has no rows for the fill-in-the-middle sentinels the "
                        f"tokenizer of {where} lacks (ids up to {need - 1}); set --model.vocab_size={need} or "
                        "more, or prepare the data again (leantrain tokenizers reserve the sentinels)")
    return FimTransform(tokens, data.eot_id, rate, spm_rate, seed), tok if added else None


def infill_prompt(tok: Tokenizer, prefix: str, suffix: str, tokens: FimTokens, mode: str = "psm") -> list[int]:
    """The ids that ask a FIM-trained model for the middle between `prefix` and `suffix`: the training
    layout up to the middle sentinel (PSM), or up to the end of the prefix (SPM). The texts are encoded as
    the data was, so a sentinel's name typed in them is text, not a sentinel."""
    if mode not in FIM_MODES:
        raise DataError(f"fim mode {mode!r} is not allowed; expected one of {', '.join(FIM_MODES)}")
    before = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        pre, suf = (tok.encode(t, add_special_tokens=False).ids if t else [] for t in (prefix, suffix))
    finally:
        tok.encode_special_tokens = before
    p, s, m = tokens.ids()
    return [p, s, *suf, m, *pre] if mode == "spm" else [p, *pre, s, *suf, m]


FILL_MARKER = "<FILL>"


def split_at_marker(text: str, where: str = "the text") -> tuple[str, str]:
    """(prefix, suffix) of a text holding FILL_MARKER exactly once, where the middle goes."""
    n = text.count(FILL_MARKER)
    if n != 1:
        raise DataError(f"{where} holds {FILL_MARKER} {n} times; mark the one place to fill in with {FILL_MARKER} "
                        "exactly once")
    prefix, suffix = text.split(FILL_MARKER)
    return prefix, suffix
