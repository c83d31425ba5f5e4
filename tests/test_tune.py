"""`leantrain tune`: a real Optuna study of real tiny runs, pruned by ASHA, killed and resumed, and shared by two
worker processes through a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from leantrain.cli import main

optuna = pytest.importorskip("optuna")


def tune_config(path: Path, dataset: Path, steps: int = 12, *, tune: str = "", eval_every: int = 3,
                ckpt_every: int = 3, trials: int = 4) -> Path:
    """A tiny model's config with a [tune] section searching lr (log) and the optimizer."""
    path.write_text(f"""
[model]
n_layers = 1
dim = 32
n_heads = 2
n_kv_heads = 2
seq_len = 32
vocab_size = 512
[data]
path = {json.dumps(str(dataset))}
[train]
steps = {steps}
micro_batch_size = 4
eval_every = {eval_every}
eval_steps = 1
sample_tokens = 0
threads = 1
[optim]
warmup_steps = 2
[precision]
dtype = "fp32"
[checkpoint]
every = {ckpt_every}
keep = 1
[log]
every = 3
progress = "none"
[energy]
meter = "estimate"
[tune]
trials = {trials}
space = {{ "optim.lr" = [1e-4, 3e-2, "log"], "optim.name" = ["adamw", "lion"] }}
{tune}
""")
    return path


def load(study_dir: Path, name: str | None = None, url: str | None = None):
    from leantrain.tune.storage import quiet_optuna

    quiet_optuna()
    return optuna.load_study(study_name=name or study_dir.name, storage=url or f"sqlite:///{study_dir / 'study.db'}")


