"""Multi-node on one machine: two torchrun agents started as separate process trees play two nodes.

Each agent is what a user starts on one machine (`torchrun --nnodes 2 ... -m leantrain.cli train`); they
meet at a rendezvous on 127.0.0.1 (c10d, or static with --node-rank), their gloo workers form one job, and
the run directory is shared, as on a cluster file system. Every run keeps the global batch of 8 sequences.

- DDP, one worker per node, against one agent with two workers: the same two ranks doing the same sums
  (a two-rank all-reduce adds a + b on both), so the logged losses and gradient norms are bit-identical.
- HSDP, two workers per node (mesh dp_replicate 2 across nodes x dp_shard 2 within; with one worker per
  node dp_shard would be 1, which is plain DDP), sharded checkpoints: the reduce-scatter and all-reduce sum
  in another order than DDP's, so within float rounding (measured 1.7e-7 relative; 1e-5 allowed).
- Elastic (`--nnodes 1:2`): one node is SIGKILLed mid-run; the survivor's agent restarts its worker alone,
  which resumes from the newest checkpoint at world size 1 and, with train.global_batch_size fixed,
  accumulates 2 micro-batches where the two nodes took 1 each: the curve is the uninterrupted one.
- A node whose run directory is not the shared one (same relative path, other working directory) stops
  every rank with one line before any of them loads a checkpoint.
Every agent and worker is SIGKILLed on the way out of each test; all waits are bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import tiny_config
from leantrain.config import load_config, to_toml
from leantrain.errors import ConfigError
from leantrain.parallel.distributed import grad_accum_steps
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer

REL = 1e-5  # fp32; HSDP and accumulation sum in another order than the reference (measured ~1e-7 relative)


def make_cfg(data_path, **over):
    return tiny_config(data_path, **{"train__micro_batch_size": 4, "train__eval_every": 0, "train__threads": 1,
                                     "log__progress": "lines", "log__grad_health_every": 0,
                                     "parallel__timeout_s": 60, **over})


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def c10d(port: int, host: bool, **conf) -> list[str]:
    """Dynamic (c10d) rendezvous at 127.0.0.1:port; the first agent hosts its store. Each agent names its own
    address (--local-addr): the default is the machine's FQDN, which need not resolve to 127.0.0.1."""
    conf = {"is_host": str(host).lower(), **conf}
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "leantrain-test",
            "--local-addr", "127.0.0.1", "--rdzv-conf", ",".join(f"{k}={v}" for k, v in conf.items())]


def static(port: int, node_rank: int) -> list[str]:
    """Static rendezvous: node 0 is the master at 127.0.0.1:port, each agent is told its --node-rank."""
    return ["--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]


def agent_cmd(cfg_path: Path, run_dir: Path, nnodes: str, nproc: int, rendezvous: list[str],
              *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc-per-node", str(nproc),
            *extra, *rendezvous, "-m", "leantrain.cli", "train", str(cfg_path), "--run-dir", str(run_dir)]


@contextlib.contextmanager
def agents(logs: Path, cmds: list[list[str]], cwd: list[Path] | None = None):
    """Start one agent per command; each node's processes (the agent, and the workers it starts in sessions
    of their own) carry a marker in their environment, by which `kill_node` finds them. On the way out
    every process of every node still alive is SIGKILLed and every agent reaped."""
    procs: list[subprocess.Popen] = []
    try:
        for i, cmd in enumerate(cmds):
            with open(logs / f"node{i}.out", "w") as out, open(logs / f"node{i}.err", "w") as err:
                env = {**os.environ, "OMP_NUM_THREADS": "1", "LEANTRAIN_TEST_NODE": f"{logs}:{i}"}
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd[i] if cwd else None))
        yield procs
    finally:
        for i in range(len(cmds)):
            kill_node(logs, i)
        for p in procs:
            p.wait(30)


def kill_node(logs: Path, i: int) -> int:
    """SIGKILL every process of node i at once, as if its machine died; returns how many there were."""
    marker = f"LEANTRAIN_TEST_NODE={logs}:{i}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def wait_all(procs: list[subprocess.Popen], logs: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    for i, p in enumerate(procs):
        code = p.wait(max(1.0, deadline - time.monotonic()))
        assert code == 0, f"node {i} exited {code}: " + (logs / f"node{i}.err").read_text()[-3000:]


