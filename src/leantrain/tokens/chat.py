"""Instruction data: prompt/response pairs -> a token dataset plus a loss mask over the response.

Each example is rendered with a chat template (default `DEFAULT_TEMPLATE`)

    <|user|>\\n{prompt}\\n<|assistant|>\\n{response}<|endoftext|>

and written like any token dataset (`tokens/dataset.py`), with one more uint8 array per shard,
`train/mask/000000.bin`, 1 where the loss counts: the response tokens and everything the template
puts after them (the end-of-text token, always last: a template's closing `<|endoftext|>` stands
for the tokenizer's end token, and one is added when a template has none). The loader turns
mask-0 targets into -100, which the model's loss ignores, so a model learns to answer, not to
predict prompts.

The template's own text (`<|user|>`, newlines) is encoded with special tokens recognised, so its
`<|endoftext|>` is the end-of-text id; the prompt and response are encoded as plain text, so a
literal `<|endoftext|>` in the data is never a boundary. Template pieces, prompt and response are
encoded separately: the prompt's tokens never merge with the response's, and `encode_prompt` gives
exactly the ids a fine-tuned model saw before its answer. The template is kept in meta.json
(`chat_template`).

Reading the records is `corpus/chat.py`'s job (chat data is one more reader): `leantrain.dataprep`
curates the examples like any corpus (dedup, filters, PII, the data card) and hands the curated
ones to `write_chat_dataset`; `prepare_chat_dataset` writes straight from files, without curation.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from leantrain.corpus.chat import ChatExample, read_chat, split_chat
from leantrain.corpus.readers import Document
from leantrain.errors import DataError
from leantrain.files import fresh_sibling, swap_in, write_durable
from leantrain.tokens.dataset import FORMAT, META, ShardWriter, dtype_for_vocab
from leantrain.tokens.prepare import Progress, check_out_dir, leantrain_version, split_hash
from leantrain.tokens.tokenizer import EOT, copy_hf_config, eot_id, load_tokenizer, train_tokenizer

__all__ = ["DEFAULT_TEMPLATE", "SYSTEM_TEMPLATE", "ChatEncoder", "ChatExample", "examples_from_documents",
           "jinja_template", "prepare_chat_dataset", "read_chat", "split_template", "write_chat_dataset"]

DEFAULT_TEMPLATE = "<|user|>\n{prompt}\n<|assistant|>\n{response}<|endoftext|>"
_BATCH = 512


def examples_from_documents(docs: Iterable[Document]) -> Iterable[ChatExample]:
    """Curated chat documents (`corpus.chat.join_chat` texts) back to examples; a document whose
    separator a step removed is an error (no leantrain step does)."""
    for d in docs:
        parts = split_chat(d.text)
        if parts is None:
            raise DataError(f"curated chat document {d.id} lost its prompt/response separator; a custom "
                            "step changed it: leave chat data to the built-in steps")
        yield ChatExample(d.id, *parts)


# how a system message is rendered in a conversation; training examples (prompt/response pairs) have none
SYSTEM_TEMPLATE = "<|system|>\n{system}\n"


def _jinja_str(text: str) -> str:
    """A Jinja string literal holding `text` exactly."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def jinja_template(template: str = DEFAULT_TEMPLATE, eos_token: str = EOT) -> str:
    """The Hugging Face `chat_template` (Jinja) of a leantrain template, rendering messages as
    `ChatEncoder.encode_conversation` encodes them, so `tokenizer.apply_chat_template` gives the ids the
    model trained on (see docs/finetune.md for the one seam where they can differ: custom templates whose
    pieces end in a space, since transformers tokenizes the rendered text whole)."""
    head, middle, _ = (_jinja_str(p) for p in split_template(template))
    tail = _jinja_str(split_template(template)[2].removesuffix(EOT) + eos_token)
    sys_head, sys_tail = (_jinja_str(p) for p in SYSTEM_TEMPLATE.split("{system}"))
    return ("{%- for message in messages -%}"
            f"{{%- if message['role'] == 'system' -%}}{{{{ {sys_head} + message['content'] + {sys_tail} }}}}"
            f"{{%- elif message['role'] == 'user' -%}}{{{{ {head} + message['content'] }}}}"
            f"{{%- elif message['role'] == 'assistant' -%}}{{{{ {middle} + message['content'] + {tail} }}}}"
            "{%- else -%}{{ raise_exception('roles are system, user and assistant') }}"
            "{%- endif -%}{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ {middle} }}}}{{%- endif -%}}")


