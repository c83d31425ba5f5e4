"""Export a run as a Hugging Face folder that `transformers` loads with no custom code.

`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` read what this
writes: config.json (the transformers class of `model.arch`: LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM or GPT2LMHeadModel; for a mixture of experts
MixtralForCausalLM, Qwen2MoeForCausalLM or Glm4MoeForCausalLM, model/hf_moe.py), safetensors weights
(sharded with an index past `max_shard_bytes`), tokenizer.json + tokenizer_config.json, and
generation_config.json. The name and layout mapping (shared with `train.init_from`) is model/hf.py.
Weights are saved in the `dtype` asked for (bf16 by default for a run trained in bf16), and a run on
chat data gets a Jinja `chat_template` in tokenizer_config.json (tokens/chat.py's `jinja_template`).
export/peft.py writes LoRA adapters in PEFT's layout with the helpers here.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from leantrain.config import load_config
from leantrain.errors import CheckpointError, ConfigError, LeantrainError
from leantrain.files import fresh_sibling, swap_in, write_durable
from leantrain.model.hf import hf_config, to_hf
from leantrain.model.hf_moe import moe_family
from leantrain.tokens.masking import MASK

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPORT_MARKER = ".leantrain-export.json"  # written into every export folder


def write_safetensors(tensors: dict[str, Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards + model.safetensors.index.json when the
    tensors pass `max_shard_bytes` (a tensor larger than the limit gets a shard of its own). Returns file names."""
    from safetensors.torch import save

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
        write_durable(out_dir / "model.safetensors", save(shards[0], metadata={"format": "pt"}), sync_dir=False)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        write_durable(out_dir / name, save(shard, metadata={"format": "pt"}), sync_dir=False)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_durable(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2), sync_dir=False)
    return [*names, "model.safetensors.index.json"]


