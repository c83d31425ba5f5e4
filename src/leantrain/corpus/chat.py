"""Chat (instruction) data as one more reader: prompt/response records -> `Document`s for the pipeline.

A chat example travels through curation as one document whose text is the prompt, `SEP` and the
response (`prompt\\n\\ue000\\nresponse`), so the quality filters, PII scrubbing, exact and near dedup
and the data card treat instruction data like any other; `split_chat` takes the two parts back
apart for tokenization (`tokens/chat.py`). `SEP` is a private-use character that no step changes
(normalization keeps it, PII patterns never match it); one inside the data is replaced by U+FFFD.

Records come from `.jsonl`/`.ndjson` files (or folders of them, walked as the corpus readers walk
folders). A record without either field is an error naming the file and line: silently dropping
examples would change what the model learns.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from leantrain.corpus.readers import (
    MAX_LINE_BYTES,
    Document,
    NotRegular,
    ReadStats,
    inner_suffix,
    open_regular,
    plan_files,
)
from leantrain.errors import DataError

SEP = "\ue000"
_JOIN = f"\n{SEP}\n"
_PLAIN_JSONL = ((".jsonl", ""), (".ndjson", ""))


@dataclass
class ChatExample:
    id: str
    prompt: str
    response: str


def _chat_files(paths: Sequence[str | Path], stats: ReadStats, follow_symlinks: bool) -> list[tuple[str, Path]]:
    for p in map(Path, paths):
        if p.is_file() and p.suffix not in (".jsonl", ".ndjson"):
            raise DataError(f"{p}: chat data must be .jsonl (one JSON object per line); convert it or pass "
                            "--format text")
    files = [(i, q) for i, q in plan_files(paths, stats, follow_symlinks=follow_symlinks)
             if inner_suffix(q) in _PLAIN_JSONL]
    if not files:
        raise DataError("no .jsonl files among the inputs; pass the files of prompt/response records")
    return files


def read_chat(paths: Sequence[str | Path], prompt_field: str = "prompt", response_field: str = "response",
              stats: ReadStats | None = None, *, follow_symlinks: bool = False) -> Iterator[ChatExample]:
    """Prompt/response pairs from .jsonl files (or folders of them), in file and line order.

    Paths are checked when called (missing files, wrong kinds), records as they are read."""
    stats = stats if stats is not None else ReadStats()
    files = _chat_files(paths, stats, follow_symlinks)
    return _examples(files, prompt_field, response_field, stats)


def _examples(files: list[tuple[str, Path]], prompt_field: str, response_field: str,
              stats: ReadStats) -> Iterator[ChatExample]:
    for file_id, path in files:
        try:
            f = open_regular(path)
        except NotRegular:
            stats.special += 1
            continue
        except OSError as e:
            raise DataError(f"{path} cannot be read ({e.strerror or e}); check that it exists and its "
                            "permissions") from None
        stats.files += 1
        with f:
            for n, raw in enumerate(iter(functools.partial(f.readline, MAX_LINE_BYTES + 1), b""), 1):
                if len(raw) > MAX_LINE_BYTES:  # memory stays bounded whatever the file holds
                    raise DataError(f"{path}:{n} is longer than {MAX_LINE_BYTES >> 20} MiB; split or remove that "
                                    "record")
                line = raw.decode("utf-8", errors="replace")
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise DataError(f"{path}:{n} is not valid JSON; fix or remove that line") from None
                except RecursionError:
                    raise DataError(f"{path}:{n} is JSON nested too deeply to read; fix or remove that line") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{n} is not a JSON object; each line must hold one record")
                for field, flag in ((prompt_field, "--prompt-field"), (response_field, "--response-field")):
                    if not isinstance(rec.get(field), str):
                        fields = ", ".join(sorted(rec)[:6]) or "none"
                        raise DataError(f"{path}:{n} has no string field {field!r} (fields: {fields}); "
                                        f"name the right one with {flag}")
                stats.documents += 1
                stats.bytes += len(raw)
                yield ChatExample(f"{file_id}#L{n}", rec[prompt_field], rec[response_field])


def join_chat(prompt: str, response: str) -> str:
    """One document's text for an example; `split_chat` undoes it."""
    return prompt.replace(SEP, "\ufffd") + _JOIN + response.replace(SEP, "\ufffd")


def split_chat(text: str) -> tuple[str, str] | None:
    """(prompt, response) of a chat document's text; None when a step removed the separator."""
    prompt, sep, response = text.partition(SEP)
    if not sep:
        return None
    return prompt.removesuffix("\n"), response.removeprefix("\n")


def read_chat_documents(paths: Sequence[str | Path], prompt_field: str = "prompt", response_field: str = "response",
                        stats: ReadStats | None = None, *, follow_symlinks: bool = False) -> Iterator[Document]:
    """`read_chat` as pipeline documents (text from `join_chat`, source the file)."""
    examples = read_chat(paths, prompt_field, response_field, stats, follow_symlinks=follow_symlinks)
    return (Document(ex.id, join_chat(ex.prompt, ex.response), ex.id.split("#L")[0]) for ex in examples)
