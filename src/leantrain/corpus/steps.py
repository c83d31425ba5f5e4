"""The contract every curation step follows, so a pipeline is just a list of them.

Two kinds of step, after datatrove's shape:

- `DocStep` looks at one document at a time (normalizers, quality filters, PII scrubbing,
  decontamination). It returns the document (maybe changed) or a `Drop` naming the reason. It
  must be picklable and deterministic, so the pipeline can run it in worker processes (or Ray
  tasks) over batches of documents and still give byte-identical output.
- `GlobalStep` needs to see the whole stream (exact and near dedup). It gets the documents and an
  `Executor` to spread its heavy work (hashing, signatures, band buckets) over the cores, and
  yields the documents it keeps, in input order.

Every step counts what it kept, changed and dropped in a `StepStats`, with a few examples per
drop reason for the data card.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from leantrain.corpus.readers import Document

T = TypeVar("T")
R = TypeVar("R")

EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 300


def utf8_len(text: str) -> int:
    """Bytes of `text` in UTF-8, as the steps count them; `isascii` is O(1), so ASCII text is not encoded."""
    return len(text) if text.isascii() else len(text.encode("utf-8", errors="surrogatepass"))


@dataclass(frozen=True)
class Drop:
    """A step's verdict that a document goes: `reason` is a short stable key (`gopher:mean_word_length`),
    `detail` a human note for the data card (`mean word length 1.2 < 3`)."""

    reason: str
    detail: str = ""


@dataclass
class StepStats:
    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> documents
    modified: Counter = field(default_factory=Counter)  # what changed documents (e.g. "pii:email") -> count
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # reason -> [{id, text, detail}]
    seconds: float = 0.0

    def drop(self, doc: Document, verdict: Drop) -> None:
        self.dropped[verdict.reason] += 1
        kept = self.examples.setdefault(verdict.reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append({"id": doc.id, "text": doc.text[:EXAMPLE_CHARS], "detail": verdict.detail})

    def merge(self, other: StepStats) -> None:
        """Add another worker's counts (examples kept in merge order, so deterministic for ordered merges)."""
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.dropped.update(other.dropped)
        self.modified.update(other.modified)
        for reason, examples in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(examples[: EXAMPLES_PER_REASON - len(kept)])
        self.seconds += other.seconds

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "dropped": dict(sorted(self.dropped.items())),
                "modified": dict(sorted(self.modified.items())), "examples": self.examples,
                "seconds": round(self.seconds, 3)}


class Executor(Protocol):
    """Runs a picklable function over items on several workers; results come back in input order."""

    workers: int

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]: ...


class DocStep:
    """One document in, the document (possibly changed) or a `Drop` out. Subclasses set `name`.

    A step that makes data (synthetic documents, splitting) may return a list of documents instead;
    each goes on through the following steps in order.
    """

    name: str = "step"

    def apply(self, doc: Document) -> Document | Drop | list[Document]:
        raise NotImplementedError

    def process(self, doc: Document, stats: StepStats) -> Document | Drop | list[Document]:
        """`apply` plus counting what changed; the pipeline calls this. Override it to count finer
        reasons (e.g. `pii:email`) in `stats.modified`; the default counts a changed text under the name."""
        result = self.apply(doc)
        if isinstance(result, Document) and result.text != doc.text:
            stats.modified[self.name] += 1
        return result


class GlobalStep:
    """Sees the whole stream; yields the kept documents in input order and records each drop in `stats`.

    `run` only says what goes (`stats.drop`); `counted` (what the pipeline calls) adds the documents
    and bytes in and out and the wall time, so every step is counted the same way, once.
    """

    name: str = "global"

    def run(self, docs: Iterable[Document], stats: StepStats, executor: Executor) -> Iterator[Document]:
        raise NotImplementedError

    def counted(self, docs: Iterable[Document], stats: StepStats, executor: Executor) -> Iterator[Document]:
        """`run` with the in/out counts and seconds (excluding the time spent waiting on earlier steps)."""
        waited = 0.0

        def inputs() -> Iterator[Document]:
            nonlocal waited
            t = time.perf_counter()
            for d in docs:
                waited += time.perf_counter() - t
                stats.docs_in += 1
                stats.bytes_in += utf8_len(d.text)
                yield d
                t = time.perf_counter()
            waited += time.perf_counter() - t

        t0 = time.perf_counter()
        for d in self.run(inputs(), stats, executor):
            stats.docs_out += 1
            stats.bytes_out += utf8_len(d.text)
            yield d
        stats.seconds += time.perf_counter() - t0 - waited

    def report(self) -> dict[str, Any]:
        """Anything for the data card beyond the counts (e.g. duplicate clusters)."""
        return {}
