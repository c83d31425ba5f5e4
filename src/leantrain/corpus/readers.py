"""Readers: turn the built-in corpus or the user's files into a stream of `Document`s.

Rules, so that a dataset can be rebuilt bit for bit from the same inputs, and so that no input
file can crash a run (every skip or repair is counted in a `ReadStats`, never silent):

- Files are visited in sorted relative-path order (posix form), never in directory order.
- Inside folders, hidden names (starting with ".") are skipped, so `.git/` never becomes data;
  `include` / `exclude` globs (fnmatch, matched against the path relative to the folder and
  against the bare file name) pick files inside folders. Files named directly are always read.
- Text is decoded as UTF-8 (a leading BOM is dropped); bytes that are not valid UTF-8 become
  U+FFFD replacement characters instead of failing the run. Such files are counted.
- A file with a NUL byte in its first 8 KiB (after decompression) is binary and skipped; an
  empty or whitespace-only file (or jsonl/parquet text) is skipped.
- `.jsonl` / `.ndjson` files give one document per line, taken from one string field; lines
  that are not JSON objects with that string field are skipped and counted. `.parquet` files
  (needs pyarrow, the `data` extra) give one document per row of that column.
- `.gz` and `.zst` wrap any of the above (`x.jsonl.gz`, `notes.txt.zst`). A compressed file
  that ends early (truncated download) keeps what was decoded before the damage, without the
  cut-off last line, and is counted as `truncated`; one that cannot be decoded at all is
  counted as `unreadable`.
- Enormous lines: a jsonl record longer than `max_line_bytes` (default 8 MiB) is skipped, and a
  line of a text file longer than that is cut out of its document (the rest is kept); both are
  counted as `long_lines`. Memory stays bounded by that size for jsonl, whatever the input.
- Only regular files are read. FIFOs, character and block devices and sockets (or symlinks to
  them) are skipped and counted as `special`, never opened for reading (a FIFO open would block;
  `/dev/zero` never ends): files are opened non-blocking and checked with `fstat` before a byte
  is read. Symlinks inside an input folder are followed only while their target stays inside
  that folder (`follow_symlinks=True` lifts this); the others are counted as `symlinks_out`.
- A file read whole (text) larger than `max_file_bytes` (default 1 GiB, after decompression) is
  skipped and counted as `too_large`; jsonl and parquet are streamed, so only their records are
  bounded. JSON nested too deeply to parse is a bad line (`deep_json`), never a crash.
- A jsonl file whose first records are JSON objects without the text field is an error that
  names the fields they have and `--text-field`, before any work starts.
- Hugging Face `datasets` folders and files have their own reader, `corpus/hf.py` (same documents,
  same counts), because they go through the optional `datasets` library.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import os
import stat
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from leantrain.errors import DataError

BUILTIN_CORPORA = ("stdlib",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
MAX_LINE_BYTES = 8 << 20
MAX_FILE_BYTES = 1 << 30
_FIELD_PROBE_LINES = 20
_SNIFF_BYTES = 8192
_CHUNK = 1 << 20
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
    excluded: int = 0  # files left out by --include/--exclude globs
    truncated: int = 0  # compressed files that ended early (the part before the damage is kept)
    unreadable: int = 0  # files that could not be decoded at all (corrupt archive, bad parquet, no such column)
    long_lines: int = 0  # jsonl records skipped / text lines cut for being longer than max_line_bytes
    bad_records: int = 0  # parquet / HF dataset rows whose text is null or not a string
    special: int = 0  # FIFOs, devices, sockets (or symlinks to them): never opened
    symlinks_out: int = 0  # symlinks leading out of their input folder (or broken), not followed
    too_large: int = 0  # files read whole that exceed max_file_bytes
    deep_json: int = 0  # jsonl lines nested too deeply to parse (also counted in bad_json_lines)

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def summary(self) -> str:
        text = (f"read {self.files} files -> {self.documents} documents ({self.bytes:,} bytes); "
                f"skipped {self.binary} binary, {self.empty} empty, {self.bad_json_lines} bad json lines")
        if self.hidden:
            text += f", {self.hidden} hidden files/folders"
        for name, what in (("excluded", "excluded by globs"), ("unreadable", "unreadable"),
                           ("bad_records", "bad parquet/dataset rows"), ("special", "FIFOs/devices/sockets"),
                           ("symlinks_out", "symlinks out of their folder"), ("too_large", "too large"),
                           ("deep_json", "too deeply nested json lines")):
            if getattr(self, name):
                text += f", {getattr(self, name)} {what}"
        if self.replaced_utf8:
            text += f"; {self.replaced_utf8} files had invalid UTF-8 (replaced with U+FFFD)"
        if self.truncated:
            text += f"; {self.truncated} compressed files were truncated (kept the part before the damage)"
        if self.long_lines:
            text += f"; {self.long_lines} over-long lines/records removed"
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


def _selected(rel: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]

    def hit(patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)

    return (not include or hit(include)) and not hit(exclude)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def walk(root: Path, stats: ReadStats, include: Sequence[str] = (), exclude: Sequence[str] = (), *,
         follow_symlinks: bool = False) -> list[tuple[str, Path]]:
    """Files under `root`, sorted by posix relative path, ids prefixed with the folder's name.

    Hidden names and files left out by the globs are counted and skipped; symlinks (to files or
    folders) are followed only while their target stays inside `root`, unless `follow_symlinks`;
    a folder reached twice through links is walked once (no loops). Special files are left to
    `open_regular`, which skips them at read time without blocking.
    """
    found: list[tuple[str, Path]] = []
    real_root = root.resolve()
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = os.stat(dirpath)
        if (here.st_dev, here.st_ino) in seen:  # reached again through a link: already walked
            dirnames[:] = []
            continue
        seen.add((here.st_dev, here.st_ino))
        visible = [d for d in dirnames if not d.startswith(".")]
        stats.hidden += len(dirnames) - len(visible)
        kept_dirs = []
        for d in visible:
            full = Path(dirpath, d)
            if full.is_symlink() and not follow_symlinks and not _inside(full.resolve(), real_root):
                stats.symlinks_out += 1
                continue
            kept_dirs.append(d)
        dirnames[:] = kept_dirs
        for name in filenames:
            if name.startswith("."):
                stats.hidden += 1
                continue
            path = Path(dirpath, name)
            if path.is_symlink() and not follow_symlinks and not _inside(path.resolve(), real_root):
                stats.symlinks_out += 1
                continue
            if not _selected(path.relative_to(root).as_posix(), include, exclude):
                stats.excluded += 1
                continue
            found.append(((Path(root.name) / path.relative_to(root)).as_posix(), path))
    found.sort()
    return found


def inner_suffix(path: Path) -> tuple[str, str]:
    """(kind suffix, compression suffix): `a.jsonl.gz` -> (".jsonl", ".gz")."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES else ""
    rest = suffixes[:-1] if comp else suffixes
    return (rest[-1] if rest else ""), comp


