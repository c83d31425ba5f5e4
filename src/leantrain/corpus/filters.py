"""Quality filters with the published thresholds (each a `DocStep`; every threshold is a field).

Prose (the `web` profile), in FineWeb's order (Penedo et al. 2024): Gopher repetition, Gopher
quality, C4, FineWeb. Source code (the `code` profile): `CodeQuality`, after Codex, The Stack,
StarCoder and CodeParrot. Word and line conventions shared by all prose filters:

- a *word* is a whitespace-separated token with surrounding punctuation stripped; a token that is
  punctuation only (`-`, `...`, `#`) is a *symbol*, not a word (Gopher's "non-symbol words"), in
  every Gopher and FineWeb rule alike (datatrove's tokenizer counts each punctuation mark as a
  word: bench/filter_parity.py shows what that changes); C4's words-per-line rule alone counts
  whitespace tokens, as C4's released code does;
- *lines* are split on `\\n`; *paragraphs* on runs of two or more `\\n`.
"""

from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass

import numpy as np

from leantrain.corpus.readers import Document
from leantrain.corpus.steps import DocStep, Drop

_PUNCT = string.punctuation + "…“”‘’«»¡¿–—•·"
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
_ALPHA_WORD = re.compile(r"[^\W\d_]\S*")  # from a word's first letter to its end: one match per such word


def words_of(text: str) -> list[str]:
    """Whitespace tokens with surrounding punctuation stripped; punctuation-only tokens are left out."""
    return list(filter(None, map(str.strip, text.split(), itertools.repeat(_PUNCT))))


def _dup_stats(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier one, their characters) — Gopher's duplicate counting."""
    seen: set[str] = set()
    dup = dup_chars = 0
    for x in items:
        if x in seen:
            dup += 1
            dup_chars += len(x)
        else:
            seen.add(x)
    return dup, dup_chars


def _ratio(n: float, d: float) -> float:
    return n / d if d else 0.0


@dataclass
class GopherQuality(DocStep):
    """Gopher's quality filter (Rae et al. 2021, "Scaling Language Models", appendix A.1.1, MassiveText).

    Drops a document with fewer than 50 or more than 100,000 words; mean word length outside
    [3, 10]; a symbol-to-word ratio above 0.1 for either "#" or the ellipsis ("..." / "…"); more than
    90% of lines starting with a bullet; more than 30% of lines ending with an ellipsis; fewer than
    80% of words containing an alphabetic character; fewer than 2 of the stop words the, be, to, of,
    and, that, have, with present ("at least two of the following English words": distinct words,
    not occurrences, so "the ... the" is one).

    Deliberate differences from datatrove, which counts words with a tokenizer that makes
    punctuation marks tokens of their own: here symbols are never words (the hash and ellipsis
    ratios and the alphabetic share are per word, as the word count and mean length already are
    in both), stop words match case-insensitively ("The" counts; datatrove's set match does not),
    and the line rules count non-blank lines, with "*", "‣" and "◦" bullets as well as "•" and "-".
    """

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")

    name = "gopher_quality"

    def apply(self, doc: Document) -> Document | Drop:
        text = doc.text
        words = words_of(text)
        n = len(words)
        if n < self.min_words:
            return Drop("gopher_quality:too_few_words", f"{n} words < {self.min_words}")
        if n > self.max_words:
            return Drop("gopher_quality:too_many_words", f"{n} words > {self.max_words}")
        mean = sum(map(len, words)) / n
        if not self.min_mean_word_length <= mean <= self.max_mean_word_length:
            return Drop("gopher_quality:mean_word_length",
                        f"mean word length {mean:.2f} outside [{self.min_mean_word_length}, "
                        f"{self.max_mean_word_length}]")
        hashes = text.count("#") / n
        if hashes > self.max_symbol_word_ratio:
            return Drop("gopher_quality:hash_ratio", f"'#' per word {hashes:.3f} > {self.max_symbol_word_ratio}")
        ellipses = (text.count("...") + text.count("…")) / n
        if ellipses > self.max_symbol_word_ratio:
            return Drop("gopher_quality:ellipsis_ratio",
                        f"ellipses per word {ellipses:.3f} > {self.max_symbol_word_ratio}")
        lines = [line for line in text.split("\n") if line.strip()]
        bullets = _ratio(sum(line.lstrip().startswith(("•", "-", "*", "‣", "◦")) for line in lines), len(lines))
        if bullets > self.max_bullet_lines_ratio:
            return Drop("gopher_quality:bullet_lines", f"{bullets:.0%} of lines start with a bullet")
        trailing = _ratio(sum(line.rstrip().endswith(("...", "…")) for line in lines), len(lines))
        if trailing > self.max_ellipsis_lines_ratio:
            return Drop("gopher_quality:ellipsis_lines", f"{trailing:.0%} of lines end with an ellipsis")
        alpha = len(_ALPHA_WORD.findall(" ".join(words))) / n  # words with at least one letter
        if alpha < self.min_alpha_words_ratio:
            return Drop("gopher_quality:alpha_words", f"{alpha:.0%} of words have a letter < "
                        f"{self.min_alpha_words_ratio:.0%}")
        stops = frozenset(self.stop_words)
        found = len(stops.intersection(map(str.lower, words)))
        if found < self.min_stop_words:
            return Drop("gopher_quality:stop_words", f"{found} stop words < {self.min_stop_words}")
        return doc


