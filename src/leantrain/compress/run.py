"""`leantrain compress`: one trained run in, one smaller model out, with what it cost measured in the same call.

The output is a run-like folder that generate, evaluate, report and export read like any run:

    config.toml           the source run's config (its [model] updated when pruning shrank the model)
    tokenizer.json ...    the source run's tokenizer files
    checkpoints/step-N/   one checkpoint in the run format; a quantized one holds torchao's flattened
                          tensors (int data, scales, zero points) and their layout in state.json
    metrics.jsonl, events.jsonl   the source run's training history (for the report), plus one compress event
    compression.json      method, settings, source checkpoint (path, sha256), and size / params / val loss /
                          decoding tokens/s before and after
    .leantrain-run        the mark that leantrain wrote the folder

The source run is only read. The folder is built under a temporary name beside OUT and renamed into place
when whole; an existing non-empty OUT is refused unless it is an earlier compress output and `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from leantrain.config import Config, load_config, to_toml
from leantrain.errors import CheckpointError, ConfigError, LeantrainError

QUANT_METHODS = ("int8", "int8-dynamic", "int4", "fp8")
PRUNE_METHODS = ("prune-magnitude", "prune-structured", "prune-2:4")
METHODS = (*QUANT_METHODS, *PRUNE_METHODS, "convert")
PRUNE_OPTIONS = ("sparsity", "scope", "heads_fraction", "channels_fraction", "score")
COMPRESSION_FILE = "compression.json"
_COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.txt", "metrics.jsonl", "events.jsonl", "plan.json")


def check_request(method: str, options: dict[str, Any], group_size: int, device: str = "cpu") -> None:
    """Refuse, before anything is read or written, a method or option that cannot work (one line each)."""
    if method not in METHODS:
        raise ConfigError(f"compress method {method!r} is not allowed; expected one of {', '.join(METHODS)}")
    if method == "fp8":
        why = fp8_unavailable(device)
        if why:
            raise ConfigError(f"--method fp8 cannot run here: {why}; use --method int8 or int4 on this machine")
    if group_size not in (16, 32, 64, 128, 256):
        raise ConfigError(f"--group-size {group_size} is not allowed; expected one of 16, 32, 64, 128, 256")
    for key, value in options.items():
        if key not in PRUNE_OPTIONS:
            raise ConfigError(f"unknown compress option {key!r}; allowed: {', '.join(PRUNE_OPTIONS)}")
        if method not in PRUNE_METHODS:
            raise ConfigError(f"--{key.replace('_', '-')} applies to the prune-* methods, not {method}; drop it")
        if key in ("sparsity", "heads_fraction", "channels_fraction") and (
                isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
                or not 0.0 <= value < 1.0):
            raise ConfigError(f"--{key.replace('_', '-')} {value!r} is not allowed; expected a number in [0, 1) "
                              "(1 would remove every weight)")
        if key == "scope" and value not in ("global", "layer"):
            raise ConfigError(f"--scope {value!r} is not allowed; expected global or layer")
        if key == "score" and value not in ("magnitude", "taylor"):
            raise ConfigError(f"--score {value!r} is not allowed; expected magnitude or taylor")


def fp8_unavailable(device: str) -> str | None:
    """Why float8 quantization cannot run on `device` (None when it can): torchao's fp8 kernels need a CUDA GPU
    of compute capability 8.9 or newer."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return "float8 needs a CUDA GPU of compute capability >= 8.9 (torchao's fp8 kernels) and this is a CPU"
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if (major, minor) < (8, 9):
        return f"float8 needs compute capability >= 8.9 and this GPU has {major}.{minor}"
    return None


def check_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    """OUT must not be the source run (or inside or around it), nor a non-empty folder leantrain did not write
    there as a compress output."""
    from leantrain.train.rundir import MARKER

    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; pass a new folder path")
    target, run = out.resolve(), run_dir.resolve()
    if target == run or run in target.parents or target in run.parents:
        raise CheckpointError(f"--out {out} is, holds or is inside the source run {run_dir}; the source run is never "
                              "modified: pick a folder outside it, e.g. --out runs/NAME-int8")
    if not out.is_dir() or not any(out.iterdir()):
        return
    ours = (out / COMPRESSION_FILE).is_file() and (out / MARKER).is_file()
    if not ours:
        raise CheckpointError(f"--out {out} is not empty and leantrain compress did not write it; pick a new folder "
                              "(nothing was changed)")
    if not overwrite:
        raise CheckpointError(f"--out {out} holds an earlier compress output; pass --overwrite to replace it, or pick "
                              "another folder")


def compressed_by(run_dir: str | Path) -> str | None:
    """The method a `leantrain compress` output folder was made with (None for a trained run)."""
    try:
        return json.loads((Path(run_dir) / COMPRESSION_FILE).read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        return None


def quantized_by(run_dir: str | Path) -> str | None:
    """The quantization method of a compress output folder (int8, int8-dynamic, int4, fp8, convert), else None."""
    method = compressed_by(run_dir)
    return method if method in (*QUANT_METHODS, "convert") else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_checkpoint(run_dir: Path, checkpoint: str | Path | None, step: int) -> Path:
    return Path(checkpoint) if checkpoint is not None else run_dir / "checkpoints" / f"step-{step:07d}"


def _measure(model: torch.nn.Module, windows: list, speed_tokens: int) -> dict[str, Any]:
    from leantrain.compress.measure import decode_tokens_per_s, params, val_loss

    got: dict[str, Any] = {"params": params(model)}
    if windows:
        got["val_loss"] = round(val_loss(model, windows), 5)
    if speed_tokens:
        decode_tokens_per_s(model, 1, min(speed_tokens, 4))  # warm-up: first calls pay one-time costs
        got["tokens_per_s_b1"] = round(decode_tokens_per_s(model, 1, speed_tokens, repeats=2), 1)
        got["tokens_per_s_b8"] = round(decode_tokens_per_s(model, 8, speed_tokens, repeats=2), 1)
    return got


def _calibration(cfg: Config, n: int) -> list:
    from leantrain.tokens.dataset import TokenDataset
    from leantrain.tokens.loader import val_batches

    ds = TokenDataset(cfg.data.path)
    return list(val_batches(ds.shards("train"), cfg.model.seq_len, cfg.train.micro_batch_size, n,
                            name="the train split", masks=ds.masks("train")))


def compress(run_dir: str | Path, out: str | Path, method: str, *, checkpoint: str | Path | None = None,
             group_size: int = 32, options: dict[str, Any] | None = None, eval_batches: int | None = None,
             speed_tokens: int = 32, calib_batches: int = 4, overwrite: bool = False,
             device: str = "cpu") -> dict[str, Any]:
    """Compress a run's newest good (or the given) checkpoint with `method` into the run-like folder `out`;
    returns what compression.json records. See the module docstring for the folder's layout."""
    from leantrain.compress.measure import val_windows, weight_bytes
    from leantrain.model.quant import quantize_model
    from leantrain.train.runs import load_trained

    options = {k: v for k, v in (options or {}).items() if v is not None}
    check_request(method, options, group_size, device)
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.toml); pass the folder `leantrain train` "
                              "wrote")
    cfg = load_config(run_dir / "config.toml")
    if cfg.finetune.lora_rank:
        raise ConfigError(f"{run_dir} holds unmerged LoRA adapters (finetune.lora_rank = {cfg.finetune.lora_rank}); "
                          f"merge them first: `leantrain export {run_dir} --out DIR`, train from it with "
                          "--init-from DIR, and compress that run")
    done = quantized_by(run_dir)
    if done:
        raise ConfigError(f"{run_dir} is already quantized ({done}); compress its source run instead")
    if method == "convert":
        if not cfg.quant.qat:
            raise ConfigError(f"--method convert turns a QAT run into its quantized model, but {run_dir} trained "
                              "without quant.qat; use --method int8 or int4 (post-training quantization)")
        scheme, group_size = cfg.quant.qat, cfg.quant.group_size
    check_out(out, run_dir, overwrite)

    model, tok, cfg, step, warnings = load_trained(run_dir, checkpoint, device)
    src = _source_checkpoint(run_dir, checkpoint, step)
    windows = val_windows(cfg, eval_batches or cfg.train.eval_steps) if (eval_batches or cfg.train.eval_steps) else []
    windows = [(x.to(device), y.to(device)) for x, y in windows]
    before = _measure(model, windows, speed_tokens)
    before["weights_mb"] = round(weight_bytes(src) / 1e6, 3)

    t0 = time.perf_counter()
    info: dict[str, Any]
    if method in PRUNE_METHODS:
        try:
            from leantrain.compress.prune import apply_pruning
        except ImportError as e:
            raise LeantrainError(f"--method {method} is not available in this build ({e}); use int8 or int4") from None
        calib = _calibration(cfg, calib_batches) if options.get("score") == "taylor" else None
        model, new_model_cfg, info = apply_pruning(model, cfg.model, method, options, calib)
        cfg.model = new_model_cfg
        quant_layout = None
    else:
        qmethod = scheme if method == "convert" else method
        info = quantize_model(model, qmethod, group_size, qat=method == "convert")
        info.update(scheme=qmethod, group_size=group_size if qmethod == "int4" else None)
        quant_layout = qmethod
    seconds = time.perf_counter() - t0
    after = _measure(model, windows, speed_tokens)

    from leantrain.files import fresh_sibling, swap_in

    tmp = fresh_sibling(out)
    try:
        ckpt = _write_folder(tmp, run_dir, model, cfg, step, quant_layout)
        after["weights_mb"] = round(weight_bytes(ckpt) / 1e6, 3)
        record = {"method": method, "settings": {"group_size": info.get("group_size"), **options},
                  "source": {"run_dir": str(run_dir.resolve()), "checkpoint": str(src.resolve()), "step": step,
                             "model_sha256": _sha256(src / "model.safetensors")},
                  "before": before, "after": after, "info": info, "seconds": round(seconds, 3),
                  "device": str(device), "torch": torch.__version__, "warnings": warnings}
        if "val_loss" in before and "val_loss" in after:
            record["val_loss_delta"] = round(after["val_loss"] - before["val_loss"], 5)
        if before["weights_mb"] and after["weights_mb"]:
            record["size_ratio"] = round(before["weights_mb"] / after["weights_mb"], 3)
        from leantrain.files import open_append, write_json_durable

        if (tmp / "events.jsonl").is_file():
            with open_append(tmp / "events.jsonl") as f:
                f.write(json.dumps({"event": "compress", "step": step, "time": round(time.time(), 3),
                                    "method": method, "source": str(run_dir)}) + "\n")
        write_json_durable(tmp / COMPRESSION_FILE, record, indent=1)
        if out.is_dir() and any(out.iterdir()):
            check_out(out, run_dir, overwrite)  # still an earlier output of ours (checked again just before)
        swap_in(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {out}: {e.strerror or e}; nothing was changed; free disk space or "
                              "fix permissions, then run the same command again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)  # the earlier compress output swap_in moved aside
    return {"out_dir": str(out), **record}


def _write_folder(folder: Path, run_dir: Path, model: torch.nn.Module, cfg: Config, step: int,
                  quant: str | None) -> Path:
    """Config, tokenizer and history files, one checkpoint, and the run mark into the new `folder`."""
    from leantrain.files import write_durable
    from leantrain.model.quant import quantized_state
    from leantrain.train.checkpoint import Checkpointer
    from leantrain.train.checkpoint.state import assemble, tied_aliases
    from leantrain.train.rundir import MARKER

    write_durable(folder / MARKER, json.dumps({"leantrain_run": 1, "compressed": True,
                                               "created": round(time.time(), 3)}) + "\n", sync_dir=False)
    write_durable(folder / "config.toml", to_toml(cfg), sync_dir=False)
    for name in _COPIED:
        src = run_dir / name
        if src.is_file() and not src.is_symlink():
            write_durable(folder / name, src.read_bytes(), sync_dir=False)
    if quant is not None:
        tensors, layout = quantized_state(model, quant)
        snap = assemble(step, tensors, {}, [], [], {"quantization": layout})
    else:
        aliases = tied_aliases(model)
        tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in model.state_dict().items()
                   if n not in aliases}
        snap = assemble(step, tensors, aliases, [], [], {})
    return Checkpointer(folder / "checkpoints", keep=1).write(snap)
