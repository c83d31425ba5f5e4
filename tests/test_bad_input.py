"""Bad input thrown at the real commands: every row exits 2 with one line `error: ...` and no traceback.

Each row builds real files under its own folder (configs, corpora, HF folders, damaged run copies) and
runs the command through `leantrain.cli.main`, in this process: a subprocess per row would spend ~2 s
importing torch, minutes for the table on two cores. `test_real_process` runs a few rows as real
processes to prove the console path (rich's stderr, argparse's exit) gives the same one line.
Every row must fail before any training step; rows of `train` also check that no run folder was made.

To add a row, append `Row(id, build, words)`: `build(ctx)` writes what the row needs under `ctx.tmp`
(the working directory of the command) and returns the argv; `words` must all appear in the message.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import save_file

from helpers import tiny_config
from leantrain.cli import main

RUN_ARGS = ["--train.steps=2", "--train.micro_batch_size=2", "--train.eval_steps=1", "--train.sample_tokens=0",
            "--precision.dtype=fp32", "--log.progress=none"]
TINY = ["--model.n_layers=1", "--model.dim=32", "--model.n_heads=2", "--model.n_kv_heads=2", "--model.seq_len=32",
        "--model.vocab_size=512", *RUN_ARGS]
# a tiny Llama config.json of the shape TINY describes (weights in `hf_weights`)
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1, "hidden_size": 32,
         "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 512,
         "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
         "tie_word_embeddings": True}


@dataclass
class Ctx:
    """What a row may use: its own folder, the shared token dataset and a trained run (copy before changing)."""

    tmp: Path
    dataset: Path
    run: Path

    def write(self, name: str, content: str | bytes) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return p

    def hf(self, config: dict | str | None, weights: dict | None = None, name: str = "hf") -> str:
        """An --init-from folder with this config.json (text as given if a str; none if None)."""
        d = self.tmp / name
        d.mkdir()
        if config is not None:
            (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if weights is not None:
            save_file(weights, str(d / "model.safetensors"))
        return str(d)

    def train(self, *args: str) -> list[str]:
        """argv of a tiny `train` on the shared dataset into ./run (which must not appear)."""
        return ["train", "--run-dir", str(self.tmp / "run"), f"--data.path={self.dataset}", *TINY, *args]

    def federate(self, *args: str) -> list[str]:
        """argv of a tiny `federate` on the shared dataset into ./run."""
        return ["federate", "--run-dir", str(self.tmp / "run"), f"--data.path={self.dataset}", *TINY, *args]

    def train_from(self, hf_dir: str, *args: str) -> list[str]:
        """argv of a `train --init-from hf_dir` into ./run; the [model] section comes from its config.json."""
        return ["train", "--run-dir", str(self.tmp / "run"), f"--data.path={self.dataset}", *RUN_ARGS,
                "--init-from", hf_dir, *args]

    def run_copy(self) -> Path:
        dst = self.tmp / "runcopy"
        shutil.copytree(self.run, dst)
        return dst


def hf_dataset(c: Ctx, columns: dict, split: str | None = None) -> str:
    """A `datasets` save_to_disk folder with these columns (a DatasetDict holding only `split` if given)."""
    import datasets

    ds = datasets.Dataset.from_dict(columns)
    out = c.tmp / "hfds"
    (datasets.DatasetDict({split: ds}) if split else ds).save_to_disk(str(out))
    return str(out)


def hf_tokenizer(c: Ctx, config: dict | str) -> str:
    """A Hugging Face tokenizer folder: the shared dataset's tokenizer.json and this tokenizer_config.json."""
    d = c.tmp / "hftok"
    d.mkdir()
    shutil.copy(c.dataset / "tokenizer.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(d)


def mask_dataset(c: Ctx, kind: str) -> str:
    """The shared dataset with a tokenizer that lacks <|mask|> (`none`: renamed, same ids) or has it as an
    `ordinary` (non-special) token."""
    ds = c.tmp / f"mask-{kind}"
    shutil.copytree(c.dataset, ds)
    blob = json.loads((ds / "tokenizer.json").read_text())
    for t in blob["added_tokens"]:
        if t["content"] == "<|mask|>" and kind == "none":
            t["content"] = "<|unused|>"
            blob["model"]["vocab"]["<|unused|>"] = blob["model"]["vocab"].pop("<|mask|>")
        elif t["content"] == "<|mask|>":
            t["special"] = False
    (ds / "tokenizer.json").write_text(json.dumps(blob))
    return str(ds)


def mlm_run(c: Ctx) -> str:
    """A finished 2-step tiny masked-language-model run (model.objective = mlm) in ./mlmrun."""
    from leantrain.train.trainer import Trainer

    cfg = tiny_config(c.dataset, train__steps=2, train__eval_every=2, train__eval_steps=1, checkpoint__every=2,
                      model__n_layers=1, model__dim=32, model__n_heads=2, model__n_kv_heads=2, model__seq_len=32,
                      model__vocab_size=520, model__objective="mlm")
    Trainer(cfg, c.tmp / "mlmrun").fit()
    return str(c.tmp / "mlmrun")


def llama(**changes) -> dict:
    c = dict(LLAMA)
    for k, v in changes.items():
        if v is ...:
            c.pop(k)
        else:
            c[k] = v
    return c


def lora_config(**changes) -> dict:
    """adapter_config.json of a rank-2 PEFT LoRA adapter on q_proj of the tiny Llama (LLAMA)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
            "target_modules": ["q_proj"], "bias": "none", **changes}


def lora_weights(module: str = "model.layers.0.self_attn.q_proj") -> dict:
    import torch

    return {f"base_model.model.{module}.lora_A.weight": torch.zeros(2, 32),
            f"base_model.model.{module}.lora_B.weight": torch.zeros(32, 2)}


def peft_adapter(c: Ctx, config: dict | None, weights: dict | None) -> str:
    """A PEFT adapter folder with this adapter_config.json and adapter_model.safetensors (each left out if None)."""
    d = c.tmp / "adapter"
    d.mkdir()
    if config is not None:
        (d / "adapter_config.json").write_text(json.dumps(config))
    if weights is not None:
        save_file(weights, str(d / "adapter_model.safetensors"))
    return str(d)


def hf_weights(**shapes) -> dict:
    """Llama tensors for LLAMA, HF names; `shapes` replaces the shape of a tensor (by its name with dots as __)."""
    import torch

    base = {"model.embed_tokens.weight": (512, 32), "model.norm.weight": (32,),
            "model.layers.0.input_layernorm.weight": (32,), "model.layers.0.post_attention_layernorm.weight": (32,),
            "model.layers.0.self_attn.q_proj.weight": (32, 32), "model.layers.0.self_attn.k_proj.weight": (32, 32),
            "model.layers.0.self_attn.v_proj.weight": (32, 32), "model.layers.0.self_attn.o_proj.weight": (32, 32),
            "model.layers.0.mlp.gate_proj.weight": (64, 32), "model.layers.0.mlp.up_proj.weight": (64, 32),
            "model.layers.0.mlp.down_proj.weight": (32, 64)}
    for k, v in shapes.items():
        base[k.replace("__", ".")] = v
    return {k: torch.zeros(v) for k, v in base.items()}


def synth(c: Ctx, *args: str, model: str | None = None, out: str | None = None) -> list[str]:
    """argv of a small `synth` of the shared run into ./synth (which must not appear unless a row makes it)."""
    return ["synth", model or str(c.run), "--kind", "python", "--count", "2", "--max-new-tokens", "4",
            "--out", out or str(c.tmp / "synth"), *args]


def damage_checkpoints(ctx: Ctx) -> Path:
    """A copy of the run whose every checkpoint has its model weights overwritten with junk."""
    run = ctx.run_copy()
    for f in (run / "checkpoints").rglob("model*.safetensors"):
        f.write_bytes(b"\0junk" * 100)
    return run


def changed_run(ctx: Ctx, name: str, content: str | None, edit: Callable[[str], str] | None = None) -> str:
    """A copy of the run with one file replaced by `content`, edited by `edit`, or (both None) removed."""
    run = ctx.run_copy()
    p = run / name
    if edit is not None:
        p.write_text(edit(p.read_text()))
    elif content is None:
        p.unlink()
    else:
        p.write_text(content)
    return str(run)


def manifest_naming(path: str) -> Callable[[str], str]:
    """An edit of a checkpoint manifest that makes it list `path` instead of model.safetensors."""
    def edit(text: str) -> str:
        m = json.loads(text)
        m["files"][path] = m["files"].pop("model.safetensors")
        return json.dumps(m)
    return edit


def fifo(ctx: Ctx, name: str) -> str:
    p = ctx.tmp / name
    os.mkfifo(p)
    return str(p)


def unreadable(ctx: Ctx, name: str) -> str:
    p = ctx.write(name, "[train]\n")
    p.chmod(0)
    return str(p)


def damaged_hf(ctx: Ctx) -> str:
    """An --init-from folder with a good config.json and a model.safetensors that is not one."""
    d = ctx.hf(LLAMA)
    (Path(d) / "model.safetensors").write_bytes(b"junk" * 9)
    return d


def tune_cfg(c: Ctx, space: str = '{ "optim.lr" = [1e-4, 1e-2, "log"] }', name: str = "tune.toml", **tune) -> str:
    """A config of the shared dataset with a [tune] section: this space (TOML text) and these settings."""
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in tune.items())
    return str(c.write(name, f"[data]\npath = {json.dumps(str(c.dataset))}\n[model]\nvocab_size = 512\n[tune]\n"
                             f"space = {space}\n{extra}"))


def tune(c: Ctx, *args: str, space: str = '{ "optim.lr" = [1e-4, 1e-2, "log"] }', **settings) -> list[str]:
    """argv of `tune` on a [tune] config into ./study."""
    return ["tune", tune_cfg(c, space, **settings), "--out", str(c.tmp / "study"), *args]


def closed_port_url() -> str:
    """A PostgreSQL URL on a 127.0.0.1 port nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql://nobody:secret@127.0.0.1:{port}/study"


def changed_study(c: Ctx) -> list[str]:
    """A study made with one space (no trial run), resumed with a config whose lr range differs."""
    from leantrain.api import load_config
    from leantrain.tune.study import open_study

    open_study(load_config, tune_cfg(c), c.tmp / "study")
    return ["tune", tune_cfg(c, '{ "optim.lr" = [1e-3, 1e-2, "log"] }', name="other.toml"), "--resume",
            str(c.tmp / "study")]


def mixed_dataset(c: Ctx) -> str:
    """A token dataset of two weighted sources, `real` and `synthetic`, with the shared dataset's tokenizer."""
    from leantrain.corpus.readers import Document
    from leantrain.tokens.prepare import prepare_dataset

    def documents():
        for i in range(8):
            yield Document(f"real/{i}", "def f(x):\n    return x + 1\n" * 20, "t")
            yield Document(f"synthetic/{i}", "class A:\n    pass\n" * 20, "t")
    prepare_dataset(documents, c.tmp / "mixed", tokenizer_path=c.dataset, val_fraction=0.2,
                    mix={"real": 0.8, "synthetic": 0.2}, source_of=lambda d: d.id.split("/")[0])
    return str(c.tmp / "mixed")


def source_dirs(c: Ctx) -> tuple[str, str]:
    """Two small input folders for `data prepare --source`."""
    return (str(c.write("real/a.txt", "hello world\n" * 50).parent),
            str(c.write("synth/b.txt", "lorem ipsum\n" * 50).parent))


def fim_not_special(text: str) -> str:
    """A tokenizer.json whose fill-in-the-middle sentinels are ordinary added tokens, not special ones."""
    tok = json.loads(text)
    for t in tok["added_tokens"]:
        if t["content"].startswith("<|fim_"):
            t["special"] = False
    return json.dumps(tok)


def fim_dataset(c: Ctx, kind: str) -> str:
    """A copy of the shared dataset: `collide` (its sentinels ordinary tokens) or `chat` (loss masks added)."""
    import numpy as np

    ds = c.tmp / "ds"
    shutil.copytree(c.dataset, ds)
    if kind == "collide":
        (ds / "tokenizer.json").write_text(fim_not_special((ds / "tokenizer.json").read_text()))
    else:
        meta = json.loads((ds / "meta.json").read_text())
        for split, info in meta["splits"].items():
            info["masks"] = []
            for rel in info["shards"]:
                (ds / split / "mask").mkdir(exist_ok=True)
                mask = f"{split}/mask/{Path(rel).name}"
                np.ones((ds / rel).stat().st_size // 2, dtype=np.uint8).tofile(ds / mask)
                info["masks"].append(mask)
        (ds / "meta.json").write_text(json.dumps(meta))
    return str(ds)


@dataclass
class Row:
    id: str
    build: Callable[[Ctx], list[str]]
    words: tuple[str, ...] = ()
    root_reads_anyway: bool = False  # permission rows: root reads every file, so the row cannot fail as root
    keeps: tuple[str, ...] = ()  # files under the row's folder that must survive the command (nothing lost)


R = Row
ROWS: list[Row] = [
    # ---- config values, every section (train, plan, lr-find and config share one validation) --------------
    R("lr-negative", lambda c: c.train("--optim.lr=-1"), ("optim.lr", "-1", "> 0")),
    R("lr-nan", lambda c: c.train("--optim.lr=nan"), ("optim.lr", "nan", "finite")),
    R("lr-inf", lambda c: c.train("--optim.lr=inf"), ("optim.lr", "inf")),
    R("beta2-above-1", lambda c: c.train("--optim.beta2=1.5"), ("optim.beta2", "[0.0, 1.0]")),
    R("eps-zero", lambda c: c.train("--optim.eps=0"), ("optim.eps",)),
    R("ns-steps-huge", lambda c: c.train("--optim.ns_steps=100000"), ("optim.ns_steps",)),
    R("guard-sigma-negative", lambda c: c.train("--guard.sigma=-1"), ("guard.sigma", "-1.0")),
    R("guard-sigma-nan", lambda c: c.train("--guard.sigma=NaN"), ("guard.sigma", "nan")),
    R("guard-history-over-window", lambda c: c.train("--guard.min_history=60", "--guard.window=10"),
      ("guard.min_history", "guard.window")),
    R("guard-policy", lambda c: c.train("--guard.policy=ignore"), ("guard.policy", "skip, rollback, off")),
    R("energy-pue-nan", lambda c: c.train("--energy.pue=nan"), ("energy.pue", "nan")),
    R("energy-price-negative", lambda c: c.train("--energy.price_per_kwh=-0.1"), ("energy.price_per_kwh",)),
    R("energy-tdp-inf", lambda c: c.train("--energy.tdp_w=inf"), ("energy.tdp_w",)),
    R("energy-deadline-garbage", lambda c: c.train("--energy.deadline=next tuesday"), ("energy.deadline", "ISO")),
    R("energy-carbon-aware-alone", lambda c: c.train("--energy.carbon_aware=true"), ("intensity_csv",)),
    R("energy-meter", lambda c: c.train("--energy.meter=wattmeter"), ("energy.meter",)),
    R("energy-device-price-negative", lambda c: c.train("--energy.price_per_device_hour=-0.5"),
      ("energy.price_per_device_hour = -0.5", "-1")),
    R("energy-device-price-below-minus-one", lambda c: c.train("--energy.price_per_device_hour=-3"),
      ("energy.price_per_device_hour", "-1 (the catalog's price)")),
    R("energy-device-price-nan", lambda c: c.train("--energy.price_per_device_hour=nan"),
      ("energy.price_per_device_hour", "nan")),
    R("plan-device-price-nan", lambda c: ["plan", "--hardware", "h100", "--energy.price_per_device_hour=nan"],
      ("energy.price_per_device_hour", "nan")),
    R("energy-ram-w-negative", lambda c: c.train("--energy.ram_w=-20"), ("energy.ram_w", "-20")),
    R("energy-ram-w-inf", lambda c: c.train("--energy.ram_w=inf"), ("energy.ram_w", "inf")),
    R("finetune-alpha-nan", lambda c: c.train("--finetune.lora_alpha=nan"), ("finetune.lora_alpha",)),
    R("finetune-dropout-above-1", lambda c: c.train("--finetune.lora_dropout=1.5"), ("finetune.lora_dropout",)),
    R("finetune-rank-negative", lambda c: c.train("--finetune.lora_rank=-4"), ("finetune.lora_rank",)),
    R("parallel-dp-shard-zero", lambda c: c.train("--parallel.dp_shard=0"), ("parallel.dp_shard",)),
    R("moe-top-k-over-experts", lambda c: c.train("--model.moe_experts=4", "--model.moe_top_k=5"),
      ("model.moe_top_k = 5", "model.moe_experts = 4")),
    R("moe-capacity-negative", lambda c: c.train("--model.moe_experts=4", "--model.moe_capacity=-1"),
      ("model.moe_capacity", "-1")),
    R("moe-capacity-nan", lambda c: c.train("--model.moe_experts=4", "--model.moe_capacity=nan"),
      ("model.moe_capacity", "nan")),
    R("moe-router", lambda c: c.train("--model.moe_experts=4", "--model.moe_router=relu"),
      ("model.moe_router", "softmax, sigmoid")),
    R("moe-balance", lambda c: c.train("--model.moe_experts=4", "--model.moe_balance=loss"), ("model.moe_balance",)),
    R("moe-gpt2", lambda c: c.train("--model.moe_experts=4", "--model.arch=gpt2"),
      ("moe_experts", "llama, qwen2 or qwen3")),
    R("moe-shared-gate-alone", lambda c: c.train("--model.moe_experts=4", "--model.moe_shared_gate=true"),
      ("moe_shared_gate", "moe_shared_experts >= 1")),
    R("moe-tp", lambda c: c.train("--model.moe_experts=4", "--parallel.tp=2", "--model.tie_embeddings=false"),
      ("moe_experts", "parallel.tp = 2")),
    R("moe-fp8", lambda c: c.train("--model.moe_experts=4", "--precision.fp8=true"), ("moe_experts", "precision.fp8")),
    R("moe-ep-experts", lambda c: c.train("--model.moe_experts=4", "--parallel.ep=3"),
      ("parallel.ep = 3", "model.moe_experts = 4")),
    R("moe-ep-world", lambda c: c.train("--model.moe_experts=4", "--parallel.ep=2"),
      ("parallel.ep = 2", "world size 1")),
    R("moe-ep-dense", lambda c: c.train("--parallel.ep=2"), ("parallel.ep = 2", "model.moe_experts = 0")),
    R("moe-ep-replicate", lambda c: c.train("--model.moe_experts=4", "--parallel.ep=2", "--parallel.dp_replicate=2"),
      ("parallel.ep = 2", "parallel.dp_replicate = 2")),
    R("moe-ep-zero", lambda c: c.train("--parallel.ep=0"), ("parallel.ep",)),
    R("moe-ep-lora", lambda c: c.train("--model.moe_experts=4", "--parallel.ep=2", "--finetune.lora_rank=4"),
      ("finetune.lora_rank", "parallel.ep = 2")),
    R("moe-ep-compile", lambda c: c.train("--model.moe_experts=4", "--parallel.ep=2", "--train.compile=true"),
      ("train.compile", "parallel.ep = 2")),
    R("parallel-timeout-zero", lambda c: c.train("--parallel.timeout_s=0"), ("parallel.timeout_s",)),
    R("parallel-tp-heads", lambda c: c.train("--parallel.tp=3", "--model.tie_embeddings=false"),
      ("parallel.tp = 3",)),
    R("parallel-backend", lambda c: c.train("--parallel.backend=mpi"), ("parallel.backend",)),
    R("global-batch-and-accum", lambda c: c.train("--train.global_batch_size=8", "--train.grad_accum_steps=2"),
      ("train.global_batch_size = 8", "train.grad_accum_steps = 2")),
    R("global-batch-micro", lambda c: c.train("--train.global_batch_size=5"),
      ("train.global_batch_size = 5", "train.micro_batch_size = 2")),
    R("batch-warmup-negative", lambda c: c.train("--train.batch_warmup_steps=-3"), ("train.batch_warmup_steps",)),
    R("batch-warmup-not-a-number", lambda c: c.train("--train.batch_warmup_steps=ten"),
      ("train.batch_warmup_steps",)),
    R("checkpoint-keep-zero", lambda c: c.train("--checkpoint.keep=0"), ("checkpoint.keep", "0")),
    R("checkpoint-every-negative", lambda c: c.train("--checkpoint.every=-5"), ("checkpoint.every",)),
    R("checkpoint-format", lambda c: c.train("--checkpoint.format=zip"), ("checkpoint.format",)),
    R("log-every-zero", lambda c: c.train("--log.every=0"), ("log.every",)),
    R("log-progress", lambda c: c.train("--log.progress=rainbow"), ("log.progress",)),
    R("log-trackers-unknown", lambda c: c.train("--log.trackers=tensorboard,tensorbord"),
      ("log.trackers", "'tensorbord'", "tensorboard, mlflow, wandb, trackio")),
    R("log-trackers-not-names", lambda c: c.train("--log.trackers=[1, 2]"), ("log.trackers", "[1, 2]", "a list of")),
    R("log-trackers-bad-toml-list", lambda c: c.train("--log.trackers=[wandb"), ("log.trackers", "[wandb")),
    R("log-trackers-string-in-file",
      lambda c: c.train(str(c.write("t.toml", '[log]\ntrackers = "wandb"\n'))),
      ("log.trackers", "'wandb'", 'trackers = ["tensorboard"]')),
    R("model-heads-zero", lambda c: c.train("--model.n_heads=0"), ("model.n_heads", "0")),
    R("model-dim-not-divisible", lambda c: c.train("--model.dim=33"), ("model.dim = 33", "n_heads")),
    R("model-kv-heads", lambda c: c.train("--model.n_kv_heads=3", "--model.n_heads=4"), ("n_kv_heads = 3",)),
    R("model-vocab-zero", lambda c: c.train("--model.vocab_size=0"), ("model.vocab_size",)),
    R("model-norm-eps-zero", lambda c: c.train("--model.norm_eps=0"), ("model.norm_eps",)),
    R("model-arch", lambda c: c.train("--model.arch=gpt3"), ("model.arch", "llama, gpt2", "qwen3", "phi3")),
    R("model-sliding-window-llama", lambda c: c.train("--model.sliding_window=8"),
      ("model.sliding_window = 8", "mistral or phi3")),
    R("model-sliding-window-negative", lambda c: c.train("--model.arch=mistral", "--model.sliding_window=-1"),
      ("model.sliding_window",)),
    R("model-head-dim-gpt2", lambda c: c.train("--model.arch=gpt2", "--model.head_dim=8"),
      ("model.head_dim = 8", "gpt2")),
    R("model-head-dim-odd", lambda c: c.train("--model.arch=qwen3", "--model.head_dim=7"), ("head size 7", "odd")),
    R("model-too-big-to-allocate", lambda c: c.train("--model.dim=131072", "--model.n_layers=4096",
                                                     "--model.n_heads=1024", "--model.n_kv_heads=1024"),
      ("cannot be allocated",)),
    R("model-vocab-huge", lambda c: c.train("--model.vocab_size=99999999999"), ("model.vocab_size", "2^24")),
    R("tokens-per-micro-batch", lambda c: c.train("--train.micro_batch_size=1000000", "--model.seq_len=1000000"),
      ("tokens per micro-batch",)),
    R("train-steps-float", lambda c: c.train("--train.steps=1e3"), ("train.steps", "integer")),
    R("train-seed-negative", lambda c: c.train("--train.seed=-1"), ("train.seed",)),
    R("train-fim-rate-above-one", lambda c: c.train("--data.fim_rate=1.5"), ("data.fim_rate", "[0.0, 1.0]")),
    R("train-fim-rate-word", lambda c: c.train("--data.fim_rate=half"), ("data.fim_rate",)),
    R("train-fim-spm-rate-negative", lambda c: c.train("--data.fim_spm_rate=-0.1"), ("data.fim_spm_rate",)),
    R("train-fim-with-mlm", lambda c: c.train("--data.fim_rate=0.5", "--model.objective=mlm"),
      ("data.fim_rate", "objective")),
    R("train-fim-sentinel-collides",
      lambda c: c.train("--data.fim_rate=0.5", f"--data.path={fim_dataset(c, 'collide')}"),
      ("<|fim_prefix|>", "ordinary token")),
    R("train-fim-on-chat-data", lambda c: c.train("--data.fim_rate=0.5", f"--data.path={fim_dataset(c, 'chat')}"),
      ("data.fim_rate", "chat data")),
    R("train-mlm-gpt2", lambda c: c.train("--model.objective=mlm", "--model.arch=gpt2", "--model.vocab_size=520"),
      ("model.objective = mlm", "model.arch = llama", "gpt2")),
    R("train-mlm-moe", lambda c: c.train("--model.objective=mlm", "--model.moe_experts=4", "--model.vocab_size=520"),
      ("model.objective = mlm", "--model.moe_experts=0")),
    R("train-mlm-distill", lambda c: c.train("--model.objective=mlm", "--distill.teacher=teacher",
                                             "--model.vocab_size=520"), ("model.objective = mlm", "distill.teacher")),
    R("train-objective-unknown", lambda c: c.train("--model.objective=prefix-lm"), ("model.objective", "mlm")),
    R("train-mlm-no-room-for-mask",
      lambda c: c.train("--model.objective=mlm", f"--data.path={mask_dataset(c, 'none')}"),
      ("<|mask|>", "--model.vocab_size=513")),
    R("train-mlm-mask-not-special",
      lambda c: c.train("--model.objective=mlm", f"--data.path={mask_dataset(c, 'ordinary')}"),
      ("<|mask|>", "ordinary token")),
    R("train-mlm-on-chat-data", lambda c: c.train("--model.objective=mlm", f"--data.path={fim_dataset(c, 'chat')}"),
      ("chat data", "model.objective = mlm")),
    R("train-mask-rate-zero", lambda c: c.train("--model.objective=mlm", "--data.mask_rate=0"), ("data.mask_rate",)),
    R("train-mask-rate-above-half", lambda c: c.train("--model.objective=mlm", "--data.mask_rate=0.9"),
      ("data.mask_rate",)),
    R("train-mask-span-zero", lambda c: c.train("--model.objective=mlm", "--data.mask_span=0"), ("data.mask_span",)),
    R("generate-mlm", lambda c: ["generate", mlm_run(c), "--prompt", "def "],
      ("masked language model", "cannot generate")),
    R("export-mlm-gguf", lambda c: ["export", mlm_run(c), "--format", "gguf", "--out", "out"],
      ("--format gguf", "model.objective = mlm", "--format hf")),
    R("train-compile-maybe", lambda c: c.train("--train.compile=maybe"), ("train.compile", "auto, true, false")),
    R("train-device", lambda c: c.train("--train.device=tpu"), ("train.device", "cuda:N")),
    R("train-empty-sample-prompt", lambda c: c.train("--train.sample_tokens=5", "--train.sample_prompt="),
      ("train.sample_prompt",)),
    R("precision-dtype", lambda c: c.train("--precision.dtype=fp16"), ("precision.dtype", "fp32, bf16")),
    R("unknown-key", lambda c: c.train("--train.stepz=3"), ("unknown key train.stepz",)),
    R("unknown-section", lambda c: c.train("--modle.dim=3"), ("unknown section [modle]",)),
    R("override-without-value", lambda c: c.train("--train.steps"), ("--train.steps",)),
    R("unknown-argument", lambda c: c.train("--bogus"), ("--bogus",)),
    R("unknown-recipe", lambda c: ["train", "--recipe", "huge"], ("unknown recipe 'huge'",)),
    R("plan-model-nan", lambda c: ["plan", "--model.init_std=nan"], ("model.init_std",)),
    R("plan-hardware-unknown", lambda c: ["plan", "--hardware", "tpu9"], ("tpu9",)),
    R("override-value-with-space", lambda c: c.train("--train.device=cuda 0"), ("train.device = 'cuda 0'",)),
    R("plan-gpus-zero", lambda c: ["plan", "--gpus", "0"], ("--gpus",)),
    R("plan-gpus-word", lambda c: ["plan", "--gpus", "two"], ("--gpus", "two")),
    R("plan-gpus-huge", lambda c: ["plan", "--gpus", str(10**20)], ("--gpus", "1,000,000")),
    R("lr-find-bad-optim", lambda c: ["lr-find", "--optim.beta1=2", "--out", str(c.tmp / "lrf")], ("optim.beta1",)),
    R("lr-find-max-lr-inf", lambda c: ["lr-find", "--max-lr", "inf", "--out", str(c.tmp / "lrf")], ("--max-lr",)),
    R("lr-find-max-lr-nan", lambda c: ["lr-find", "--max-lr", "nan", "--out", str(c.tmp / "lrf")], ("--max-lr",)),
    R("lr-find-few-steps", lambda c: ["lr-find", "--steps", "2", "--out", str(c.tmp / "lrf")], ("--steps 2",)),
    R("lr-find-huge-steps", lambda c: ["lr-find", "--steps", "99999999999", "--out", str(c.tmp / "lrf")],
      ("--steps 99999999999",)),
    R("config-unknown-value", lambda c: ["config", "--optim.name=sgd"], ("optim.name", "adamw")),

    # ---- config files --------------------------------------------------------------------------------------
    R("file-missing", lambda c: c.train(str(c.tmp / "nope.toml")), ("does not exist",)),
    R("file-is-folder", lambda c: c.train(str(c.write("cfg.toml/x", "").parent)), ("is a folder",)),
    R("file-not-utf8", lambda c: c.train(str(c.write("c.toml", b"[train]\nsample_prompt = \"\xff\xfe\"\n"))),
      ("not UTF-8",)),
    R("file-not-toml", lambda c: c.train(str(c.write("c.toml", "[train\nsteps = 3\n"))), ("not valid TOML",)),
    R("file-binary", lambda c: c.train(str(c.write("c.toml", bytes(range(256))))), ("c.toml",)),
    R("file-fifo", lambda c: c.train(fifo(c, "c.toml")), ("not a regular file",)),
    R("file-unreadable", lambda c: c.train(unreadable(c, "c.toml")), ("cannot be read",), root_reads_anyway=True),
    R("file-unquoted-date", lambda c: c.train(str(c.write("c.toml", "[data]\npath = 2024-06-01\n"))),
      ("data.path", "quote it")),
    R("file-section-not-table", lambda c: c.train(str(c.write("c.toml", "model = 3\n"))), ("[model]", "table")),
    R("file-nan", lambda c: ["plan", str(c.write("c.toml", "[optim]\nlr = nan\n"))], ("optim.lr", "nan")),
    R("file-inf-sigma", lambda c: ["config", str(c.write("c.toml", "[guard]\nsigma = -inf\n"))], ("guard.sigma",)),
    R("file-string-for-int", lambda c: ["config", str(c.write("c.toml", "[train]\nsteps = \"10\"\n"))],
      ("train.steps", "'10'")),
    R("config-file-folder", lambda c: ["config", str(c.tmp)], ("is a folder",)),

    # ---- --init-from folders -------------------------------------------------------------------------------
    R("init-from-missing", lambda c: c.train_from(str(c.tmp / "nope")), ("not a folder",)),
    R("init-from-no-config", lambda c: c.train_from(c.hf(None)), ("config.json is missing",)),
    R("init-from-not-json", lambda c: c.train_from(c.hf("{not json")), ("not valid JSON",)),
    R("init-from-list", lambda c: c.train_from(c.hf("[1, 2]")), ("JSON list",)),
    R("init-from-moe-mlp-only-layers", lambda c: c.train_from(c.hf(llama(
        model_type="qwen2_moe", num_experts=4, moe_intermediate_size=16, mlp_only_layers=[0]))),
      ("mlp_only_layers = [0]", "Qwen2MoeForCausalLM")),
    R("init-from-moe-sliding-window", lambda c: c.train_from(c.hf(llama(model_type="mixtral", num_local_experts=4,
                                                                        sliding_window=16))),
      ("sliding_window = 16", "MixtralForCausalLM")),
    R("init-from-missing-field", lambda c: c.train_from(c.hf(llama(hidden_size=...))),
      ("hidden_size is missing",)),
    R("init-from-string-size", lambda c: c.train_from(c.hf(llama(hidden_size="32"))),
      ("hidden_size = '32'",)),
    R("init-from-zero-heads", lambda c: c.train_from(c.hf(llama(num_attention_heads=0))),
      ("num_attention_heads = 0",)),
    R("init-from-float-layers", lambda c: c.train_from(c.hf(llama(num_hidden_layers=1.5))),
      ("num_hidden_layers = 1.5",)),
    R("init-from-inconsistent-heads", lambda c: c.train_from(c.hf(llama(hidden_size=33))),
      ("hidden_size = 33", "num_attention_heads")),
    R("init-from-kv-heads", lambda c: c.train_from(c.hf(llama(num_key_value_heads=3))),
      ("num_key_value_heads = 3",)),
    R("init-from-eps-nan", lambda c: c.train_from(c.hf(llama(rms_norm_eps="nan"))), ("rms_norm_eps",)),
    R("init-from-unsupported", lambda c: c.train_from(c.hf(llama(model_type="gemma"))),
      ("'gemma'", "not supported", "Llama", "GPT-2", "Mistral", "Qwen2", "Qwen3", "Phi-3")),
    R("init-from-qwen2-sliding", lambda c: c.train_from(c.hf(llama(model_type="qwen2", use_sliding_window=True))),
      ("use_sliding_window = True", "not supported")),
    R("init-from-phi3-partial-rope", lambda c: c.train_from(c.hf(llama(model_type="phi3", partial_rotary_factor=0.5))),
      ("partial_rotary_factor = 0.5",)),
    R("init-from-qwen3-odd-head-dim", lambda c: c.train_from(c.hf(llama(model_type="qwen3", head_dim=15))),
      ("head_dim = 15 is odd",)),
    R("init-from-mistral-layer-types", lambda c: c.train_from(c.hf(llama(
        model_type="mistral", layer_types=["sliding_attention"]))), ("layer_types", "not supported")),
    R("init-from-mistral-window-string", lambda c: c.train_from(c.hf(llama(model_type="mistral", sliding_window="8"))),
      ("sliding_window = '8'",)),
    R("init-from-rope-scaling", lambda c: c.train_from(c.hf(llama(rope_scaling={"type": "linear"}))),
      ("rope type 'linear'",)),
    R("init-from-huge-vocab", lambda c: c.train_from(c.hf(llama(vocab_size=2**30))),
      ("model.vocab_size", "config.json")),
    R("init-from-contradicts", lambda c: c.train_from(c.hf(llama()), "--model.dim=64"),
      ("model.dim = 64", "contradicts")),
    R("init-from-no-weights", lambda c: c.train_from(c.hf(llama())), ("no model.safetensors",)),
    R("init-from-weights-shape", lambda c: c.train_from(c.hf(llama(), hf_weights(
        model__layers__0__self_attn__q_proj__weight=(16, 32)))), ("q_proj.weight", "shape [16, 32]")),
    R("init-from-weights-missing", lambda c: c.train_from(c.hf(llama(), {
        k: v for k, v in hf_weights().items() if "down_proj" not in k})), ("down_proj",)),
    R("init-from-weights-damaged", lambda c: c.train_from(damaged_hf(c)), ("cannot be read as safetensors",)),

    R("init-from-json-nan", lambda c: c.train_from(c.hf(json.dumps(LLAMA).replace("1e-05", "NaN"))),
      ("rms_norm_eps = nan",)),
    R("init-from-deep-json", lambda c: c.train_from(c.hf("[" * 100_000)), ("not valid JSON",)),

    # ---- data prepare --------------------------------------------------------------------------------------
    R("prepare-missing-input", lambda c: ["data", "prepare", str(c.tmp / "nope.txt"), "--out", str(c.tmp / "ds")],
      ("does not exist",)),
    R("prepare-no-input", lambda c: ["data", "prepare", "--out", str(c.tmp / "ds")], ("--builtin",)),
    R("prepare-both-inputs", lambda c: ["data", "prepare", str(c.write("a.txt", "hi")), "--builtin", "stdlib",
                                        "--out", str(c.tmp / "ds")], ("one of the three",)),
    R("prepare-val-fraction", lambda c: ["data", "prepare", str(c.write("a.txt", "hello world\n" * 50)), "--out",
                                         str(c.tmp / "ds"), "--val-fraction", "1.5"], ("val_fraction",)),
    R("prepare-val-fraction-nan", lambda c: ["data", "prepare", str(c.write("a.txt", "hello world\n" * 50)),
                                             "--out", str(c.tmp / "ds"), "--val-fraction", "nan"], ("val_fraction",)),
    R("prepare-workers-zero", lambda c: ["data", "prepare", str(c.write("a.txt", "hi")), "--out", str(c.tmp / "ds"),
                                         "--workers", "0"], ("--workers",)),
    R("prepare-vocab-word", lambda c: ["data", "prepare", "--builtin", "stdlib", "--out", str(c.tmp / "ds"),
                                       "--vocab-size", "big"], ("--vocab-size",)),
    R("prepare-jsonl-field", lambda c: ["data", "prepare", str(c.write("a.jsonl", '{"content": "x"}\n' * 5)),
                                        "--out", str(c.tmp / "ds")], ("content", "--text-field")),
    R("prepare-curation-not-toml", lambda c: ["data", "prepare", "--builtin", "stdlib", "--out", str(c.tmp / "ds"),
                                              "--curation-config", str(c.write("cur.toml", "[x\n"))], ("cur.toml",)),
    R("prepare-set-bogus", lambda c: ["data", "prepare", "--builtin", "stdlib", "--out", str(c.tmp / "ds"),
                                      "--set", "nosuchstep.x=1"], ("nosuchstep",)),
    R("prepare-set-nan", lambda c: ["data", "prepare", "--builtin", "stdlib", "--profile", "web", "--out",
                                    str(c.tmp / "ds"), "--set", "gopher_quality.min_words=nan"],
      ("gopher_quality.min_words",)),
    R("prepare-set-inf", lambda c: ["data", "prepare", "--builtin", "stdlib", "--profile", "web", "--out",
                                    str(c.tmp / "ds"), "--set", "gopher_quality.max_symbol_word_ratio=inf"],
      ("max_symbol_word_ratio",)),
    R("prepare-chat-no-input", lambda c: ["data", "prepare", "--format", "chat", "--out", str(c.tmp / "ds")],
      ("--builtin",)),
    R("prepare-empty-file", lambda c: ["data", "prepare", str(c.write("a.txt", "")), "--out", str(c.tmp / "ds")],
      ("no documents",)),
    R("prepare-empty-folder", lambda c: ["data", "prepare", str(c.write("in/.keep", "").parent), "--out",
                                         str(c.tmp / "ds")], ("no documents",)),
    R("prepare-not-utf8", lambda c: ["data", "prepare", str(c.write("a.txt", b"\xff\xfe\x00bad" * 100)), "--out",
                                     str(c.tmp / "ds")], ("binary",)),
    R("prepare-deep-jsonl", lambda c: ["data", "prepare", str(c.write("a.jsonl", '{"text": ' + "[" * 100_000 + "\n")),
                                       "--out", str(c.tmp / "ds")], ("nested",)),
    R("prepare-jsonl-not-json", lambda c: ["data", "prepare", str(c.write("a.jsonl", "hello\nworld\n")), "--out",
                                           str(c.tmp / "ds")], ("bad json",)),
    R("prepare-out-is-file", lambda c: ["data", "prepare", "--builtin", "stdlib", "--out", str(c.write("ds", "x"))],
      ("is a file",), keeps=("ds",)),
    R("prepare-out-not-dataset", lambda c: ["data", "prepare", "--builtin", "stdlib", "--overwrite", "--out",
                                            str(c.write("mine/notes.txt", "keep me").parent)],
      ("notes.txt", "refusing"), keeps=("mine/notes.txt",)),
    R("prepare-tokenizer-missing", lambda c: ["data", "prepare", str(c.write("a.txt", "hi")), "--out",
                                              str(c.tmp / "ds"), "--tokenizer", str(c.tmp / "tok.json")],
      ("tok.json",)),
    R("prepare-hf-missing", lambda c: ["data", "prepare", "--hf-dataset", str(c.tmp / "nope"), "--out",
                                       str(c.tmp / "ds")], ("nope", "does not exist")),
    R("prepare-hf-hub-name", lambda c: ["data", "prepare", "--hf-dataset", "org/name", "--out", str(c.tmp / "ds")],
      ("org/name", "not a local path", "Hub")),
    R("prepare-hf-not-datasets", lambda c: ["data", "prepare", "--hf-dataset", str(c.write("d/a.txt", "hi").parent),
                                            "--out", str(c.tmp / "ds")], ("not a datasets folder", "save_to_disk")),
    R("prepare-hf-field", lambda c: ["data", "prepare", "--hf-dataset", hf_dataset(c, {"content": ["x", "y"]}),
                                     "--out", str(c.tmp / "ds")], ("'text'", "content", "--text-field")),
    R("prepare-hf-field-not-text", lambda c: ["data", "prepare", "--hf-dataset", hf_dataset(c, {"n": [1, 2]}),
                                              "--text-field", "n", "--out", str(c.tmp / "ds")], ("'n'", "not text")),
    R("prepare-hf-split", lambda c: ["data", "prepare", "--hf-dataset", hf_dataset(c, {"text": ["x"]}, split="train"),
                                     "--hf-split", "test", "--out", str(c.tmp / "ds")], ("'test'", "--hf-split")),
    R("prepare-hf-and-paths", lambda c: ["data", "prepare", str(c.write("a.txt", "hi")), "--hf-dataset",
                                         str(c.tmp), "--out", str(c.tmp / "ds")], ("one of the three",)),
    R("prepare-hf-include", lambda c: ["data", "prepare", "--hf-dataset", hf_dataset(c, {"text": ["x"]}),
                                       "--include", "*.py", "--out", str(c.tmp / "ds")], ("--include",)),
    R("prepare-tokenizer-no-json", lambda c: ["data", "prepare", str(c.write("a.txt", "hi")), "--out",
                                              str(c.tmp / "ds"), "--tokenizer",
                                              str(c.write("tok/tokenizer_config.json", "{}").parent)],
      ("tokenizer.json", "save_pretrained")),
    R("prepare-tokenizer-empty-folder", lambda c: ["data", "prepare", str(c.write("a.txt", "hi")), "--out",
                                                   str(c.tmp / "ds"), "--tokenizer",
                                                   str(c.write("tok/notes.txt", "x").parent)],
      ("tokenizer.json", "does not exist")),
    R("prepare-tokenizer-bad-eos", lambda c: ["data", "prepare", str(c.write("a.txt", "hi")), "--out",
                                              str(c.tmp / "ds"), "--tokenizer",
                                              hf_tokenizer(c, {"eos_token": "<eos?>"})],
      ("eos_token", "<eos?>")),
    R("prepare-tokenizer-config-not-json", lambda c: ["data", "prepare", str(c.write("a.txt", "hi")), "--out",
                                                      str(c.tmp / "ds"), "--tokenizer", hf_tokenizer(c, "{oops")],
      ("tokenizer_config.json", "not valid JSON")),
    R("prepare-source-negative", lambda c: ["data", "prepare", "--source", f"real={source_dirs(c)[0]}:-0.5",
                                            "--source", f"synth={source_dirs(c)[1]}:1", "--out", str(c.tmp / "ds")],
      ("--source", "weight -0.5", ">= 0")),
    R("prepare-source-zero-sum", lambda c: ["data", "prepare", *(f"--source={d}:0" for d in source_dirs(c)),
                                            "--out", str(c.tmp / "ds")], ("do not sum to a positive number",)),
    R("prepare-source-missing-dir", lambda c: ["data", "prepare", "--source", f"real={c.tmp / 'nope'}:0.8",
                                               "--out", str(c.tmp / "ds")],
      ("--source real", "nope", "does not exist")),
    R("prepare-source-no-weight", lambda c: ["data", "prepare", "--source", source_dirs(c)[0], "--out",
                                             str(c.tmp / "ds")], ("no weight", "NAME=PATH:WEIGHT")),
    R("prepare-source-weight-word", lambda c: ["data", "prepare", "--source", f"real={source_dirs(c)[0]}:lots",
                                               "--out", str(c.tmp / "ds")], ("'lots'", "not a number")),
    R("prepare-source-twice", lambda c: ["data", "prepare", "--source", f"a={source_dirs(c)[0]}:1", "--source",
                                         f"a={source_dirs(c)[1]}:1", "--out", str(c.tmp / "ds")],
      ("'a'", "given twice")),
    R("prepare-source-and-paths", lambda c: ["data", "prepare", str(c.write("a.txt", "hi")), "--source",
                                             f"{source_dirs(c)[0]}:1", "--out", str(c.tmp / "ds")],
      ("--source", "drop the plain input")),
    R("prepare-source-chat", lambda c: ["data", "prepare", "--format", "chat", "--source", f"{source_dirs(c)[0]}:1",
                                        "--out", str(c.tmp / "ds")], ("--source", "--format chat")),

    # ---- report --------------------------------------------------------------------------------------------
    R("report-missing-run", lambda c: ["report", str(c.tmp / "nope")], ("not a run directory",)),
    R("report-plain-folder", lambda c: ["report", str(c.write("x/notes.txt", "hi").parent)], ("not a run",)),
    R("report-out-folder", lambda c: ["report", str(c.run), "--out", str(c.tmp)], ("is a folder",)),
    R("report-out-no-parent", lambda c: ["report", str(c.run), "--out", str(c.tmp / "a" / "b.html")],
      ("does not exist",)),
    R("report-out-foreign-file", lambda c: ["report", str(c.run), "--out", str(c.write("notes.html", "mine"))],
      ("not written by leantrain",), keeps=("notes.html",)),

    # ---- compare -------------------------------------------------------------------------------------------
    R("compare-no-runs", lambda c: ["compare"], ("RUN_DIR",)),
    R("compare-one-run", lambda c: ["compare", str(c.run)], ("at least two run directories",)),
    R("compare-missing-run", lambda c: ["compare", str(c.run), str(c.tmp / "nope")], ("nope", "not a run directory")),
    R("compare-plain-folder", lambda c: ["compare", str(c.run), str(c.write("x/notes.txt", "hi").parent)],
      ("not a run directory",)),
    R("compare-same-run-twice", lambda c: ["compare", str(c.run), str(c.run.parent / ".." / c.run.parent.name /
                                                                       c.run.name)], ("given twice",)),
    R("compare-metrics-damaged", lambda c: ["compare", str(c.run), changed_run(c, "metrics.jsonl", "{torn\nxx\n")],
      ("metrics.jsonl", "no metrics records", "damaged")),
    R("compare-metrics-empty", lambda c: ["compare", str(c.run), changed_run(c, "metrics.jsonl", "")],
      ("no metrics records", "not logged a step")),
    R("compare-out-folder", lambda c: ["compare", str(c.run), c.run_copy().as_posix(), "--out", str(c.tmp)],
      ("is a folder",)),
    R("compare-out-foreign-file", lambda c: ["compare", str(c.run), str(c.run_copy()), "--out",
                                             str(c.write("mine.html", "<html>mine</html>"))],
      ("not written by leantrain",), keeps=("mine.html",)),
    R("compare-default-out-foreign", lambda c: (c.write("compare.html", "mine"),  # ./compare.html, not ours
                                                ["compare", str(c.run), str(c.run_copy())])[1],
      ("compare.html", "not written by leantrain"), keeps=("compare.html",)),

    # ---- serve (each fails before a port is opened) --------------------------------------------------------
    R("serve-missing-run", lambda c: ["serve", str(c.tmp / "nope")], ("neither a run directory", "nope")),
    R("serve-port-negative", lambda c: ["serve", str(c.run), "--port", "-1"], ("port", "-1")),
    R("serve-port-word", lambda c: ["serve", str(c.run), "--port", "http"], ("--port",)),
    R("serve-max-batch-zero", lambda c: ["serve", str(c.run), "--max-batch", "0"], ("max_batch", "0")),
    R("serve-max-body-zero", lambda c: ["serve", str(c.run), "--max-body", "0"], ("max_body",)),
    R("serve-timeout-nan", lambda c: ["serve", str(c.run), "--timeout", "nan"], ("timeout", "nan")),
    R("serve-empty-api-key", lambda c: ["serve", str(c.run), "--api-key", " "], ("API key is empty",)),
    R("serve-threads-zero", lambda c: ["serve", str(c.run), "--threads", "0"], ("threads", "0")),
    R("serve-mlm-run", lambda c: ["serve", mlm_run(c)], ("masked language model", "model.objective = causal")),
    R("serve-missing-checkpoint", lambda c: ["serve", str(c.run), "--checkpoint", str(c.tmp / "nope")], ("nope",)),

    # ---- generate ------------------------------------------------------------------------------------------
    R("generate-temperature-nan", lambda c: ["generate", str(c.run), "--prompt", "x", "--temperature", "nan"],
      ("temperature", "nan")),
    R("generate-temperature-negative", lambda c: ["generate", str(c.run), "--prompt", "x", "--temperature", "-1"],
      ("temperature", "-1")),
    R("generate-temperature-inf", lambda c: ["generate", str(c.run), "--prompt", "x", "--temperature", "inf"],
      ("temperature",)),
    R("generate-top-k-negative", lambda c: ["generate", str(c.run), "--prompt", "x", "--top-k", "-1"],
      ("top-k", "-1")),
    R("generate-max-new-zero", lambda c: ["generate", str(c.run), "--prompt", "x", "--max-new-tokens", "0"],
      ("max-new-tokens", "0")),
    R("generate-max-new-negative", lambda c: ["generate", str(c.run), "--prompt", "x", "--max-new-tokens", "-5"],
      ("max-new-tokens",)),
    R("generate-top-k-word", lambda c: ["generate", str(c.run), "--prompt", "x", "--top-k", "many"], ("--top-k",)),
    R("generate-no-prompt", lambda c: ["generate", str(c.run)], ("--prompt",)),
    R("generate-empty-prompt", lambda c: ["generate", str(c.run), "--prompt", ""], ("prompt is empty",)),
    R("generate-missing-run", lambda c: ["generate", str(c.tmp / "nope"), "--prompt", "x"], ("not a run directory",)),
    R("generate-missing-checkpoint", lambda c: ["generate", str(c.run), "--prompt", "x", "--checkpoint",
                                                str(c.tmp / "nope")], ("nope",)),
    R("generate-chat-on-text-run", lambda c: ["generate", str(c.run), "--prompt", "x", "--chat"], ("--chat",)),
    R("generate-damaged-checkpoints", lambda c: ["generate", str(damage_checkpoints(c)), "--prompt", "x"],
      ("checkpoint",)),

    R("generate-run-config-not-toml", lambda c: ["generate", changed_run(c, "config.toml", "[model\n"),
                                                 "--prompt", "x"], ("not valid TOML",)),
    R("generate-run-config-nan", lambda c: ["generate", changed_run(c, "config.toml", None, lambda t: t.replace(
        "\nlr = 0.003\n", "\nlr = nan\n")), "--prompt", "x"], ("optim.lr = nan",)),
    R("generate-run-no-tokenizer", lambda c: ["generate", changed_run(c, "tokenizer.json", None), "--prompt", "x"],
      ("tokenizer.json",)),
    R("generate-manifest-not-json", lambda c: ["generate", changed_run(c, "checkpoints/step-0000002/manifest.json",
                                                                       "{junk"), "--prompt", "x"], ("checkpoint",)),
    R("generate-manifest-escapes", lambda c: ["generate", changed_run(
        c, "checkpoints/step-0000002/manifest.json", None, manifest_naming("../../config.toml")), "--prompt", "x"],
      ("checkpoint",)),
    R("generate-manifest-absolute", lambda c: ["generate", changed_run(
        c, "checkpoints/step-0000002/manifest.json", None, manifest_naming("/etc/passwd")), "--prompt", "x"],
      ("checkpoint",)),
    R("generate-regex-does-not-compile", lambda c: ["generate", str(c.run), "--prompt", "x", "--regex", "[]"],
      ("--regex", "does not compile")),
    R("generate-regex-matches-nothing", lambda c: ["generate", str(c.run), "--prompt", "x", "--regex", "[^\\s\\S]"],
      ("--regex", "matches no text")),
    R("generate-regex-and-grammar", lambda c: ["generate", str(c.run), "--prompt", "x", "--regex", "a",
                                               "--grammar", str(c.write("g.ebnf", 'root ::= "a"'))],
      ("--grammar", "not allowed with")),
    R("generate-schema-missing", lambda c: ["generate", str(c.run), "--prompt", "x", "--json-schema",
                                            str(c.tmp / "none.json")], ("--json-schema", "cannot read")),
    R("generate-schema-not-json", lambda c: ["generate", str(c.run), "--prompt", "x", "--json-schema",
                                             str(c.write("s.json", "{type: object"))],
      ("--json-schema", "not valid JSON")),
    R("generate-schema-bad-type", lambda c: ["generate", str(c.run), "--prompt", "x", "--json-schema",
                                             str(c.write("s.json", '{"type": "objec"}'))],
      ("--json-schema", "does not compile", "objec")),
    R("generate-grammar-undefined-rule", lambda c: ["generate", str(c.run), "--prompt", "x", "--grammar",
                                                    str(c.write("g.ebnf", "root ::= item\n"))],
      ("--grammar", "does not compile", "item")),
    # fill in the middle (docs/objectives.md)
    R("generate-infill-run-without-fim", lambda c: ["generate", str(c.run), "--prefix", "def f(", "--suffix", ")"],
      ("without fill-in-the-middle", "--data.fim_rate")),
    R("generate-infill-no-sentinels", lambda c: ["generate", changed_run(c, "tokenizer.json", None, fim_not_special),
                                                 "--prefix", "a", "--suffix", "b"],
      ("no fill-in-the-middle sentinels",)),
    R("generate-infill-and-prompt", lambda c: ["generate", str(c.run), "--prompt", "x", "--prefix", "a"],
      ("--prompt", "--prefix")),
    R("generate-infill-file-and-prefix", lambda c: ["generate", str(c.run), "--infill", str(c.write("a.py", "<FILL>")),
                                                    "--prefix", "a"], ("--infill", "--prefix")),
    R("generate-infill-no-marker", lambda c: ["generate", str(c.run), "--infill", str(c.write("a.py", "x = 1\n"))],
      ("<FILL>", "0 times")),
    R("generate-infill-two-markers", lambda c: ["generate", str(c.run), "--infill",
                                                str(c.write("a.py", "<FILL>\n<FILL>"))], ("<FILL>", "2 times")),
    R("generate-infill-file-missing", lambda c: ["generate", str(c.run), "--infill", str(c.tmp / "nope.py")],
      ("--infill", "nope.py")),
    R("generate-infill-with-chat", lambda c: ["generate", str(c.run), "--prefix", "a", "--suffix", "b", "--chat"],
      ("--chat",)),
    R("generate-fim-mode-unknown", lambda c: ["generate", str(c.run), "--prefix", "a", "--fim-mode", "mps"],
      ("--fim-mode",)),
    R("generate-fim-mode-without-infill", lambda c: ["generate", str(c.run), "--prompt", "x", "--fim-mode", "spm"],
      ("--fim-mode", "--prefix")),

    # ---- synth ---------------------------------------------------------------------------------------------
    R("synth-missing-run", lambda c: synth(c, model=str(c.tmp / "nope")), ("does not exist",)),
    R("synth-not-a-model", lambda c: synth(c, model=str(c.write("proj/x.txt", "x").parent)),
      ("neither a run directory",)),
    R("synth-bad-kind", lambda c: synth(c, "--kind", "yaml"), ("--kind", "python, json, text")),
    R("synth-count-zero", lambda c: synth(c, "--count", "0"), ("--count 0", ">= 1")),
    R("synth-count-negative", lambda c: synth(c, "--count", "-3"), ("--count -3", ">= 1")),
    R("synth-count-word", lambda c: synth(c, "--count", "many"), ("--count",)),
    R("synth-batch-size-zero", lambda c: synth(c, "--batch-size", "0"), ("--batch-size 0",)),
    R("synth-temperature-nan", lambda c: synth(c, "--temperature", "nan"), ("temperature",)),
    R("synth-schema-does-not-compile", lambda c: synth(c, "--kind", "json", "--json-schema",
                                                       str(c.write("s.json", '{"type": "objec"}'))),
      ("--json-schema", "does not compile", "objec")),
    R("synth-schema-not-json", lambda c: synth(c, "--kind", "json", "--json-schema", str(c.write("s.json", "{x"))),
      ("--json-schema", "not valid JSON")),
    R("synth-schema-with-python", lambda c: synth(c, "--json-schema", str(c.write("s.json", '{"type": "object"}'))),
      ("--json-schema", "--kind json")),
    R("synth-ruff-with-json", lambda c: synth(c, "--kind", "json", "--ruff"), ("--ruff", "--kind json")),
    R("synth-regex-does-not-compile", lambda c: synth(c, "--kind", "text", "--regex", "[a-"),
      ("--regex", "does not compile")),
    R("synth-regex-matches-nothing", lambda c: synth(c, "--kind", "text", "--regex", "[^\\s\\S]"),
      ("--regex", "matches no text")),
    R("synth-grammar-undefined-rule", lambda c: synth(c, "--kind", "text", "--grammar",
                                                      str(c.write("g.ebnf", "root ::= item\n"))),
      ("--grammar", "does not compile", "item")),
    R("synth-prompts-missing", lambda c: synth(c, "--prompts", str(c.tmp / "none.txt")), ("--prompts", "no such")),
    R("synth-prompts-empty", lambda c: synth(c, "--prompts", str(c.write("p.txt", "\n\n"))), ("no prompts",)),
    R("synth-corpus-missing", lambda c: synth(c, "--corpus", str(c.tmp / "none")), ("--corpus", "does not exist")),
    R("synth-out-foreign", lambda c: synth(c, out=str(c.write("mine/notes.txt", "mine").parent)),
      ("did not write", "synth.json"), keeps=("mine/notes.txt",)),
    R("synth-out-is-file", lambda c: synth(c, out=str(c.write("o.txt", "x"))), ("not a folder",), keeps=("o.txt",)),
    R("synth-out-earlier-output", lambda c: synth(c, out=str(c.write("o/synth.json", json.dumps(
        {"format": "leantrain-synth/1"})).parent)), ("--overwrite",), keeps=("o/synth.json",)),

    # ---- export --------------------------------------------------------------------------------------------
    R("export-missing-run", lambda c: ["export", str(c.tmp / "nope"), "--out", str(c.tmp / "hf")],
      ("not a run directory",)),
    R("export-shard-size-zero", lambda c: ["export", str(c.run), "--out", str(c.tmp / "hf"), "--max-shard-size",
                                           "0"], ("size '0'",)),
    R("export-shard-size-word", lambda c: ["export", str(c.run), "--out", str(c.tmp / "hf"), "--max-shard-size",
                                           "huge"], ("size 'huge'",)),
    R("export-out-not-empty", lambda c: ["export", str(c.run), "--out", str(c.write("o/keep.txt", "mine").parent)],
      ("--overwrite",), keeps=("o/keep.txt",)),
    R("export-overwrite-foreign", lambda c: ["export", str(c.run), "--overwrite", "--out",
                                             str(c.write("o/keep.txt", "mine").parent)],
      ("not written by leantrain",), keeps=("o/keep.txt",)),
    R("export-overwrite-run", lambda c: ["export", str(c.run), "--overwrite", "--out", str(c.run)],
      ("is the run directory",)),
    R("export-format", lambda c: ["export", str(c.run), "--format", "tflite", "--out", str(c.tmp / "hf")],
      ("--format",)),
    R("export-moe-bias-softmax", lambda c: ["export", changed_run(c, "config.toml", None, lambda t: t.replace(
        "moe_experts = 0\n", "moe_experts = 4\n").replace('moe_balance = "aux"', 'moe_balance = "bias"')),
        "--out", str(c.tmp / "hf")], ("moe_balance = bias", "no transformers architecture", "moe_router = sigmoid")),
    R("export-moe-ungated-shared", lambda c: ["export", changed_run(c, "config.toml", None, lambda t: t.replace(
        "moe_experts = 0\n", "moe_experts = 4\n").replace("moe_shared_experts = 0\n", "moe_shared_experts = 1\n")),
        "--out", str(c.tmp / "hf")], ("moe_shared_experts = 1", "moe_shared_gate = true")),

    R("export-overwrite-corpus", lambda c: ["export", str(c.run), "--overwrite", "--out",
                                            str(shutil.copytree(c.dataset, c.tmp / "corpus"))],
      ("not written by leantrain",), keeps=("corpus/meta.json", "corpus/tokenizer.json")),
    R("export-overwrite-contains-run", lambda c: ["export", str(c.run_copy()), "--overwrite", "--out", str(c.tmp)],
      ("holds the run directory",), keeps=("runcopy/config.toml", "runcopy/metrics.jsonl")),
    R("export-overwrite-inside-run", lambda c: ["export", str(c.run_copy()), "--overwrite", "--out",
                                                str(c.tmp / "runcopy" / "checkpoints")],
      ("inside the run directory",), keeps=("runcopy/checkpoints/latest",)),
    R("export-out-dot", lambda c: c.write("notes.txt", "mine") and ["export", str(c.run), "--out", "."],
      ("current folder",), keeps=("notes.txt",)),
    R("export-bad-checkpoint", lambda c: ["export", str(c.run), "--out", str(c.tmp / "hf"), "--checkpoint",
                                          str(c.tmp / "nope")], ("not a folder",)),
    R("export-dtype-word", lambda c: ["export", str(c.run), "--out", str(c.tmp / "hf"), "--dtype", "int8"],
      ("--dtype", "int8")),
    R("export-peft-not-lora", lambda c: ["export", str(c.run), "--format", "peft", "--out", str(c.tmp / "hf")],
      ("no LoRA adapters", "--format hf")),
    R("export-quantize-word", lambda c: ["export", str(c.run), "--format", "onnx", "--quantize", "int4", "--out",
                                         str(c.tmp / "o")], ("--quantize", "int4")),
    R("export-quantize-hf", lambda c: ["export", str(c.run), "--quantize", "int8", "--out", str(c.tmp / "o")],
      ("--quantize int8", "--format hf", "--format onnx --quantize int8")),
    R("export-onnx-q8_0", lambda c: ["export", str(c.run), "--format", "onnx", "--quantize", "q8_0", "--out",
                                     str(c.tmp / "o")], ("--quantize q8_0", "--format gguf")),
    R("export-onnx-dtype", lambda c: ["export", str(c.run), "--format", "onnx", "--dtype", "fp16", "--out",
                                      str(c.tmp / "o")], ("--dtype fp16", "--format onnx", "--quantize int8")),
    R("export-gguf-int8", lambda c: ["export", str(c.run), "--format", "gguf", "--quantize", "int8", "--out",
                                     str(c.tmp / "o")], ("--quantize int8", "q8_0")),
    R("export-gguf-dtype-and-quantize", lambda c: ["export", str(c.run), "--format", "gguf", "--dtype", "fp16",
                                                   "--quantize", "q8_0", "--out", str(c.tmp / "o")], ("pass one",)),
    R("export-gguf-moe", lambda c: ["export", changed_run(c, "config.toml", None, lambda t: t.replace(
        "moe_experts = 0\n", "moe_experts = 4\n")), "--format", "gguf", "--out", str(c.tmp / "o")],
      ("mixture-of-experts", "--format onnx")),
    R("export-gguf-gpt2", lambda c: ["export", changed_run(c, "config.toml", None, lambda t: t.replace(
        'arch = "llama"', 'arch = "gpt2"')), "--format", "gguf", "--out", str(c.tmp / "o")],
      ("arch = llama", "gpt2", "convert_hf_to_gguf.py")),

    # ---- finetune.adapter (PEFT adapter folders) ------------------------------------------------------------
    R("adapter-not-folder", lambda c: c.train_from(c.hf(llama(), hf_weights()), "--finetune.adapter=nope"),
      ("nope", "not a folder")),
    R("adapter-no-weights", lambda c: c.train_from(c.hf(llama(), hf_weights()), "--finetune.adapter="
                                                   + peft_adapter(c, lora_config(), None)),
      ("adapter_model.safetensors",)),
    R("adapter-no-config", lambda c: c.train_from(c.hf(llama(), hf_weights()), "--finetune.adapter="
                                                  + peft_adapter(c, None, lora_weights())),
      ("adapter_config.json",)),
    R("adapter-unmappable-target", lambda c: c.train_from(c.hf(llama(), hf_weights()), "--finetune.adapter="
                                                          + peft_adapter(c, lora_config(target_modules=[
                                                              "q_proj", "embed_tokens"]), lora_weights())),
      ("embed_tokens", "leantrain can map")),
    R("adapter-unmappable-tensor", lambda c: c.train_from(c.hf(llama(), hf_weights()), "--finetune.adapter="
                                                          + peft_adapter(c, lora_config(target_modules=".*"),
                                                                         lora_weights("model.embed_tokens"))),
      ("model.embed_tokens", "cannot map")),
    R("adapter-dora", lambda c: c.train_from(c.hf(llama(), hf_weights()), "--finetune.adapter="
                                             + peft_adapter(c, lora_config(use_dora=True), lora_weights())),
      ("use_dora",)),
    R("adapter-bad-shape", lambda c: c.train_from(c.hf(llama(), hf_weights()), "--finetune.adapter="
                                                  + peft_adapter(c, lora_config(r=4), lora_weights())),
      ("r = 4", "does not fit")),
    R("adapter-rank-contradicts", lambda c: c.train_from(c.hf(llama(), hf_weights()), "--finetune.lora_rank=8",
                                                         "--finetune.adapter=" + peft_adapter(c, lora_config(),
                                                                                              lora_weights())),
      ("finetune.lora_rank = 8", "contradicts")),

    # ---- pruning and distillation (docs/compression.md) ----------------------------------------------------
    R("prune-sparsity-one", lambda c: c.train("--prune.method=magnitude", "--prune.sparsity=1.0"),
      ("prune.sparsity", "[0, 1)")),
    R("prune-end-before-start", lambda c: c.train("--prune.method=magnitude", "--prune.start_step=10",
                                                  "--prune.end_step=5"), ("prune.end_step", "start_step")),
    R("prune-two-four-sparsity", lambda c: c.train("--prune.method=2:4", "--prune.sparsity=0.3"), ("2:4", "0.5")),
    R("prune-method-word", lambda c: c.train("--prune.method=random"), ("prune.method", "magnitude")),
    R("compress-heads-fraction-one", lambda c: ["compress", str(c.run), "--method", "prune-structured",
                                                "--heads-fraction", "1.0", "--out", str(c.tmp / "p")],
      ("heads-fraction", "[0, 1)")),
    R("compress-heads-all-removed", lambda c: ["compress", str(c.run), "--method", "prune-structured",
                                               "--heads-fraction", "0.9", "--out", str(c.tmp / "p")],
      ("heads_fraction", "leaves none")),
    R("compress-sparsity-one", lambda c: ["compress", str(c.run), "--method", "prune-magnitude", "--sparsity", "1",
                                          "--out", str(c.tmp / "p")], ("sparsity", "[0, 1)")),
    # ---- compress: quantization and its shared checks (docs/compression.md) -----------------------------------
    R("compress-method-word", lambda c: ["compress", str(c.run), "--method", "int3", "--out", str(c.tmp / "q")],
      ("int3", "int8", "int4")),
    R("compress-fp8-on-cpu", lambda c: ["compress", str(c.run), "--method", "fp8", "--out", str(c.tmp / "q")],
      ("fp8", "CPU", "int8")),
    R("compress-sparsity-negative", lambda c: ["compress", str(c.run), "--method", "prune-magnitude", "--sparsity",
                                               "-0.1", "--out", str(c.tmp / "q")], ("sparsity", "[0, 1)")),
    R("compress-sparsity-nan", lambda c: ["compress", str(c.run), "--method", "prune-magnitude", "--sparsity",
                                          "nan", "--out", str(c.tmp / "q")], ("sparsity", "[0, 1)")),
    R("compress-option-not-for-method", lambda c: ["compress", str(c.run), "--method", "int8", "--sparsity", "0.5",
                                                   "--out", str(c.tmp / "q")], ("--sparsity", "prune-")),
    R("compress-group-size", lambda c: ["compress", str(c.run), "--method", "int4", "--group-size", "33",
                                        "--out", str(c.tmp / "q")], ("--group-size", "32")),
    R("compress-lora-unmerged", lambda c: ["compress", changed_run(c, "config.toml", None, lambda t: t.replace(
        "lora_rank = 0", "lora_rank = 4", 1)), "--method", "int8", "--out", str(c.tmp / "q")],
      ("unmerged LoRA", "merge")),
    R("compress-out-foreign", lambda c: ["compress", str(c.run), "--method", "int8", "--out",
                                         str(c.write("mine/notes.txt", "mine").parent)], ("not empty", "did not write"),
      keeps=("mine/notes.txt",)),
    R("compress-out-is-run", lambda c: ["compress", str(c.run), "--method", "int8", "--out", str(c.run)],
      ("source run", "never modified")),
    R("compress-convert-not-qat", lambda c: ["compress", str(c.run), "--method", "convert", "--out", str(c.tmp / "q")],
      ("quant.qat", "int8")),
    R("compress-missing-run", lambda c: ["compress", str(c.tmp / "nope"), "--method", "int8", "--out",
                                         str(c.tmp / "q")], ("not a run directory",)),
    R("quant-qat-word", lambda c: c.train("--quant.qat=int3"), ("quant.qat", "int4")),
    R("quant-qat-with-lora", lambda c: c.train("--quant.qat=int4", "--finetune.lora_rank=4"),
      ("quant.qat", "lora_rank")),
    R("distill-teacher-vocab", lambda c: c.train(f"--distill.teacher={c.run}", "--model.vocab_size=600"),
      ("vocab_size", "512")),
    R("distill-teacher-not-run", lambda c: c.train("--distill.teacher", str(c.tmp / "nope")), ("not a leantrain run",)),
    R("distill-temperature-zero", lambda c: c.train(f"--distill.teacher={c.run}", "--distill.temperature=0"),
      ("distill.temperature",)),
    R("init-from-run-contradicts", lambda c: c.train(f"--train.init_from={c.run}", "--model.n_layers=2"),
      ("model.n_layers", "contradicts")),

    # ---- checkpoint consolidate ----------------------------------------------------------------------------
    R("consolidate-missing", lambda c: ["checkpoint", "consolidate", str(c.tmp / "nope"), "--out", str(c.tmp / "o")],
      ("nope",)),
    R("consolidate-full-checkpoint", lambda c: ["checkpoint", "consolidate",
                                                str(sorted((c.run / "checkpoints").glob("step-*"))[-1]),
                                                "--out", str(c.tmp / "o")], ("already a full checkpoint",)),
    R("consolidate-no-out", lambda c: ["checkpoint", "consolidate", str(c.tmp)], ("--out",)),

    # ---- run directories -----------------------------------------------------------------------------------
    R("resume-not-a-run", lambda c: ["train", "--resume", str(c.tmp / "nope")], ("not a run directory",)),
    R("run-dir-is-file", lambda c: ["train", "--run-dir", str(c.write("afile", "x")), f"--data.path={c.dataset}",
                                    *TINY], ("afile",)),
    R("run-dir-foreign", lambda c: ["train", "--run-dir", str(c.write("proj/notes.txt", "mine").parent),
                                    f"--data.path={c.dataset}", *TINY], ("notes.txt", "did not write"),
      keeps=("proj/notes.txt",)),
    R("memory-too-big", lambda c: c.train("--model.dim=65536", "--model.n_layers=24", "--model.n_heads=512",
                                          "--model.n_kv_heads=512"), ("does not fit", "--force")),
    R("data-path-missing", lambda c: c.train("--data.path=/nonexistent/ds"), ("/nonexistent/ds",)),
    R("mix-unknown-source", lambda c: c.train(f"--data.path={mixed_dataset(c)}", "--data.mix={ synth = 1 }"),
      ("data.mix", "'synth'", "real, synthetic")),
    R("mix-not-mixed-dataset", lambda c: c.train("--data.mix={ real = 1 }"), ("data.mix", "not a mixed dataset")),
    R("mix-negative-weight", lambda c: c.train("--data.mix={ real = -0.5, synthetic = 1 }"),
      ("data.mix", "'real'", ">= 0")),
    R("mix-zero-sum", lambda c: c.train("--data.mix={ real = 0, synthetic = 0 }"), ("data.mix", "positive")),
    R("mix-weight-not-number", lambda c: c.train('--data.mix={ real = "lots" }'), ("data.mix", "'lots'")),

    # ---- federate (docs/federated.md) ----------------------------------------------------------------------
    R("federate-per-round-over-clients", lambda c: c.federate("--federated.clients=3",
                                                              "--federated.clients_per_round=5"),
      ("federated.clients_per_round = 5", "federated.clients = 3")),
    R("federate-alpha-zero", lambda c: c.federate("--federated.alpha=0"), ("federated.alpha", "(0.0,")),
    R("federate-alpha-negative", lambda c: c.federate("--federated.alpha=-1"), ("federated.alpha",)),
    R("federate-local-steps-zero", lambda c: c.federate("--federated.local_steps=0"), ("federated.local_steps",)),
    R("federate-dp-noise-negative", lambda c: c.federate("--federated.dp_noise=-0.5"), ("federated.dp_noise",)),
    R("federate-empty-partition", lambda c: c.federate("--federated.clients=500", "--federated.partition=natural"),
      ("partition holds", "needs at least", "federated.clients")),
    R("federate-lora-only-without-lora", lambda c: c.federate("--federated.lora_only=true"),
      ("federated.lora_only", "finetune.lora_rank")),
    R("federate-dp-with-fedadam", lambda c: c.federate("--federated.dp_noise=1", "--federated.strategy=fedadam"),
      ("fedavg", "fedadam")),
    R("federate-secagg-with-dp", lambda c: c.federate("--federated.secure_aggregation=true", "--federated.dp_noise=1"),
      ("federated.secure_aggregation", "differential privacy")),
    R("federate-secagg-with-fedyogi", lambda c: c.federate("--federated.secure_aggregation=true",
                                                           "--federated.strategy=fedyogi"), ("fedprox", "fedyogi")),
    R("federate-secagg-one-client", lambda c: c.federate("--federated.secure_aggregation=true",
                                                         "--federated.clients=1"), ("2 to 1023", "not 1")),
    R("federate-secagg-two-shares", lambda c: c.federate("--federated.secure_aggregation=true", "--federated.clients=4",
                                                         "--federated.secagg_shares=2"), ("secagg_shares = 2",)),
    R("federate-secagg-threshold-all-shares", lambda c: c.federate("--federated.secure_aggregation=true",
                                                                   "--federated.clients=3",
                                                                   "--federated.secagg_threshold=3"),
      ("secagg_threshold = 3", "below the 3 shares")),
    R("federate-secagg-clip-zero", lambda c: c.federate("--federated.secure_aggregation=true",
                                                        "--federated.secagg_clip=0"), ("federated.secagg_clip",)),

    # ---- tune: the space, the study, the storage -----------------------------------------------------------
    R("tune-space-empty", lambda c: tune(c, space="{}"), ("tune.space is empty",)),
    R("tune-range-inverted", lambda c: tune(c, space='{ "optim.lr" = [1e-2, 1e-4, "log"] }'),
      ("optim.lr", "inverted range")),
    R("tune-range-empty", lambda c: tune(c, space='{ "optim.lr" = [0.01, 0.01] }'), ("optim.lr", "empty range")),
    R("tune-list-empty", lambda c: tune(c, space='{ "optim.lr" = [] }'), ("optim.lr", "empty range")),
    R("tune-unknown-key", lambda c: tune(c, space='{ "optim.lrr" = [1e-4, 1e-2] }'),
      ("unknown config key optim.lrr",)),
    R("tune-int-key-float-range", lambda c: tune(c, space='{ "model.n_layers" = [1.5, 4] }'),
      ("model.n_layers", "integer")),
    R("tune-choice-wrong-type", lambda c: tune(c, space='{ "optim.name" = ["adamw", 3] }'), ("optim.name", "3")),
    R("tune-bound-out-of-range", lambda c: tune(c, space='{ "optim.lr" = [0, 1e-2] }'),
      ("optim.lr", "lower bound 0")),
    R("tune-log-not-positive", lambda c: tune(c, space='{ "optim.warmup_steps" = [0, 10, "log"] }'),
      ("log range", "low > 0")),
    R("tune-trials-zero", lambda c: tune(c, "--trials", "0"), ("--trials 0", ">= 1")),
    R("tune-trials-config-zero", lambda c: tune(c, trials=0), ("tune.trials",)),
    R("tune-objective-unknown", lambda c: tune(c, objective="speed"), ("tune.objective", "val_loss")),
    R("tune-cmaes-multi-objective", lambda c: tune(c, sampler="cmaes", objective="val_loss,energy_kwh"),
      ("cmaes", "nsga2")),
    R("tune-storage-unreachable", lambda c: tune(c, "--storage", closed_port_url()),
      ("cannot reach the study storage", "nobody:***@127.0.0.1")),
    R("tune-storage-scheme", lambda c: tune(c, "--storage", "redis://127.0.0.1/0"), ("redis://", "postgresql://")),
    R("tune-space-changed", changed_study, ("search space differs", "optim.lr", "--out")),
    R("tune-resume-not-a-study", lambda c: ["tune", "--resume", str(c.write("proj/x.txt", "x").parent)],
      ("not a study folder",), keeps=("proj/x.txt",)),
    R("tune-out-foreign", lambda c: tune(c, "--out", str(c.write("mine/notes.txt", "mine").parent)),
      ("notes.txt", "did not write"), keeps=("mine/notes.txt",)),
]


@pytest.fixture(scope="module")
def trained_run(dataset, tmp_path_factory):
    """A finished 2-step tiny run with a checkpoint: the target of generate, export and report rows."""
    from leantrain.train.trainer import Trainer

    run = tmp_path_factory.mktemp("bad-input") / "run"
    cfg = tiny_config(dataset, train__steps=2, train__eval_every=2, train__eval_steps=1, checkpoint__every=2,
                      model__n_layers=1, model__dim=32, model__n_heads=2, model__n_kv_heads=2, model__seq_len=32)
    Trainer(cfg, run).fit()
    return run


def _snapshot(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


def _check(code: int, err: str, row: Row) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}, stderr: {err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
    assert lines[0].startswith("error"), lines[0]
    for w in row.words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, dataset, trained_run, tmp_path, monkeypatch, capsys):
    if row.root_reads_anyway and os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    ctx = Ctx(tmp_path, dataset, trained_run)
    argv = row.build(ctx)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(trained_run)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    _check(code, capsys.readouterr().err, row)
    assert _snapshot(trained_run) == before, "the shared run was changed"
    for name in row.keeps:
        assert (tmp_path / name).exists(), f"{name} was lost"
    if argv[0] == "train":  # refused before any folder is made (bad --init-from weights included)
        assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


REAL_PROCESS = ["lr-nan", "file-is-folder", "init-from-string-size", "generate-temperature-nan", "plan-gpus-word",
                "report-missing-run", "compare-one-run", "prepare-hf-field"]


@pytest.mark.parametrize("row", [r for r in ROWS if r.id in REAL_PROCESS], ids=lambda r: r.id)
def test_real_process(row, dataset, trained_run, tmp_path):
    """The same rows through a real `python -m leantrain.cli` process: what a user sees."""
    argv = row.build(Ctx(tmp_path, dataset, trained_run))
    r = subprocess.run([sys.executable, "-m", "leantrain.cli", *argv], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    _check(r.returncode, r.stderr, row)


def test_table_is_big_and_ids_unique():
    assert len(ROWS) >= 60 and len({r.id for r in ROWS}) == len(ROWS)


def test_report_skips_a_line_that_is_not_json(trained_run, tmp_path, capsys):
    """A metrics line that is not JSON (or not UTF-8) costs a warning, not the report."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"{not json\n\xff\xfe\n[1, 2]\n")
    (run / "report.html").unlink(missing_ok=True)
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "3 line(s)" in err and "Traceback" not in err
    assert (run / "report.html").stat().st_size > 1000
