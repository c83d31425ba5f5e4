"""Language filter: keeps documents in the wanted languages, only when an identifier is available.

The identifier is fastText's language-ID model (`lid.176.bin`, as CCNet, FineWeb and datatrove
use) through the `fasttext` package, with a model file the user provides (`model_path`, or the
`LEANTRAIN_LID_MODEL` environment variable). leantrain downloads nothing: without the package or
the file, `LanguageFilter.available()` says why and the pipeline skips the step, with that note
in the data card, instead of failing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leantrain.corpus.readers import Document
from leantrain.corpus.steps import DocStep, Drop


@dataclass
class LanguageFilter(DocStep):
    """Drops documents whose top language is not in `languages` or scores below `min_score` (FineWeb: 0.65)."""

    languages: tuple[str, ...] = ("en",)
    min_score: float = 0.65
    model_path: str = ""
    _model: Any = field(default=None, init=False, repr=False, compare=False)

    name = "language"

    def _path(self) -> str:
        return self.model_path or os.environ.get("LEANTRAIN_LID_MODEL", "")

    def available(self) -> tuple[bool, str]:
        """(usable, why not): the pipeline skips the step when this is False."""
        try:
            import fasttext  # noqa: F401
        except ImportError:
            return False, "no language identifier: the fasttext package is not installed"
        path = self._path()
        if not path or not Path(path).is_file():
            return False, ("no language identifier: no fastText model file (set language.model_path or "
                           "LEANTRAIN_LID_MODEL to lid.176.bin)")
        return True, ""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model"] = None  # each worker loads its own copy
        return state

    def apply(self, doc: Document) -> Document | Drop:
        if self._model is None:
            import fasttext

            self._model = fasttext.load_model(self._path())
        labels, scores = self._model.predict(" ".join(doc.text.split())[:10_000], k=1)
        lang = labels[0].removeprefix("__label__") if labels else "unknown"
        score = float(scores[0]) if len(scores) else 0.0
        if lang not in self.languages:
            return Drop("language:other", f"{lang} ({score:.2f})")
        if score < self.min_score:
            return Drop("language:low_score", f"{lang} score {score:.2f} < {self.min_score}")
        return doc
