"""Weighted source mixing: one token dataset made of named sources, each trained on in proportion to its weight.

`leantrain data prepare --source real=corpus/:0.8 --source synthetic=synth/:0.2 --out data/mixed` writes
each source's shards under train/NAME/ and val/NAME/ and records the weights in meta.json ("mix"); the
`[data] mix` config table may re-weigh the sources of such a dataset for one run (a source left out gets 0).
The loader (`tokens/loader.py`) draws each window's source with these weights from the step's own seeded
generator, so where a sequence comes from depends only on (seed, step, position in the global batch):
resuming needs nothing but the step, and ranks split the global batch as they do without a mix.

A small source is repeated as often as its weight asks: it is seen `weight x trained tokens / its tokens`
times in a run ("effective epochs"), which `effective_epochs` computes and the trainer announces.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leantrain.errors import DataError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SPEC_HINT = "write --source NAME=PATH:WEIGHT (or PATH:WEIGHT, named after the folder), e.g. --source real=corpus/:0.8"


@dataclass(frozen=True)
class SourceSpec:
    """One `--source`: its name (a folder name under train/ and val/), its input path and its weight."""

    name: str
    path: Path
    weight: float


def _weight(text: str, where: str) -> float:
    try:
        w = float(text)
    except ValueError:
        raise DataError(f"{where}: weight {text!r} is not a number; {_SPEC_HINT}") from None
    if not math.isfinite(w) or w < 0:
        raise DataError(f"{where}: weight {text} is not allowed; give a finite number >= 0")
    return w


def check_name(name: str, where: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise DataError(f"{where}: source name {name!r} is not allowed; use letters, digits, '_', '-' or '.' "
                        "(at most 64, not starting with '.', '_' or '-')")
    return name


def parse_source(spec: str) -> SourceSpec:
    """`NAME=PATH:WEIGHT` or `PATH:WEIGHT` (the name is the path's last part without its suffixes)."""
    where = f"--source {spec!r}"
    path, colon, weight = spec.rpartition(":")
    if not colon or not path:
        raise DataError(f"{where}: no weight; {_SPEC_HINT}")
    name, eq, rest = path.partition("=")
    if eq and NAME_RE.fullmatch(name) and rest:
        path = rest
    else:
        name = Path(path).name.split(".")[0]
    return SourceSpec(check_name(name, where), Path(path), _weight(weight, where))


def check_weights(weights: Mapping[str, float], where: str) -> dict[str, float]:
    """The weights normalised to sum 1; negative, non-finite or all-zero weights are errors naming `where`."""
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise DataError(f"{where}: the weight of {name!r} is {w!r}; give a finite number >= 0")
    total = float(sum(weights.values()))
    if not weights or total <= 0:
        raise DataError(f"{where}: the weights {dict(weights)} do not sum to a positive number; give at least one "
                        "source a weight > 0")
    return {name: float(w) / total for name, w in weights.items()}


def check_sources(specs: list[SourceSpec]) -> dict[str, float]:
    """Names unique, every path there, weights usable; returns the normalised weights by name, in order."""
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise DataError(f"--source: the name {s.name!r} is given twice; name each source once "
                            "(--source NAME=PATH:WEIGHT)")
        seen.add(s.name)
        if not s.path.exists():
            raise DataError(f"--source {s.name}: {s.path} does not exist; check the path")
    return check_weights({s.name: s.weight for s in specs}, "--source")


def resolve_weights(recorded: Mapping[str, float] | None, override: Mapping[str, Any], dataset: str | Path,
                    where: str = "data.mix") -> dict[str, float] | None:
    """The weights a run trains with: `override` (the `[data] mix` table; sources it leaves out get 0) or,
    when it is empty, the weights recorded at prepare time. Normalised to sum 1, in the dataset's order;
    None for a dataset of one source."""
    if recorded is None:
        if override:
            raise DataError(f"{where} is set but {dataset} is not a mixed dataset; prepare it with --source "
                            "NAME=PATH:WEIGHT (repeated) or drop data.mix")
        return None
    if not override:
        return check_weights(recorded, f"{dataset} meta.json mix")
    unknown = [n for n in override if n not in recorded]
    if unknown:
        raise DataError(f"{where} names the source {unknown[0]!r}, which the dataset does not have; its sources are "
                        f"{', '.join(recorded)}")
    return check_weights({n: override.get(n, 0.0) for n in recorded}, where)


def effective_epochs(weights: Mapping[str, float], tokens: Mapping[str, int], trained_tokens: int) -> dict[str, float]:
    """How many times each source is seen (in expectation) when training on `trained_tokens` tokens."""
    return {n: weights[n] * trained_tokens / tokens[n] if tokens[n] else 0.0 for n in weights}


def mix_record(weights: Mapping[str, float], splits: Mapping[str, Any]) -> dict[str, Any]:
    """meta.json's "mix": per source its weight (normalised), train and val tokens and documents, and
    the trained tokens after which it has been seen once (its train tokens / weight)."""
    sources = {}
    for name, w in weights.items():
        train, val = splits["train"]["sources"][name], splits["val"]["sources"][name]
        sources[name] = {"weight": w, "train_tokens": train["tokens"], "train_documents": train["documents"],
                         "val_tokens": val["tokens"], "val_documents": val["documents"],
                         "tokens_per_epoch": round(train["tokens"] / w) if w > 0 else None}
    return {"sampling": "each training window picks its source with probability = weight", "sources": sources}
