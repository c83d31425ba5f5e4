"""Documents -> token dataset: train (or reuse) a tokenizer, encode, split by document, write shards.

Two streaming passes over `documents()` (tokenizer training, then encoding), so a corpus never
has to fit in memory. Everything is written into a hidden temporary sibling folder that is renamed
to `out_dir` only when complete: an interrupted prepare never leaves something that looks usable,
and `overwrite=True` keeps the old dataset until the new one is whole.

Split rule: a document goes to val when sha1(id) read as a fraction in [0, 1) is below
`val_fraction`, so the split of a document never depends on the other documents or their order.
If that leaves a split empty, the train document with the lowest hash moves to val (or the val
document with the highest hash to train); a corpus of one document is split inside its tokens
(the last `val_fraction` of them, at least one token, go to val).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from leantrain.corpus.readers import Document
from leantrain.errors import DataError
from leantrain.files import fresh_sibling, swap_in, write_durable
from leantrain.tokens.dataset import FORMAT, META, ShardWriter, dtype_for_vocab
from leantrain.tokens.mix import mix_record
from leantrain.tokens.tokenizer import HF_CONFIG, copy_hf_config, eot_id, load_tokenizer, train_tokenizer

Progress = Callable[[str, int, int | None], None]

_BATCH_DOCS = 512
_BATCH_BYTES = 4 << 20
_IN_FLIGHT = 2  # batches being encoded while this thread writes the one before them
_PROGRESS_EVERY = 256
_DATASET_NAMES = frozenset({META, "tokenizer.json", HF_CONFIG, "train", "val", "data_card.md", "data_card.json",
                            "data_card.png"})


def split_hash(doc_id: str) -> float:
    """A document's place in [0, 1): stable across runs, machines and Python versions."""
    return int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64


def leantrain_version() -> str:
    """The installed leantrain version, for provenance ("unknown" when run from a source tree)."""
    try:
        return metadata.version("leantrain")
    except metadata.PackageNotFoundError:
        return "unknown"


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Fail before any work when `out` cannot take a dataset: a file, a non-empty folder without
    `overwrite`, or a folder holding files that a token dataset does not (never deleted)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; choose a folder path for the token dataset")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise DataError(f"{out} already exists and is not empty; pass --overwrite to replace it "
                        "or choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _DATASET_NAMES)
    if foreign:
        raise DataError(f"{out} holds files that are not part of a token dataset ({', '.join(foreign[:3])}); "
                        "refusing to delete them even with --overwrite; choose another --out")


@dataclass
class _Split:
    writer: ShardWriter
    documents: int = 0
    bytes: int = 0
    pending: list[np.ndarray] = field(default_factory=list)

    def add(self, tokens: np.ndarray, nbytes: int) -> None:
        self.pending.append(tokens)
        self.documents += 1
        self.bytes += nbytes

    def flush(self) -> None:
        if self.pending:
            self.writer.write(np.concatenate(self.pending))
            self.pending.clear()


@dataclass
class _Held:
    """A document kept back from writing in case its split ends up needing to donate it."""

    h: float
    tokens: np.ndarray
    nbytes: int