class NotRegular(Exception):
    """A path that is not a regular file (FIFO, device, socket, folder, broken link)."""


def open_regular(path: Path):  # -> BinaryIO
    """Open `path` for reading only if it is a regular file, without ever blocking.

    O_NONBLOCK makes opening a FIFO return at once (a blocking open waits for a writer forever);
    `fstat` on the opened descriptor then decides, so a file swapped for a FIFO after a check is
    still caught. Raises `NotRegular` for anything but a regular file, `OSError` when it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegular(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_regular(path: Path) -> bool:
    """True for a regular file (following symlinks); FIFOs, devices, sockets, folders, broken links: False."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _need(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise DataError(f"reading this input needs the {module} package; "
                        "install it with: pip install 'leantrain[data]'") from None


def plan_files(paths: Sequence[str | Path], stats: ReadStats, *, include: Sequence[str] = (),
               exclude: Sequence[str] = (), follow_symlinks: bool = False) -> list[tuple[str, Path]]:
    """(id, path) of the files to read: folders walked, missing paths an error, special files counted and left out.

    A file named directly is read even through a symlink (the user named it), but only if it is a
    regular file: `/dev/zero` or a FIFO passed on the command line is skipped and counted.
    """
    plan: list[tuple[str, Path]] = []
    for p in map(Path, paths):
        if not os.path.lexists(p):
            raise DataError(f"input path {p} does not exist; check the path or pass another file or folder")
        if p.is_dir():
            plan.extend((i, q) for i, q in walk(p, stats, include, exclude, follow_symlinks=follow_symlinks))
        elif not p.exists():
            stats.symlinks_out += 1  # a broken symlink named directly
        else:
            plan.append((p.name, p))
    kept = []
    for doc_id, path in plan:
        if is_regular(path):
            kept.append((doc_id, path))
        elif os.path.exists(path):
            stats.special += 1
        else:
            stats.symlinks_out += 1  # broken link
    return kept


def _record_fields(path: Path, text_field: str, max_line_bytes: int) -> list[str] | None:
    """The fields of a jsonl file's first records when none has a string `text_field`; None if fine (or unknown)."""
    fields: set[str] = set()
    objects = 0
    lines = _lines(path, max_line_bytes, ReadStats())
    try:
        for n, raw in enumerate(lines):
            if n >= _FIELD_PROBE_LINES:
                break
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8", errors="replace"))
            except (ValueError, RecursionError):
                continue
            if not isinstance(obj, dict):
                continue
            if isinstance(obj.get(text_field), str):
                return None
            objects += 1
            fields.update(map(str, obj))
    except (NotRegular, OSError):
        return None  # the read proper counts it
    finally:
        lines.close()
    return sorted(fields) if objects else None