def split_template(template: str) -> tuple[str, str, str]:
    """(head, middle, tail) of `head{prompt}middle{response}tail`."""
    if template.count("{prompt}") != 1 or template.count("{response}") != 1 or \
            template.index("{prompt}") > template.index("{response}"):
        raise DataError(f"chat template {template!r} must hold {{prompt}} once, then {{response}} once")
    head, rest = template.split("{prompt}")
    middle, tail = rest.split("{response}")
    return head, middle, tail


class ChatEncoder:
    """Encodes examples to (ids, mask) with one tokenizer and template; see the module docstring."""

    def __init__(self, tok: Tokenizer, template: str = DEFAULT_TEMPLATE, eos: str | None = None) -> None:
        self.tok, self.template = tok, template
        self.eot = eot_id(tok, eos=eos)  # `eos`: a Hugging Face tokenizer's own end token (tokenizer_eos)
        head, middle, tail = split_template(template)
        # a closing <|endoftext|> means the tokenizer's end token, whatever it is called (</s> in an
        # imported Llama tokenizer); every example ends with it, so it always ends a document
        tail = tail.removesuffix(EOT)
        tok.encode_special_tokens = False  # the template's markers are meant as special tokens
        self.head, self.middle, self.tail = (np.array(tok.encode(t, add_special_tokens=False).ids, dtype=np.int64)
                                             for t in (head, middle, tail))
        self.tail = np.append(self.tail, self.eot)

    def _texts(self, texts: list[str]) -> list[np.ndarray]:
        self.tok.encode_special_tokens = True  # user text: "<|endoftext|>" in it is text
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [np.array(e.ids, dtype=np.int64) for e in encode(texts, add_special_tokens=False)]

    def encode(self, examples: list[ChatExample]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, mask) per example; mask is 1 on the response and the tail (end token included)."""
        prompts = self._texts([e.prompt for e in examples])
        responses = self._texts([e.response for e in examples])
        out = []
        for p, r in zip(prompts, responses, strict=True):
            ids = np.concatenate([self.head, p, self.middle, r, self.tail])
            n_prompt = len(self.head) + len(p) + len(self.middle)
            mask = np.zeros(len(ids), dtype=np.uint8)
            mask[n_prompt:] = 1
            out.append((ids, mask))
        return out

    def encode_prompt(self, prompt: str) -> list[int]:
        """The ids a fine-tuned model gets before it answers: head, prompt, middle."""
        return np.concatenate([self.head, self._texts([prompt])[0], self.middle]).tolist()

    def encode_conversation(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
                            ) -> list[int]:
        """OpenAI-style messages -> ids, the rule the exported `chat_template` (`jinja_template`) renders: a
        user turn is head + text, an assistant turn middle + text + tail + end token, a system turn
        `SYSTEM_TEMPLATE`; `add_generation_prompt` ends with middle. One user + one assistant turn gives
        exactly the ids of a trained example (`encode`), a user turn + generation prompt `encode_prompt`'s."""
        self.tok.encode_special_tokens = False
        sys_head, sys_tail = (np.array(self.tok.encode(t, add_special_tokens=False).ids, dtype=np.int64)
                              for t in SYSTEM_TEMPLATE.split("{system}"))
        parts: list[np.ndarray] = []
        for i, m in enumerate(messages):
            role, text = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(text, str):
                raise DataError(f"message {i} has role {role!r} and content of type {type(text).__name__}; "
                                "expected role system, user or assistant and a string content")
            ids = self._texts([text])[0]
            parts += {"system": [sys_head, ids, sys_tail], "user": [self.head, ids],
                      "assistant": [self.middle, ids, self.tail]}[role]
        if add_generation_prompt:
            parts.append(self.middle)
        return np.concatenate([np.zeros(0, dtype=np.int64), *parts]).tolist()


class _SplitWriter:
    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.tokens = ShardWriter(folder, dtype, shard_tokens)
        self.masks = ShardWriter(folder / "mask", np.uint8, shard_tokens)  # same sizes: shards stay aligned
        self.documents = self.bytes = self.targets = 0

    def add(self, ids: np.ndarray, mask: np.ndarray, nbytes: int) -> None:
        self.tokens.write(ids)
        self.masks.write(mask)
        self.documents += 1
        self.bytes += nbytes
        self.targets += int(mask.sum())

    def close(self, root: Path) -> dict[str, Any]:
        shards, masks = self.tokens.close(), self.masks.close()
        return {"shards": [p.relative_to(root).as_posix() for p in shards],
                "masks": [p.relative_to(root).as_posix() for p in masks],
                "tokens": self.tokens.tokens, "target_tokens": self.targets, "documents": self.documents,
                "bytes": self.bytes}


