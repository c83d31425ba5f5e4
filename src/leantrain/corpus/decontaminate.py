"""Decontamination: drop training documents that contain text of the evaluation sets.

A model that saw its test questions in training reports a score it did not earn. Like GPT-3 and
datatrove, a training document goes when it shares any word n-gram (13 by default) with any eval
document. Words are those of near dedup (lowercased runs of letters/digits/underscore, or any
non-ASCII character), n-grams are 64-bit hashes held in one sorted numpy array, so checking a
document is one vectorized `searchsorted`; the step pickles small and runs in worker processes.

Eval documents shorter than n words cannot be matched this way; they are counted in
`short_eval_docs` so the data card can say so instead of claiming they were checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from leantrain.corpus.dedup import ngram_hashes, word_ngrams, word_spans
from leantrain.corpus.readers import Document, read_paths
from leantrain.corpus.steps import DocStep, Drop
from leantrain.errors import ConfigError

_DETAIL_CHARS = 200


class Decontaminate(DocStep):
    """Drop a document sharing any word n-gram with the eval set (`decontaminate:ngram_overlap`).

    `eval_paths` are files or folders read like training data (text files, jsonl with `text_field`);
    `eval_texts` are strings. At least one eval document with n or more words is required.
    """

    name = "decontaminate"

    def __init__(self, eval_paths: Iterable[str | Path] | str | Path = (), eval_texts: Iterable[str] | str = (),
                 n: int = 13, text_field: str = "text") -> None:
        if n < 1:
            raise ConfigError(f"decontamination n-gram size {n} must be >= 1; 13 is the usual choice")
        self.n = n
        texts = [eval_texts] if isinstance(eval_texts, str) else list(eval_texts)
        paths = [eval_paths] if isinstance(eval_paths, str | Path) else list(eval_paths)
        if paths:
            texts.extend(doc.text for doc in read_paths(paths, text_field=text_field))
        grams = [word_ngrams(t, n) for t in texts]
        self.eval_docs = len(texts)
        self.short_eval_docs = sum(1 for g in grams if g.size == 0)
        self._table = np.unique(np.concatenate(grams)) if grams else np.zeros(0, np.uint64)
        if self._table.size == 0:
            raise ConfigError(f"decontamination has no eval n-grams: {len(texts)} eval documents, none with {n}+ "
                              "words; pass eval files/texts or lower n")
        self.eval_ngrams = int(self._table.size)

    def apply(self, doc: Document) -> Document | Drop:
        words, starts, ends = word_spans(doc.text)
        if words.size < self.n:
            return doc
        grams = ngram_hashes(words, self.n)
        pos = np.searchsorted(self._table, grams).clip(max=self._table.size - 1)
        hits = np.flatnonzero(self._table[pos] == grams)
        if hits.size == 0:
            return doc
        first = int(hits[0])
        lowered = doc.text.lower().encode("utf-8", errors="surrogatepass")  # word_spans' offsets are into this
        gram = lowered[starts[first]:ends[first + self.n - 1]].decode("utf-8", errors="replace")
        return Drop("decontaminate:ngram_overlap",
                    f"{hits.size} shared {self.n}-grams, first: {gram[:_DETAIL_CHARS]!r}")
