"""The curation pipeline: sources -> steps -> curated documents, counted at every step.

A `Pipeline` reads its sources in order (each a callable returning documents: a reader, or a
generator of synthetic documents), cuts the stream into batches, runs each run of consecutive
`DocStep`s fused over the batches on an executor (local processes or Ray), and hands the stream
to each `GlobalStep` (dedup) with the same executor. Output order is input order, whatever the
executor, so the same input and config give byte-identical output.

Profiles name the usual step lists; exact and near dedup run in every profile (`none` included)
unless `dedup` is off. The settings are the `[curation]` section of the main config
(`leantrain.config.CurationConfig`): its fields pick the profile and switches, and
`[curation.<step>]` tables set any step's fields or turn steps on and off:

    [curation]
    profile = "web"
    [curation.gopher_quality]
    min_words = 20
    [curation.c4]
    enabled = false

`load_curation` reads that section from a TOML file (a main config, or a curation-only file in
the older form: top-level `profile` and `[step]` tables) plus `step.field=value` overrides.
The pipeline counts what every step took in, kept and dropped (the base of each kind of step
does the counting, as in datatrove); the curated stream is handed to tokenization through a
spill file (`write_spill` / `read_spill`) by `leantrain.dataprep`, which sits above both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leantrain.config import CurationConfig
from leantrain.config import load_config as load_main_config
from leantrain.corpus.readers import Document
from leantrain.corpus.steps import DocStep, Drop, Executor, GlobalStep, StepStats, utf8_len
from leantrain.errors import ConfigError, DataError

Source = Callable[[], Iterable[Document]]
Step = DocStep | GlobalStep

PROFILES = ("none", "code", "web")
# Every step a config may name, in the order a pipeline runs them. FineWeb runs Gopher repetition
# before Gopher quality; both only drop (never change) documents, so the kept set is the same either
# way, and the cheap quality rules first spare the costly n-gram counting on most rejects.
STEP_ORDER = ("normalize", "language", "gopher_quality", "gopher_repetition", "c4", "fineweb", "code", "pii",
              "exact_dedup", "near_dedup", "decontaminate")
_PROFILE_STEPS = {
    "none": ("exact_dedup", "near_dedup"),
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
    """Check a TOML value against a field's default type; tuples come from TOML arrays; a string
    (an override typed on the command line) is read as a TOML value when the field is not a string."""
    if isinstance(value, str) and not isinstance(default, str) and default is not None:
        with contextlib.suppress(tomllib.TOMLDecodeError):
            value = tomllib.loads(f"v = {value.strip()}")["v"]
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif (isinstance(default, float) and isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value)):  # NaN would pass or fail every threshold test silently
        return float(value)
    elif isinstance(default, str) and isinstance(value, str):
        return value
    elif isinstance(default, tuple) and isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    elif default is None or default is inspect.Parameter.empty:
        return tuple(value) if isinstance(value, list) else value
    raise ConfigError(f"{where} = {value!r} is not allowed; expected a value like {default!r}")


def parse_override(text: str) -> tuple[str, str, Any]:
    """`gopher_quality.min_words=20` -> ("gopher_quality", "min_words", 20); `profile=web` -> ("", "profile",
    "web"); values are TOML values, else the text as typed."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().rpartition(".")
    if not sep or not name or (dot and not section):
        raise ConfigError(f"curation override {text!r} is not allowed; write step.field=value, "
                          "e.g. gopher_quality.min_words=20")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word: a string
    return section, name, value


def load_curation(path: str | Path | None = None, overrides: Iterable[str] = (),
                  base: CurationConfig | None = None) -> CurationConfig:
    """The curation settings: `base` (or the defaults), then a TOML file's `[curation]` section (or, in a
    curation-only file, its top level), then `step.field=value` / `field=value` overrides.

    Scalar fields are checked by the main config's validation (one system); step tables by `build_steps`.
    """
    section: dict[str, Any] = {}
    if base is not None:
        section = {k: v for k, v in dataclasses.asdict(base).items() if k != "steps"}
        section.update({k: dict(v) for k, v in base.steps.items()})
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"curation config {p} is a folder; pass a TOML file")
        if not p.is_file():
            raise ConfigError(f"curation config {p} does not exist; pass a TOML file")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"curation config {p} is not UTF-8 text; save it as UTF-8 TOML") from None
        except OSError as e:
            raise ConfigError(f"curation config {p} cannot be read ({e.strerror}); check its permissions") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"curation config {p} is not valid TOML: {e}") from None
        data = data["curation"] if isinstance(data.get("curation"), dict) else data
        for key, value in data.items():
            if isinstance(value, dict):
                section.setdefault(key, {}).update(value)
            else:
                section[key] = value
    for item in overrides:
        step, name, value = parse_override(item)
        if step:
            section.setdefault(step, {})[name] = value
        else:
            section[name] = value
    try:
        return load_main_config(overrides={"curation": section}).curation
    except ConfigError as e:
        raise ConfigError(str(e).replace("config: curation.", "curation setting ")) from None


def plan_for(curation: CurationConfig, eval_paths: Iterable[str | Path] = ()) -> Plan:
    """The step list a `[curation]` section asks for (see `build_steps`)."""
    return build_steps(curation.profile, curation.steps, dedup=curation.dedup, pii=curation.pii,
                       eval_paths=eval_paths, language=curation.language or None)


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

    def _unique(self, name: str) -> str:
        """A step's name in the counts; a second step of the same name gets `name#2`, so no count overwrites another."""
        taken = {s.name for s in self.stats}
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name}#{n}", n + 1
        return unique

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
                seg_stats = []
                for s in segment:
                    seg_stats.append(StepStats(self._unique(s.name)))
                    self.stats.append(seg_stats[-1])
                stream = self._doc_steps(tuple(segment), stream, seg_stats)
                segment = []
            if step is not None:
                stats = StepStats(self._unique(step.name))
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
        yield from step.counted(docs, stats, self.executor)
        self.reports[stats.name] = step.report()


# ---- the hand-off to tokenization -----------------------------------------------------

def write_spill(docs: Iterable[Document], path: Path) -> int:
    """Write curated documents to a jsonl spill file (surrogates kept); returns how many."""
    n = 0
    with path.open("wb") as f:
        for d in docs:
            line = json.dumps({"id": d.id, "source": d.source, "text": d.text}, ensure_ascii=False)
            f.write(line.encode("utf-8", errors="surrogatepass") + b"\n")
            n += 1
    return n


def read_spill(path: Path) -> Iterator[Document]:
    """The documents `write_spill` wrote, in order."""
    with path.open("rb") as f:
        for raw in f:
            obj = json.loads(raw.decode("utf-8", errors="surrogatepass"))
            yield Document(obj["id"], obj["text"], obj["source"])
