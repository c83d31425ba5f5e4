"""What the server serves: a model, its tokenizer, its end token and its chat rule, from a run or an HF export.

A run directory (config.toml + checkpoints) loads through `api.load_model`, so the server runs exactly the
weights `leantrain generate` runs; an exported Hugging Face folder (config.json + safetensors, as
`leantrain export --format hf` writes it) is rebuilt as a leantrain Transformer with `model.hf`. Chat
requests are rendered with the run's own template (chat_template.txt; leantrain's default template for a
run not trained on chat data), or with the Jinja `chat_template` of an export's tokenizer_config.json.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from leantrain.errors import DataError

Messages = Sequence[dict[str, str]]


@dataclass
class ServedModel:
    """A model in eval mode with what the server needs around it. `chat_ids` renders OpenAI messages to
    prompt ids (ending with the assistant's generation prompt); `eos_id` ends an answer."""

    name: str
    model: Any  # leantrain.model.Transformer (imported lazily: torch)
    tokenizer: Tokenizer
    eos_id: int | None
    chat_ids: Callable[[Messages], list[int]]
    source: Path

    @property
    def seq_len(self) -> int:
        return int(self.model.cfg.seq_len)

    def encode(self, text: str) -> list[int]:
        """Prompt ids of a completion request, as `leantrain generate` encodes its prompt."""
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def _leantrain_chat(tok: Tokenizer, template: str, eos: str | None) -> Callable[[Messages], list[int]]:
    from leantrain.tokens.chat import ChatEncoder

    # the encoder flips the tokenizer's special-token flag per call: it gets its own copy and a lock
    encoder = ChatEncoder(Tokenizer.from_str(tok.to_str()), template, eos=eos)
    lock = threading.Lock()

    def chat_ids(messages: Messages) -> list[int]:
        with lock:
            return encoder.encode_conversation(messages, add_generation_prompt=True)

    return chat_ids


def _jinja_chat(tok: Tokenizer, template: str, specials: dict[str, str]) -> Callable[[Messages], list[int]]:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise DataError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    copy = Tokenizer.from_str(tok.to_str())  # special tokens in the rendered text are the template's markers

    def chat_ids(messages: Messages) -> list[int]:
        text = compiled.render(messages=list(messages), add_generation_prompt=True, **specials)
        return copy.encode(text, add_special_tokens=False).ids

    return chat_ids


def load_served(path: str | Path, *, name: str | None = None, checkpoint: str | Path | None = None,
                load_model: Callable[..., Any] | None = None) -> ServedModel:
    """Load RUN_DIR (its newest good checkpoint, or `checkpoint`) or an HF export folder for serving.
    `load_model` is `leantrain.api.load_model`, handed in (serve sits above the API); runs need it."""
    from leantrain.model.generate import check_can_generate
    from leantrain.tokens.chat import DEFAULT_TEMPLATE
    from leantrain.tokens.tokenizer import eot_id, hf_tokenizer_config, special_tokens, tokenizer_eos

    path = Path(path)
    if (path / "config.toml").is_file() or (path.parent.name == "checkpoints"
                                            and (path.parent.parent / "config.toml").is_file()):
        if load_model is None:
            raise ValueError("serving a run directory needs load_model=leantrain.api.load_model")
        loaded = load_model(path, checkpoint=checkpoint)
        check_can_generate(loaded.model)
        run = loaded.run_dir
        eos = tokenizer_eos(run / "tokenizer.json")
        template = run / "chat_template.txt"
        chat = _leantrain_chat(loaded.tokenizer, template.read_text() if template.is_file() else DEFAULT_TEMPLATE,
                               eos)
        return ServedModel(name or run.resolve().name, loaded.model, loaded.tokenizer,
                           eot_id(loaded.tokenizer, eos=eos), chat, run)
    from leantrain.model.hf import load_hf_export

    model, tok = load_hf_export(path, checkpoint)
    check_can_generate(model)
    tok_config = hf_tokenizer_config(path / "tokenizer.json") or {}
    specials = special_tokens(tok_config)
    eos = specials.get("eos_token")
    template = tok_config.get("chat_template")
    chat = (_jinja_chat(tok, template, specials) if isinstance(template, str)
            else _leantrain_chat(tok, DEFAULT_TEMPLATE, eos))
    try:
        eos_id = eot_id(tok, where=str(path / "tokenizer.json"), eos=eos)
    except DataError:
        cfg_eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
        eos_id = cfg_eos if isinstance(cfg_eos, int) else None
    return ServedModel(name or path.resolve().name, model, tok, eos_id, chat, path)
