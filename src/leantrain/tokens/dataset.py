"""The token dataset on disk: meta.json + tokenizer.json + flat uint16/uint32 shards per split.

Layout (format 1):

    meta.json         format, vocab_size, eot_id, dtype, tokenizer, splits{train,val}, provenance
                      (+ special_tokens when the tokenizer came from a Hugging Face folder)
    tokenizer.json
    tokenizer_config.json   only with a Hugging Face tokenizer: its special tokens, chat template
    train/000000.bin  raw little-endian tokens, every document followed by the end-of-text id
    val/000000.bin
    train/mask/000000.bin   chat data only (`tokens/chat.py`): one uint8 per token, 1 where the loss
                            counts (response tokens and the end token), listed as splits[...]["masks"]
    train/NAME/000000.bin   a mixed dataset only (`tokens/mix.py`, `data prepare --source`): each source's
                            shards, listed in splits[...]["sources"][NAME]; meta.json's "mix" holds the weights

Shards are plain arrays so that `numpy.memmap` reads them with no parsing and no copy, and any
process (or rank) can open them at once. A shard is written under a temporary name and renamed
when whole, so a crash never leaves a half shard that looks finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from leantrain.errors import DataError
from leantrain.tokens.mix import check_weights
from leantrain.tokens.tokenizer import eot_id, load_tokenizer, tokenizer_eos

FORMAT = 1
SPLITS = ("train", "val")
META = "meta.json"
_PREPARE_HINT = "run `leantrain data prepare --out {path} --overwrite` to rebuild it"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (ids 0..65535), else uint32: half the disk and page cache."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token arrays to `folder/000000.bin, 000001.bin, ...`, each exactly `shard_tokens` long
    except the last; documents may continue across a shard end (the loader never reads across)."""

    def __init__(self, folder: str | Path, dtype: np.dtype | str, shard_tokens: int = 50_000_000) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._max = np.iinfo(self.dtype).max
        self.shard_tokens = shard_tokens
        self.tokens = 0
        self._shards: list[Path] = []
        self._file: Any = None
        self._in_shard = 0
        self._closed = False

    def _tmp(self, i: int) -> Path:
        return self.folder / f"{i:06d}.bin.tmp"

    def _finish_shard(self) -> None:
        self._file.close()
        i = len(self._shards)
        final = self.folder / f"{i:06d}.bin"
        os.replace(self._tmp(i), final)
        self._shards.append(final)
        self._file = None
        self._in_shard = 0

    def write(self, tokens: np.ndarray | list[int]) -> None:
        """Append tokens; values must fit the dtype (a too-small dtype would corrupt ids silently)."""
        if self._closed:
            raise ValueError("ShardWriter is closed")
        arr = np.asarray(tokens)
        if arr.size == 0:
            return
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if int(arr.min()) < 0 or int(arr.max()) > self._max:
            raise ValueError(f"token ids outside [0, {self._max}] cannot be stored as {self.dtype.name}")
        arr = arr.astype(self.dtype, copy=False)
        pos = 0
        while pos < arr.size:
            if self._file is None:
                self._file = open(self._tmp(len(self._shards)), "wb")  # noqa: SIM115 - spans calls
            take = min(self.shard_tokens - self._in_shard, arr.size - pos)
            self._file.write(arr[pos:pos + take].tobytes())
            self._in_shard += take
            pos += take
            if self._in_shard == self.shard_tokens:
                self._finish_shard()
        self.tokens += arr.size

    def close(self) -> list[Path]:
        """Finish the last shard; returns every shard path in order (empty if nothing was written)."""
        if not self._closed:
            if self._file is not None:
                self._finish_shard()
            self._closed = True
        return list(self._shards)

    def abort(self) -> None:
        """Drop the unfinished shard; finished ones stay (the caller owns the folder)."""
        if self._file is not None:
            self._file.close()
            self._tmp(len(self._shards)).unlink(missing_ok=True)
            self._file = None
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TokenDataset:
    """A prepared token dataset, checked whole on open so that damage shows before training starts.

    `vocab_size` (optional) is the model's embedding size; it must hold every token id.
    """

    def __init__(self, path: str | Path, vocab_size: int | None = None) -> None:
        self.path = Path(path)
        hint = _PREPARE_HINT.format(path=self.path)
        if not self.path.is_dir():
            raise DataError(f"token dataset {self.path} does not exist; "
                            f"run `leantrain data prepare --out {self.path}` to create it")
        meta_path = self.path / META
        if not meta_path.is_file():
            raise DataError(f"{self.path} has no {META}, so it is not a finished token dataset; {hint}")
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{meta_path} is not valid JSON ({e}); {hint}") from None
        self.meta: dict[str, Any] = meta
        self._check_meta(hint)
        self.vocab_size: int = int(meta["vocab_size"])
        self.eot_id: int = int(meta["eot_id"])
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        if self.dtype != dtype_for_vocab(self.vocab_size).newbyteorder("<"):
            raise DataError(f"{meta_path}: dtype {meta['dtype']} does not fit vocab_size {self.vocab_size}; {hint}")
        self._check_tokenizer(hint)
        for split in SPLITS:
            self._check_split(split, hint)
        self._check_mix(hint)
        if vocab_size is not None and vocab_size < self.vocab_size:
            raise DataError(f"model.vocab_size = {vocab_size} is smaller than the vocabulary of {self.path} "
                            f"({self.vocab_size}); set --model.vocab_size={self.vocab_size} or prepare the "
                            f"data with --vocab-size {vocab_size}")
        self._memmaps: dict[str, list[np.memmap]] = {}

    def _check_meta(self, hint: str) -> None:
        m, where = self.meta, self.path / META
        if not isinstance(m, dict):
            raise DataError(f"{where} is not a JSON object; {hint}")
        if m.get("format") != FORMAT:
            raise DataError(f"{where} has format {m.get('format')!r}, this leantrain reads format {FORMAT}; {hint}")
        for key in ("vocab_size", "eot_id", "dtype", "tokenizer", "splits"):
            if key not in m:
                raise DataError(f"{where} lacks the key {key!r}; {hint}")
        if not isinstance(m["splits"], dict) or any(
                not isinstance(m["splits"].get(s), dict) or not isinstance(m["splits"][s].get("shards"), list)
                for s in SPLITS):
            raise DataError(f"{where}: splits must hold train and val, each with a shards list; {hint}")
        try:
            np.dtype(m["dtype"])
        except TypeError:
            raise DataError(f"{where}: dtype {m['dtype']!r} is not a numpy dtype; {hint}") from None

    def _check_tokenizer(self, hint: str) -> None:
        tok = self.tokenizer()
        n = tok.get_vocab_size()
        if n != self.vocab_size:
            raise DataError(f"{self.path}: meta.json says vocab_size {self.vocab_size} but the tokenizer has {n}; "
                            f"{hint}")
        if eot_id(tok, eos=tokenizer_eos(self.path / self.meta["tokenizer"])) != self.eot_id:
            raise DataError(f"{self.path}: meta.json eot_id {self.eot_id} does not match the tokenizer; {hint}")

    def _check_split(self, split: str, hint: str) -> None:
        info = self.meta["splits"][split]
        if not info["shards"] or not info.get("tokens"):
            raise DataError(f"{self.path}: the {split} split is empty; add documents and {hint}")
        total = 0
        for rel in info["shards"]:
            p = self.path / rel
            if not p.is_file():
                raise DataError(f"{self.path}: shard {rel} is missing; {hint}")
            size = p.stat().st_size
            if size == 0 or size % self.dtype.itemsize:
                raise DataError(f"{self.path}: shard {rel} has {size} bytes, not a whole number of "
                                f"{self.dtype.name} tokens (truncated?); {hint}")
            total += size // self.dtype.itemsize
        if total != info["tokens"]:
            raise DataError(f"{self.path}: the {split} shards hold {total} tokens but meta.json says "
                            f"{info['tokens']} (truncated or replaced?); {hint}")
        masks = info.get("masks")
        if masks is not None:  # chat data: one uint8 loss-mask byte per token, shard by shard
            if not isinstance(masks, list) or len(masks) != len(info["shards"]):
                raise DataError(f"{self.path}: the {split} split lists {len(info['shards'])} shards but not as many "
                                f"masks; {hint}")
            for rel, mask_rel in zip(info["shards"], masks, strict=True):
                p = self.path / mask_rel
                want = (self.path / rel).stat().st_size // self.dtype.itemsize
                if not p.is_file() or p.stat().st_size != want:
                    raise DataError(f"{self.path}: loss mask {mask_rel} is missing or not {want} bytes long; {hint}")

    def _check_mix(self, hint: str) -> None:
        """A mixed dataset (`tokens/mix.py`): each split's shards are its sources' shards, in the mix's order."""
        mix, where = self.meta.get("mix"), self.path / META
        if mix is None:
            return
        try:
            names = list(mix["sources"])
            weights = {n: mix["sources"][n]["weight"] for n in names}
            for split in SPLITS:
                info = self.meta["splits"][split]
                parts = info["sources"]
                if list(parts) != names or [r for n in names for r in parts[n]["shards"]] != info["shards"] \
                        or sum(parts[n]["tokens"] for n in names) != info["tokens"]:
                    raise DataError(f"{where}: the {split} split's sources do not match its shards; {hint}")
        except (KeyError, TypeError, AttributeError):
            raise DataError(f"{where}: its mix section is damaged; {hint}") from None
        check_weights(weights, f"{where} mix")

    @property
    def mix(self) -> dict[str, float] | None:
        """The source weights recorded by `data prepare --source` (normalised, in order), or None for one source."""
        mix = self.meta.get("mix")
        return None if mix is None else {n: float(v["weight"]) for n, v in mix["sources"].items()}

    def source_tokens(self, split: str) -> dict[str, int]:
        """Tokens per source of a mixed dataset's split, in the mix's order (empty without a mix)."""
        return {n: int(v["tokens"]) for n, v in self.meta["splits"][split].get("sources", {}).items()}

    def source_shard_counts(self, split: str) -> list[int]:
        """How many of `shards(split)` each source holds, in order: the loader's map from shards to sources."""
        return [len(v["shards"]) for v in self.meta["splits"][split].get("sources", {}).values()]

    def shards(self, split: str) -> list[np.memmap]:
        """Read-only memory maps of the split's shards, opened once and shared by every caller."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._memmaps:
            self._memmaps[split] = [np.memmap(self.path / rel, dtype=self.dtype, mode="r")
                                    for rel in self.meta["splits"][split]["shards"]]
        return self._memmaps[split]

    def masks(self, split: str) -> list[np.memmap] | None:
        """Loss masks aligned with `shards(split)` (1 = train on this token), or None for plain text data."""
        rels = self.meta["splits"][split].get("masks")
        if rels is None:
            return None
        return [np.memmap(self.path / rel, dtype=np.uint8, mode="r") for rel in rels]

    @property
    def chat_template(self) -> str | None:
        """The template chat examples were rendered with (`leantrain data prepare --format chat`), else None."""
        return self.meta.get("chat_template")

    def num_tokens(self, split: str) -> int:
        return int(self.meta["splits"][split]["tokens"])

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path / self.meta["tokenizer"])

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"train={self.num_tokens('train'):,} tokens, val={self.num_tokens('val'):,} tokens)")
