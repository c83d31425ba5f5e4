"""The curation pipeline: sources -> steps -> curated documents, counted at every step.

A `Pipeline` reads its sources in order (each a callable returning documents: a reader, or a
generator of synthetic documents), cuts the stream into batches, runs each run of consecutive
`DocStep`s fused over the batches on an executor (local processes or Ray), and hands the stream
to each `GlobalStep` (dedup) with the same executor. Output order is input order, whatever the
executor, so the same input and config give byte-identical output.

Profiles name the usual step lists; a TOML file (or `section.key=value` overrides) sets any
step's fields or turns steps on and off:

    profile = "web"            # optional; the CLI's --profile wins
    [gopher_quality]
    min_words = 20
    [c4]
    enabled = false

`curate_dataset` runs a pipeline once, spills the curated documents to a temporary jsonl file
next to the output, builds the token dataset from that spill (the tokenizer pass and the encode
pass read the spill, so dedup is not computed twice) and writes the data card into the dataset
folder before it is renamed into place.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import shutil
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leantrain.corpus.readers import Document, ReadStats
from leantrain.corpus.steps import DocStep, Drop, Executor, GlobalStep, StepStats, utf8_len
from leantrain.errors import ConfigError, DataError
from leantrain.files import fresh_sibling

Source = Callable[[], Iterable[Document]]
Step = DocStep | GlobalStep

PROFILES = ("none", "code", "web")
# Every step a config may name, in the order a pipeline runs them. FineWeb runs Gopher repetition
# before Gopher quality; both only drop (never change) documents, so the kept set is the same either
# way, and the cheap quality rules first spare the costly n-gram counting on most rejects.
STEP_ORDER = ("normalize", "language", "gopher_quality", "gopher_repetition", "c4", "fineweb", "code", "pii",
              "exact_dedup", "near_dedup", "decontaminate")
_PROFILE_STEPS = {
    "none": (),
    "code": ("normalize", "code", "pii", "exact_dedup", "near_dedup", "decontaminate"),
    "web": ("normalize", "language", "gopher_quality", "gopher_repetition", "c4", "fineweb", "pii",
            "exact_dedup", "near_dedup", "decontaminate"),
}
# Profile-specific defaults on top of each step's own (published) defaults.
_PROFILE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "code": {},
    # FineWeb's recipe runs C4 without the terminal-punctuation line rule (it removed too much).
    "web": {"normalize": {"max_blank_lines": 2, "collapse_spaces": True}, "c4": {"terminal_punct": False}},
}

BATCH_DOCS = 512
BATCH_BYTES = 1 << 20


def _step_classes() -> dict[str, Callable[..., Step]]:
    from leantrain.corpus.filters import C4Filter, CodeQuality, FineWebQuality, GopherQuality, GopherRepetition
    from leantrain.corpus.language import LanguageFilter
    from leantrain.corpus.normalize import Normalize
    from leantrain.corpus.pii import PIIScrub

    classes: dict[str, Callable[..., Step]] = {
        "normalize": Normalize, "language": LanguageFilter, "gopher_repetition": GopherRepetition,
        "gopher_quality": GopherQuality, "c4": C4Filter, "fineweb": FineWebQuality, "code": CodeQuality,
        "pii": PIIScrub}
    # The dedup/decontamination steps live in their own modules (imported lazily: numpy-heavy).
    from leantrain.corpus.decontaminate import Decontaminate
    from leantrain.corpus.dedup import ExactDedup, NearDedup

    classes.update(exact_dedup=ExactDedup, near_dedup=NearDedup, decontaminate=Decontaminate)
    return classes


def step_fields(cls: Callable[..., Step]) -> dict[str, Any]:
    """The settable fields of a step class and their defaults."""
    if dataclasses.is_dataclass(cls):
        return {f.name: f.default for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    params = inspect.signature(cls).parameters
    return {k: p.default for k, p in params.items() if p.kind is not p.VAR_KEYWORD and p.kind is not p.VAR_POSITIONAL}


def _coerce(default: Any, value: Any, where: str) -> Any:
    """Check a TOML value against a field's default type; tuples come from TOML arrays."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(default, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, str) and isinstance(value, str):
        return value
    elif isinstance(default, tuple) and isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    elif default is None or default is inspect.Parameter.empty:
        return tuple(value) if isinstance(value, list) else value
    raise ConfigError(f"{where} = {value!r} is not allowed; expected a value like {default!r}")


