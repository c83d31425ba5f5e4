"""Hugging Face `datasets` as one more reader: a local dataset folder or data files -> `Document`s.

What it reads, all local (the Hub is never asked: `datasets` is imported with HF_HUB_OFFLINE /
HF_DATASETS_OFFLINE set and its offline switch is kept on, only builders that read local files are
used, and a path that does not exist here is refused in one line):

- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`state.json` or
  `dataset_dict.json` inside), opened with `load_from_disk`: memory-mapped arrow, read in batches,
  so a dataset larger than memory streams through; `split` picks the split of a `DatasetDict`;
- a folder of data files (`.parquet`, `.arrow`, `.json`, `.jsonl`; e.g. a downloaded Hub snapshot),
  opened with `load_dataset(folder, split=..., streaming=True)`, which infers the splits from the
  file names as the Hub does;
- one such file, opened with `load_dataset(<builder>, data_files=file, streaming=True)`.

Every record gives one document from its `text_field` (or, for chat data, its prompt and response
fields joined as `corpus.chat` joins them), id `<name>#R<row>`; records whose text is null or not
a string are counted as `bad_records`, blank ones as `empty`, never silently dropped. The fields
are checked when the reader is called, before any work starts; a missing one is an error naming
the fields the records have and the flag to pick another.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leantrain.corpus.chat import join_chat
from leantrain.corpus.readers import Document, ReadStats
from leantrain.errors import DataError

BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}
DISK_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes
_METADATA = frozenset({*DISK_MARKERS, "dataset_info.json", "dataset_infos.json"})
_BATCH = 128  # rows per batch: memory is bounded by this many of the largest rows
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name", as the Hub names datasets
_INSTALL = "install it with: pip install 'leantrain[hf]'"
_OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _datasets() -> Any:
    """Import `datasets` offline: nothing this reader does may reach the network.

    The offline variables are set while `datasets` is imported (it reads them then) and put back
    afterwards, so the caller's process is left as it was; `datasets`' own switch stays on (also when
    it was imported before), as it is what its loaders consult.
    """
    saved = {k: os.environ.get(k) for k in _OFFLINE}
    os.environ.update(dict.fromkeys(_OFFLINE, "1"))
    try:
        import datasets
    except ImportError:
        raise DataError(f"--hf-dataset needs the datasets package; {_INSTALL}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _local(path: str | Path) -> Path:
    """`path` as an existing local folder or file; a Hub name or URL is refused, never fetched."""
    text = str(path)
    p = Path(text)
    if os.path.lexists(p):
        return p
    if "://" in text or _HUB_NAME.match(text):
        raise DataError(f"--hf-dataset {text} is not a local path; leantrain never downloads from the Hugging Face "
                        "Hub: fetch it yourself (huggingface-cli download, or load_dataset(...).save_to_disk(DIR)) "
                        "and pass the local folder")
    raise DataError(f"--hf-dataset {text} does not exist; pass a folder written by save_to_disk or local "
                    ".parquet/.arrow/.json/.jsonl files")


def _data_files(folder: Path) -> list[Path]:
    """Data files under `folder` that `load_dataset` can read (hidden names and datasets' own metadata left
    out); a save_to_disk folder inside is an error naming it, since its arrow files are not one dataset."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(m in filenames for m in DISK_MARKERS):
            raise DataError(f"{folder} holds the save_to_disk folder {dirpath}; pass that folder to --hf-dataset")
        found += [Path(dirpath, n) for n in filenames
                  if not n.startswith(".") and n not in _METADATA and Path(n).suffix.lower() in BUILDERS]
    return sorted(found)


