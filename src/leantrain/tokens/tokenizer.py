"""Byte-level BPE tokenizer: trained with HF `tokenizers` (Rust, parallel), saved as tokenizer.json.

Byte-level means every string round-trips exactly (no unknown token), which matters for code.
No prefix space is added, so `decode(encode(s)) == s` for any text.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from leantrain.errors import DataError

EOT = "<|endoftext|>"
MIN_VOCAB = 257  # 256 byte symbols + the end-of-text token


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """Learn BPE merges from `texts` (streamed once); the vocabulary has at most `vocab_size` entries.

    The result is deterministic for the same texts in the same order.
    """
    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size = {vocab_size} is too small; byte-level BPE needs at least {MIN_VOCAB} "
                        "(256 bytes + end-of-text)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json, or the tokenizer.json inside a token dataset folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"tokenizer file {p} does not exist; pass a tokenizer.json or a token dataset folder")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises plain Exception with a parse message
        raise DataError(f"tokenizer file {p} cannot be read ({str(e).splitlines()[0] if str(e) else e!r}); "
                        "re-create it with `leantrain data prepare`") from None
    eot_id(tok, where=str(p))
    return tok


# End-of-sequence tokens of imported tokenizers without ours (Llama 2 / Mistral, Llama 3, Gemma): the
# document separator when fine-tuning such a model on its own tokenizer.
EOS_FALLBACKS = ("</s>", "<|end_of_text|>", "<eos>")


def eot_id(tok: Tokenizer, where: str = "tokenizer") -> int:
    """The id that separates documents: every leantrain tokenizer has EOT; an imported one its EOS token."""
    for token in (EOT, *EOS_FALLBACKS):
        i = tok.token_to_id(token)
        if i is not None:
            return i
    raise DataError(f"{where} has no {EOT} token (nor an end-of-sequence token {', '.join(EOS_FALLBACKS)}); "
                    "train one with `leantrain data prepare` or add it as a special token")