def _batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    """The non-empty documents in order, cut into batches of at most _BATCH_DOCS documents or ~_BATCH_BYTES."""
    batch: list[Document] = []
    size = 0
    for d in docs:
        if not d.text:
            continue
        batch.append(d)
        size += len(d.text)
        if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_all(docs: Iterator[Document], tok: Any, eot: int, dtype: np.dtype, val_fraction: float,
                train: _Split, val: _Split, progress: Progress | None, total: int | None,
                doc_tokens: list[int] | None = None, add_special: bool = False) -> None:
    held_train: _Held | None = None  # lowest-hash train document: the one val gets if it has none
    held_val: _Held | None = None    # highest-hash val document: the one train gets if it has none
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    done = 0

    def run(batch: list[Document], encodings: list[Any]) -> None:
        nonlocal held_train, held_val, done
        for d, enc in zip(batch, encodings, strict=True):
            ids = enc.ids
            if add_special and ids and ids[-1] == eot:  # the tokenizer's post-processor ends it already
                ids = ids[:-1]
            arr = np.empty(len(ids) + 1, dtype=dtype)
            arr[:-1] = ids
            arr[-1] = eot
            if doc_tokens is not None:
                doc_tokens.append(len(ids))
            doc: _Held | None = _Held(split_hash(d.id), arr, len(d.text.encode("utf-8", errors="replace")))
            if doc.h < val_fraction:
                if held_val is None or doc.h > held_val.h:
                    held_val, doc = doc, held_val
                if doc is not None:
                    val.add(doc.tokens, doc.nbytes)
            else:
                if held_train is None or doc.h < held_train.h:
                    held_train, doc = doc, held_train
                if doc is not None:
                    train.add(doc.tokens, doc.nbytes)
        train.flush()
        val.flush()
        done += len(batch)
        if progress:
            progress("encode", done, total)

    # The tokenizer encodes a batch on all cores without the GIL; alone, its cores would wait while this thread
    # reads the next batch and writes the last one, and at each batch's end on its longest document. Two batches
    # in flight keep them busy; results are taken in input order, so the output is the same.
    pool = ThreadPoolExecutor(_IN_FLIGHT, thread_name_prefix="encode")
    pending: deque[tuple[list[Document], Future]] = deque()
    try:
        for batch in _batches(docs):
            pending.append((batch, pool.submit(encode, [d.text for d in batch], add_special_tokens=add_special)))
            if len(pending) > _IN_FLIGHT:
                first, encodings = pending.popleft()
                run(first, encodings.result())
        while pending:
            first, encodings = pending.popleft()
            run(first, encodings.result())
    finally:  # an error or Ctrl-C: drop the queued batches, wait only for those already encoding
        pool.shutdown(wait=True, cancel_futures=True)

    n = train.documents + val.documents + (held_train is not None) + (held_val is not None)
    if n == 0:
        raise DataError("no documents to prepare (every input was empty, binary or skipped); check the inputs")
    if n == 1:
        held = held_train or held_val
        assert held is not None
        body = held.tokens[:-1]
        if len(body) < 2:
            raise DataError(f"the only document has {len(body)} token(s), too few to split into train and val; "
                            "add data")
        n_val = min(len(body) - 1, max(1, round(len(body) * val_fraction)))
        cut = len(body) - n_val
        frac = cut / len(body)
        train.add(np.append(body[:cut], np.array([eot], dtype)), round(held.nbytes * frac))
        val.add(np.append(body[cut:], np.array([eot], dtype)), held.nbytes - round(held.nbytes * frac))
    else:
        if held_train is not None:
            to_val = val.documents == 0 and held_val is None
            (val if to_val else train).add(held_train.tokens, held_train.nbytes)
        if held_val is not None:
            to_train = train.documents == 0 and held_train is None
            (train if to_train else val).add(held_val.tokens, held_val.nbytes)
    train.flush()
    val.flush()


def _split_meta(s: _Split, root: Path) -> dict[str, Any]:
    return {"shards": [p.relative_to(root).as_posix() for p in s.writer.close()], "tokens": s.writer.tokens,
            "documents": s.documents, "bytes": s.bytes}


def _encode_sources(documents: Callable[[], Iterable[Document]], source_of: Callable[[Document], str],
                    names: list[str], tmp: Path, tok: Any, eot: int, dtype: np.dtype, val_fraction: float,
                    shard_tokens: int, progress: Progress | None, total: int | None, doc_tokens: list[int] | None,
                    add_special: bool) -> dict[str, Any]:
    """Each source encoded and split on its own into train/NAME/ and val/NAME/; the splits' shard lists are
    the sources' lists in order (so a reader that ignores the mix still sees every token once)."""
    splits: dict[str, Any] = {s: {"shards": [], "tokens": 0, "documents": 0, "bytes": 0, "sources": {}}
                              for s in ("train", "val")}
    done = 0
    for name in names:
        def counted(stage: str, n: int, of: int | None, base: int = done) -> None:
            if progress:
                progress(stage, base + n, of)

        def mine(name: str = name) -> Iterator[Document]:
            return (d for d in documents() if source_of(d) == name)

        with ShardWriter(tmp / "train" / name, dtype, shard_tokens) as tw, \
                ShardWriter(tmp / "val" / name, dtype, shard_tokens) as vw:
            train, val = _Split(tw), _Split(vw)
            try:
                _encode_all(mine(), tok, eot, dtype, val_fraction, train, val, counted, total, doc_tokens,
                            add_special=add_special)
            except DataError as e:
                raise DataError(f"source {name!r}: {e}") from None
        done += train.documents + val.documents
        for split, s in (("train", train), ("val", val)):
            part = _split_meta(s, tmp)
            splits[split]["sources"][name] = part
            splits[split]["shards"] += part["shards"]
            for key in ("tokens", "documents", "bytes"):
                splits[split][key] += part[key]
    return splits