def parse_override(text: str) -> tuple[str, str, Any]:
    """`gopher_quality.min_words=20` -> ("gopher_quality", "min_words", 20); values are TOML values."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise ConfigError(f"curation override {text!r} is not allowed; write step.field=value, "
                          "e.g. gopher_quality.min_words=20")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word: a string
    return section, name, value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a curation TOML file and apply `step.field=value` overrides; returns {section: {field: value}}."""
    config: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"curation config {p} does not exist; pass a TOML file")
        try:
            config = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"curation config {p} is not valid TOML: {e}") from None
    for item in overrides:
        section, name, value = parse_override(item)
        config.setdefault(section, {})[name] = value
    return config


@dataclass
class Plan:
    """The steps a profile and config give, plus notes for the card (steps skipped and why)."""

    profile: str
    steps: list[Step]
    settings: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def build_steps(profile: str = "code", config: dict[str, Any] | None = None, *, dedup: bool = True,
                pii: bool = True, eval_paths: Iterable[str | Path] = (), language: str | None = None) -> Plan:
    """The step list for `profile`, with `config`'s fields and switches applied.

    `dedup=False` leaves out exact and near dedup; `pii=False` the scrubber; decontamination runs
    only when `eval_paths` are given; a language filter only when `language` (or the config) asks
    for one and an identifier is installed.
    """
    config = dict(config or {})
    profile = config.pop("profile", profile) if profile is None else profile
    if profile not in PROFILES:
        raise ConfigError(f"curation profile {profile!r} is not allowed; choose one of {', '.join(PROFILES)}")
    classes = _step_classes()
    for section, values in config.items():
        if section == "profile":
            continue
        if section not in classes:
            raise ConfigError(f"unknown curation step [{section}]; steps: {', '.join(STEP_ORDER)}")
        if not isinstance(values, dict):
            raise ConfigError(f"curation config {section} = {values!r} is not allowed; use a [{section}] table")
    eval_paths = [str(p) for p in eval_paths]
    wanted = set(_PROFILE_STEPS[profile])
    if not dedup:
        wanted -= {"exact_dedup", "near_dedup"}
    if not pii:
        wanted.discard("pii")
    if language:
        wanted.add("language")
    notes: list[str] = []
    steps: list[Step] = []
    settings: dict[str, dict[str, Any]] = {}
    for name in STEP_ORDER:
        section = dict(config.get(name, {}))
        enabled = section.pop("enabled", name in wanted)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{name}.enabled = {enabled!r} is not allowed; expected true or false")
        if name == "decontaminate":
            paths = eval_paths or section.get("eval_paths", [])
            if not enabled or not paths:
                continue
            section["eval_paths"] = list(paths)
        if name == "language" and language:
            section["languages"] = [language]
        if not enabled:
            continue
        cls = classes[name]
        fields = step_fields(cls)
        kwargs = dict(_PROFILE_DEFAULTS.get(profile, {}).get(name, {}))
        for key, value in section.items():
            if key not in fields:
                raise ConfigError(f"unknown curation setting {name}.{key}; allowed: {', '.join(sorted(fields))}, "
                                  "enabled")
            kwargs[key] = _coerce(fields[key], value, f"{name}.{key}")
        try:
            step = cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"curation step {name}: {e}") from None
        if name == "language":
            ok, why = step.available()  # type: ignore[union-attr]
            if not ok:
                notes.append(f"language filter skipped: {why}")
                continue
        settings[name] = {**{k: v for k, v in fields.items() if v is not inspect.Parameter.empty}, **kwargs}
        steps.append(step)
    return Plan(profile, steps, settings, notes)