def read_paths(paths: list[str | Path], text_field: str = "text", stats: ReadStats | None = None, *,
               include: Sequence[str] = (), exclude: Sequence[str] = (),
               max_line_bytes: int = MAX_LINE_BYTES, max_file_bytes: int = MAX_FILE_BYTES,
               follow_symlinks: bool = False) -> Iterator[Document]:
    """Documents from files and folders (recursive): one per text file, one per jsonl line or parquet row.

    ids are stable under moving the data: `folder/rel/path.txt` (the folder's own name, then the
    relative path) or the bare file name for a file passed directly; jsonl lines add `#L<n>`,
    parquet rows `#R<n>`. Missing paths, a missing optional reader package and jsonl records
    without the text field fail at call time, before anything is read.
    """
    stats = stats if stats is not None else ReadStats()
    if isinstance(paths, str | Path):
        paths = [paths]
    if max_line_bytes < 1:
        raise DataError(f"max_line_bytes = {max_line_bytes} is not allowed; expected an integer >= 1")
    if max_file_bytes < 1:
        raise DataError(f"max_file_bytes = {max_file_bytes} is not allowed; expected an integer >= 1")
    plan = plan_files(paths, stats, include=include, exclude=exclude, follow_symlinks=follow_symlinks)
    for _, path in plan:
        kind, comp = inner_suffix(path)
        if kind in PARQUET_SUFFIXES and not comp:
            _need("pyarrow")
        if comp in (".zst", ".zstd"):
            _need("zstandard")
    for _, path in plan:
        if inner_suffix(path)[0] in JSONL_SUFFIXES:
            fields = _record_fields(path, text_field, max_line_bytes)
            if fields is not None:
                shown = ", ".join(fields[:8]) + (", ..." if len(fields) > 8 else "")
                raise DataError(f"{path}: its records have no string field {text_field!r} (fields: {shown}); "
                                "pick the field that holds the text with --text-field NAME")
    return _read_files(plan, text_field, stats, max_line_bytes, max_file_bytes)


def _read_files(plan: list[tuple[str, Path]], text_field: str, stats: ReadStats,
                max_line_bytes: int, max_file_bytes: int) -> Iterator[Document]:
    for doc_id, path in plan:
        stats.files += 1
        kind, comp = inner_suffix(path)
        try:
            if kind in PARQUET_SUFFIXES and not comp:
                yield from _read_parquet(doc_id, path, text_field, stats)
            elif kind in JSONL_SUFFIXES:
                yield from _read_jsonl(doc_id, path, text_field, stats, max_line_bytes)
            else:
                yield from _read_text(doc_id, path, stats, max_line_bytes, max_file_bytes)
        except NotRegular:
            stats.files -= 1
            stats.special += 1  # became a FIFO/device after the plan was made
        except OSError:  # vanished, no permission, an I/O error: counted, the run goes on
            stats.unreadable += 1


class _Damaged(Exception):
    """A compressed stream ended early (`truncated`) or could not be decoded at all."""

    def __init__(self, truncated: bool) -> None:
        super().__init__("truncated" if truncated else "unreadable")
        self.truncated = truncated