def two_nodes(cfg, run_dir: Path, nproc: int, rendezvous: str) -> str:
    """Train `cfg` into run_dir on two agents of `nproc` workers each; returns both nodes' stdout."""
    logs = run_dir.with_name(run_dir.name + "-logs")
    logs.mkdir(exist_ok=True)
    cfg_path = logs / "config.toml"
    cfg_path.write_text(to_toml(cfg))
    port = free_port()
    meet = [c10d(port, host=i == 0) if rendezvous == "c10d" else static(port, i) for i in (0, 1)]
    with agents(logs, [agent_cmd(cfg_path, run_dir, "2", nproc, meet[i]) for i in (0, 1)]) as procs:
        wait_all(procs, logs)
    return "".join((logs / f"node{i}.out").read_text() for i in (0, 1))


@pytest.fixture(scope="module")
def one_node(dataset, tmp_path_factory):
    """The reference run: one agent, two DDP workers, micro-batch 4 (checkpoints at steps 6 and 12)."""
    run = tmp_path_factory.mktemp("one-node") / "run"
    cfg_path = run.with_name("config.toml")
    cfg_path.write_text(to_toml(make_cfg(dataset, parallel__dp_replicate=2, parallel__dp_shard=1)))
    with agents(run.parent, [agent_cmd(cfg_path, run, "1", 2, ["--standalone"])]) as procs:
        wait_all(procs, run.parent)
    return run