def _apply_chain(steps: tuple[DocStep, ...], batch: list[Document]) -> tuple[list[Document], list[StepStats]]:
    """Run fused per-document steps over one batch (in a worker); returns kept documents and per-step stats."""
    stats = [StepStats(s.name) for s in steps]
    out: list[Document] = []
    clock = time.process_time  # CPU seconds: what a step costs, whatever else the machine runs
    for doc in batch:
        pending = [doc]
        for step, st in zip(steps, stats, strict=True):
            nxt: list[Document] = []
            t0 = clock()
            for d in pending:
                size = utf8_len(d.text)
                st.docs_in += 1
                st.bytes_in += size
                result = step.process(d, st)
                if isinstance(result, Drop):
                    st.drop(d, result)
                    continue
                for r in (result if isinstance(result, list | tuple) else (result,)):
                    st.docs_out += 1
                    st.bytes_out += size if r is d else utf8_len(r.text)
                    nxt.append(r)
            st.seconds += clock() - t0
            pending = nxt
            if not pending:
                break
        out.extend(pending)
    return out, stats


class Pipeline:
    """Sources -> steps -> documents. Iterate `run()`; then `stats`, `reports` and `lengths` describe the run."""

    def __init__(self, sources: Source | Iterable[Source], steps: Iterable[Step] = (),
                 executor: Executor | None = None, batch_docs: int = BATCH_DOCS, batch_bytes: int = BATCH_BYTES,
                 progress: Callable[[int], None] | None = None) -> None:
        from leantrain.corpus.executors import SerialExecutor

        self.sources = [sources] if callable(sources) else list(sources)
        self.steps = list(steps)
        for s in self.steps:
            if not isinstance(s, DocStep | GlobalStep):
                raise TypeError(f"{s!r} is neither a DocStep nor a GlobalStep")
        self.executor: Executor = executor if executor is not None else SerialExecutor()
        self.batch_docs, self.batch_bytes = batch_docs, batch_bytes
        self.progress = progress
        self.stats: list[StepStats] = []
        self.reports: dict[str, dict[str, Any]] = {}
        self.lengths: dict[str, list[int]] = {"in": [], "out": []}  # characters per document
        self.seconds = 0.0

    def run(self) -> Iterator[Document]:
        t0 = time.perf_counter()
        self.stats, self.reports, self.lengths = [], {}, {"in": [], "out": []}
        read = StepStats("read")
        self.stats.append(read)
        stream: Iterator[Document] = self._read(read)
        segment: list[DocStep] = []
        for step in self.steps + [None]:  # type: ignore[list-item]
            if isinstance(step, DocStep):
                segment.append(step)
                continue
            # Stats are made here, not inside the (lazy) generators, so they list in step order.
            if segment:
                seg_stats = [StepStats(s.name) for s in segment]
                self.stats.extend(seg_stats)
                stream = self._doc_steps(tuple(segment), stream, seg_stats)
                segment = []
            if step is not None:
                stats = StepStats(step.name)
                self.stats.append(stats)
                stream = self._global(step, stream, stats)
        out = self.lengths["out"]
        for doc in stream:
            out.append(len(doc.text))
            yield doc
        self.seconds = time.perf_counter() - t0

    def _read(self, read: StepStats) -> Iterator[Document]:
        lengths = self.lengths["in"]
        t = time.perf_counter()
        for source in self.sources:
            for doc in source():
                if not isinstance(doc, Document):
                    raise DataError(f"a source yielded {type(doc).__name__}, not a Document; a synthetic source "
                                    "must yield leantrain.corpus.readers.Document objects")
                size = utf8_len(doc.text)
                read.docs_in += 1
                read.docs_out += 1
                read.bytes_in += size
                read.bytes_out += size
                lengths.append(len(doc.text))
                read.seconds += time.perf_counter() - t
                if self.progress and read.docs_in % 256 == 0:
                    self.progress(read.docs_in)
                yield doc
                t = time.perf_counter()
        read.seconds += time.perf_counter() - t

    def _batches(self, docs: Iterator[Document]) -> Iterator[list[Document]]:
        batch: list[Document] = []
        size = 0
        for d in docs:
            batch.append(d)
            size += len(d.text)
            if len(batch) >= self.batch_docs or size >= self.batch_bytes:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _doc_steps(self, steps: tuple[DocStep, ...], docs: Iterator[Document],
                   stats: list[StepStats]) -> Iterator[Document]:
        fn = functools.partial(_apply_chain, steps)
        for kept, part in self.executor.map(fn, self._batches(docs)):
            for total, p in zip(stats, part, strict=True):
                total.merge(p)
            yield from kept

    def _global(self, step: GlobalStep, docs: Iterator[Document], stats: StepStats) -> Iterator[Document]:
        upstream = [0, 0, 0.0]  # docs, bytes, seconds spent waiting on earlier steps

        def counted() -> Iterator[Document]:
            t = time.perf_counter()
            for d in docs:
                upstream[2] += time.perf_counter() - t
                upstream[0] += 1
                upstream[1] += utf8_len(d.text)
                yield d
                t = time.perf_counter()
            upstream[2] += time.perf_counter() - t

        n_out = b_out = 0
        t0 = time.perf_counter()
        for d in step.run(counted(), stats, self.executor):
            n_out += 1
            b_out += utf8_len(d.text)
            yield d
        # The pipeline's own counts win over whatever the step counted, so every step reads alike.
        stats.docs_in, stats.bytes_in, stats.docs_out, stats.bytes_out = upstream[0], upstream[1], n_out, b_out
        stats.seconds = time.perf_counter() - t0 - upstream[2]
        self.reports[step.name] = step.report()


