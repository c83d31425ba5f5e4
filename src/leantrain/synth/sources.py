"""Where prompts and the real corpus come from: templates, seed documents, a prompts file, a token dataset.

The real corpus serves twice: its documents seed prompts (a Python function's signature and docstring, the
first line of a text), and it is the reference that synthetic documents are deduplicated against, so a
model that recites its training data adds nothing. It is a token dataset decoded back to documents (the
run's own, by default: exactly what the model trained on, curated) or files and folders read like `data
prepare` reads them.
"""

from __future__ import annotations

import ast
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from leantrain.corpus.readers import Document, read_paths
from leantrain.errors import ConfigError, DataError

# Prompts used when neither --prompt, --prompts nor seed documents give any.
TEMPLATES = {"python": ["def ", "class "], "json": ["data = "], "text": ["\n"]}
MAX_SEED_CHARS = 400
MAX_REFERENCE_CHARS = 64 << 20  # the reference corpus held in memory for dedup (a note says when it was cut)
REFERENCE_SOURCE = "reference"


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a file: a .jsonl of {"prompt": ...} records, or plain text with one prompt per line
    (a typed `\\n` stands for a newline)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--prompts {p}: no such file; pass a text file with one prompt per line or a .jsonl "
                          "file of {\"prompt\": ...} records")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--prompts {p}: cannot read it ({getattr(e, 'strerror', None) or e}); "
                          "pass a UTF-8 text file") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"--prompts {p}: line {n} is not JSON; write one {{\"prompt\": ...}} "
                                  "object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ConfigError(f"--prompts {p}: line {n} has no string field \"prompt\"; add it")
            prompts.append(record["prompt"])
        else:
            prompts.append(line.replace("\\n", "\n"))
    prompts = [q for q in prompts if q.strip() or q == "\n"]
    if not prompts:
        raise ConfigError(f"--prompts {p} holds no prompts; write one prompt per line")
    return prompts


def python_seeds(text: str) -> Iterator[str]:
    """`def` headers of a module's top-level functions with their docstrings, as prompts to complete."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return
    lines = text.splitlines(keepends=True)
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or not node.body:
            continue
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        body = node.body[0]
        docstring = isinstance(body, ast.Expr) and isinstance(body.value, ast.Constant) \
            and isinstance(body.value.value, str)
        end = body.end_lineno if docstring else body.lineno - 1
        # without its last newline: BPE merges a newline with the next line's indent, so a prompt that ends
        # in a bare newline token asks the model to continue from a split it never saw in training
        seed = "".join(lines[first - 1:end]).rstrip()
        if 0 < len(seed) <= MAX_SEED_CHARS:
            yield seed


def text_seeds(text: str) -> Iterator[str]:
    """The first non-empty line of a document, cut to 80 characters."""
    for line in text.splitlines():
        if line.strip():
            yield line[:80]
            return


def seed_prompts(kind: str, docs: list[Document], limit: int, seed: int) -> list[str]:
    """Up to `limit` distinct prompts cut from `docs` (in a shuffled order fixed by `seed`)."""
    pick = python_seeds if kind == "python" else text_seeds
    found: dict[str, None] = {}
    for doc in docs:
        for s in pick(doc.text):
            found.setdefault(s)
    prompts = list(found)
    random.Random(seed).shuffle(prompts)
    return prompts[:limit]


def decode_dataset(path: Path, max_chars: int = MAX_REFERENCE_CHARS) -> tuple[list[Document], bool]:
    """The documents of a token dataset (train and val), decoded with its tokenizer; (docs, cut short)."""
    from leantrain.tokens.dataset import TokenDataset

    ds = TokenDataset(path)
    tok = ds.tokenizer()
    docs: list[Document] = []
    chars = 0
    for split in ("train", "val"):
        for shard_no, shard in enumerate(ds.shards(split)):
            ends = np.flatnonzero(np.asarray(shard) == ds.eot_id)
            start = 0
            pieces = []
            for end in ends.tolist():
                if end > start:
                    pieces.append(np.asarray(shard[start:end]).tolist())
                start = end + 1
            for i, text in enumerate(tok.decode_batch(pieces)):
                docs.append(Document(f"{split}/{shard_no}#{i}", text, REFERENCE_SOURCE))
                chars += len(text)
                if chars >= max_chars:
                    return docs, True
    return docs, False


def reference_documents(corpus: list[str | Path] | None, dataset: Path | None) -> tuple[list[Document], str, bool]:
    """The real corpus: files/folders `corpus` if given, else the token dataset `dataset` decoded; returns
    (documents, where from, cut short). No corpus and no dataset: ([], "", False)."""
    if corpus:
        for p in corpus:
            if not Path(p).exists():
                raise DataError(f"--corpus {p} does not exist; pass the files or folders of the real corpus")
        docs, chars = [], 0
        for d in read_paths(list(corpus)):
            docs.append(Document(d.id, d.text, REFERENCE_SOURCE))
            chars += len(d.text)
            if chars >= MAX_REFERENCE_CHARS:
                return docs, ", ".join(map(str, corpus)), True
        return docs, ", ".join(map(str, corpus)), False
    if dataset is None:
        return [], "", False
    docs, cut = decode_dataset(dataset)
    return docs, str(dataset), cut
