"""Curation filters against datatrove's implementations, on real prose found on this machine.

Runs leantrain's Gopher quality, Gopher repetition, C4 (both the C4 and FineWeb variants) and
FineWeb filters and datatrove's (`pip install -e '.[bench]'`: datatrove and spaCy, whose blank
English pipeline is datatrove's English word and sentence splitter) on the same documents, and
prints per filter how often the keep/drop verdicts agree, then the documents where they differ,
grouped by each side's reason. Documents (nothing is downloaded):

  doc       /usr/share/doc: READMEs, NEWS, changelogs (gzip too), copyright files, .txt/.md/.rst
  licenses  /usr/share/common-licenses
  metadata  the long descriptions of the installed Python packages (their README files)
  docstrings  module docstrings of the Python standard library
  stdlib    a sample of leantrain's built-in corpus (source code: the filters should drop it)

Every text goes through the web profile's `normalize` step first, as the filters see it in
`data prepare --profile web`. The "c4 web, zero-sentence lines" row replays C4 with the sentence
count leantrain had before (a line without terminal punctuation counted no sentence) to show
what that rule dropped. The "dt words w/o punctuation" rows give datatrove leantrain's notion of a
word (its tokenizer's punctuation-only tokens left out): the disagreement that remains there is
not that deliberate difference.

    python bench/filter_parity.py                   # all sources, up to 250 documents each
    python bench/filter_parity.py --per-source 100 --examples 5
"""

from __future__ import annotations

import argparse
import ast
import gzip
import random
import sys
import sysconfig
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from leantrain.corpus import filters
from leantrain.corpus.normalize import Normalize
from leantrain.corpus.readers import Document, read_builtin
from leantrain.corpus.steps import Drop

MAX_CHARS = 50_000  # longer files are cut at a line boundary: spaCy's cost grows with the text
MIN_CHARS = 200


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[: text.rfind("\n", 0, MAX_CHARS) + 1]


def _read(path: Path) -> str | None:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\0" in raw[:4096]:
        return None
    return raw.decode("utf-8", errors="replace")


def docs_usr_share_doc() -> Iterator[tuple[str, str]]:
    wanted = (".txt", ".md", ".rst", ".gz")
    paths = sorted(Path("/usr/share/doc").rglob("*"))
    for path in random.Random(0).sample(paths, len(paths)):  # a spread of packages, not the first ones
        name = path.name.lower()
        if not path.is_file() or path.is_symlink():
            continue
        if not (path.suffix in wanted or name.startswith(("readme", "news", "copyright", "changelog", "authors"))):
            continue
        if path.suffix == ".gz" and not name.startswith(("changelog", "news", "readme")):
            continue
        text = _read(path)
        if text:
            yield str(path), text


def docs_licenses() -> Iterator[tuple[str, str]]:
    for path in sorted(Path("/usr/share/common-licenses").glob("*")):
        if path.is_file() and (text := _read(path)):
            yield str(path), text


def docs_metadata() -> Iterator[tuple[str, str]]:
    for dist in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        raw = dist.read_text("METADATA")
        if raw:
            body = Parser().parsestr(raw).get_payload()
            if isinstance(body, str):
                yield f"METADATA:{dist.metadata['Name']}", body


def docs_docstrings() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=True)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        if doc:
            yield f"docstring:{path.relative_to(root)}", doc


def docs_stdlib() -> Iterator[tuple[str, str]]:
    docs = list(read_builtin("stdlib"))
    for d in random.Random(0).sample(docs, len(docs)):
        yield f"stdlib:{d.id}", d.text


SOURCES: dict[str, Callable[[], Iterator[tuple[str, str]]]] = {
    "doc": docs_usr_share_doc, "licenses": docs_licenses, "metadata": docs_metadata,
    "docstrings": docs_docstrings, "stdlib": docs_stdlib}


def load(per_source: int) -> list[tuple[str, Document]]:
    norm = Normalize(max_blank_lines=2, collapse_spaces=True)  # the web profile's settings
    out = []
    for source, make in SOURCES.items():
        n = 0
        for name, text in make():
            if len(text.strip()) < MIN_CHARS:
                continue
            d = norm.apply(Document(name, _cut(text), source))
            if isinstance(d, Document) and d.text.strip():
                out.append((source, d))
                n += 1
                if n >= per_source:
                    break
    return out


