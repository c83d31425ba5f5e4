"""Synthetic candidates through the curation pipeline: checks, filters, dedup against themselves and the real corpus.

The pipeline is the one `data prepare` runs (`corpus.pipeline`), with the kind's checks (`synth.checks`) in
front. Dedup against the real corpus wraps each dedup step in `AgainstReference`: the step sees the real
documents first and the candidates after, so it keeps the real copy of any duplicate pair and drops the
synthetic one (dedup keeps the earliest); only candidates are counted and only candidates come out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from leantrain.corpus.readers import Document
from leantrain.corpus.steps import Drop, Executor, GlobalStep, StepStats
from leantrain.synth.sources import REFERENCE_SOURCE


class _CandidatesOnly:
    """The `stats.drop` a wrapped step calls: counts candidates, ignores real documents it drops among themselves."""

    def __init__(self, stats: StepStats, reference_ids: set[str]) -> None:
        self.stats, self.reference_ids = stats, reference_ids
        self.copies_of_real = 0

    def drop(self, doc: Document, verdict: Drop) -> None:
        if doc.source == REFERENCE_SOURCE:
            return
        if self._kept_is_real(verdict.detail):
            self.copies_of_real += 1
            verdict = Drop(verdict.reason + "_of_real", verdict.detail)
        self.stats.drop(doc, verdict)

    def _kept_is_real(self, detail: str) -> bool:
        # dedup details name the kept document: "same normalized text as ID" / "near-duplicate of ID (cluster N)"
        for prefix in ("same normalized text as ", "near-duplicate of "):
            if detail.startswith(prefix):
                return detail[len(prefix):].split(" (cluster ")[0] in self.reference_ids
        return False


class AgainstReference(GlobalStep):
    """A dedup step run over the real documents then the candidates; yields the candidates it keeps. A candidate
    dropped as a copy of a real document is counted under `<reason>_of_real` (e.g. `dedup:near_of_real`)."""

    def __init__(self, inner: GlobalStep, reference: list[Document]) -> None:
        self.inner, self.reference = inner, reference
        self.name = inner.name
        self._report: dict[str, Any] = {}

    def run(self, docs: Iterable[Document], stats: StepStats, executor: Executor) -> Iterator[Document]:
        ids = {d.id for d in self.reference}
        counting = _CandidatesOnly(stats, ids)

        def both() -> Iterator[Document]:
            yield from self.reference
            yield from docs

        for doc in self.inner.run(both(), counting, executor):  # type: ignore[arg-type]
            if doc.source != REFERENCE_SOURCE:
                yield doc
        report = dict(self.inner.report())
        clusters = report.get("clusters")
        if isinstance(clusters, list):  # only clusters that lost a candidate
            kept = []
            for c in clusters:
                removed = [r for r in c.get("removed", []) if r not in ids]
                if removed:
                    kept.append({**c, "removed": removed, "kept_is_real": c.get("kept") in ids})
            report["clusters"] = kept
        report["reference_documents"] = len(self.reference)
        report["candidates_removed_as_copies_of_real"] = counting.copies_of_real
        self._report = report

    def report(self) -> dict[str, Any]:
        return self._report
