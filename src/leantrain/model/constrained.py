"""Constrained decoding: only emit tokens that keep the output inside a regular expression, a JSON schema or
an EBNF grammar (docs/constrained.md).

The grammar engine is xgrammar (the `constrain` extra): it compiles the rule against the model's vocabulary
once, then at each step gives a bitmask of the tokens that keep the text a valid prefix; the sampler sees
-inf for every other token, so greedy and sampled decoding alike stay inside the language. The end-of-text
token is allowed exactly when the text is complete, and choosing it ends generation. Written by hand here:
only the vocabulary hand-over (byte-level BPE strings, special tokens masked out) and the one-line errors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from leantrain.errors import ConfigError

KINDS = ("regex", "json_schema", "grammar")
FLAGS = {"regex": "--regex", "json_schema": "--json-schema", "grammar": "--grammar"}


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:
        raise ConfigError("constrained decoding needs xgrammar: pip install 'leantrain[constrain]'") from e
    return xgrammar


def _engine_message(exc: BaseException) -> str:
    """xgrammar's C++ errors carry a timestamp and a source path; keep the sentence a user can act on."""
    text = " ".join(str(exc).split())
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text).rstrip(".")


@dataclass
class Grammar:
    """A compiled rule for one vocabulary; `matcher()` gives a fresh per-sequence state."""

    kind: str
    source: str
    compiled: Any
    vocab_size: int
    stop_ids: list[int] = field(default_factory=list)
    forbidden: Tensor | None = None  # tokens masked on top of the engine's mask (bool over the vocabulary)
    # xgrammar lets UTF-16 surrogates (0xED 0xA0-0xBF ...) through, which are not UTF-8 and decode to U+FFFD:
    # a token ending in byte 0xED may not be followed by one starting with 0xA0-0xBF (bool masks, or None)
    ends_ed: Tensor | None = None
    surrogate_tail: Tensor | None = None

    def matcher(self) -> Constraint:
        return Constraint(self)


class Constraint:
    """The state of one sequence under a `Grammar`: masks logits, follows the chosen tokens."""

    def __init__(self, grammar: Grammar) -> None:
        xgr = _xgrammar()
        self.grammar = grammar
        self._matcher = xgr.GrammarMatcher(grammar.compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, grammar.vocab_size)
        self._apply = xgr.apply_token_bitmask_inplace
        self._after_ed = False  # the last token ended in byte 0xED

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole sentence of the language (ending here would be valid)."""
        return bool(self._matcher.is_completed() or self._matcher.is_terminated())

    @property
    def terminated(self) -> bool:
        """Whether the end-of-text token was chosen: nothing more may follow."""
        return bool(self._matcher.is_terminated())

    def allowed(self) -> Tensor:
        """A bool mask over the vocabulary of the tokens allowed next."""
        return torch.isfinite(self.mask_(torch.zeros(self.grammar.vocab_size)))

    def mask_(self, logits: Tensor) -> Tensor:
        """Set the logits of every token that would break the rule to -inf, in place; returns `logits`."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        self._apply(logits.view(1, -1), self._bitmask, vocab_size=self.grammar.vocab_size)
        if self.grammar.forbidden is not None:
            logits.masked_fill_(self.grammar.forbidden.to(logits.device), float("-inf"))
        if self._after_ed and self.grammar.surrogate_tail is not None:
            logits.masked_fill_(self.grammar.surrogate_tail.to(logits.device), float("-inf"))
        return logits

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(int(token_id)):
            raise RuntimeError(f"token {token_id} was chosen although the grammar forbids it")  # a bug, not input
        ends_ed = self.grammar.ends_ed
        self._after_ed = ends_ed is not None and 0 <= token_id < ends_ed.numel() and bool(ends_ed[token_id])


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte in a token string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def surrogate_masks(encoded: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Bool masks over byte-level tokens: those holding a UTF-16 surrogate's bytes (0xED 0xA0-0xBF) inside,
    those ending in 0xED, and those starting with 0xA0-0xBF (forbidden right after one ending in 0xED)."""
    chars = _byte_level_chars()
    inside, ends, starts = [], [], []
    for token in encoded:
        raw = bytes(chars[c] for c in token) if token and all(c in chars for c in token) else b""
        inside.append(any(a == 0xED and 0xA0 <= b <= 0xBF for a, b in zip(raw, raw[1:], strict=False)))
        ends.append(raw.endswith(b"\xed"))
        starts.append(bool(raw) and 0xA0 <= raw[0] <= 0xBF)
    return (torch.tensor(inside, dtype=torch.bool), torch.tensor(ends, dtype=torch.bool),
            torch.tensor(starts, dtype=torch.bool))


def control_byte_tokens(encoded: list[str]) -> Tensor:
    """A bool mask of the byte-level tokens whose bytes include a control byte (< 0x20)."""
    control = {c for c, b in _byte_level_chars().items() if b < 0x20}
    return torch.tensor([any(ch in control for ch in token) for token in encoded], dtype=torch.bool)


def compile_constraint(kind: str, source: str, vocab: dict[str, int], vocab_size: int,
                       stop_ids: list[int], *, name: str | None = None) -> Grammar:
    """Compile `source` (a regex, a JSON schema text, or EBNF in xgrammar's GBNF dialect) for a byte-level BPE
    vocabulary `vocab` (token string -> id, as `tokenizers` gives it) padded to the model's `vocab_size`.

    `stop_ids` are the end-of-text ids: allowed once the text is complete. Raises ConfigError (one line) for a
    rule that does not compile, and for one that no text can satisfy. Messages name the CLI flag, or `name`
    (the server's request field) and then the rule instead of the file it came from."""
    if kind not in KINDS:
        raise ConfigError(f"unknown constraint kind {kind!r}; expected one of {', '.join(KINDS)}")
    flag = name or FLAGS[kind]
    fix = ("expression" if kind == "regex" else "file") if name is None else {
        "regex": "expression", "json_schema": "schema", "grammar": "grammar"}[kind]
    if not stop_ids:
        raise ConfigError(f"{flag} needs an end-of-text token in the tokenizer to end the output; "
                          "use a tokenizer with <|endoftext|> or an eos_token")
    xgr = _xgrammar()
    encoded = [""] * vocab_size
    for token, i in vocab.items():
        if i < vocab_size:
            encoded[i] = token
    for i in stop_ids:
        encoded[i] = ""  # special tokens are not text: never allowed as text, the stop id ends the output
    info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size, stop_token_ids=stop_ids)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    if kind == "json_schema":
        try:
            json.loads(source)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag}: the schema is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno});"
                              f" fix the {fix}") from None
    try:
        if kind == "regex":
            compiled = compiler.compile_regex(source)
        elif kind == "json_schema":
            compiled = compiler.compile_json_schema(source, any_whitespace=False)
        else:
            compiled = compiler.compile_grammar(source)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"{flag} does not compile: {_engine_message(e)}; fix the {fix}") from None
    # xgrammar's JSON strings admit raw control characters, which strict parsers (Python's json among them)
    # reject; with compact separators no JSON text needs a byte below 0x20, so no token carrying one may come
    forbidden = control_byte_tokens(encoded) if kind == "json_schema" else None
    inside, ends_ed, surrogate_tail = surrogate_masks(encoded)
    forbidden = inside if forbidden is None else forbidden | inside
    grammar = Grammar(kind, source, compiled, vocab_size, list(stop_ids), forbidden, ends_ed, surrogate_tail)
    if not grammar.matcher().allowed().any():
        raise ConfigError(f"{flag} matches no text at all, so nothing could be generated; fix the {fix}")
    return grammar