def prepare_chat_dataset(paths: Sequence[str | Path], out_dir: str | Path, *, prompt_field: str = "prompt",
                         response_field: str = "response", **kwargs: Any) -> dict[str, Any]:
    """Write a chat token dataset from .jsonl files without curation (`leantrain.dataprep.prepare` curates
    first); returns its meta.json. A bad template or record fails before any folder is made."""
    split_template(kwargs.get("template", DEFAULT_TEMPLATE))
    for _ in read_chat(paths, prompt_field, response_field):
        pass
    provenance = {**(kwargs.pop("provenance", None) or {}), "prompt_field": prompt_field,
                  "response_field": response_field}
    return write_chat_dataset(lambda: read_chat(paths, prompt_field, response_field), out_dir,
                              provenance=provenance, **kwargs)


def write_chat_dataset(examples: Callable[[], Iterable[ChatExample]], out_dir: str | Path, *,
                       template: str = DEFAULT_TEMPLATE, tokenizer_path: str | Path | None = None,
                       vocab_size: int = 8192, val_fraction: float = 0.02, shard_tokens: int = 50_000_000,
                       overwrite: bool = False, provenance: dict | None = None, progress: Progress | None = None,
                       doc_tokens: list[int] | None = None,
                       before_publish: Callable[[Path, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Write a chat token dataset (tokens + loss masks) from `examples()` (called once or twice) to `out_dir`.

    The split follows `prepare_dataset`: an example goes to val when sha1(its id) < val_fraction; if
    that leaves a split empty, one example moves over. `tokenizer_path` reuses a tokenizer (usually
    the base model's: fine-tuning needs its ids); without it one is trained on the rendered examples.
    `doc_tokens` and `before_publish` work as in `prepare_dataset` (the data card goes in with them).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction = {val_fraction} is not allowed; expected a number in [0, 1)")
    split_template(template)
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    tmp = fresh_sibling(out)
    try:
        if tokenizer_path is not None:
            tok = load_tokenizer(tokenizer_path)
            tok_info = {"tokenizer": "reused", "tokenizer_source": str(tokenizer_path)}
        else:
            head, middle, tail = split_template(template)
            tok = train_tokenizer((head + e.prompt + middle + e.response for e in examples()), vocab_size)
            tok_info = {"tokenizer": "trained", "requested_vocab_size": vocab_size}
        tok.save(str(tmp / "tokenizer.json"))
        specials = copy_hf_config(tokenizer_path, tmp) if tokenizer_path is not None else {}
        encoder = ChatEncoder(tok, template, eos=specials.get("eos_token"))
        dtype = dtype_for_vocab(tok.get_vocab_size())
        train, val = _SplitWriter(tmp / "train", dtype, shard_tokens), _SplitWriter(tmp / "val", dtype, shard_tokens)
        held_train: tuple | None = None  # (hash, ids, mask, bytes) of the lowest-hash train example
        held_val: tuple | None = None    # ... and of the highest-hash val example
        done = 0
        batch: list[ChatExample] = []

        def run(batch: list[ChatExample]) -> None:
            nonlocal held_train, held_val, done
            for ex, (ids, mask) in zip(batch, encoder.encode(batch), strict=True):
                if doc_tokens is not None:
                    doc_tokens.append(len(ids) - 1)
                item: tuple | None = (split_hash(ex.id), ids, mask, len((ex.prompt + ex.response).encode()))
                if item[0] < val_fraction:
                    if held_val is None or item[0] > held_val[0]:
                        held_val, item = item, held_val
                    if item is not None:
                        val.add(*item[1:])
                else:
                    if held_train is None or item[0] < held_train[0]:
                        held_train, item = item, held_train
                    if item is not None:
                        train.add(*item[1:])
            done += len(batch)
            if progress:
                progress("encode", done, None)

        for ex in examples():
            batch.append(ex)
            if len(batch) >= _BATCH:
                run(batch)
                batch = []
        if batch:
            run(batch)
        if train.documents + val.documents + (held_train is not None) + (held_val is not None) < 2:
            raise DataError("chat data needs at least 2 examples (one for train, one for val); add examples")
        if held_train is not None:
            (val if val.documents == 0 and held_val is None else train).add(*held_train[1:])
        if held_val is not None:
            (train if train.documents == 0 and held_train is None else val).add(*held_val[1:])
        splits = {"train": train.close(tmp), "val": val.close(tmp)}
        meta = {
            "format": FORMAT, "vocab_size": tok.get_vocab_size(), "eot_id": encoder.eot, "dtype": dtype.name,
            "tokenizer": "tokenizer.json", "splits": splits, "chat_template": template,
            **({"special_tokens": specials} if specials else {}),
            "provenance": {
                **(provenance or {}),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "leantrain_version": leantrain_version(), **tok_info, "format": "chat",
                "val_fraction": val_fraction, "split_rule": "sha1(example id) < val_fraction",
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