def prepare_dataset(documents: Callable[[], Iterable[Document]], out_dir: str | Path, *, vocab_size: int = 8192,
                    tokenizer_path: str | Path | None = None, val_fraction: float = 0.02,
                    shard_tokens: int = 50_000_000, overwrite: bool = False, provenance: dict | None = None,
                    progress: Progress | None = None, doc_tokens: list[int] | None = None,
                    before_publish: Callable[[Path, dict[str, Any]], None] | None = None,
                    mix: Mapping[str, float] | None = None,
                    source_of: Callable[[Document], str] | None = None) -> dict[str, Any]:
    """Build a token dataset in `out_dir` from `documents()` (called once or twice); returns meta.json.

    `tokenizer_path` (a tokenizer.json, a token dataset folder or a local Hugging Face tokenizer folder)
    reuses that tokenizer instead of training one, so several datasets share ids; `vocab_size` is then
    ignored. A Hugging Face tokenizer's tokenizer_config.json is kept beside the dataset's tokenizer.json,
    its eos token separates documents and its post-processor's tokens (a bos) start each one, as
    `AutoTokenizer(text)` would encode it.
    `progress(stage, done, total)` is called with stage "tokenizer" or "encode", counted in documents.
    `doc_tokens`, if given, gets each written document's token count (without end-of-text), in input
    order; `before_publish(tmp_dir, meta)` may add files (a data card) before the dataset is renamed
    into place, so they appear together or not at all.
    `mix` (source name -> weight, normalised) with `source_of(document) -> name` writes each source's
    documents to train/NAME/ and val/NAME/ (each source split on its own, so each has both splits) and
    records the mixture in meta.json (`tokens/mix.py`); one tokenizer is trained on all of them.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction = {val_fraction} is not allowed; expected a number in [0, 1)")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens = {shard_tokens} is not allowed; expected an integer >= 1")
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    tmp = fresh_sibling(out)
    try:
        total: int | None = None
        if tokenizer_path is not None:
            tok = load_tokenizer(tokenizer_path)
            tok.save(str(tmp / "tokenizer.json"))
            specials = copy_hf_config(tokenizer_path, tmp)
            tok_info = {"tokenizer": "reused", "tokenizer_source": str(tokenizer_path)}
        else:
            count = 0

            def texts() -> Iterator[str]:
                nonlocal count
                for d in documents():
                    if d.text:
                        count += 1
                        if progress and count % _PROGRESS_EVERY == 0:
                            progress("tokenizer", count, None)
                        yield d.text

            tok = train_tokenizer(texts(), vocab_size)
            if count == 0:
                raise DataError("no documents to prepare (every input was empty, binary or skipped); "
                                "check the inputs")
            if progress:
                progress("tokenizer", count, count)
            total = count
            tok.save(str(tmp / "tokenizer.json"))
            specials = {}
            tok_info = {"tokenizer": "trained", "requested_vocab_size": vocab_size}

        eot, vocab = eot_id(tok, eos=specials.get("eos_token")), tok.get_vocab_size()
        # A literal "<|endoftext|>" inside a document is text, not a boundary: only the id we append is.
        # (Runtime-only flag; the saved tokenizer.json is unaffected.)
        tok.encode_special_tokens = True
        dtype = dtype_for_vocab(vocab)
        if mix is None:
            with ShardWriter(tmp / "train", dtype, shard_tokens) as tw, \
                    ShardWriter(tmp / "val", dtype, shard_tokens) as vw:
                train, val = _Split(tw), _Split(vw)
                _encode_all(iter(documents()), tok, eot, dtype, val_fraction, train, val, progress, total, doc_tokens,
                            add_special=bool(specials))
            splits = {name: _split_meta(s, tmp) for name, s in (("train", train), ("val", val))}
        else:
            if source_of is None:
                raise ValueError("prepare_dataset(mix=...) needs source_of")
            splits = _encode_sources(documents, source_of, list(mix), tmp, tok, eot, dtype, val_fraction,
                                     shard_tokens, progress, total, doc_tokens, bool(specials))
        meta = {
            "format": FORMAT, "vocab_size": vocab, "eot_id": eot, "dtype": dtype.name,
            "tokenizer": "tokenizer.json", "splits": splits,
            **({"mix": mix_record(mix, splits)} if mix is not None else {}),
            **({"special_tokens": specials} if specials else {}),
            "provenance": {
                **(provenance or {}),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "leantrain_version": leantrain_version(),
                **tok_info,
                "val_fraction": val_fraction,
                "split_rule": "sha1(document id) < val_fraction",
                "shard_tokens": shard_tokens,
            },
        }
        write_durable(tmp / META, json.dumps(meta, indent=2) + "\n")
        if before_publish is not None:
            before_publish(tmp, meta)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


