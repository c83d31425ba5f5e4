"""Data parallelism on real processes: two `gloo` ranks launched by torchrun, the tiny model, 1 thread each.

Every 2-rank run uses micro_batch_size 4 per rank: the same global batch (8 sequences) as the
single-process reference, so its logged loss curve must match the reference's within float rounding
(the sums are split across ranks and added in another order). Checkpoints cross layouts both ways.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import tiny_config
from leantrain.cli import main
from leantrain.config import ParallelConfig, load_config, to_toml
from leantrain.errors import CheckpointError, ConfigError
from leantrain.parallel.distributed import resolve_degrees
from leantrain.train.checkpoint import consolidate
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer

REL = 1e-5  # fp32 losses; measured differences are ~1e-7 relative (grad norms ~1e-6)


def make_cfg(data_path, **over):
    return tiny_config(data_path, **{"train__micro_batch_size": 8, "train__eval_every": 0, "train__threads": 1,
                                     "log__progress": "lines", "log__grad_health_every": 6, **over})
def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}


def assert_same_curve(run_dir: Path, reference: Path, steps=range(1, 13), block_rel: float = 1e-4) -> None:
    got, want = records(run_dir), records(reference)
    assert sorted(got) == list(range(1, 13)), "rank 0 alone writes metrics, one line per step"
    for s in steps:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=REL), f"step {s}"
        assert got[s]["grad_norm"] == pytest.approx(want[s]["grad_norm"], rel=1e-4), f"step {s}"
        assert got[s]["tokens"] == want[s]["tokens"]
        assert ("val_loss" in got[s]) == ("val_loss" in want[s])  # only the last step evaluates
        if "val_loss" in want[s]:
            assert got[s]["val_loss"] == pytest.approx(want[s]["val_loss"], rel=REL), f"val at step {s}"
    for s in (6, 12):
        if s in steps:
            for block, norm in want[s]["grad_norms"].items():
                assert got[s]["grad_norms"][block] == pytest.approx(norm, rel=block_rel), (s, block)


def torchrun(cfg, run_dir: Path, timeout: int = 240, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m leantrain.cli train CFG --run-dir RUN_DIR`."""
    cfg_path = run_dir.with_name(run_dir.name + ".toml")
    cfg_path.write_text(to_toml(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "leantrain.cli", "train", str(cfg_path), "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """The single-process run (micro-batch 8, checkpoints at steps 6 and 12) every layout must match."""
    run = tmp_path_factory.mktemp("single") / "run"
    with pytest.MonkeyPatch.context() as mp:  # conftest's per-test cache dir is not set up yet here
        mp.setenv("LEANTRAIN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        Trainer(make_cfg(dataset), run).fit()
    return run


def test_ddp_two_ranks_match_single_process(dataset, reference, tmp_path):
    run = tmp_path / "ddp"
    proc = torchrun(make_cfg(dataset, train__micro_batch_size=4, parallel__dp_replicate=2, parallel__dp_shard=1),
                    run)
    assert_same_curve(run, reference)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["parallel"]["strategy"] == "ddp" and plan["tokens_per_step"] == 8 * 64
    assert proc.stdout.count("done: 12 steps") == 1 and proc.stdout.count("step 12/12 ") == 1  # rank 1: silent


def test_fsdp_two_ranks_match_and_resume_at_one_rank(dataset, reference, tmp_path):
    run = tmp_path / "fsdp"
    torchrun(make_cfg(dataset, train__micro_batch_size=4), run)
    assert json.loads((run / "plan.json").read_text())["parallel"]["strategy"] == "fsdp"
    assert_same_curve(run, reference)
    # 2 ranks -> 1: continue the FSDP run's step-6 checkpoint in this single process
    shutil.rmtree(run / "checkpoints" / "step-0000012")
    single = Trainer(load_config(run / "config.toml", overrides={"train": {"micro_batch_size": 8}}), run)
    assert single.step == 6
    single.fit()
    assert_same_curve(run, reference)
    assert len(read_jsonl(run / "metrics.discarded.jsonl")) == 6


def test_single_process_checkpoint_resumes_at_two_ranks(dataset, reference, tmp_path):
    run = tmp_path / "one-then-two"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "step-0000012")
    torchrun(make_cfg(dataset, train__micro_batch_size=4), run)
    assert_same_curve(run, reference, steps=range(7, 13))
    resumed = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]
    assert resumed and resumed[-1]["checkpoint"] == "step-0000006"


def test_killed_rank_restarts_the_group_which_resumes(dataset, tmp_path):
    """torchrun --max-restarts 1: SIGKILL rank 1 mid-run; the restarted group resumes from the newest
    checkpoint and finishes on the uninterrupted curve."""
    cfg = make_cfg(dataset, train__steps=40, checkpoint__every=5, log__grad_health_every=0)
    straight = tmp_path / "straight"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEANTRAIN_CACHE_DIR", str(tmp_path / "cache"))
        Trainer(cfg, straight).fit()
    run = tmp_path / "elastic"
    cfg_path = tmp_path / "elastic.toml"
    cfg_path.write_text(to_toml(make_cfg(dataset, train__steps=40, train__micro_batch_size=4, checkpoint__every=5,
                                         log__grad_health_every=0)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts", "1",
           "--nproc-per-node", "2", "-m", "leantrain.cli", "train", str(cfg_path), "--run-dir", str(run)]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        agent = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while agent.poll() is None and time.monotonic() < deadline and len(read_jsonl(run / "metrics.jsonl")) < 12:
        time.sleep(0.01)
    killed = [pid for pid in worker_pids(agent.pid) if "LOCAL_RANK=1" in environ(pid)]
    assert len(killed) == 1, "rank 1 should still be running at step 12 of 40"
    os.kill(killed[0], signal.SIGKILL)
    assert agent.wait(180) == 0, (tmp_path / "err").read_text()[-3000:]
    resumed = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] >= 10
    got, want = records(run), records(straight)
    assert sorted(got) == list(range(1, 41))
    for s in want:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=REL), f"step {s}"


def worker_pids(parent: int) -> list[int]:
    """Children of the torchrun agent (any of its threads may have started them)."""
    pids = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def environ(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


UNTIED_BLOCK_REL = 1e-3  # untied, the small embedding/first-block grad norms drift ~2e-4 by step 12 (FSDP2 alike)


@pytest.fixture(scope="module")
def reference_untied(dataset, tmp_path_factory):
    """The single-process reference with untied embeddings, which tensor parallel needs."""
    run = tmp_path_factory.mktemp("single-untied") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEANTRAIN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        Trainer(make_cfg(dataset, model__tie_embeddings=False), run).fit()
    return run


def test_tensor_parallel_two_ranks_match_single_process_and_resume_at_one(dataset, reference_untied, tmp_path):
    """tp = 2: both ranks read the same 8 sequences and each computes half of every block's heads and hidden
    units; the curve is the single process's. Its (full) checkpoint then continues in one process."""
    run = tmp_path / "tp"
    torchrun(make_cfg(dataset, model__tie_embeddings=False, parallel__tp=2, parallel__dp_shard=1), run)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["parallel"]["strategy"] == "tp" and plan["tokens_per_step"] == 8 * 64
    assert_same_curve(run, reference_untied, block_rel=UNTIED_BLOCK_REL)
    shutil.rmtree(run / "checkpoints" / "step-0000012")
    single = Trainer(load_config(run / "config.toml", overrides={"parallel": {"tp": 1}}), run)
    assert single.step == 6
    single.fit()
    assert_same_curve(run, reference_untied, block_rel=UNTIED_BLOCK_REL)


def test_fsdp_times_tensor_parallel_four_ranks_match_single_process(dataset, reference_untied, tmp_path):
    """2-D mesh (dp_shard 2, tp 2): two data-parallel groups of 4 sequences, each split over 2 tp ranks."""
    run = tmp_path / "fsdp-tp"
    torchrun(make_cfg(dataset, model__tie_embeddings=False, parallel__tp=2, train__micro_batch_size=4), run,
             nproc=4, timeout=300)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["parallel"]["strategy"] == "fsdp+tp" and plan["parallel"]["dp_shard"] == 2
    assert_same_curve(run, reference_untied, block_rel=UNTIED_BLOCK_REL)


def test_sharded_checkpoints_resume_at_one_rank_fall_back_when_damaged_and_consolidate(dataset, reference, tmp_path):
    """checkpoint.format = sharded under FSDP2: each rank writes its own shard file. One process resumes them;
    a damaged newest one is skipped loudly; a consolidated (full) copy resumes on the same curve too."""
    run = tmp_path / "sharded"
    torchrun(make_cfg(dataset, train__micro_batch_size=4, checkpoint__format="sharded"), run)
    assert_same_curve(run, reference)
    step6, step12 = run / "checkpoints" / "step-0000006", run / "checkpoints" / "step-0000012"
    assert len(list((step6 / "shards").glob("*.safetensors"))) == 2 and not (step6 / "model.safetensors").exists()
    assert json.loads((step6 / "manifest.json").read_text())["kind"] == "sharded"
    full6 = tmp_path / "full6"
    assert main(["checkpoint", "consolidate", str(step6), "--out", str(full6)]) == 0
    assert (full6 / "model.safetensors").is_file() and (full6 / "optim.safetensors").is_file()
    with pytest.raises(CheckpointError, match="already a full checkpoint"):
        consolidate(full6, tmp_path / "again")
    copy = tmp_path / "from-consolidated"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-0000012")
    shutil.rmtree(copy / "checkpoints" / "step-0000006")
    shutil.copytree(full6, copy / "checkpoints" / "step-0000006")
    # damage one rank's shard of the newest checkpoint: resume falls back to step 6, loudly
    shard = sorted((step12 / "shards").glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    over = {"train": {"micro_batch_size": 8}}
    single = Trainer(load_config(run / "config.toml", overrides=over), run)
    assert single.step == 6
    single.fit()
    assert_same_curve(run, reference)
    damaged = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "checkpoint_damaged"]
    assert len(damaged) == 1 and "step-0000012" in damaged[0]["message"] and "checksum" in damaged[0]["message"]
    single = Trainer(load_config(copy / "config.toml", overrides=over), copy)
    assert single.step == 6
    single.fit()
    assert_same_curve(copy, reference)


def test_sharded_checkpoint_of_one_process_resumes_at_two_ranks(dataset, reference, tmp_path):
    run = tmp_path / "one-sharded"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEANTRAIN_CACHE_DIR", str(tmp_path / "cache"))
        Trainer(make_cfg(dataset, train__steps=12, checkpoint__format="sharded"), run).fit()
    assert_same_curve(run, reference)
    shutil.rmtree(run / "checkpoints" / "step-0000012")
    torchrun(make_cfg(dataset, train__micro_batch_size=4, checkpoint__format="sharded"), run)
    assert_same_curve(run, reference, steps=range(7, 13))
    resumed = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]
    assert resumed and resumed[-1]["checkpoint"] == "step-0000006"
    assert len(list((run / "checkpoints" / "step-0000012" / "shards").glob("*.safetensors"))) == 2


def test_stuck_rank_makes_the_other_stop_with_one_line(dataset, tmp_path):
    """SIGSTOP rank 1 mid-run: rank 0 waits parallel.timeout_s in its next collective, then says so in one
    leantrain line and exits non-zero, instead of hanging or printing gloo's C++ error."""
    cfg_path = tmp_path / "stuck.toml"
    cfg_path.write_text(to_toml(make_cfg(dataset, train__steps=400, train__micro_batch_size=4, checkpoint__every=0,
                                         log__grad_health_every=0, parallel__timeout_s=8)))
    run = tmp_path / "stuck"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "leantrain.cli", "train", str(cfg_path), "--run-dir", str(run)]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        agent = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while agent.poll() is None and time.monotonic() < deadline and len(read_jsonl(run / "metrics.jsonl")) < 3:
        time.sleep(0.05)
    rank1 = [pid for pid in worker_pids(agent.pid) if "LOCAL_RANK=1" in environ(pid)]
    assert len(rank1) == 1, "rank 1 should still be running at step 3 of 400"
    os.kill(rank1[0], signal.SIGSTOP)
    try:
        while "collective waited" not in (tmp_path / "err").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.kill(rank1[0], signal.SIGKILL)  # stopped, it would hold torchrun in its 30 s grace period
    assert agent.wait(60) != 0
    err = (tmp_path / "err").read_text()
    said = [line for line in err.splitlines() if "collective waited" in line]
    assert len(said) == 1 and said[0].startswith("rank 0: ") and "parallel.timeout_s=8 s" in said[0], err[-3000:]
    assert "Timed out waiting" not in err and "unbound_buffer" not in err


