"""Fault tolerance, proven on real processes and a real tiny model.

SIGKILL at random moments and in the middle of a checkpoint write, SIGTERM, auto-resume and
--restart, damaged checkpoints, a full disk, NaN/Inf and loss spikes under both guard policies,
divergence, gradient health, async checkpoints. Every run uses one intra-op thread: with two
OpenMP threads on a shared 2-core machine each step waits on the other process's time slices.
Kill moments are random; a failing trial names its seed (set LEANTRAIN_TEST_SEED to replay it).
"""

from __future__ import annotations

import errno
import io
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

import leantrain.train.checkpoint.full as checkpoint_mod
from helpers import StopAt, tiny_config
from leantrain.config import to_toml
from leantrain.display import TrainDisplay
from leantrain.errors import CheckpointError
from leantrain.train.checkpoint import read_checkpoint
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer, TrainingDiverged

STEPS = 48  # long enough that a kill aimed at step <= 28 lands well before the end


def make_cfg(data_path, **over):
    return tiny_config(data_path, **{"train__steps": STEPS, "train__eval_every": 0, "train__threads": 1,
                                     "checkpoint__every": 4, "log__progress": "lines", **over})
def write_cfg(path: Path, cfg) -> Path:
    path.write_text(to_toml(cfg))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}


