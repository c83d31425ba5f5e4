"""Raw documents -> curated documents -> token dataset: the one data path, above `corpus` and `tokens`.

`prepare` reads the inputs (files and folders, the built-in corpus, a local Hugging Face `datasets`
folder or file, or chat records), runs the
curation pipeline that the `[curation]` config section asks for (dedup in every profile), spills
the curated documents to a temporary jsonl file next to the output, builds the token dataset (plain
or chat with loss masks) from that spill, and writes the data card into the dataset folder before
it is renamed into place: no dataset without its card, and the tokenizer and encode passes read the
spill, so curation runs once.

Nothing half-made survives: the spill folder (`.NAME.curate-PID`) and the dataset staging folder
(`.NAME.tmp-PID`) are removed on every way out (an error, a full disk, Ctrl-C), and leftovers of a
process that was killed (SIGKILL, power loss) are removed the next time a prepare writes the same
`out`. A full disk or another write failure becomes one `DataError` naming what to do.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leantrain.config import CurationConfig
from leantrain.corpus.card import build_card, write_card
from leantrain.corpus.chat import read_chat_documents
from leantrain.corpus.executors import make_executor
from leantrain.corpus.pipeline import Pipeline, Plan, Source, plan_for, read_spill, write_spill
from leantrain.corpus.readers import Document, ReadStats, read_builtin, read_paths
from leantrain.corpus.steps import Executor
from leantrain.errors import DataError
from leantrain.files import fresh_sibling, remove_stale_temps
from leantrain.tokens.mix import SourceSpec, check_sources, parse_source
from leantrain.tokens.prepare import Progress, check_out_dir, prepare_dataset
from leantrain.tokens.tokenizer import load_tokenizer

FORMATS = ("text", "chat")


@dataclass
class Prepared:
    """What `prepare` made: the dataset's meta.json and data card, the readers' counts, and notes for people."""

    out: Path
    meta: dict[str, Any]
    card: dict[str, Any]
    read_stats: ReadStats
    executor: str = "serial"
    warnings: list[str] = field(default_factory=list)


def _write_error(e: OSError, out: Path) -> DataError:
    where = e.filename or out.parent
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DataError(f"no space left on the disk while writing {where}; the partial output was removed; "
                         f"free some space (or pick an --out on another disk) and run the same command again")
    return DataError(f"{where}: {e.strerror or e}; the partial output was removed; check that path's "
                     f"permissions and free space, then run the same command again")


def curate_dataset(sources: Source | Iterable[Source], out_dir: str | Path, *, plan: Plan,
                   executor: Executor | None = None, read_stats: ReadStats | None = None,
                   provenance: dict[str, Any] | None = None, progress: Progress | None = None, plot: bool = True,
                   format: str = "text", chat_template: str | None = None,
                   **tokenize_kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Curate `sources` with `plan`, then build the token dataset in `out_dir`; returns (meta, card).

    `format="chat"` takes chat documents (`corpus.chat`) and writes tokens with loss masks using
    `chat_template`. `tokenize_kwargs` go to `prepare_dataset` / `write_chat_dataset` (vocab_size,
    tokenizer_path, val_fraction, shard_tokens, overwrite).
    """
    if format not in FORMATS:
        raise DataError(f"format {format!r} is not allowed; choose one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    check_out_dir(out, bool(tokenize_kwargs.get("overwrite", False)))  # fail before the curation work
    spill_dir = None
    try:
        spill_dir = fresh_sibling(out, "curate")
        pipe = Pipeline(sources, plan.steps, executor,
                        progress=(lambda n: progress("curate", n, None)) if progress else None)
        spill = spill_dir / "curated.jsonl"
        kept = write_spill(pipe.run(), spill)
        if progress:
            progress("curate", pipe.stats[0].docs_in, pipe.stats[0].docs_in)
        if pipe.stats[0].docs_in == 0:
            summary = f" ({read_stats.summary()})" if read_stats is not None else ""
            raise DataError(f"no documents to read{summary}; check the inputs")
        if kept == 0:
            drops = ", ".join(f"{st.name} dropped {sum(st.dropped.values()):,}" for st in pipe.stats if st.dropped)
            raise DataError(f"curation kept no documents (profile {plan.profile!r}, {pipe.stats[0].docs_in:,} read; "
                            f"{drops}); loosen the [curation] settings or pick another --profile")
        doc_tokens: list[int] = []
        card: dict[str, Any] = {}

        def publish(tmp: Path, meta: dict[str, Any]) -> None:
            card.update(build_card(pipe, plan, meta, doc_tokens, read_stats=read_stats,
                                   executor=getattr(executor, "describe", lambda: "serial")()))
            write_card(card, tmp, plot=plot)

        prov = {**(provenance or {}), "curation_profile": plan.profile}
        if format == "chat":
            from leantrain.tokens.chat import DEFAULT_TEMPLATE, examples_from_documents, write_chat_dataset

            meta = write_chat_dataset(lambda: examples_from_documents(read_spill(spill)), out,
                                      template=chat_template or DEFAULT_TEMPLATE, provenance=prov, progress=progress,
                                      doc_tokens=doc_tokens, before_publish=publish, **tokenize_kwargs)
        else:
            meta = prepare_dataset(lambda: read_spill(spill), out, provenance=prov, progress=progress,
                                   doc_tokens=doc_tokens, before_publish=publish, **tokenize_kwargs)
    except OSError as e:
        raise _write_error(e, out) from None
    finally:
        if spill_dir is not None:
            shutil.rmtree(spill_dir, ignore_errors=True)
    return meta, card


def source_of(doc: Document) -> str:
    """The `--source` name of a document of a mixed prepare (its id starts with `NAME/`)."""
    return doc.id.split("/", 1)[0]


def prepare(inputs: Sequence[str | Path] = (), out: str | Path = "data/dataset", *, builtin: str | None = None,
            format: str = "text", curation: CurationConfig | None = None, eval_paths: Sequence[str | Path] = (),
            include: Sequence[str] = (), exclude: Sequence[str] = (), vocab_size: int = 8192,
            tokenizer: str | Path | None = None, val_fraction: float = 0.02, shard_tokens: int = 50_000_000,
            overwrite: bool = False, prompt_field: str = "prompt", response_field: str = "response",
            chat_template: str | None = None, progress: Progress | None = None,
            executor: Executor | None = None, plot: bool = True, hf_dataset: str | Path | None = None,
            hf_split: str = "train", sources: Sequence[str | SourceSpec] = ()) -> Prepared:
    """Build a curated token dataset in `out` from files/folders `inputs`, the built-in corpus `builtin`
    or a local Hugging Face `datasets` folder or data file `hf_dataset` (split `hf_split`).

    `curation` is the `[curation]` config section (profile, dedup, PII, language, executor, reader
    safety, text_field); `format="chat"` reads prompt/response records and writes loss masks. Every
    check (paths, settings, the text field of jsonl files and datasets) happens before any folder is written.
    `sources` (`--source NAME=PATH:WEIGHT` strings or `tokens.mix.SourceSpec`s) makes a mixed dataset instead
    of `inputs`: curated together (so dedup keeps a document shared by two sources in the first one given),
    tokenized with one tokenizer, written and split per source, trained on by weight (`tokens/mix.py`).
    """
    cur = curation if curation is not None else CurationConfig()
    out = Path(out)
    inputs = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    if sources:
        if builtin or inputs or hf_dataset:
            raise DataError("--source gives every input of a mixed dataset; drop the plain input paths, --builtin "
                            "and --hf-dataset (or drop --source)")
        if format != "text":
            raise DataError("--source mixes text sources; --format chat takes plain inputs")
    elif sum(map(bool, (builtin, inputs, hf_dataset))) != 1:
        raise DataError("give input files/folders, --builtin stdlib or --hf-dataset PATH (one of the three)")
    if hf_dataset and (include or exclude):
        raise DataError("--include/--exclude pick files inside input folders; they do not apply to --hf-dataset")
    if format not in FORMATS:
        raise DataError(f"format {format!r} is not allowed; choose one of {', '.join(FORMATS)}")
    if builtin and (include or exclude):
        raise DataError("--include/--exclude pick files inside input folders; they do not apply to --builtin")
    if format == "chat" and builtin:
        raise DataError("--format chat reads .jsonl files of prompt/response records; pass them as inputs")
    if format == "chat":
        from leantrain.tokens.chat import DEFAULT_TEMPLATE, split_template

        split_template(chat_template or DEFAULT_TEMPLATE)
    plan = plan_for(cur, eval_paths)
    if tokenizer is not None:
        load_tokenizer(tokenizer)  # a missing or broken tokenizer fails before the curation work
    stats = ReadStats()
    documents: Callable[[], Iterable[Any]]
    mix: dict[str, float] | None = None
    if sources:
        specs = [parse_source(x) if isinstance(x, str) else x for x in sources]
        mix = check_sources(specs)
        reader_kw = dict(text_field=cur.text_field, include=include, exclude=exclude,
                         max_file_bytes=cur.max_file_bytes, follow_symlinks=cur.follow_symlinks)
        for spec in specs:
            read_paths([spec.path], **reader_kw)  # checks paths, reader packages and jsonl text fields first

        def documents():
            for spec in specs:  # ids carry the source name, which routes each document to its source's shards
                for d in read_paths([spec.path], stats=stats, **reader_kw):
                    yield Document(f"{spec.name}/{d.id}", d.text, d.source)
        provenance = {"sources": {s.name: {"path": str(s.path.resolve()), "weight": s.weight} for s in specs}}
    elif hf_dataset:
        from leantrain.corpus.hf import read_hf_chat, read_hf_dataset

        if format == "chat":  # opens the dataset and checks its fields before any work
            read_hf_chat(hf_dataset, prompt_field, response_field, hf_split)

            def documents():
                return read_hf_chat(hf_dataset, prompt_field, response_field, hf_split, stats)
            fields: dict[str, Any] = {"prompt_field": prompt_field, "response_field": response_field}
        else:
            read_hf_dataset(hf_dataset, cur.text_field, hf_split)

            def documents():
                return read_hf_dataset(hf_dataset, cur.text_field, hf_split, stats)
            fields = {"text_field": cur.text_field}
        provenance: dict[str, Any] = {"hf_dataset": str(Path(hf_dataset).resolve()), "hf_split": hf_split, **fields}
    elif builtin:
        read_builtin(builtin)  # checks the name before any work

        def documents():
            return read_builtin(builtin, stats=stats)
        provenance = {"builtin": builtin}
    elif format == "chat":
        read_chat_documents(inputs, prompt_field, response_field, follow_symlinks=cur.follow_symlinks)

        def documents():
            return read_chat_documents(inputs, prompt_field, response_field, stats,
                                       follow_symlinks=cur.follow_symlinks)
        provenance = {"paths": [str(Path(p).resolve()) for p in inputs], "prompt_field": prompt_field,
                      "response_field": response_field}
    else:
        reader_kw = dict(text_field=cur.text_field, include=include, exclude=exclude,
                         max_file_bytes=cur.max_file_bytes, follow_symlinks=cur.follow_symlinks)
        read_paths(inputs, **reader_kw)  # checks paths, reader packages and jsonl text fields before any work

        def documents():
            return read_paths(inputs, stats=stats, **reader_kw)
        provenance = {"paths": [str(Path(p).resolve()) for p in inputs]}
    check_out_dir(out, overwrite)
    warnings = [f"cleaned up {name}, left next to {out} by a process that was killed"
                for name in remove_stale_temps(out.parent, out.name)] if out.parent.is_dir() else []
    own = executor is None
    ex = make_executor(cur.executor, cur.workers or None) if own else executor
    try:
        meta, card = curate_dataset(documents, out, plan=plan, executor=ex, read_stats=stats, provenance=provenance,
                                    progress=progress, plot=plot, format=format, chat_template=chat_template,
                                    vocab_size=vocab_size, tokenizer_path=tokenizer, val_fraction=val_fraction,
                                    shard_tokens=shard_tokens, overwrite=overwrite,
                                    **({"mix": mix, "source_of": source_of} if mix is not None else {}))
        described = ex.describe()
    finally:
        if own:
            ex.close()
    return Prepared(out, meta, card, stats, described, warnings)