def _batched(builder: str) -> dict[str, Any]:
    """Parquet is read a row group at a time unless told a batch size (one file can be one row group), and
    pre-buffering keeps whole column chunks around: off, the memory of a long read levels off."""
    if builder != "parquet":
        return {}
    import pyarrow.dataset as pds

    return {"batch_size": _BATCH, "fragment_scan_options": pds.ParquetFragmentScanOptions(pre_buffer=False)}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class HFSource:
    """One opened dataset (a split): its rows, its column names and how many files hold it."""

    def __init__(self, path: str | Path, split: str = "train") -> None:
        self.path = _local(path)
        ds_lib = _datasets()
        p = self.path
        if p.is_dir() and any((p / m).is_file() for m in DISK_MARKERS):
            try:
                loaded = ds_lib.load_from_disk(str(p))
            except Exception as e:  # datasets raises many kinds for a damaged folder
                raise DataError(f"{p} cannot be read as a save_to_disk folder ({_first_line(e)}); write it again "
                                "with save_to_disk") from None
            if isinstance(loaded, ds_lib.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{p} has no split {split!r} (splits: {', '.join(loaded)}); pick one with "
                                    "--hf-split NAME")
                loaded = loaded[split]
                self.name = f"{p.name}/{split}"
            else:
                self.name = p.name
            self.files = max(1, len(loaded.cache_files))
        elif p.is_dir():
            files = _data_files(p)
            if not files:
                raise DataError(f"{p} is not a datasets folder: no {' or '.join(DISK_MARKERS)} (save_to_disk) and "
                                f"no {'/'.join(BUILDERS)} files; pass a folder written by save_to_disk, or data files")
            kinds = sorted({BUILDERS[f.suffix.lower()] for f in files})
            if len(kinds) > 1:
                raise DataError(f"{p} mixes {' and '.join(kinds)} files; put one kind in the folder (or pass one file)")
            # the builder named, so datasets infers the splits from file names and never runs a loading script
            loaded = self._load(ds_lib, kinds[0], data_dir=str(p), split=split, **_batched(kinds[0]))
            self.name, self.files = f"{p.name}/{split}", len(files)
        elif p.is_file():
            builder = BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise DataError(f"--hf-dataset {p} is not a .parquet/.arrow/.json/.jsonl file; pass such a file or "
                                "a save_to_disk folder (plain text files go in as inputs without --hf-dataset)")
            if split != "train":
                raise DataError(f"--hf-split {split}: a single file {p.name} holds one split; drop --hf-split")
            loaded = self._load(ds_lib, builder, data_files=str(p), split="train", **_batched(builder))
            self.name, self.files = p.name, 1
        else:
            raise DataError(f"--hf-dataset {p} is not a regular file or folder; pass a save_to_disk folder or "
                            "data files")
        self.dataset = loaded

    def _load(self, ds_lib: Any, *args: Any, split: str, **kwargs: Any) -> Any:
        try:
            return ds_lib.load_dataset(*args, split=split, streaming=True, **kwargs)
        except ValueError as e:
            if "split" in str(e).lower():
                raise DataError(f"{self.path} has no split {split!r} ({_first_line(e)}); pick one with "
                                "--hf-split NAME") from None
            raise DataError(f"{self.path} cannot be read by datasets ({_first_line(e)}); check the files") from None
        except Exception as e:
            raise DataError(f"{self.path} cannot be read by datasets ({_first_line(e)}); check the files") from None

    def columns(self) -> list[str]:
        """Column names, from the schema, or (json read as a stream has none yet) from the first record."""
        names = self.dataset.column_names
        if names is None:
            try:
                first = next(iter(self.dataset.take(1)), None)
            except Exception as e:
                raise DataError(f"{self.path} cannot be read by datasets ({_first_line(e)}); check the files") from None
            names = list(first) if first else []
        return [str(n) for n in names]

    def batches(self, fields: list[str]) -> Iterator[dict[str, list[Any]]]:
        """Rows in batches of columns `fields`: from the memory map or the stream, never all at once."""
        yield from self.dataset.select_columns(fields).iter(batch_size=_BATCH)


def _check_fields(src: HFSource, fields: list[tuple[str, str]]) -> None:
    names = src.columns()
    features = getattr(src.dataset, "features", None) or {}
    for field, flag in fields:
        if field not in names:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise DataError(f"{src.path}: its records have no string field {field!r} (fields: {shown or 'none'}); "
                            f"pick the field that holds the text with {flag} NAME")
        dtype = getattr(features.get(field), "dtype", "string")
        if dtype not in ("string", "large_string"):
            raise DataError(f"{src.path}: field {field!r} holds {dtype}, not text; pick the field that holds the "
                            f"text with {flag} NAME")


def read_hf_dataset(path: str | Path, text_field: str = "text", split: str = "train",
                    stats: ReadStats | None = None) -> Iterator[Document]:
    """Documents from a local `datasets` folder or data file, one per record (see the module docstring).

    The path, the `datasets` package, the split and the field are checked when called."""
    src = HFSource(path, split)
    _check_fields(src, [(text_field, "--text-field")])
    return _documents(src, [text_field], stats if stats is not None else ReadStats(), lambda row: row[0])


def read_hf_chat(path: str | Path, prompt_field: str = "prompt", response_field: str = "response",
                 split: str = "train", stats: ReadStats | None = None) -> Iterator[Document]:
    """Chat documents (`corpus.chat.join_chat` of prompt and response) from a local `datasets` folder or file."""
    src = HFSource(path, split)
    _check_fields(src, [(prompt_field, "--prompt-field"), (response_field, "--response-field")])
    return _documents(src, [prompt_field, response_field], stats if stats is not None else ReadStats(),
                      lambda row: join_chat(*row))


def _documents(src: HFSource, fields: list[str], stats: ReadStats, text_of: Any) -> Iterator[Document]:
    stats.files += src.files
    row = 0
    source = str(src.path)
    try:
        for batch in src.batches(fields):
            for values in zip(*(batch[f] for f in fields), strict=True):
                row += 1
                if not all(isinstance(v, str) for v in values):
                    stats.bad_records += 1
                    continue
                text = text_of(values)
                if not "".join(values).strip():
                    stats.empty += 1
                    continue
                stats.documents += 1
                stats.bytes += len(text.encode("utf-8", errors="replace"))
                yield Document(id=f"{src.name}#R{row}", text=text, source=source)
    except DataError:
        raise
    except Exception:  # a damaged arrow/parquet file mid-stream: counted, what was read is kept
        stats.unreadable += 1
    if row == 0:
        stats.empty += 1
