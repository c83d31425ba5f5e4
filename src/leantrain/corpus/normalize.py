"""Unicode normalization and whitespace cleanup: the first step of every curating profile.

What it does, each part switchable, in this order:

- line endings: CRLF and lone CR become LF;
- control characters: C0/C1 controls other than tab, LF and form feed, invisible marks
  (zero-width space/joiners, word joiner, stray BOMs) and lone surrogates (which JSON input can
  carry and UTF-8 cannot encode) are removed: they carry no meaning for a language model and
  split tokens unpredictably;
- Unicode normal form (NFC by default: composes "e" + combining acute into "é" without the
  lossy compatibility folding of NFKC, which would rewrite "ﬁ", "²" or full-width forms);
- trailing spaces and tabs at line ends are removed;
- `max_blank_lines` > 0 collapses longer runs of blank lines; `collapse_spaces` turns runs of
  spaces inside a line into one (for prose only: it would break code indentation);
- leading and trailing blank lines of the document are removed.

A document that is empty afterwards is dropped (`normalize:empty`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from leantrain.corpus.readers import Document
from leantrain.corpus.steps import DocStep, Drop, StepStats

_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff\ud800-\udfff]")
_TRAILING = re.compile(r"[ \t]+(?=\n|\Z)")
_SPACES = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")
_FORMS = ("NFC", "NFKC", "NFD", "NFKD", "")


@dataclass
class Normalize(DocStep):
    form: str = "NFC"
    newlines: bool = True
    control_chars: bool = True
    strip_trailing: bool = True
    max_blank_lines: int = 0
    collapse_spaces: bool = False

    name = "normalize"

    def __post_init__(self) -> None:
        if self.form not in _FORMS:
            raise ValueError(f"normalize.form = {self.form!r}; expected one of {', '.join(map(repr, _FORMS))}")
        if self.max_blank_lines < 0:
            raise ValueError(f"normalize.max_blank_lines = {self.max_blank_lines}; expected >= 0 (0: keep all)")

    def apply(self, doc: Document) -> Document | Drop:
        return self.process(doc, StepStats(self.name))

    def process(self, doc: Document, stats: StepStats) -> Document | Drop:
        text = doc.text
        crlf = self.newlines and "\r" in text
        if crlf:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.control_chars:
            cleaned = _CONTROL.sub("", text)
            if cleaned != text:
                stats.modified["normalize:control"] += 1
                text = cleaned
        if self.form and not text.isascii() and not unicodedata.is_normalized(self.form, text):
            text = unicodedata.normalize(self.form, text)
            stats.modified["normalize:unicode"] += 1
        before = text
        if self.strip_trailing and (" \n" in text or "\t\n" in text or text.endswith((" ", "\t"))):
            text = _TRAILING.sub("", text)  # (the substring test first: most files have nothing to strip)
        if self.collapse_spaces:
            text = _SPACES.sub(" ", text)
        if self.max_blank_lines:
            text = re.sub("\n{" + str(self.max_blank_lines + 2) + ",}", "\n" * (self.max_blank_lines + 1), text)
        body = text.strip("\n")
        if not body or body.isspace():
            return Drop("normalize:empty", "nothing left after whitespace cleanup")
        text = body + "\n" if text.endswith("\n") else body
        if crlf or text != before:
            stats.modified["normalize:whitespace"] += 1
        if text == doc.text:
            return doc
        return Document(doc.id, text, doc.source)
