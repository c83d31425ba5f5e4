"""Byte-level BPE tokenizer: trained with HF `tokenizers` (Rust, parallel), saved as tokenizer.json.

Byte-level means every string round-trips exactly (no unknown token), which matters for code.
No prefix space is added, so `decode(encode(s)) == s` for any text.

A local Hugging Face tokenizer folder (`tokenizer.json` + `tokenizer_config.json`, as
`save_pretrained` writes it) can stand in for a trained one: its `tokenizer_config.json` travels
with the token dataset and the run, so its special tokens (bos/eos/pad, chat markers) mean the
same everywhere; its eos token separates documents, and the post-processor saved in its
tokenizer.json (a leading bos, say) is applied to every document, as `tokenizer(text)` in
transformers 5 applies it (transformers 4's Llama classes rebuild it from `add_bos_token`; re-save
such a folder with a current transformers if the two disagree).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from leantrain.errors import DataError
from leantrain.files import write_durable

EOT = "<|endoftext|>"
# fill-in-the-middle sentinels (the names Qwen and leantrain use), in the order prefix, suffix, middle;
# every trained tokenizer reserves them, so one dataset trains with or without FIM (tokens/fim.py)
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
MASK = "<|mask|>"  # what a masked language model (model.objective = mlm) reads in place of hidden tokens
RESERVED_TOKENS = (EOT, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, MASK)  # EOT first: id 0
MIN_VOCAB = 256 + len(RESERVED_TOKENS)  # 256 byte symbols + the reserved special tokens


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """Learn BPE merges from `texts` (streamed once); the vocabulary has at most `vocab_size` entries.

    The result is deterministic for the same texts in the same order.
    """
    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size = {vocab_size} is too small; byte-level BPE needs at least {MIN_VOCAB} "
                        "(256 bytes + end-of-text + 3 fill-in-the-middle sentinels + <|mask|>)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(RESERVED_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json, or the tokenizer.json inside a token dataset, run or Hugging Face tokenizer folder."""
    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.json").is_file() and (p / HF_CONFIG).is_file():
            raise DataError(f"{p} has a {HF_CONFIG} but no tokenizer.json (a slow-only tokenizer); write the fast "
                            "one with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"tokenizer file {p} does not exist; pass a tokenizer.json, a token dataset folder or a "
                        "Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json)")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises plain Exception with a parse message
        raise DataError(f"tokenizer file {p} cannot be read ({str(e).splitlines()[0] if str(e) else e!r}); "
                        "re-create it with `leantrain data prepare`") from None
    config = hf_tokenizer_config(p)
    eot_id(tok, where=str(p), eos=special_tokens(config).get("eos_token"))
    return tok


HF_CONFIG = "tokenizer_config.json"
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def hf_tokenizer_config(path: str | Path) -> dict[str, Any] | None:
    """The tokenizer_config.json next to a tokenizer.json (or inside a folder); None when there is none.

    Only leantrain-trained tokenizers come without one; a file that is not a JSON object is an error.
    """
    p = Path(path)
    cfg_path = (p if p.is_dir() else p.parent) / HF_CONFIG
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{cfg_path} is not valid JSON ({e}); fix it or re-save the tokenizer with "
                        "save_pretrained") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{cfg_path} is not a JSON object; re-save the tokenizer with save_pretrained")
    return cfg


def special_tokens(config: dict[str, Any] | None) -> dict[str, str]:
    """{"bos_token": "<s>", "eos_token": "</s>", ...}: the named special tokens a tokenizer_config.json sets."""
    if not config:
        return {}
    return {k: text for k in SPECIAL_KEYS if (text := _token_text(config.get(k))) is not None}


def copy_hf_config(source: str | Path, folder: Path) -> dict[str, str]:
    """Copy the tokenizer_config.json beside `source` (if any) into `folder`, so its special tokens travel with
    the tokenizer.json saved there; returns those special tokens ({} when `source` has no config)."""
    config = hf_tokenizer_config(source)
    if config is None:
        return {}
    src = Path(source)
    write_durable(folder / HF_CONFIG, ((src if src.is_dir() else src.parent) / HF_CONFIG).read_bytes(),
                  sync_dir=False)
    return special_tokens(config)


def tokenizer_eos(path: str | Path) -> str | None:
    """The eos token named by the tokenizer_config.json beside `path`, if any: the document separator."""
    return special_tokens(hf_tokenizer_config(path)).get("eos_token")


# End-of-sequence tokens of imported tokenizers without ours (Llama 2 / Mistral, Llama 3, Gemma): the
# document separator when fine-tuning such a model on its own tokenizer.
EOS_FALLBACKS = ("</s>", "<|end_of_text|>", "<eos>")


def eot_id(tok: Tokenizer, where: str = "tokenizer", eos: str | None = None) -> int:
    """The id that separates documents: `eos` when a tokenizer_config.json names one (see `tokenizer_eos`),
    else EOT (every leantrain tokenizer has it), else an imported tokenizer's usual EOS token."""
    if eos is not None:
        i = tok.token_to_id(eos)
        if i is None:
            raise DataError(f"{where}: the eos_token {eos!r} of its {HF_CONFIG} is not in the tokenizer's "
                            "vocabulary; fix eos_token there or re-save the tokenizer with save_pretrained")
        return i
    for token in (EOT, *EOS_FALLBACKS):
        i = tok.token_to_id(token)
        if i is not None:
            return i
    raise DataError(f"{where} has no {EOT} token (nor an end-of-sequence token {', '.join(EOS_FALLBACKS)}); "
                    "train one with `leantrain data prepare` or add it as a special token")