def check_resumed_from_step6(run: Path, reference: Path, exact: bool) -> None:
    """The run's curve is the reference's (each test drops the step-12 checkpoint before its second launch,
    which then resumes from step 6 and redoes steps 7-12)."""
    got, want = records(run), records(reference)
    assert sorted(got) == list(range(1, 13))
    for s, w in want.items():
        if exact:
            assert (got[s]["loss"], got[s]["grad_norm"]) == (w["loss"], w["grad_norm"]), f"step {s}"
        else:
            assert got[s]["loss"] == pytest.approx(w["loss"], rel=REL), f"step {s}"
            assert got[s]["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), f"step {s}"
        assert got[s]["tokens"] == w["tokens"] == s * 8 * 64
    assert got[12]["val_loss"] == pytest.approx(want[12]["val_loss"], rel=0 if exact else REL)


def test_ddp_on_two_nodes_trains_checkpoints_and_resumes_like_one_node(dataset, one_node, tmp_path):
    run = tmp_path / "ddp"
    cfg = make_cfg(dataset, parallel__dp_replicate=2, parallel__dp_shard=1)
    out = two_nodes(cfg, run, nproc=1, rendezvous="c10d")
    assert out.count("done: 12 steps") == 1  # rank 0 alone speaks, on whichever node it landed
    plan = json.loads((run / "plan.json").read_text())
    assert plan["parallel"]["strategy"] == "ddp" and plan["parallel"]["world_size"] == 2
    check_resumed_from_step6(run, one_node, exact=True)
    shutil.rmtree(run / "checkpoints" / "step-0000012")
    two_nodes(cfg, run, nproc=1, rendezvous="c10d")
    resumed = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["checkpoint"] == "step-0000006"
    assert sorted(r["step"] for r in read_jsonl(run / "metrics.discarded.jsonl")) == list(range(7, 13))
    check_resumed_from_step6(run, one_node, exact=True)


def test_hsdp_replicated_across_nodes_sharded_within_resumes_like_one_node(dataset, one_node, tmp_path):
    run = tmp_path / "hsdp"
    cfg = make_cfg(dataset, train__micro_batch_size=2, parallel__dp_replicate=2, parallel__dp_shard=2,
                   checkpoint__format="sharded")
    two_nodes(cfg, run, nproc=2, rendezvous="static")
    plan = json.loads((run / "plan.json").read_text())
    assert plan["parallel"]["strategy"] == "hsdp" and plan["parallel"]["world_size"] == 4
    # every rank of both nodes wrote its own shard file into the shared run directory
    assert len(list((run / "checkpoints" / "step-0000006" / "shards").glob("*.safetensors"))) == 4
    check_resumed_from_step6(run, one_node, exact=False)
    shutil.rmtree(run / "checkpoints" / "step-0000012")
    two_nodes(cfg, run, nproc=2, rendezvous="static")
    resumed = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["checkpoint"] == "step-0000006"
    check_resumed_from_step6(run, one_node, exact=False)


def test_a_node_that_does_not_share_the_run_directory_stops_every_rank_before_any_step(dataset, one_node, tmp_path):
    """Both agents pass `--run-dir run` but work in other folders, as on two machines without a shared file
    system: node 0's `run` holds the reference's checkpoints, node 1's none. Resuming on different steps
    would train on with different weights; every rank stops, rank 0 says why in one line."""
    cwd = [tmp_path / "node0", tmp_path / "node1"]
    cwd[1].mkdir()
    shutil.copytree(one_node, cwd[0] / "run")
    before = (cwd[0] / "run" / "metrics.jsonl").read_bytes()
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(to_toml(make_cfg(dataset, parallel__dp_replicate=2, parallel__dp_shard=1)))
    port = free_port()
    with agents(tmp_path, [agent_cmd(cfg_path, Path("run"), "2", 1, static(port, i)) for i in (0, 1)], cwd) as procs:
        assert all(p.wait(120) != 0 for p in procs)
    said = [line for line in (tmp_path / "node0.err").read_text().splitlines() if "do not find" in line]
    assert len(said) == 1 and said[0].startswith("error: 1 of 2 processes") and "(step-0000012)" in said[0], said
    assert "shared file system" in said[0] and "[rank0]: Traceback" not in (tmp_path / "node0.err").read_text()
    assert (cwd[0] / "run" / "metrics.jsonl").read_bytes() == before  # nothing of the run was rewritten
    assert not (cwd[1] / "run" / "checkpoints").exists()


def test_elastic_run_loses_a_node_and_goes_on_alone_from_the_newest_checkpoint(dataset, tmp_path):
    """torchrun --nnodes 1:2 --max-restarts 2 on both agents; SIGKILL the second node (agent and worker)
    at step 12 of 40. The first node's worker fails on the broken connection, its agent meets the
    rendezvous again alone and restarts it at world size 1, which resumes the newest (sharded, 2-rank)
    checkpoint and accumulates 2 micro-batches of 4 to keep the global batch of 8."""
    over = {"train__steps": 40, "train__global_batch_size": 8, "checkpoint__every": 5,
            "checkpoint__format": "sharded"}
    straight = tmp_path / "straight"
    Trainer(make_cfg(dataset, **over), straight).fit()  # one process: micro-batch 4 x accumulation 2
    run, logs = tmp_path / "elastic", tmp_path / "logs"
    logs.mkdir()
    cfg_path = logs / "config.toml"
    cfg_path.write_text(to_toml(make_cfg(dataset, **over)))
    port = free_port()
    # a dead node is noticed after 2 missed 1 s keep-alives; a lone survivor waits 3 s for company
    conf = {"last_call_timeout": 3, "keep_alive_interval": 1, "keep_alive_max_attempt": 2, "join_timeout": 60}
    cmds = [agent_cmd(cfg_path, run, "1:2", 1, c10d(port, host=i == 0, **conf), "--max-restarts", "2")
            for i in (0, 1)]
    with agents(logs, cmds) as (survivor, doomed):
        deadline = time.monotonic() + 120
        while survivor.poll() is None and time.monotonic() < deadline and not (
                two_ranks(run) and len(read_jsonl(run / "metrics.jsonl")) >= 12):
            time.sleep(0.01)
        assert doomed.poll() is None and two_ranks(run), "both nodes should be training at step 12 of 40"
        killed_at = max(records(run))
        assert kill_node(logs, 1) == 2  # its agent and its worker
        assert survivor.wait(120) == 0, (logs / "node0.err").read_text()[-3000:]
    got, want = records(run), records(straight)
    assert sorted(got) == list(range(1, 41))
    for s in want:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=REL), f"step {s}"
        assert got[s]["tokens"] == s * 8 * 64
    assert got[40]["val_loss"] == pytest.approx(want[40]["val_loss"], rel=REL)
    resumed = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]
    # the newest whole checkpoint when node 1 died (the save in flight then, if any, was not)
    assert len(resumed) == 1 and killed_at - 5 <= resumed[0]["step"] <= killed_at + 5 and resumed[0]["step"] % 5 == 0
    starts = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "start"]
    assert starts[0]["parallel"]["world_size"] == 2 and "parallel" not in starts[-1]  # alone: one process
    plan = json.loads((run / "plan.json").read_text())
    assert plan["parallel"]["world_size"] == 1 and plan["tokens_per_step"] == 8 * 64


def two_ranks(run: Path) -> bool:
    """The run's current attempt spans both nodes (rank 0 writes plan.json at each start)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((run / "plan.json").read_text())["parallel"]["world_size"] == 2
    return False


def test_global_batch_sets_the_accumulation_per_world_size_or_says_which_cannot_split_it():
    train = load_config(overrides=["--train.global_batch_size=8", "--train.micro_batch_size=2"]).train
    assert [grad_accum_steps(train, dp) for dp in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ConfigError) as e:
        grad_accum_steps(train, 3)
    assert "\n" not in str(e.value) and "global_batch_size = 8" in str(e.value) and "3 data-parallel" in str(e.value)
    assert grad_accum_steps(load_config(overrides=["--train.grad_accum_steps=3"]).train, 4) == 3  # unset: as given