# ---- curated token dataset -----------------------------------------------------------

def _write_spill(docs: Iterable[Document], path: Path) -> int:
    n = 0
    with path.open("wb") as f:
        for d in docs:
            line = json.dumps({"id": d.id, "source": d.source, "text": d.text}, ensure_ascii=False)
            f.write(line.encode("utf-8", errors="surrogatepass") + b"\n")
            n += 1
    return n


def read_spill(path: Path) -> Iterator[Document]:
    with path.open("rb") as f:
        for raw in f:
            obj = json.loads(raw.decode("utf-8", errors="surrogatepass"))
            yield Document(obj["id"], obj["text"], obj["source"])


def curate_dataset(sources: Source | Iterable[Source], out_dir: str | Path, *, plan: Plan,
                   executor: Executor | None = None, read_stats: ReadStats | None = None,
                   provenance: dict[str, Any] | None = None, progress: Callable[[str, int, int | None], None] | None
                   = None, plot: bool = True, **prepare_kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Curate `sources` with `plan`, then build the token dataset in `out_dir`; returns (meta, card).

    The card (`data_card.json`, `data_card.md`, and `data_card.png` when matplotlib is there) is
    written into the dataset folder before it is renamed into place: no dataset without its card.
    """
    from leantrain.corpus.card import build_card, write_card
    from leantrain.tokens.prepare import _check_out_dir, prepare_dataset

    out = Path(out_dir)
    _check_out_dir(out, bool(prepare_kwargs.get("overwrite", False)))  # fail before the curation work
    spill_dir = fresh_sibling(out, "curate")
    try:
        pipe = Pipeline(sources, plan.steps, executor,
                        progress=(lambda n: progress("curate", n, None)) if progress else None)
        spill = spill_dir / "curated.jsonl"
        kept = _write_spill(pipe.run(), spill)
        if progress:
            progress("curate", pipe.stats[0].docs_in, pipe.stats[0].docs_in)
        if kept == 0:
            raise DataError(f"curation kept no documents (profile {plan.profile!r}, {pipe.stats[0].docs_in} read); "
                            "see which step removed them with --profile none or a looser config")
        doc_tokens: list[int] = []
        card: dict[str, Any] = {}

        def publish(tmp: Path, meta: dict[str, Any]) -> None:
            card.update(build_card(pipe, plan, meta, doc_tokens, read_stats=read_stats,
                                   executor=getattr(executor, "describe", lambda: "serial")()))
            write_card(card, tmp, plot=plot)

        meta = prepare_dataset(lambda: read_spill(spill), out, provenance={**(provenance or {}),
                               "curation_profile": plan.profile}, progress=progress, doc_tokens=doc_tokens,
                               before_publish=publish, **prepare_kwargs)
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)
    return meta, card