@pytest.mark.parametrize("degrees, world, words", [
    ({"dp_replicate": 3}, 2, ["dp_replicate = 3", "world size 2"]),
    ({"dp_replicate": 2, "dp_shard": 2}, 2, ["= 4 processes", "world size is 2"]),
    ({"dp_replicate": 2}, 1, ["dp_replicate = 2", "world size 1"]),
])
def test_bad_degrees_are_one_line_config_errors(degrees, world, words):
    with pytest.raises(ConfigError) as e:
        resolve_degrees(ParallelConfig(**degrees), world)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)
    assert resolve_degrees(ParallelConfig(), 4) == (1, 4, 1) and resolve_degrees(ParallelConfig(dp_replicate=2), 4) \
        == (2, 2, 1)


def test_cli_refuses_degrees_and_tensor_parallel_before_any_work(dataset, tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "run"), f"--data.path={dataset}",
                 "--parallel.dp_replicate=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "world size 1" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="set --model.tie_embeddings=false"):
        load_config(overrides=["--parallel.tp=2"])
    with pytest.raises(ConfigError, match="does not divide model.n_heads"):
        load_config(overrides=["--parallel.tp=3", "--model.tie_embeddings=false"])
    with pytest.raises(ConfigError, match="dp_shard = 0"):
        load_config(overrides=["--parallel.dp_shard=0"])


def test_muon_under_fsdp_two_ranks_matches_single_process(dataset, tmp_path):
    """Muon orthogonalises whole matrices: under FSDP2 each rank gathers the update of its row shard, runs
    Newton-Schulz on the whole and keeps its rows, so the curve is the single process's (within the
    rounding of the split gradient sums, which Newton-Schulz carries along)."""
    over = {"optim__name": "muon", "train__steps": 6, "checkpoint__every": 0, "log__grad_health_every": 0}
    single = tmp_path / "single"
    Trainer(make_cfg(dataset, **over), single).fit()
    run = tmp_path / "fsdp-muon"
    torchrun(make_cfg(dataset, train__micro_batch_size=4, **over), run)
    assert json.loads((run / "plan.json").read_text())["parallel"]["strategy"] == "fsdp"
    got, want = records(run), records(single)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for s in want:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-4), f"step {s}"
    assert got[6]["val_loss"] == pytest.approx(want[6]["val_loss"], rel=1e-4)
    assert want[6]["loss"] < want[1]["loss"]