def test_tune_asha_writes_best_toml_that_trains(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tune_config(tmp_path / "tune.toml", dataset)
    assert main(["tune", str(cfg), "--out", "study"]) == 0
    out = capsys.readouterr().out
    study = load(tmp_path / "study")
    trials = study.get_trials()
    assert len(trials) == 4
    states = [t.state.name for t in trials]
    assert set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    # ASHA stopped the trials behind at a rung (seeded sampler and deterministic training: the same every run)
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned, out
    for t in trials:  # each trial is a normal run in trials/NNNN, its steps the per-trial budget or fewer
        run = tmp_path / "study" / "trials" / f"{t.number:04d}"
        assert t.user_attrs["run_dir"] == f"trials/{t.number:04d}" and (run / "report.html").is_file()
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == t.user_attrs["steps"]
        assert max(steps) == 12 if t.state.name == "COMPLETE" else max(steps) < 12
    for t in pruned:
        assert "pruned at step" in t.user_attrs["pruned_reason"]
    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert f"trial {best.number}: val_loss" in out and "best.toml" in out
    page = (tmp_path / "study" / "report.html").read_text()
    assert "Optimization history" in page and "Parallel coordinates" in page and "<script" not in page
    # best.toml is a config for `leantrain train`: the best trial's values, and it trains
    text = (tmp_path / "study" / "best.toml").read_text()
    assert f'name = "{best.params["optim.name"]}"' in text and f"lr = {best.params['optim.lr']!r}" in text
    assert main(["train", str(tmp_path / "study" / "best.toml"), "--run-dir", "again"]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 12 and abs(metrics[-1]["val_loss"] - best.value) < 1e-4  # the same run again


def test_multi_objective_study_shows_its_pareto_front(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tune_config(tmp_path / "tune.toml", dataset, steps=6, trials=3, tune='objective = "val_loss,energy_kwh"')
    assert main(["tune", str(cfg), "--out", "study"]) == 0
    out = capsys.readouterr().out
    trials = load(tmp_path / "study").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3  # NSGA-II; Optuna prunes no multi-objective study
    for t in trials:  # the objectives are what the run measured
        assert t.values == [t.user_attrs["val_loss"], t.user_attrs["energy_kwh"]] and t.values[1] > 0
    front = [t for t in trials if not any(o.values[0] <= t.values[0] and o.values[1] <= t.values[1]
                                          and o.values != t.values for o in trials)]
    assert "Pareto front (val_loss, energy_kwh)" in out
    for t in front:
        assert f"trial {t.number}: val_loss" in out
    assert "Pareto front: val loss x energy_kwh" in (tmp_path / "study" / "report.html").read_text()
    lowest = min(front, key=lambda t: t.values[0])
    assert f"best trial {lowest.number} " in (tmp_path / "study" / "best.toml").read_text()


def _unfinished_trial_with_checkpoint(study_dir: Path) -> Path | None:
    for run in sorted((study_dir / "trials").glob("*")) if (study_dir / "trials").is_dir() else []:
        events = run / "events.jsonl"
        if (run / "checkpoints" / "latest").exists() and events.is_file() and '"end"' not in events.read_text():
            return run
    return None


def test_killed_worker_leaves_a_study_that_resumes(dataset, tmp_path, monkeypatch, capsys):
    """SIGKILL a worker in the middle of a trial: the study stays readable, and --resume fails that trial and
    retries it from its run's checkpoint, so the study ends with its trial count, none lost."""
    cfg = tune_config(tmp_path / "tune.toml", dataset, steps=150, tune='pruner = "none"', trials=3,
                      eval_every=50, ckpt_every=10)
    study_dir = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-m", "leantrain.cli", "tune", str(cfg), "--out", str(study_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    victim = None
    try:
        deadline = time.monotonic() + 120
        while victim is None and proc.poll() is None and time.monotonic() < deadline:
            victim = _unfinished_trial_with_checkpoint(study_dir)
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert victim is not None, f"no trial was caught running: {proc.stderr.read().decode()[-2000:]}"
    killed = int(victim.name)
    # readable right away: the killed trial is still marked running
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--show", str(study_dir)]) == 0
    assert "running" in capsys.readouterr().out
    assert main(["tune", "--resume", str(study_dir)]) == 0
    trials = load(study_dir).get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[killed].state.name == "FAIL"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].user_attrs["run_dir"] == f"trials/{killed:04d}"  # trained on in the killed trial's run
    events = [json.loads(line) for line in (victim / "events.jsonl").read_text().splitlines() if line.strip()]
    assert any(e["event"] == "resume" for e in events) and events[-1]["event"] == "end"
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == 3 and len(trials) == 4  # three counted trials, plus the failed one that was retried
    assert main(["tune", "--show", str(study_dir)]) == 0
    assert f"retried as trial {retries[0].number}" in capsys.readouterr().out


# ---- PostgreSQL: two workers share one study ------------------------------------------------------------

def _pg_bin(name: str) -> str | None:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(found[-1]) if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on a free 127.0.0.1 port (initdb refuses root: run as `postgres`)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are missing; apt-get install postgresql")
    as_user = None
    if os.geteuid() == 0:
        try:
            as_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user for initdb")
    root = Path(tempfile.mkdtemp(prefix="leantrain-pg-"))
    if as_user is not None:
        os.chown(root, as_user.pw_uid, as_user.pw_gid)

    def run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        def drop() -> None:
            if as_user is not None:
                os.setgid(as_user.pw_gid)
                os.setuid(as_user.pw_uid)
        return subprocess.run(cmd, preexec_fn=drop, capture_output=True, text=True, timeout=timeout, cwd=root)

    data, port = root / "data", _free_port()
    started = False
    try:
        r = run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        assert r.returncode == 0, r.stderr
        r = run(pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-t", "30", "-o",
                f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -F", "start")
        started = r.returncode == 0
        assert started, r.stderr + (root / "log").read_text()
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_postgres_study(dataset, tmp_path, postgres):
    cfg = tune_config(tmp_path / "tune.toml", dataset)
    cmd = [sys.executable, "-m", "leantrain.cli", "tune", str(cfg), "--storage", postgres, "--study-name", "shared"]
    procs = [subprocess.Popen([*cmd, "--out", str(tmp_path / f"w{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    ran = []
    for out, _ in outs:
        m = re.search(r"this worker ran (\d+) trials(?:: ([\d, ]+))?;", out)
        assert m, out
        numbers = [int(n) for n in m.group(2).split(",")] if m.group(2) else []
        assert len(numbers) == int(m.group(1))
        ran.append(numbers)
    trials = load(tmp_path / "w0", "shared", postgres.replace("postgresql://", "postgresql+psycopg://")).get_trials()
    numbers = sorted(t.number for t in trials)
    # every trial of the study was run by exactly one of the two workers: none lost, none run twice
    assert numbers == sorted(ran[0] + ran[1]) == list(range(len(trials)))
    assert len(trials) >= 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert all(ran), f"one worker ran no trial: {ran}"
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2
    for i, numbers in enumerate(ran):  # each trial ran in the folder of the worker that ran it
        for n in numbers:
            assert (tmp_path / f"w{i}" / "trials" / f"{n:04d}" / "metrics.jsonl").is_file()