def steps_logged(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    evs = read_jsonl(run_dir / "events.jsonl")
    return [e for e in evs if kind is None or e["event"] == kind]


def text_display() -> tuple[TrainDisplay, io.StringIO]:
    """The CLI's terminal display, writing to a string instead of a terminal."""
    buf = io.StringIO()
    return TrainDisplay("lines", Console(file=buf, width=400, color_system=None)), buf


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root: contents and mtime, to prove nothing was touched (but the run's `.lock`, where
    each process that claims the run writes its pid)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture
def rng():
    seed = int(os.environ.get("LEANTRAIN_TEST_SEED", time.time_ns() % 2**32))
    r = random.Random(seed)
    r.seed_value = seed
    return r


_REFERENCE: dict[str, dict[int, float]] = {}


@pytest.fixture
def reference(dataset, tmp_path_factory):
    """Per-step losses of an uninterrupted run of make_cfg(dtype=...), computed once per session."""
    def get(dtype="fp32"):
        if dtype not in _REFERENCE:
            run = tmp_path_factory.mktemp(f"reference-{dtype}")
            Trainer(make_cfg(dataset, precision__dtype=dtype, checkpoint__every=0), run).fit()
            _REFERENCE[dtype] = losses(run)
            assert sorted(_REFERENCE[dtype]) == list(range(1, STEPS + 1))
        return _REFERENCE[dtype]
    return get


# ---- real processes ---------------------------------------------------------------------

def cli(*args, out: Path, **kw) -> subprocess.Popen:
    """`python -m leantrain.cli ARGS` with stdout and stderr going to files (no pipe to fill)."""
    with open(out.with_suffix(".out"), "w") as stdout, open(out.with_suffix(".err"), "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "leantrain.cli", *map(str, args)], stdout=stdout,
                                stderr=stderr, **kw)


def finish(proc: subprocess.Popen, out: Path, timeout=120) -> tuple[int, str, str]:
    rc = proc.wait(timeout)
    return rc, out.with_suffix(".out").read_text(), out.with_suffix(".err").read_text()


def last_step(run_dir: Path) -> int:
    """Step of the newest whole line of metrics.jsonl (0 if none)."""
    recs = read_jsonl(run_dir / "metrics.jsonl")
    return recs[-1]["step"] if recs else 0


def signal_at_step(proc: subprocess.Popen, run_dir: Path, step: int, sig: int, jitter: float = 0.0,
                   rng: random.Random | None = None) -> None:
    """Send `sig` once metrics.jsonl shows `step`, after a random pause of up to `jitter` seconds so the
    signal lands anywhere in a later step: forward, optimizer, logging or a checkpoint write."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and last_step(run_dir) < step and time.monotonic() < deadline:
        time.sleep(0.001)
    if jitter:
        time.sleep(rng.uniform(0, jitter))
    if proc.poll() is None:
        proc.send_signal(sig)


def is_stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


# ---- SIGKILL, SIGTERM, auto-resume --------------------------------------------------------

@pytest.mark.parametrize("dtype, async_, kills", [("fp32", False, 2), ("bf16", True, 1)])
def test_sigkill_at_random_moments_then_resume_is_bit_identical(dataset, tmp_path, reference, rng, dtype, async_,
                                                                kills):
    cfg = make_cfg(dataset, precision__dtype=dtype, checkpoint__async=async_)
    cfg_file = write_cfg(tmp_path / "cfg.toml", cfg)
    run = tmp_path / "run"
    why = f"(LEANTRAIN_TEST_SEED={rng.seed_value})"
    resumed_from = []
    floor = 4
    for k in range(kills + 1):
        args = ["train", cfg_file, "--run-dir", run] if k == 0 else ["train", "--resume", run]
        proc = cli(*args, out=tmp_path / f"run{k}")
        if k < kills:
            target = rng.randint(floor + 1, max(floor + 1, 28 - 6 * (kills - 1 - k)))
            signal_at_step(proc, run, target, signal.SIGKILL, jitter=0.015, rng=rng)
            rc, out, err = finish(proc, tmp_path / f"run{k}")
            assert rc == -signal.SIGKILL, f"run {k} ended ({rc}) before the kill aimed at step {target} {why}: {err}"
            floor = last_step(run) + 1  # stale lines up to here are discarded only once the next run starts
        else:
            rc, out, err = finish(proc, tmp_path / f"run{k}")
            assert rc == 0, err
        if k > 0:
            resumed_from.append(events(run, "resume")[-1]["step"])
    assert steps_logged(run) == list(range(1, STEPS + 1)), why
    assert losses(run) == reference(dtype), f"resumed from steps {resumed_from} {why}"
    assert len(events(run, "resume")) == kills and max(resumed_from) > 0, why


def test_sigkill_during_checkpoint_write_resumes_from_the_previous_one(dataset, tmp_path, reference, rng):
    cfg = make_cfg(dataset, checkpoint__every=2)
    run, ck = tmp_path / "run", tmp_path / "run" / "checkpoints"
    proc = cli("train", write_cfg(tmp_path / "cfg.toml", cfg), "--run-dir", run, out=tmp_path / "run0")
    start = rng.randint(4, 24)
    caught = None
    while proc.poll() is None and caught is None:
        if last_step(run) >= start and ck.is_dir():
            temps = [n for n in os.listdir(ck) if n.startswith(".tmp-step-")]
            if temps:
                proc.send_signal(signal.SIGSTOP)
                while proc.poll() is None and not is_stopped(proc.pid):
                    time.sleep(0.0002)
                # still being written now that the process is frozen?
                if proc.poll() is None and (ck / temps[0]).exists():
                    caught = temps[0]
                    proc.send_signal(signal.SIGKILL)
                else:
                    proc.send_signal(signal.SIGCONT)
        time.sleep(0.0005)
    rc, _, err = finish(proc, tmp_path / "run0")
    assert caught and rc == -signal.SIGKILL, f"no checkpoint write was caught after step {start}: {rc} {err}"
    writing = int(caught.split("-")[2])
    assert not (ck / f"step-{writing:07d}").exists() and (ck / caught).is_dir()
    assert read_checkpoint(ck / f"step-{writing - 2:07d}").step == writing - 2

    display, shown = text_display()
    again = Trainer(cfg, run, observers=[display])
    assert again.step == writing - 2
    assert events(run, "resume")[-1]["checkpoint"] == f"step-{writing - 2:07d}"
    again.fit()
    assert losses(run) == reference("fp32")
    assert not [n for n in os.listdir(ck) if n.startswith(".tmp")], "the dead write's temp folder was left behind"


def test_sigterm_saves_and_exits_0_then_auto_resume_then_restart(dataset, tmp_path, reference, rng):
    cfg_file = write_cfg(tmp_path / "cfg.toml", make_cfg(dataset))
    run = tmp_path / "run"
    proc = cli("train", cfg_file, "--run-dir", run, out=tmp_path / "run0")
    signal_at_step(proc, run, rng.randint(5, 24), signal.SIGTERM)
    rc, out, err = finish(proc, tmp_path / "run0")
    assert rc == 0, err
    stopped = last_step(run)
    assert f"stopped by SIGTERM at step {stopped}" in out and stopped < STEPS
    assert [e["step"] for e in events(run, "preempted")] == [stopped]
    assert events(run, "preempted")[0]["signal"] == "SIGTERM"
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{stopped:07d}"
    assert read_checkpoint(run / "checkpoints" / f"step-{stopped:07d}").step == stopped

    # Pointed at the run again, with nothing else: it resumes with the run's own config.
    rc, out, err = finish(cli("train", "--run-dir", run, out=tmp_path / "run1"), tmp_path / "run1")
    assert rc == 0, err
    assert f"resume at step {stopped}" in out
    assert losses(run) == reference("fp32")
    before = tree(run)

    # --restart moves the old run aside (not deleted) and starts at step 0. Backups already named
    # for the coming seconds (an earlier restart) must be neither replaced nor nested into.
    decoys = {tmp_path / f"run.bak-{time.strftime('%Y%m%d-%H%M%S', time.localtime(time.time() + i))}"
              for i in range(30)}
    for d in decoys:
        d.mkdir(exist_ok=True)
        (d / "marker").write_text("an earlier backup")
    rc, out, err = finish(cli("train", cfg_file, "--run-dir", run, "--restart", "--train.steps=3",
                              out=tmp_path / "run2"), tmp_path / "run2")
    assert rc == 0, err
    backups = [p for p in tmp_path.glob("run.bak-*") if p not in decoys]
    assert len(backups) == 1 and str(backups[0]) in out
    assert {k: v[0] for k, v in tree(backups[0]).items()} == {k: v[0] for k, v in before.items()}
    assert all([p.name for p in d.iterdir()] == ["marker"] for d in decoys)
    assert steps_logged(run) == [1, 2, 3] and not events(run, "resume")


# ---- damaged checkpoints ------------------------------------------------------------------

def damage(path: Path, how: str) -> None:
    target = path / "model.safetensors"
    if how == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif how == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 3] ^= 0x01
        target.write_bytes(bytes(data))
    else:
        target.unlink()


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_damaged_newest_checkpoint_falls_back_with_one_line(dataset, tmp_path, how):
    cfg = make_cfg(dataset, train__steps=12)
    run = tmp_path / "run"
    Trainer(cfg, run).fit()
    straight = losses(run)
    damage(run / "checkpoints" / "step-0000012", how)
    display, shown = text_display()
    again = Trainer(cfg, run, observers=[display])
    assert again.step == 8
    warned = [line for line in shown.getvalue().splitlines() if " is damaged" in line]
    assert len(warned) == 1 and "step-0000012" in warned[0] and "model.safetensors" in warned[0]
    assert "step-0000008" in warned[0]  # says which checkpoint is used instead
    assert len(events(run, "checkpoint_damaged")) == 1
    again.fit()
    assert losses(run) == straight
    assert read_checkpoint(run / "checkpoints" / "step-0000012").step == 12  # rewritten whole


def test_first_save_after_falling_back_removes_the_abandoned_newer_checkpoint(dataset, tmp_path):
    """Left in place, the damaged step-12 would outrank the new checkpoints in any later fallback, and
    pruning by name would delete the good ones before it."""
    run = tmp_path / "run"
    Trainer(make_cfg(dataset, train__steps=12), run).fit()
    damage(run / "checkpoints" / "step-0000012", "flip")
    again = Trainer(make_cfg(dataset, train__steps=12, checkpoint__every=3), run)
    assert again.step == 8
    again.observers.append(StopAt(again, 9))
    again.fit()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000008", "step-0000009"]


def test_torn_event_line_does_not_swallow_the_next_event(dataset, tmp_path):
    run = tmp_path / "run"
    Trainer(make_cfg(dataset, train__steps=4), run).fit()
    with open(run / "events.jsonl", "a") as f:
        f.write('{"time": 1, "event": "checkpo')  # killed in the middle of a line
    Trainer(make_cfg(dataset, train__steps=4), run)
    assert [e["step"] for e in events(run, "resume")] == [4]


def test_cli_damaged_newest_warns_in_one_line_and_continues(dataset, tmp_path):
    cfg = make_cfg(dataset, train__steps=12)
    run = tmp_path / "run"
    Trainer(cfg, run).fit()
    damage(run / "checkpoints" / "step-0000012", "flip")
    rc, out, err = finish(cli("train", "--resume", run, out=tmp_path / "r"), tmp_path / "r")
    assert rc == 0, err
    warned = [line for line in (out + err).splitlines() if " is damaged" in line]
    assert len(warned) == 1 and "step-0000012" in warned[0] and "checksum" in warned[0], out + err
    assert "resume at step 8" in out


def test_cli_no_usable_checkpoint_is_one_line_and_touches_nothing(dataset, tmp_path):
    cfg = make_cfg(dataset, train__steps=8)
    run = tmp_path / "run"
    Trainer(cfg, run).fit()
    damage(run / "checkpoints" / "step-0000004", "truncate")
    damage(run / "checkpoints" / "step-0000008", "delete")
    before = tree(run)
    time.sleep(0.01)  # so that a rewrite would show in the mtimes
    rc, out, err = finish(cli("train", "--resume", run, out=tmp_path / "r"), tmp_path / "r")
    assert rc == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "no usable checkpoint" in err and "nothing was overwritten" in err
    assert "step-0000004" in err and "step-0000008" in err
    assert tree(run) == before


# ---- a full disk ---------------------------------------------------------------------------

@pytest.mark.parametrize("async_", [False, True])
def test_failed_save_stops_the_run_and_keeps_the_previous_checkpoint(dataset, tmp_path, monkeypatch, async_):
    """ENOSPC from the write layer on every save after the first (the last save, for async: its
    failure only shows when the trainer waits for the background writer)."""
    cfg = make_cfg(dataset, train__steps=8, checkpoint__async=async_)
    run = tmp_path / "run"
    real_write = checkpoint_mod.write_durable

    def write_durable(path, data, **kw):
        if path.parent.name.startswith(".tmp-step-") and not path.parent.name.startswith(".tmp-step-0000004"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data, **kw)

    monkeypatch.setattr(checkpoint_mod, "write_durable", write_durable)
    display, shown = text_display()
    trainer = Trainer(cfg, run, observers=[display])
    with pytest.raises(CheckpointError, match="step-0000008.*No space left on device.*earlier checkpoints are "
                                              "intact") as e:
        trainer.fit()
    assert "\n" not in str(e.value)
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-0000004"]
    assert (ck / "latest").read_text().strip() == "step-0000004"
    assert read_checkpoint(ck / "step-0000004").step == 4
    assert [e["step"] for e in events(run, "checkpoint_failed")] == [8]
    assert "checkpoint_failed at step 8" in shown.getvalue()


def test_cli_disk_full_exits_2_with_one_line(dataset, tmp_path):
    """A real write failure: the process may not write files over 200 kB (RLIMIT_FSIZE; Python ignores
    SIGXFSZ, so write() fails with EFBIG), which the ~0.5 MB model file exceeds."""
    cfg = make_cfg(dataset, train__steps=8)
    run = tmp_path / "run"
    first = Trainer(cfg, run)
    first.observers.append(StopAt(first, 4))
    assert first.fit()["stopped"]
    good = {k: v for k, v in tree(run / "checkpoints").items()}

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    rc, out, err = finish(cli("train", "--resume", run, out=tmp_path / "r", preexec_fn=small_files), tmp_path / "r")
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().count("\n") == 0 and "could not save checkpoint step-0000008" in err
    assert "File too large" in err and "earlier checkpoints are intact" in err
    assert tree(run / "checkpoints") == good
    assert [e["step"] for e in events(run, "checkpoint_failed")] == [8]

    def tiny_files():  # too small even for the run directory's copy of the tokenizer
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))

    cfg_file = write_cfg(tmp_path / "cfg.toml", cfg)
    rc, out, err = finish(cli("train", cfg_file, "--run-dir", tmp_path / "fresh", out=tmp_path / "f",
                              preexec_fn=tiny_files), tmp_path / "f")
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().count("\n") == 0 and "File too large" in err and "tokenizer.json" in err


# ---- the stability guard -------------------------------------------------------------------

class Corrupt:
    """A forward hook on the real model: multiplies the loss it returns by `factor` on training forwards
    once trainer.step reaches `at`, `times` times in all (each dropped step is tried again)."""

    def __init__(self, trainer, at, factor, times=1):
        self.trainer, self.at, self.factor, self.times, self.fired = trainer, at, factor, times, 0
        trainer.model.register_forward_hook(self)

    def __call__(self, module, args, output):
        if module.training and self.trainer.step >= self.at and self.fired < self.times:
            self.fired += 1
            return output * self.factor
        return None


GUARD_STEPS = 30


def guard_cfg(dataset, **over):
    base = {"train__steps": GUARD_STEPS, "checkpoint__every": 5, "guard__min_history": 8,
            "log__grad_health_every": 5}
    return make_cfg(dataset, **{**base, **over})


_CLEAN: dict[str, dict] = {}


@pytest.fixture
def clean_run(dataset, tmp_path_factory):
    if not _CLEAN:
        run = tmp_path_factory.mktemp("clean")
        summary = Trainer(guard_cfg(dataset), run).fit()
        _CLEAN.update(summary=summary, run=run)
    return _CLEAN


@pytest.mark.parametrize("policy", ["skip", "rollback"])
@pytest.mark.parametrize("fault, factor, reason", [("nan", float("nan"), "non-finite"),
                                                   ("inf", float("inf"), "non-finite"),
                                                   ("spike", 20.0, "loss spike")])
def test_guard_recovers_from_nan_inf_and_spikes(dataset, tmp_path, clean_run, policy, fault, factor, reason):
    display, shown = text_display()
    trainer = Trainer(guard_cfg(dataset, guard__policy=policy), tmp_path / "run", observers=[display])
    hook = Corrupt(trainer, at=17, factor=factor)
    summary = trainer.fit()
    run = tmp_path / "run"
    assert hook.fired == 1 and summary["step"] == GUARD_STEPS
    acted = events(run, policy)
    assert len(acted) == 1 and reason in acted[0]["message"] and acted[0]["step"] == 17
    assert f"{policy} at step 17: {reason}" in shown.getvalue()
    if policy == "rollback":
        assert acted[0]["checkpoint"] == "step-0000015" and acted[0]["from_step"] == 17
    # metrics read as one clean run: each step once, every loss finite
    assert steps_logged(run) == list(range(1, GUARD_STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_jsonl(run / "metrics.jsonl"))
    clean = clean_run["summary"]
    assert summary["val_loss"] == pytest.approx(clean["val_loss"], rel=0.03)
    assert losses(run) != losses(clean_run["run"])  # the dropped batch really changed the run


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_guard_gives_up_after_max_retries(dataset, tmp_path, policy):
    trainer = Trainer(guard_cfg(dataset, guard__policy=policy, guard__max_retries=2), tmp_path / "run")
    hook = Corrupt(trainer, at=12, factor=float("nan"), times=1000)
    with pytest.raises(TrainingDiverged) as e:
        trainer.fit()
    msg = str(e.value)
    assert "\n" not in msg and "diverged" in msg and "guard.max_retries = 2" in msg and "non-finite" in msg
    assert hook.fired == 3
    assert len(events(tmp_path / "run", policy)) == 2 and len(events(tmp_path / "run", "diverged")) == 1
    # no update from a bad step reached the weights
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_guard_off_lets_nan_through(dataset, tmp_path):
    """The control for the tests above: without the guard the same fault ruins the weights."""
    trainer = Trainer(guard_cfg(dataset, guard__policy="off", train__steps=14), tmp_path / "run")
    Corrupt(trainer, at=12, factor=float("nan"))
    trainer.fit()
    assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ---- gradient health -----------------------------------------------------------------------

def test_grad_health_records_in_metrics(clean_run):
    records = read_jsonl(clean_run["run"] / "metrics.jsonl")
    with_health = [r["step"] for r in records if "grad_norms" in r]
    assert with_health == [5, 10, 15, 20, 25, 30]
    r = records[9]
    assert set(r["grad_norms"]) == {"tok_embeddings", "layers.0", "layers.1", "norm"}  # output is tied
    assert set(r["update_ratio"]) == set(r["grad_norms"])
    assert all(0 < v < 100 for v in r["grad_norms"].values())
    assert all(1e-6 < v < 1 for v in r["update_ratio"].values())
    assert "update_ratio" not in records[8]


@pytest.mark.parametrize("factor, at, steps, words", [(1e4, 14, 16, "exploding gradients"),
                                                      (1e-9, 0, 21, "vanishing gradients")])
def test_grad_health_warns(dataset, tmp_path, factor, at, steps, words):
    display, shown = text_display()
    cfg = make_cfg(dataset, train__steps=steps, guard__policy="off", log__grad_health_every=1)
    trainer = Trainer(cfg, tmp_path / "run", observers=[display])
    Corrupt(trainer, at=at, factor=factor, times=1 if factor > 1 else 1000)
    trainer.fit()
    warnings = events(tmp_path / "run", "grad_warning")
    assert len(warnings) == 1 and words in warnings[0]["message"]
    assert words in shown.getvalue()


def test_grad_health_warning_state_survives_a_resume(dataset, tmp_path):
    cfg = make_cfg(dataset, train__steps=21, guard__policy="off", log__grad_health_every=1)
    first = Trainer(cfg, tmp_path / "run")
    Corrupt(first, at=0, factor=1e-9, times=1000)
    first.observers.append(StopAt(first, 12))
    first.fit()
    second = Trainer(cfg, tmp_path / "run")
    Corrupt(second, at=0, factor=1e-9, times=1000)
    second.fit()
    assert [e["step"] for e in events(tmp_path / "run", "grad_warning")] == [20]


# ---- async checkpoints ---------------------------------------------------------------------

def test_async_checkpoints_hold_the_same_tensors_as_sync(dataset, tmp_path, monkeypatch):
    """The background writer is slowed down (as a big model or a slow disk would) so that training
    runs several steps while it serialises: only a true snapshot keeps the step's weights."""
    real_write = checkpoint_mod.write_durable

    def slow_write(path, data, **kw):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.02)
        return real_write(path, data, **kw)

    monkeypatch.setattr(checkpoint_mod, "write_durable", slow_write)
    for mode in ("sync", "async"):
        cfg = make_cfg(dataset, train__steps=12, checkpoint__keep=3, checkpoint__async=mode == "async")
        Trainer(cfg, tmp_path / mode).fit()
    for step in (4, 8, 12):
        for name in ("model.safetensors", "optim.safetensors"):
            a = (tmp_path / "sync" / "checkpoints" / f"step-{step:07d}" / name).read_bytes()
            b = (tmp_path / "async" / "checkpoints" / f"step-{step:07d}" / name).read_bytes()
            assert a == b, f"{name} of step {step} differs"
    assert all(e["background"] for e in events(tmp_path / "async", "checkpoint"))
    assert losses(tmp_path / "sync") == losses(tmp_path / "async")
