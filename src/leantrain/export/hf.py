"""Export a run as a Hugging Face folder that `transformers` loads with no custom code.

`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` read what this
writes: config.json (LlamaForCausalLM, or GPT2LMHeadModel for `arch = "gpt2"`), safetensors weights
(sharded with an index past `max_shard_bytes`), tokenizer.json + tokenizer_config.json, and
generation_config.json. The name and layout mapping (shared with `train.init_from`) is model/hf.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from leantrain.errors import CheckpointError, ConfigError
from leantrain.files import fresh_sibling, swap_in
from leantrain.model.hf import hf_config, to_hf

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def write_safetensors(tensors: dict[str, Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards + model.safetensors.index.json when the
    tensors pass `max_shard_bytes` (a tensor larger than the limit gets a shard of its own). Returns file names."""
    from safetensors.torch import save_file

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [*names, "model.safetensors.index.json"]


def parse_size(text: str) -> int:
    """'5GB', '200MB', '10KB' or a plain byte count -> bytes (decimal units, as transformers uses)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"size {text!r} is not allowed; expected a positive size such as 5GB, 500MB or 1000000")
    scale = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
             "T": 10**12, "TB": 10**12}[m.group(2)]
    return max(1, int(float(m.group(1)) * scale))


def export_hf(run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> dict[str, Any]:
    """Write a run's newest good (or the given) checkpoint as a transformers model folder; returns a summary.

    The folder is built under a temporary name next to `out_dir` and renamed when whole, so a crash
    never leaves a half-written export; a non-empty `out_dir` is replaced only with `overwrite`.
    """
    from leantrain.tokens.tokenizer import eot_id
    from leantrain.train.runs import load_trained

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"--out {out} is not empty; pass --overwrite to replace it or pick another folder")
    model, tok, cfg, step, warnings = load_trained(run_dir, checkpoint)
    eot = eot_id(tok, where=f"{run_dir}/tokenizer.json")
    eot_token = tok.id_to_token(eot)
    tmp = fresh_sibling(out)
    try:
        state = {k: v.detach().to(torch.float32).cpu() for k, v in model.state_dict().items()}
        files = write_safetensors(to_hf(state, cfg.model), tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg.model, eot), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}, indent=2))
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot_token, "eos_token": eot_token,
             "pad_token": eot_token, "model_max_length": cfg.model.seq_len, "clean_up_tokenization_spaces": False},
            indent=2))
        files += ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out_dir": str(out), "step": step, "arch": cfg.model.arch, "files": sorted(files),
            "params": sum(p.numel() for p in model.parameters()), "warnings": warnings}