_GRAM_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier for the rolling n-gram hash


class _Grams:
    """Word n-grams of one document as 64-bit hashes (numpy), so the n-gram rules cost O(words log words)."""

    def __init__(self, words: list[str]) -> None:
        ids = dict.fromkeys(words)  # insertion-ordered: a word's id is the rank of its first appearance
        for i, w in enumerate(ids):
            ids[w] = i
        self.ids = np.fromiter(map(ids.__getitem__, words), np.uint64, len(words))
        self.lengths = np.fromiter(map(len, words), np.int64, len(words))
        self.cum = np.concatenate([[0], np.cumsum(self.lengths)])
        self._keys = {1: self.ids + np.uint64(1)}

    def keys(self, n: int) -> np.ndarray:
        """Hash of the n-gram starting at each position (len(words) - n + 1 of them)."""
        if n not in self._keys:
            prev = self.keys(n - 1)
            self._keys[n] = prev[:-1] * _GRAM_MUL + self._keys[1][n - 1:]
        return self._keys[n]

    def top_chars(self, n: int) -> int:
        """Characters covered by the most frequent n-gram: its length with spaces times its count
        (ties go to the n-gram seen first, like Counter.most_common)."""
        keys = self.keys(n)
        if keys.size == 0:
            return 0
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        best = int(counts.max())
        if best < 2:
            return 0
        first = int(np.flatnonzero(counts[inverse] == best)[0])
        return (int(self.cum[first + n] - self.cum[first]) + n - 1) * best

    def dup_chars(self, n: int) -> int:
        """Characters of the words inside any n-gram that repeats an earlier one, each word counted once."""
        keys = self.keys(n)
        if keys.size == 0:
            return 0
        _, first = np.unique(keys, return_index=True)
        repeat = np.ones(keys.size, bool)
        repeat[first] = False
        starts = np.flatnonzero(repeat)
        if starts.size == 0:
            return 0
        cover = np.zeros(self.ids.size + 1, np.int64)
        np.add.at(cover, starts, 1)
        np.add.at(cover, starts + n, -1)
        covered = np.cumsum(cover[:-1]) > 0
        return int(self.lengths[covered].sum())


