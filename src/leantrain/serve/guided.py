"""Output constraints for the server: a request's regex, JSON schema or grammar, compiled once per rule.

Compiling is `model.constrained.compile_constraint` (xgrammar), the same call `leantrain generate --regex`
makes, against the served tokenizer's vocabulary; the compiled rule is kept in a small LRU cache keyed by
(kind, source), since clients tend to send the same schema with every request. Each sequence then gets its
own matcher from it (`Grammar.matcher()`): the engine masks that row's logits and feeds it that row's tokens.
Anything that stops a rule from being used -- it does not compile, matches nothing, the server has no
xgrammar, the tokenizer is not byte-level BPE or has no end-of-text token -- is the request's 400.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from leantrain.errors import ConfigError
from leantrain.serve.protocol import APIError, Rule


class Grammars:
    """Compiled rules for one served model (`get` is safe from any thread; compile runs outside the lock)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_id: int | None, capacity: int = 64) -> None:
        self.tokenizer, self.vocab_size, self.eos_id, self.capacity = tokenizer, vocab_size, eos_id, capacity
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # rules compiled so far (cache misses)

    def unusable(self, param: str) -> APIError | None:
        """Why this model cannot be constrained at all (the same for every rule), or None."""
        decoder = (json.loads(self.tokenizer.to_str()).get("decoder") or {}).get("type")
        if decoder != "ByteLevel":
            return APIError(400, f"{param}: this model's tokenizer is not byte-level BPE (its decoder is {decoder}), "
                            "which constrained decoding needs; send the request without an output constraint", param,
                            "unsupported_tokenizer")
        if self.eos_id is None:
            return APIError(400, f"{param}: this model's tokenizer has no end-of-text token to end a constrained "
                            "output; send the request without an output constraint", param, "unsupported_tokenizer")
        return None

    def get(self, rule: Rule) -> Any:
        """The compiled `model.constrained.Grammar` of `rule`; APIError 400 when it cannot be used."""
        key = (rule.kind, rule.source)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        problem = self.unusable(rule.param)
        if problem is not None:
            raise problem
        from leantrain.model.constrained import compile_constraint

        try:
            grammar = compile_constraint(rule.kind, rule.source, self.tokenizer.get_vocab(with_added_tokens=True),
                                         self.vocab_size, [self.eos_id], name=rule.param)
        except ConfigError as e:
            raise APIError(400, str(e), rule.param, "invalid_constraint") from None
        with self._lock:
            self.compiled += 1
            self._cache[key] = grammar
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return grammar
