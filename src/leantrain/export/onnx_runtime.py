"""Run an exported ONNX decoder (export/onnx.py) with ONNX Runtime: logits, greedy/sampled decoding, val loss.

The decoding loop mirrors model/generate.py so that the two give the same tokens: the prompt runs once
and the present keys/values become the next call's past; once the text outgrows the context length,
each further token is computed from the last `context_length` tokens afresh. `use_cache=False` feeds the
whole context every step with an empty past, the reference the cache is tested against. A batch of
prompts of different lengths is left-padded (attention_mask 0, positions counted from each row's first
real token), the layout the exported graph's mask supports.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from leantrain.errors import CheckpointError

ONNX_CONFIG = "genai_config.json"


class OnnxLM:
    """An ONNX Runtime session over an ONNX export folder (model.onnx + genai_config.json + tokenizer.json)."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        cfg_path = self.folder / ONNX_CONFIG
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.folder} is not an ONNX export (no {ONNX_CONFIG}); write one with "
                                  "`leantrain export RUN_DIR --format onnx --out DIR`")
        self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        m = self.config["model"]
        d = m["decoder"]
        self.n_layers, self.n_kv, self.head = d["num_hidden_layers"], d["num_key_value_heads"], d["head_size"]
        self.context, self.vocab, self.eos_id = m["context_length"], m["vocab_size"], m["eos_token_id"]
        self.pad_id = m.get("pad_token_id", self.eos_id)
        self.names = d["inputs"], d["outputs"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.folder / d["filename"]), opts, providers=["CPUExecutionProvider"])
        self._tok = None

    @property
    def tokenizer(self) -> Any:
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        return self._tok

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.n_kv, 0, self.head), dtype=np.float32) for _ in range(2 * self.n_layers)]

    def forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call of the graph: logits [B, T, vocab] and the present keys/values (the next call's past)."""
        inp, out = self.names
        feed = {inp["input_ids"]: ids.astype(np.int64), inp["attention_mask"]: mask.astype(np.int64),
                inp["position_ids"]: positions.astype(np.int64)}
        for i in range(self.n_layers):
            feed[inp["past_key_names"] % i] = past[2 * i]
            feed[inp["past_value_names"] % i] = past[2 * i + 1]
        result = self.session.run(None, feed)
        return result[0], list(result[1:])

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits [B, T, vocab] of full sequences (no padding, no past): leantrain's `model(ids)`."""
        B, T = ids.shape
        return self.forward(ids, np.ones((B, T), np.int64), np.tile(np.arange(T), (B, 1)), self.empty_past(B))[0]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, eos_id: int | None = -1, seed: int | None = None,
                 use_cache: bool = True) -> list[list[int]]:
        """New token ids for each prompt (a row stops after `eos_id`; -1: the model's eos, None: never).
        temperature 0 is greedy: then the ids equal leantrain's `generate` for the same weights."""
        if any(not p for p in prompts):
            raise ValueError("generate needs at least one prompt token per prompt")
        eos = self.eos_id if eos_id == -1 else eos_id
        rng = np.random.default_rng(seed)
        B = len(prompts)
        seqs = [list(p) for p in prompts]
        new: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        past: list[np.ndarray] | None = None
        mask = np.zeros((B, 0), np.int64)
        for _ in range(max_new_tokens):
            longest = max(len(s) for s in seqs)
            if use_cache and past is not None and longest <= self.context:
                ids = np.array([[s[-1]] for s in seqs])
                mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
                pos = mask.sum(1, keepdims=True) - 1
            else:  # first step, no cache, or past the context: the last `context` tokens afresh
                window = [s[-self.context:] for s in seqs]
                width = max(len(w) for w in window)
                ids = np.array([[self.pad_id] * (width - len(w)) + w for w in window])
                mask = np.array([[0] * (width - len(w)) + [1] * len(w) for w in window], np.int64)
                pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
                past = self.empty_past(B)
            logits, present = self.forward(ids, mask, pos, past)
            past = present if use_cache else None
            for b in range(B):
                if done[b]:
                    seqs[b].append(self.pad_id)  # keeps rows aligned; never returned
                    continue
                t = sample(logits[b, -1], temperature, top_k, rng)
                new[b].append(t)
                seqs[b].append(t)
                done[b] = eos is not None and t == eos
            if all(done):
                break
        return new

    def loss(self, x: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy of targets `y` (-100: ignored) given inputs `x` [B, T], in float64."""
        logits = self.logits(x).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        keep = y != -100
        picked = np.take_along_axis(logp, np.where(keep, y, 0)[..., None], axis=-1)[..., 0]
        return float(-(picked * keep).sum() / keep.sum())


def sample(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """Greedy at temperature 0 (the first maximum, as torch.argmax), else top-k sampling."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k and top_k < z.size:
        z = np.where(z < np.partition(z, -top_k)[-top_k], -math.inf, z)
    p = np.exp(z - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))
