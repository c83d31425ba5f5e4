"""Readers: turn the built-in corpus or the user's files into a stream of `Document`s.

Rules, so that a dataset can be rebuilt bit for bit from the same inputs:

- Files are visited in sorted relative-path order (posix form), never in directory order.
- Text is decoded as UTF-8 (a leading BOM is dropped); bytes that are not valid UTF-8 become
  U+FFFD replacement characters instead of failing the run. Such files are counted.
- A file with a NUL byte in its first 8 KiB is binary and skipped; an empty or whitespace-only
  file (or jsonl text) is skipped. Every skip is counted in a `ReadStats`, never silent.
- `.jsonl` / `.ndjson` files give one document per line, taken from one string field; lines
  that are not JSON objects with that string field are skipped and counted.
- Inside folders, hidden names (starting with ".") are skipped, so `.git/` never becomes data.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from leantrain.errors import DataError

BUILTIN_CORPORA = ("stdlib",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SNIFF_BYTES = 8192
# Test suites are huge and repetitive; the stdlib without them is ~12 MB of ordinary code.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str


@dataclass
class ReadStats:
    """What a reader kept and skipped, so the CLI can say it instead of dropping data silently.

    A reader adds to the object it is given; `prepare_dataset` reads its documents twice, so give
    each call a fresh `ReadStats` (or `reset()` it) when you want the counts of one pass.
    """

    files: int = 0
    documents: int = 0
    bytes: int = 0
    binary: int = 0
    empty: int = 0
    bad_json_lines: int = 0
    replaced_utf8: int = 0
    hidden: int = 0

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)

    def summary(self) -> str:
        text = (f"read {self.files} files -> {self.documents} documents ({self.bytes:,} bytes); "
                f"skipped {self.binary} binary, {self.empty} empty, {self.bad_json_lines} bad json lines")
        if self.hidden:
            text += f", {self.hidden} hidden files/folders"
        if self.replaced_utf8:
            text += f"; {self.replaced_utf8} files had invalid UTF-8 (replaced with U+FFFD)"
        return text


def _decode(data: bytes, stats: ReadStats) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        stats.replaced_utf8 += 1
        return data.decode("utf-8-sig", errors="replace")


def _stdlib_root() -> Path:
    # In a venv this is still the base interpreter's stdlib, which is what we want.
    return Path(sysconfig.get_paths()["stdlib"])


def _builtin_files(root: Path) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            # _sysconfigdata_*.py is a generated dump of this machine's build flags, not source.
            if name.endswith(".py") and not name.startswith("_sysconfigdata_"):
                path = Path(dirpath, name)
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return found


def read_builtin(name: str = "stdlib", stats: ReadStats | None = None) -> Iterator[Document]:
    """The built-in corpus: Python's standard library sources, available on every machine offline.

    id is the path relative to the stdlib folder. The name is checked (and the file list taken)
    at call time, so a typo fails before any work starts.
    """
    if name not in BUILTIN_CORPORA:
        raise DataError(f"unknown built-in corpus {name!r}; available: {', '.join(BUILTIN_CORPORA)}")
    root = _stdlib_root()
    if not root.is_dir():
        raise DataError(f"the Python standard library folder {root} is missing; "
                        "use a full Python install or pass your own files")
    files = _builtin_files(root)
    return _read_builtin(files, f"builtin:{name}", stats if stats is not None else ReadStats())


def _document(data: bytes, doc_id: str, source: str, stats: ReadStats) -> Document | None:
    """Decode one file's bytes into a document, counting it; None (counted as empty) if blank."""
    text = _decode(data, stats)
    if not text.strip():
        stats.empty += 1
        return None
    stats.documents += 1
    stats.bytes += len(data)
    return Document(id=doc_id, text=text, source=source)


def _read_builtin(files: list[tuple[str, Path]], source: str, stats: ReadStats) -> Iterator[Document]:
    for rel, path in files:
        stats.files += 1
        doc = _document(path.read_bytes(), rel, source, stats)
        if doc is not None:
            yield doc


def _walk(root: Path, stats: ReadStats) -> list[tuple[str, Path]]:
    """Files under `root`, sorted by posix relative path, ids prefixed with the folder's name."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        visible = [d for d in dirnames if not d.startswith(".")]
        stats.hidden += len(dirnames) - len(visible)
        dirnames[:] = visible
        for name in filenames:
            if name.startswith("."):
                stats.hidden += 1
                continue
            path = Path(dirpath, name)
            found.append(((Path(root.name) / path.relative_to(root)).as_posix(), path))
    found.sort()
    return found


def read_paths(paths: list[str | Path], text_field: str = "text",
               stats: ReadStats | None = None) -> Iterator[Document]:
    """Documents from files and folders (recursive): one per text file, one per jsonl line.

    ids are stable under moving the data: `folder/rel/path.txt` (the folder's own name, then the
    relative path) or the bare file name for a file passed directly; jsonl lines add `#L<n>`.
    Missing paths fail at call time, before anything is read.
    """
    stats = stats if stats is not None else ReadStats()
    if isinstance(paths, str | Path):
        paths = [paths]
    plan: list[tuple[str, Path]] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"input path {p} does not exist; check the path or pass another file or folder")
        if p.is_dir():
            plan.extend(_walk(p, stats))
        else:
            plan.append((p.name, p))
    return _read_files(plan, text_field, stats)


def _read_files(plan: list[tuple[str, Path]], text_field: str, stats: ReadStats) -> Iterator[Document]:
    for doc_id, path in plan:
        stats.files += 1
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _read_jsonl(doc_id, path, text_field, stats)
            continue
        data = path.read_bytes()
        if b"\0" in data[:_SNIFF_BYTES]:
            stats.binary += 1
            continue
        doc = _document(data, doc_id, str(path), stats)
        if doc is not None:
            yield doc


def _read_jsonl(doc_id: str, path: Path, text_field: str, stats: ReadStats) -> Iterator[Document]:
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
        if b"\0" in head:
            stats.binary += 1
            return
        if not head.strip():
            stats.empty += 1
            return
        f.seek(0)
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines separate nothing in jsonl; not an error
            try:
                obj = json.loads(raw.decode("utf-8", errors="replace"))
            except ValueError:
                stats.bad_json_lines += 1
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                stats.bad_json_lines += 1
                continue
            if not text.strip():
                stats.empty += 1
                continue
            stats.documents += 1
            stats.bytes += len(text.encode("utf-8", errors="replace"))
            yield Document(id=f"{doc_id}#L{lineno}", text=text, source=str(path))