@dataclass
class GopherRepetition(DocStep):
    """Gopher's repetition filter (Rae et al. 2021, table A1): removes repetitive documents.

    Thresholds: duplicate lines 30% (of lines) and 20% (of characters); duplicate paragraphs 30%
    and 20%; the most frequent 2/3/4-gram covering more than 20/18/16% of the characters; duplicated
    5..10-grams covering more than 15/14/13/12/11/10% of the characters. Fractions are over the
    document's characters, as in datatrove. "Duplicated n-grams" counts the characters of every word
    inside an n-gram occurrence that repeats an earlier one, each word once, as the paper describes;
    datatrove's greedy left-to-right scan (which skips past each repeat) can count slightly less.
    N-grams are compared by 64-bit hashes of word ids.
    """

    max_dup_line_frac: float = 0.30
    max_dup_para_frac: float = 0.30
    max_dup_line_char_frac: float = 0.20
    max_dup_para_char_frac: float = 0.20
    top_ngram_max_frac: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_ngram_max_frac: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12),
                                                         (9, 0.11), (10, 0.10))

    name = "gopher_repetition"

    def apply(self, doc: Document) -> Document | Drop:
        text = doc.text
        size = len(text)
        paragraphs = _PARAGRAPHS.split(text.strip())
        dup, chars = _dup_stats(paragraphs)
        if _ratio(dup, len(paragraphs)) > self.max_dup_para_frac:
            return Drop("gopher_repetition:dup_paragraphs", f"{dup}/{len(paragraphs)} paragraphs repeat")
        if _ratio(chars, size) > self.max_dup_para_char_frac:
            return Drop("gopher_repetition:dup_paragraph_chars", f"{chars / size:.0%} of characters in "
                        "repeated paragraphs")
        lines = _LINES.split(text)
        dup, chars = _dup_stats(lines)
        if _ratio(dup, len(lines)) > self.max_dup_line_frac:
            return Drop("gopher_repetition:dup_lines", f"{dup}/{len(lines)} lines repeat")
        if _ratio(chars, size) > self.max_dup_line_char_frac:
            return Drop("gopher_repetition:dup_line_chars", f"{chars / size:.0%} of characters in repeated lines")
        grams = _Grams(words_of(text))
        for n, frac in self.top_ngram_max_frac:
            top = _ratio(grams.top_chars(n), size)
            if top > frac:
                return Drop(f"gopher_repetition:top_{n}gram", f"top {n}-gram covers {top:.0%} > {frac:.0%}")
        for n, frac in self.dup_ngram_max_frac:
            dup_frac = _ratio(grams.dup_chars(n), size)
            if dup_frac > frac:
                return Drop(f"gopher_repetition:dup_{n}gram", f"repeated {n}-grams cover {dup_frac:.0%} > {frac:.0%}")
        return doc