def parse_size(text: str) -> int:
    """'5GB', '200MB', '10KB' or a plain byte count -> bytes (decimal units, as transformers uses)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"size {text!r} is not allowed; expected a positive size such as 5GB, 500MB or 1000000")
    scale = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
             "T": 10**12, "TB": 10**12}[m.group(2)]
    return max(1, int(float(m.group(1)) * scale))


def check_export_target(out: Path, run_dir: str | Path, overwrite: bool) -> None:
    """Refuse, in one line and before anything is written or deleted, an --out whose replacement could lose
    what leantrain did not write: the run directory, the run's data folder, a folder holding or inside
    either, the current folder, the home folder, /tmp or a folder holding one of them, and (with
    --overwrite) any non-empty folder that lacks the mark an earlier export left in it."""
    from leantrain.config import load_config

    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; pass a folder path")
    target = out.resolve()
    run = Path(run_dir).resolve()
    guarded = {"the run directory": run}
    with contextlib.suppress(LeantrainError, OSError):  # not a run: load_trained says so next
        guarded["the run's data folder"] = Path(load_config(run / "config.toml").data.path).resolve()
    for what, folder in guarded.items():
        if target == folder or target in folder.parents or folder in target.parents:
            relation = "is" if target == folder else "holds" if target in folder.parents else "is inside"
            raise CheckpointError(f"--out {out} {relation} {what} ({folder}); export to a folder outside it, "
                                  "e.g. --out exports/NAME")
    for what, folder in [("the current folder", Path.cwd()), ("your home folder", Path.home()),
                         ("the temporary folder", Path(tempfile.gettempdir())), ("the temporary folder", Path("/tmp"))]:
        folder = folder.resolve()
        if target == folder or target in folder.parents:
            relation = "is" if target == folder else "holds"
            raise CheckpointError(f"--out {out} {relation} {what}; export to a new folder, e.g. --out exports/NAME")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(f"--out {out} is not empty; pass --overwrite to replace an earlier export there, "
                              "or pick another folder")
    if not (out / EXPORT_MARKER).is_file():
        raise CheckpointError(f"--out {out} was not written by leantrain export (no {EXPORT_MARKER} in it), so "
                              "--overwrite will not replace it; pick another folder or empty it yourself")


def default_dtype(run_dir: str | Path, cfg: Any) -> str:
    """bf16 when the run trained in bf16 (plan.json holds the dtype `auto` resolved to), else fp32."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return "bf16" if json.loads((Path(run_dir) / "plan.json").read_text()).get("dtype") == "bfloat16" else "fp32"
    return "bf16" if cfg.precision.dtype == "bf16" else "fp32"


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not allowed; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def write_hf_folder(folder: Path, state: dict[str, Tensor], tok: Any, cfg: Any, run_dir: str | Path, dtype: str,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Weights (leantrain `state`, cast to `dtype`), config.json, generation_config.json and the tokenizer
    files (with the run's chat template, when it trained on chat data) into the existing `folder`."""
    from leantrain.tokens.chat import jinja_template
    from leantrain.tokens.tokenizer import eot_id, hf_tokenizer_config, special_tokens

    torch_dtype = check_dtype(dtype)
    # a run on a Hugging Face tokenizer keeps its tokenizer_config.json (special tokens, chat markers)
    hf_tok = hf_tokenizer_config(Path(run_dir) / "tokenizer.json") or {}
    specials = special_tokens(hf_tok)
    eot = eot_id(tok, where=f"{run_dir}/tokenizer.json", eos=specials.get("eos_token"))
    eot_token = tok.id_to_token(eot)
    bos = tok.token_to_id(specials["bos_token"]) if "bos_token" in specials else None
    bos = eot if bos is None else bos
    chat = Path(run_dir) / "chat_template.txt"  # a chat run: transformers' apply_chat_template gives its ids
    template = {"chat_template": jinja_template(chat.read_text(), eot_token)} if chat.is_file() else {}
    state = {k: v.detach().cpu().to(torch_dtype) for k, v in state.items()}
    files = write_safetensors(to_hf(state, cfg.model), folder, max_shard_bytes)
    config = {**hf_config(cfg.model, eot), "bos_token_id": bos, "torch_dtype": str(torch_dtype).removeprefix("torch.")}
    masked = {}
    if cfg.model.objective == "mlm":  # the run's tokenizer holds <|mask|> (tokens/masking.py); both name it
        masked = {"mask_token": MASK}
        config["mask_token_id"] = tok.token_to_id(MASK)
    write_durable(folder / "config.json", json.dumps(config, indent=2), sync_dir=False)
    write_durable(folder / "generation_config.json", json.dumps(
        {"bos_token_id": bos, "eos_token_id": eot, "pad_token_id": eot}, indent=2), sync_dir=False)
    write_durable(folder / "tokenizer.json", tok.to_str(pretty=True), sync_dir=False)
    write_durable(folder / "tokenizer_config.json", json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot_token, "eos_token": eot_token,
         "pad_token": eot_token, "clean_up_tokenization_spaces": False, **hf_tok,
         "model_max_length": cfg.model.seq_len, **masked, **template}, indent=2), sync_dir=False)
    return [*files, "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


def publish(out: Path, fill: Callable[[Path], list[str]]) -> list[str]:
    """Build an export under a temporary name next to `out` with `fill(folder)` and rename it into place when
    whole, so a crash never leaves a half-written export; returns fill's file names."""
    tmp = fresh_sibling(out)
    try:
        files = fill(tmp)
        swap_in(tmp, out)
    except OSError as e:  # a full disk, a file-size limit: the partial export goes, --out stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write the export {out}: {e.strerror or e}; the partial output was removed "
                              f"and {out} is as it was; free disk space, then run the same command again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def mark_export(folder: Path, kind: str, step: int, run_dir: str | Path) -> None:
    """The mark that lets a later --overwrite replace this folder (and nothing leantrain did not write)."""
    write_durable(folder / EXPORT_MARKER, json.dumps({"leantrain_export": 1, "format": kind, "step": step,
                                                      "run_dir": str(Path(run_dir).resolve())}, indent=1),
                  sync_dir=False)


def export_hf(run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
              dtype: str | None = None) -> dict[str, Any]:
    """Write a run's newest good (or the given) checkpoint as a transformers model folder; returns a summary.

    The folder is built under a temporary name next to `out_dir` and renamed when whole, so a crash
    never leaves a half-written export; a non-empty `out_dir` is replaced only with `overwrite`. `dtype`
    (fp32, bf16, fp16) is that of the saved weights; None: bf16 when the run trained in bf16, else fp32.
    """
    from leantrain.train.runs import load_trained

    out = Path(out_dir)
    if dtype is not None:
        check_dtype(dtype)
    run_cfg = Path(run_dir) / "config.toml"
    run_model = load_config(run_cfg).model if run_cfg.is_file() else None
    if run_model is not None and run_model.moe_experts:  # before anything is written: is there an exact HF class?
        moe_family(run_model)
    check_export_target(out, run_dir, overwrite)
    model, tok, cfg, step, warnings = load_trained(run_dir, checkpoint)
    dtype = dtype or default_dtype(run_dir, cfg)

    def fill(folder: Path) -> list[str]:
        files = write_hf_folder(folder, model.state_dict(), tok, cfg, run_dir, dtype, max_shard_bytes)
        mark_export(folder, "hf", step, run_dir)
        return files

    files = publish(out, fill)
    auto = "AutoModelForMaskedLM" if cfg.model.objective == "mlm" else "AutoModelForCausalLM"
    return {"out_dir": str(out), "step": step, "arch": cfg.model.arch, "files": sorted(files), "dtype": dtype,
            "params": sum(p.numel() for p in model.parameters()), "warnings": warnings, "auto_class": auto}


def check_objective_format(run_dir: str | Path, format: str) -> None:
    """An MLM encoder exports as transformers' EuroBertForMaskedLM (format hf) only: ONNX, GGUF and PEFT exports
    here are causal decoders, so they are refused in one line before anything is written."""
    run_cfg = Path(run_dir) / "config.toml"
    if format != "hf" and run_cfg.is_file() and load_config(run_cfg).model.objective == "mlm":
        raise ConfigError(f"--format {format} exports causal decoders, but {run_dir} is a masked language model "
                          "(model.objective = mlm); export it with --format hf (transformers' EuroBertForMaskedLM)")