def no_punct_words():
    """datatrove's English tokenizer without its punctuation-only tokens: leantrain's notion of a word, so the
    rows that use it show what is left once that deliberate difference is taken out."""
    from datatrove.utils.text import PUNCTUATION_SET
    from datatrove.utils.word_tokenizers import SpaCyTokenizer

    class WordsOnly(SpaCyTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return [w for w in super().word_tokenize(text) if any(ch not in PUNCTUATION_SET for ch in w)]

    return WordsOnly("en")


def pairs():
    """(row name, leantrain step, datatrove filter) for each comparison."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    words = no_punct_words()
    return [
        ("gopher_quality", filters.GopherQuality(), GopherQualityFilter()),
        ("gopher_repetition", filters.GopherRepetition(), GopherRepetitionFilter()),
        ("c4", filters.C4Filter(), C4QualityFilter()),
        ("c4 web (no terminal-punct rule)", filters.C4Filter(terminal_punct=False),
         C4QualityFilter(filter_no_terminal_punct=False)),
        # datatrove's code default for duplicated-line characters is 0.01; FineWeb's paper (and leantrain) 0.1
        ("fineweb", filters.FineWebQuality(), FineWebQualityFilter(char_duplicates_ratio=0.1)),
        ("gopher_quality, dt words w/o punctuation", filters.GopherQuality(), GopherQualityFilter(language=words)),
        ("gopher_repetition, dt w/o punctuation", filters.GopherRepetition(), GopherRepetitionFilter(language=words)),
        ("fineweb, dt words w/o punctuation", filters.FineWebQuality(),
         FineWebQualityFilter(char_duplicates_ratio=0.1, language=words)),
    ]


def datatrove_verdict(flt, doc: Document) -> tuple[str | None, str]:
    """(drop reason or None, the text it would keep)."""
    from datatrove.data import Document as DTDocument

    d = DTDocument(text=doc.text, id=doc.id)
    try:
        v = flt.filter(d)
    except ZeroDivisionError:
        return "ZeroDivisionError", d.text
    if isinstance(v, tuple):
        return (None if v[0] else v[1]), d.text
    return (None if v else "dropped"), d.text


def leantrain_verdict(step, doc: Document) -> tuple[str | None, str]:
    out = step.apply(doc)
    return (out.reason, "") if isinstance(out, Drop) else (None, out.text)


def old_sentence_count(line: str) -> int:
    """The count before the fix: terminal marks only, so a line without one counted zero sentences."""
    return len(filters._SENTENCE_END.findall(line))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-source", type=int, default=250, help="documents at most from each source")
    ap.add_argument("--examples", type=int, default=3, help="document names shown per disagreement reason")
    args = ap.parse_args()
    try:
        import datatrove
        import spacy  # noqa: F401  (datatrove's English tokenizer)
    except ImportError as e:
        sys.exit(f"{e.name} is not installed: pip install -e '.[bench]'")
    t0 = time.perf_counter()
    docs = load(args.per_source)
    by_source = Counter(s for s, _ in docs)
    mb = sum(len(d.text.encode()) for _, d in docs) / 1e6
    print(f"datatrove {datatrove.__version__ if hasattr(datatrove, '__version__') else metadata.version('datatrove')}"
          f"; {len(docs)} documents, {mb:.1f} MB after normalize: "
          + ", ".join(f"{s} {n}" for s, n in by_source.items()) + f" (loaded in {time.perf_counter() - t0:.0f} s)")

    comparisons = pairs()
    c4web = comparisons[3]
    comparisons.append(("c4 web, zero-sentence lines (before)", c4web[1], c4web[2]))
    counts = {name: Counter() for name, _, _ in comparisons}
    per_source = {name: defaultdict(lambda: [0, 0]) for name, _, _ in comparisons}
    diffs = {name: defaultdict(list) for name, _, _ in comparisons}
    for source, doc in docs:  # document-major, so datatrove's cached word split serves every filter
        for name, ours, theirs in comparisons:
            if name.endswith("(before)"):
                saved, filters.sentence_count = filters.sentence_count, old_sentence_count
                try:
                    lt, lt_text = leantrain_verdict(ours, doc)
                finally:
                    filters.sentence_count = saved
            else:
                lt, lt_text = leantrain_verdict(ours, doc)
            dt, dt_text = datatrove_verdict(theirs, doc)
            same = (lt is None) == (dt is None)
            c = counts[name]
            c["n"] += 1
            c["agree"] += same
            c["lt_drop"] += lt is not None
            c["dt_drop"] += dt is not None
            per_source[name][source][0] += same
            per_source[name][source][1] += 1
            if same and lt is None and lt_text.strip() != dt_text.strip():
                c["text_diff"] += 1
                diffs[name][("both keep", "kept text differs")].append(doc.id)
            if not same:
                key = (f"leantrain drops: {lt}", "datatrove keeps") if lt else \
                      ("leantrain keeps", f"datatrove drops: {dt}")
                diffs[name][key].append(doc.id)

    print()
    print(f"{'filter':42} {'docs':>5} {'agree':>7} {'lt drops':>9} {'dt drops':>9} {'text diff':>9}"
          "   agreement per source")
    for name, c in counts.items():
        n = c["n"]
        srcs = " ".join(f"{s} {a / t:.0%}" for s, (a, t) in per_source[name].items())
        print(f"{name:42} {n:5d} {c['agree'] / n:7.1%} {c['lt_drop'] / n:9.1%} {c['dt_drop'] / n:9.1%} "
              f"{c['text_diff']:9d}   {srcs}")
    for name, by_reason in diffs.items():
        if not by_reason:
            continue
        print(f"\n{name}: where they differ")
        for (ours, theirs), ids in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(ids[: args.examples]) + (" ..." if len(ids) > args.examples else "")
            print(f"  {len(ids):4d}  {ours:44} {theirs:40} e.g. {shown}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