_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_C4_END = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.!?]+(?:[\"')\]]*)(?=\s|$)")


def sentence_count(line: str) -> int:
    """Sentences in one line: one per terminal mark followed by a space or the end, plus one for
    any text after the last mark, so a non-blank line has at least one (as a sentence splitter says)."""
    count = end = 0
    for m in _SENTENCE_END.finditer(line):
        count, end = count + 1, m.end()
    return count + bool(line[end:].strip())


@dataclass
class C4Filter(DocStep):
    """C4's clean-up (Raffel et al. 2020, section 2.2), with the values of the released code.

    Per line (after stripping, and removing Wikipedia citation marks like "[1]", "[edit]"): drop
    lines that do not end in terminal punctuation (. ? ! " ') or end in "...", lines with fewer
    than 3 words, lines with a word longer than 1000 characters, lines containing "javascript",
    and cookie/terms-of-use boilerplate lines. Per page: drop pages containing "lorem ipsum" or a
    curly bracket "{" (code, not prose), and pages left with fewer than 5 sentences. The paper's
    text says "fewer than 3 sentences" and "at least 5 words"; the released TFDS code (and
    datatrove) use 5 sentences and 3 words per line, which we follow. The bad-words list is not
    applied. Kept lines are joined with "\\n".

    Sentences are counted per kept line, as the reference runs its sentence splitter on each line:
    every terminal mark (. ! ? with closing quotes or brackets) followed by a space or the line's
    end closes one, and text after the last one is one more, so a kept line counts at least one
    sentence even without terminal punctuation (FineWeb's variant, `terminal_punct = false`, keeps
    such lines; counting them as zero dropped 20% of the real documents of bench/filter_parity.py
    that datatrove keeps). Words per line are counted after citation marks go, as in the TFDS code;
    datatrove counts them before (`x = []` is 3 words there, 2 here).
    """

    remove_citations: bool = True
    terminal_punct: bool = True
    min_words_per_line: int = 3
    max_word_length: int = 1000
    drop_javascript_lines: bool = True
    drop_policy_lines: bool = True
    drop_lorem_ipsum: bool = True
    drop_curly_bracket: bool = True
    min_sentences: int = 5

    name = "c4"

    def apply(self, doc: Document) -> Document | Drop:
        kept: list[str] = []
        for raw in doc.text.split("\n"):
            line = raw.strip()
            # the reference's order: long words before citation marks go, words counted after
            if (self.max_word_length and len(line) > self.max_word_length
                    and any(len(w) > self.max_word_length for w in line.split())):
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if not line:
                continue
            words = line.split()
            if self.terminal_punct and (not line.endswith(_C4_END) or line.endswith("...")):
                continue
            if len(words) < self.min_words_per_line:
                continue
            low = line.lower()
            if self.drop_lorem_ipsum and "lorem ipsum" in low:
                return Drop("c4:lorem_ipsum", "page contains 'lorem ipsum'")
            if self.drop_javascript_lines and "javascript" in low:
                continue
            if self.drop_curly_bracket and "{" in line:
                return Drop("c4:curly_bracket", "page contains '{' (code, not prose)")
            if self.drop_policy_lines and any(p in low for p in _POLICY):
                continue
            kept.append(line)
        text = "\n".join(kept)
        if not kept:
            return Drop("c4:no_lines_left", "no line passed the line rules")
        sentences = sum(map(sentence_count, kept))
        if sentences < self.min_sentences:
            return Drop("c4:too_few_sentences", f"{sentences} sentences < {self.min_sentences}")
        if text == doc.text:
            return doc
        return Document(doc.id, text, doc.source)


_FINEWEB_STOP = (".", "!", "?", "…", "。", "！", "？", "‼", "⁇", "⁈", "⁉")
_CLOSERS = "\"'”’»)]"  # may follow the terminal mark: `He said "stop."`


@dataclass
class FineWebQuality(DocStep):
    """FineWeb's own filters (Penedo et al. 2024, section 3.6).

    Drops a document when 12% or fewer of its non-blank lines end with terminal punctuation
    (kept if the ratio is above 0.12), when more than 67% of its lines are 30 characters or shorter,
    or when 10% or more of its characters (newlines left out) sit in lines that repeat an earlier line.
    The paper states 0.1 for the last rule; datatrove's code default is 0.01, which we do not
    follow. Also datatrove's "list" rule: more than 0.3 line breaks per word (lines of fewer than
    ~3.3 words on average).

    Deliberate differences from datatrove: the list rule counts the breaks between non-blank lines,
    the unit of every other rule here, where datatrove counts newline characters, so blank lines
    between paragraphs (up to 3 newlines each after the web profile's normalize step) do not make
    prose look like a list; words are `words_of` (symbols are not words, as in every prose rule
    here), where datatrove's tokenizer counts each punctuation mark as a word, which lowers its
    ratio; and a terminal mark followed by closing quotes or brackets (`said "stop."`) ends a line
    in punctuation too (a quote alone does not: `x = "y"` is code, not a sentence).
    """

    min_line_punct_ratio: float = 0.12
    line_punct_exclude_zero: bool = False
    max_short_line_ratio: float = 0.67
    short_line_length: int = 30
    max_dup_line_char_ratio: float = 0.1
    max_newline_word_ratio: float = 0.3

    name = "fineweb"

    def apply(self, doc: Document) -> Document | Drop:
        text = doc.text
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return Drop("fineweb:empty", "no non-blank lines")
        punct = sum(line.rstrip().rstrip(_CLOSERS).endswith(_FINEWEB_STOP) for line in lines) / len(lines)
        if punct <= self.min_line_punct_ratio and not (punct == 0 and self.line_punct_exclude_zero):
            return Drop("fineweb:line_punct_ratio", f"{punct:.0%} of lines end in punctuation <= "
                        f"{self.min_line_punct_ratio:.0%}")
        short = sum(len(line) <= self.short_line_length for line in lines) / len(lines)
        if short > self.max_short_line_ratio:
            return Drop("fineweb:short_lines", f"{short:.0%} of lines are <= {self.short_line_length} chars")
        dup = _ratio(_dup_stats(lines)[1], len(text) - text.count("\n"))
        if dup >= self.max_dup_line_char_ratio:
            return Drop("fineweb:dup_line_chars", f"{dup:.1%} of characters in repeated lines >= "
                        f"{self.max_dup_line_char_ratio:.0%}")
        n_words = len(words_of(text))
        per_word = (len(lines) - 1) / n_words if n_words else float("inf")
        if per_word > self.max_newline_word_ratio:
            return Drop("fineweb:list_like", f"{per_word:.2f} line breaks per word > {self.max_newline_word_ratio}")
        return doc


_BASE64 = re.compile(r"[a-zA-Z0-9+/\n=]{64,}")
_HEX = re.compile(r"(?:\b(?:0x|\\x)?[0-9a-fA-F]{2}(?:,|\b\s*)){8,}")
_UNICODE = re.compile(r"(?:\\u[0-9a-fA-F]{4}){8,}")
_NON_ALNUM = re.compile(r"[\W_]+")
_ASCII_NON_ALNUM = bytes(b for b in range(128) if not chr(b).isalnum())


def alnum_fraction(text: str) -> float:
    """Share of characters that are letters or digits (a byte-level fast path for ASCII text)."""
    if not text:
        return 0.0
    if text.isascii():
        return len(text.encode("ascii").translate(None, _ASCII_NON_ALNUM)) / len(text)
    return (len(text) - sum(map(len, _NON_ALNUM.findall(text)))) / len(text)


@dataclass
class CodeQuality(DocStep):
    """Source-code filters, after the BigCode/Codex recipes.

    - files over 1 MB (The Stack, Kocetkov et al. 2022);
    - max line length > 1000 or mean line length > 100, alphanumeric fraction < 0.25 (Codex, Chen
      et al. 2021; The Stack): minified, generated or data files;
    - an autogenerated marker ("auto-generated", "autogenerated", "automatically generated") in
      the first 5 lines (CodeParrot's filter, as used for StarCoder);
    - encoded data (StarCoder, Li et al. 2023): base64 runs of 64+ chars, hex byte sequences of 8+
      bytes, 8+ `\\uXXXX` escapes; dropped when one match is longer than 1024 characters or
      matches cover more than 50% of the file.
    """

    max_bytes: int = 1_000_000
    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alnum_fraction: float = 0.25
    autogenerated_markers: tuple[str, ...] = ("auto-generated", "autogenerated", "automatically generated")
    autogenerated_scan_lines: int = 5
    max_encoded_match: int = 1024
    max_encoded_fraction: float = 0.5

    name = "code"

    def apply(self, doc: Document) -> Document | Drop:
        text = doc.text
        size = len(text.encode("utf-8", errors="replace")) if len(text) * 4 > self.max_bytes else len(text)
        if self.max_bytes and size > self.max_bytes:
            return Drop("code:too_large", f"{size:,} bytes > {self.max_bytes:,}")
        lines = text.split("\n")
        longest = max(map(len, lines))
        if longest > self.max_line_length:
            return Drop("code:max_line_length", f"a line of {longest} chars > {self.max_line_length}")
        mean = (len(text) - len(lines) + 1) / len(lines)
        if mean > self.max_mean_line_length:
            return Drop("code:mean_line_length", f"mean line length {mean:.0f} > {self.max_mean_line_length:.0f}")
        alnum = alnum_fraction(text)
        if alnum < self.min_alnum_fraction:
            return Drop("code:alnum_fraction", f"alphanumeric fraction {alnum:.2f} < {self.min_alnum_fraction}")
        if self.autogenerated_markers:
            head = "\n".join(lines[: self.autogenerated_scan_lines]).lower()
            for marker in self.autogenerated_markers:
                if marker in head:
                    return Drop("code:autogenerated", f"{marker!r} in the first {self.autogenerated_scan_lines} lines")
        if self.max_encoded_fraction < 1.0 or self.max_encoded_match:
            covered = 0
            for pattern in (_BASE64, _HEX, _UNICODE):
                if pattern is _UNICODE and "\\u" not in text:
                    continue
                for m in pattern.finditer(text):
                    span = m.end() - m.start()
                    if self.max_encoded_match and span > self.max_encoded_match:
                        return Drop("code:encoded_data", f"an encoded blob of {span} chars > {self.max_encoded_match}")
                    covered += span
            frac = _ratio(covered, len(text))
            if frac > self.max_encoded_fraction:
                return Drop("code:encoded_data", f"encoded data covers {frac:.0%} of the file")
        return doc
