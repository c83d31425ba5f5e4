"""The plan and the run it predicts agree by construction (both ask leantrain.device); threads per process;
the trainer refuses, before allocating, a model the planner says does not fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from leantrain import cli
from leantrain.config import load_config, recipe_names
from leantrain.device import choose_threads, describe_device, physical_cores
from leantrain.model.transformer import Attention
from leantrain.plan.planner import memory_refusal
from leantrain.train.trainer import Trainer

# built without training: a few steps' settings, no eval, checkpoint or sample
SHORT = {"train": {"steps": 2, "eval_every": 0, "eval_steps": 1, "sample_tokens": 0},
         "checkpoint": {"every": 0}, "log": {"progress": "none"}}
CASES = [(name, {}) for name in recipe_names()] + [
    ("tiny", {"precision": {"dtype": "auto"}, "train": {"attention": "auto"}}),
    ("tiny", {"precision": {"dtype": "fp32"}}),
    ("tiny", {"precision": {"dtype": "bf16"}, "model": {"seq_len": 1024}}),
    ("tiny", {"train": {"threads": 1}}),
]


def _merge(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        for section, fields in d.items():
            out.setdefault(section, {}).update(fields)
    return out


def _flags(over: dict) -> list[str]:
    return [f"--{s}.{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
            for s, fields in over.items() for k, v in fields.items()]


@pytest.mark.parametrize("recipe, extra", CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(CASES)])
def test_plan_and_run_report_the_same_dtype_attention_peak_and_threads(dataset, tmp_path, capsys, recipe, extra):
    over = _merge(SHORT, {"data": {"path": str(dataset)}}, extra)
    assert cli.main(["plan", "--recipe", recipe, "--json", *_flags(over)]) in (0, 1)
    planned = json.loads(capsys.readouterr().out)["configured"]

    cfg = load_config(recipe=recipe, overrides=over)
    with Trainer(cfg, tmp_path / "run", resume=False) as trainer:
        kernels = {m.kernel for m in trainer.model.modules() if isinstance(m, Attention)}
        threads = torch.get_num_threads()
    run_plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    dtype = {"bfloat16": "bf16", "float32": "fp32"}[run_plan["dtype"]]

    assert planned["layout"]["dtype"] == dtype == run_plan["estimate"]["dtype"]
    assert kernels == {planned["layout"]["attention"]} == {run_plan["attention"]} == {run_plan["estimate"]["attention"]}
    assert planned["peak_flops"] == run_plan["peak_flops"] == run_plan["estimate"]["peak_flops"] > 0
    want_threads = cfg.train.threads or physical_cores()
    assert threads == run_plan["threads"] == want_threads
    assert f"threads = {want_threads}," in (tmp_path / "run" / "config.toml").read_text()
    if "precision" not in extra and recipe == "tiny":  # the recipe's shape and settings, planned as trained
        assert cfg.model == load_config(recipe="tiny").model


def test_auto_rules_follow_the_device():
    info = describe_device("cpu", "fp32", "auto", seq_len=256)
    assert (info.dtype, info.attention) == (torch.float32, "sdpa")
    info = describe_device("cpu", "bf16", "auto", seq_len=256)
    assert (info.dtype, info.attention) == (torch.bfloat16, "matmul")
    assert describe_device("cpu", "bf16", "auto", seq_len=4096).attention == "sdpa"  # [T, T] scores cost memory


def test_threads_come_from_the_cores_this_process_may_use_divided_by_local_ranks():
    old_mask, old_threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        assert choose_threads(0, 2) == max(1, physical_cores() // 2)
        assert choose_threads(3, 2) == 3  # train.threads wins
        os.sched_setaffinity(0, {min(old_mask)})
        assert physical_cores() == 1 and choose_threads(0, 1) == 1
        assert describe_device("cpu", "fp32", measure_peak=False).threads == 1 == torch.get_num_threads()
    finally:
        os.sched_setaffinity(0, old_mask)
        torch.set_num_threads(old_threads)


def test_memory_refusal_names_the_numbers_and_what_would_fit(dataset):
    cfg = load_config(recipe="tiny", overrides=_merge(SHORT, {"data": {"path": str(dataset)},
                                                             "train": {"micro_batch_size": 16}}))
    info = describe_device("cpu", cfg.precision.dtype, cfg.train.attention, cfg.model.seq_len)
    assert memory_refusal(cfg, info, 64 * 1024**3, "a test host") is None
    message = memory_refusal(cfg, info, 0.8 * 1024**3, "a test host")
    assert message is not None and "\n" not in message
    assert "does not fit" in message and "GiB per process" in message and "a test host" in message
    assert "--train.micro_batch_size=" in message and "--force" in message
    hopeless = memory_refusal(cfg, info, 1024**2, "a test host")
    assert "shrink the model" in hopeless


HUGE = ["--model.dim=16384", "--model.n_layers=64", "--model.n_heads=64", "--model.n_kv_heads=8",
        "--model.seq_len=128", "--train.steps=2", "--log.progress=none", "--checkpoint.every=0"]


def test_train_refuses_a_model_that_does_not_fit_before_allocating_it(dataset, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "leantrain.cli", "train", "--run-dir", str(run), f"--data.path={dataset}", *HUGE]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "does not fit in memory" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert "ranks" in lines[0] and "--force" in lines[0]
    assert not run.exists() or not any(run.iterdir())
    # --force skips the check: here the next check (the dataset's 512-token vocabulary) stops it before any
    # weight is allocated, so the test never asks for terabytes
    r = subprocess.run([*cmd, "--model.vocab_size=256", "--force"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not fit" not in r.stderr and "vocab_size" in r.stderr, r.stderr[-2000:]


def test_fsdp_under_bf16_gathers_bf16_weights_and_keeps_fp32_shards_and_gradients(tmp_path):
    """parallel.apply_fsdp's MixedPrecisionPolicy, on a one-rank gloo group: the block computes with bf16
    weights, the sharded parameters and their gradients stay fp32; the planner counts no autocast copies."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from leantrain.config import ModelConfig
    from leantrain.model import Transformer
    from leantrain.parallel.distributed import Layout
    from leantrain.parallel.parallelize import apply_fsdp
    from leantrain.plan.memory import Layout as PlanLayout
    from leantrain.plan.memory import estimate_memory

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        mcfg = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, seq_len=32, vocab_size=128)
        model = Transformer(mcfg)
        apply_fsdp(model, Layout(device=torch.device("cpu"), mesh=mesh), True, torch.bfloat16)
        seen = []
        model.layers[0].attention.wq.register_forward_hook(lambda mod, i, o: seen.append(mod.weight.dtype))
        x = torch.randint(0, 128, (2, 32))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, x)
        loss.backward()
        assert seen == [torch.bfloat16] and loss.dtype == torch.float32
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    finally:
        dist.destroy_process_group()
    sharded = estimate_memory(mcfg, PlanLayout(dp_shard=2, dtype="bf16"))
    assert sharded["weight_casts"] == 0 and sharded["fsdp_gathered"] > 0
    assert estimate_memory(mcfg, PlanLayout(dtype="bf16"))["weight_casts"] > 0  # one process: autocast's copies