def _chunks(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of `path` in chunks; raises `_Damaged` where the stream breaks."""
    comp = inner_suffix(path)[1]
    if comp == ".gz":
        got = False
        try:
            with open_regular(path) as raw, gzip.open(raw, "rb") as f:
                while chunk := f.read1(_CHUNK):  # read1: what decodes now, so a truncated tail loses little
                    got = True
                    yield chunk
        except EOFError:
            raise _Damaged(truncated=True) from None
        except (OSError, zlib.error):
            raise _Damaged(truncated=got) from None
    elif comp in (".zst", ".zstd"):
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        dobj, got, pending = dctx.decompressobj(), False, False
        try:
            with open_regular(path) as f:
                while raw := f.read(_CHUNK):
                    while raw:
                        out = dobj.decompress(raw)
                        pending = not dobj.eof
                        if out:
                            got = True
                            yield out
                        raw = dobj.unused_data if dobj.eof else b""
                        if dobj.eof:
                            dobj = dctx.decompressobj()  # the next frame (zstd files may hold several)
        except zstandard.ZstdError:
            raise _Damaged(truncated=got) from None
        if pending:
            raise _Damaged(truncated=True)
    else:
        with open_regular(path) as f:
            while chunk := f.read(_CHUNK):
                yield chunk


def _cut_long_lines(data: bytes, limit: int, stats: ReadStats) -> bytes:
    if len(data) <= limit:
        return data
    lines = data.split(b"\n")
    kept = [line for line in lines if len(line) <= limit]
    if len(kept) == len(lines):
        return data
    stats.long_lines += len(lines) - len(kept)
    return b"\n".join(kept)


def _read_text(doc_id: str, path: Path, stats: ReadStats, max_line_bytes: int,
               max_file_bytes: int = MAX_FILE_BYTES) -> Iterator[Document]:
    if os.stat(path).st_size > max_file_bytes:
        stats.too_large += 1
        return
    parts: list[bytes] = []
    size = 0
    chunks = _chunks(path)
    try:
        for chunk in chunks:  # bounded: a decompression bomb or a file that keeps growing stops here
            size += len(chunk)
            if size > max_file_bytes:
                chunks.close()
                stats.too_large += 1
                return
            parts.append(chunk)
    except _Damaged as e:
        if not e.truncated:
            stats.unreadable += 1
            return
        stats.truncated += 1
        data = b"".join(parts)
        parts = [data[: data.rfind(b"\n") + 1]]  # the cut-off last line goes
    data = b"".join(parts)
    if b"\0" in data[:_SNIFF_BYTES]:
        stats.binary += 1
        return
    doc = _document(_cut_long_lines(data, max_line_bytes, stats), doc_id, str(path), stats)
    if doc is not None:
        yield doc


def _lines(path: Path, limit: int, stats: ReadStats) -> Iterator[bytes]:
    """Lines of `path` (decompressed), one item per line so numbering holds; a line longer than
    `limit` comes out as b"" (counted), so memory stays bounded by `limit`."""
    buf = b""
    skipping = False  # inside an over-long line: drop bytes up to its newline
    try:
        for chunk in _chunks(path):
            buf += chunk
            start = 0
            while True:
                nl = buf.find(b"\n", start)
                if nl < 0:
                    break
                if skipping:
                    skipping = False
                    yield b""
                elif nl - start <= limit:
                    yield buf[start:nl + 1]
                else:
                    stats.long_lines += 1
                    yield b""
                start = nl + 1
            buf = buf[start:]
            if len(buf) > limit:
                if not skipping:
                    stats.long_lines += 1
                skipping, buf = True, b""
    except _Damaged as e:
        if e.truncated:
            stats.truncated += 1
        else:
            stats.unreadable += 1
        return  # the cut-off last line goes
    if buf and not skipping:
        yield buf


def _record(text: str, doc_id: str, path: Path, stats: ReadStats) -> Document | None:
    """One record's text (a jsonl line's or a parquet row's) as a counted document; None when empty."""
    if not text.strip():
        stats.empty += 1
        return None
    stats.documents += 1
    stats.bytes += len(text.encode("utf-8", errors="replace"))
    return Document(id=doc_id, text=text, source=str(path))


def _read_jsonl(doc_id: str, path: Path, text_field: str, stats: ReadStats,
                max_line_bytes: int) -> Iterator[Document]:
    lines = _lines(path, max_line_bytes, stats)
    damaged = stats.unreadable + stats.truncated
    first, blank = True, True
    for lineno, raw in enumerate(lines, start=1):
        if first:
            first = False
            if b"\0" in raw[:_SNIFF_BYTES]:
                stats.binary += 1
                lines.close()
                return
        if not raw.strip():
            continue  # blank lines separate nothing in jsonl; not an error
        blank = False
        try:
            obj = json.loads(raw.decode("utf-8", errors="replace"))
        except ValueError:
            stats.bad_json_lines += 1
            continue
        except RecursionError:  # nested deeper than the parser's stack: a bad line, not a crash
            stats.bad_json_lines += 1
            stats.deep_json += 1
            continue
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            stats.bad_json_lines += 1
            continue
        doc = _record(text, f"{doc_id}#L{lineno}", path, stats)
        if doc is not None:
            yield doc
    if blank and damaged == stats.unreadable + stats.truncated:
        stats.empty += 1


def _read_parquet(doc_id: str, path: Path, text_field: str, stats: ReadStats) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_regular(path) as fh:
            yield from _parquet_rows(doc_id, path, pq.ParquetFile(fh), text_field, stats)
    except (pa.ArrowException, OSError):
        stats.unreadable += 1


def _parquet_rows(doc_id: str, path: Path, pf, text_field: str, stats: ReadStats) -> Iterator[Document]:
    if text_field not in pf.schema_arrow.names:
        stats.unreadable += 1
        return
    row = 0
    any_rows = False
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            any_rows = True
            if not isinstance(text, str):
                stats.bad_records += 1
                continue
            doc = _record(text, f"{doc_id}#R{row}", path, stats)
            if doc is not None:
                yield doc
    if not any_rows:
        stats.empty += 1
