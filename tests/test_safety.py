"""Data safety, on real processes and real files: nothing a user does can make leantrain delete, overwrite or
write through what it did not write.

`export --overwrite` aimed at the run, its data, /tmp, the current or the home folder or a folder of the user's;
two trainers on one run directory; a project folder passed as --run-dir; symlinks planted in a run; a resume
that cannot write its files; temporary files left by killed processes; SIGTERM during start-up. Timing-free:
processes are frozen with SIGSTOP at the moment under test instead of raced against.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import tiny_config
from leantrain.cli import main
from leantrain.config import to_toml
from leantrain.errors import CheckpointError
from leantrain.train.telemetry import RunLog, read_jsonl
from leantrain.train.trainer import Trainer

STEPS = 4


def make_cfg(data, **over):
    return tiny_config(data, **{"train__steps": STEPS, "train__eval_every": 0, "train__threads": 1,
                                "checkpoint__every": 2, **over})


def write_cfg(path: Path, cfg) -> Path:
    path.write_text(to_toml(cfg))
    return path


def cli(*args, cwd=None, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leantrain.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=300, **kw)


def start(*args, out: Path, **kw) -> subprocess.Popen:
    """A CLI process with stdout/stderr going to files (no pipe to fill while it is frozen)."""
    with open(out.with_suffix(".out"), "w") as o, open(out.with_suffix(".err"), "w") as e:
        return subprocess.Popen([sys.executable, "-m", "leantrain.cli", *map(str, args)], stdout=o, stderr=e, **kw)


def finish(proc: subprocess.Popen, out: Path) -> tuple[int, str, str]:
    rc = proc.wait(300)
    return rc, out.with_suffix(".out").read_text(), out.with_suffix(".err").read_text()


def one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    for w in words:
        assert w in err, err


def tree(root: Path) -> dict[str, tuple[bytes, int] | str]:
    """Every entry under root (files with contents and mtime, links with their target), to prove nothing changed."""
    out: dict[str, tuple[bytes, int] | str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = (p.read_bytes(), p.stat().st_mtime_ns)
        else:
            out[str(p.relative_to(root))] = "dir"
    return out


def wait_for(cond, proc: subprocess.Popen | None = None, limit_s: float = 120) -> bool:
    deadline = time.monotonic() + limit_s
    while not cond():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl")}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def world(tmp_path_factory, dataset):
    """A trained run (in-process) on its own copy of the data, so no refusal bug can touch the shared one."""
    root = tmp_path_factory.mktemp("safety")
    data = root / "data"
    shutil.copytree(dataset, data)
    run = root / "run"
    Trainer(make_cfg(data), run).fit()
    return root, data, run


# ---- export --overwrite -----------------------------------------------------------------------

def test_export_overwrite_refuses_what_it_did_not_write_and_deletes_nothing(world, tmp_path, monkeypatch, capsys):
    """The table runs through the CLI's own entry point in this process (a subprocess each would only add
    start-up time); the current folder and /tmp cases run as real processes."""
    root, data, run = world
    home, tmp = tmp_path / "home", tmp_path / "tmpdir"
    project = tmp_path / "project"
    for d in (home, tmp, project):
        d.mkdir()
        (d / "precious.txt").write_text("the user's own file")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    before = {d: tree(d) for d in (root, home, tmp, project)}
    cases = [  # (--out, words in the one-line error)
        (run, "is the run directory"),
        (root, "holds the run directory"),
        (run / "checkpoints", "is inside the run directory"),
        (data, "is the run's data folder"),
        (data / "train", "is inside the run's data folder"),
        (home, "is your home folder"),
        (tmp, "is the temporary folder"),
        (project, "was not written by leantrain export"),
    ]
    for out, words in cases:
        capsys.readouterr()
        rc = main(["export", str(run), "--out", str(out), "--overwrite"])
        one_line_error(rc, capsys.readouterr().err, words)
    for args in (["--out", ".", "--overwrite"], ["--out", "."], ["--out", "/tmp", "--overwrite"]):
        r = cli("export", run, *args, cwd=project)
        one_line_error(r.returncode, r.stderr, f"--out {args[1]} ")
    assert {d: tree(d) for d in (root, home, tmp, project)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "project", "tmpdir"]  # no staging left


def test_export_overwrite_replaces_its_own_export_and_cleans_stale_staging(world, tmp_path):
    root, data, run = world
    out = tmp_path / "exp"
    r = cli("export", run, "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / ".leantrain-export.json").is_file() and (out / "model.safetensors").is_file()
    r = cli("export", run, "--out", out)
    one_line_error(r.returncode, r.stderr, "not empty", "--overwrite")
    # leftovers of killed exports: staging folders and a durable-write temp file, by a dead pid (removed)
    # and by a live one (this test process: not ours to touch)
    gone = dead_pid()
    stale = [tmp_path / f".exp.tmp-{gone}", tmp_path / f".exp.old-{gone}"]
    for s in stale:
        s.mkdir()
        (s / "model.safetensors").write_bytes(b"partial")
    (tmp_path / f".exp.tmp-{gone}-a1b2c3").write_bytes(b"partial")
    live = tmp_path / f".exp.tmp-{os.getpid()}"
    live.mkdir()
    not_ours = tmp_path / f".notes.tmp-{gone}x"
    not_ours.write_text("a user's file with a similar name")
    r = cli("export", run, "--out", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".exp.tmp-" + str(os.getpid()), "exp",
                                                                not_ours.name])
    assert json.loads((out / ".leantrain-export.json").read_text())["step"] == STEPS


def test_sigterm_during_export_keeps_the_old_export_and_leaves_no_staging(world, tmp_path):
    """Frozen (SIGSTOP) while its staging folder exists, then SIGTERM: the earlier export stays whole."""
    root, data, run = world
    out = tmp_path / "exp"
    assert cli("export", run, "--out", out).returncode == 0
    old = tree(out)
    for _ in range(8):
        proc = start("export", run, "--out", out, "--overwrite", "--max-shard-size", "2KB", out=tmp_path / "e")
        staging = lambda: any(p.name.startswith(".exp.tmp-") for p in tmp_path.iterdir())  # noqa: E731
        caught = wait_for(staging, proc)
        if caught:
            proc.send_signal(signal.SIGSTOP)
            caught = staging()
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
        rc, _, err = finish(proc, tmp_path / "e")
        if caught:
            break
        assert rc == 0, err
        old = tree(out)  # it finished before the freeze: that export is the one to keep
    else:
        pytest.skip("the export never outlived its first millisecond of staging on this machine")
    assert rc == 143 and "stopped by SIGTERM" in err and err.strip().count("\n") == 0, err
    assert tree(out) == old
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".exp.")]


def test_export_onto_a_full_disk_is_one_line_and_keeps_the_old_export(world, tmp_path):
    """The weights (~0.5 MB) do not fit under a 100 kB file-size limit (RLIMIT_FSIZE, a real EFBIG as root)."""
    root, data, run = world
    out = tmp_path / "exp"
    assert cli("export", run, "--out", out).returncode == 0
    old = tree(out)

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = cli("export", run, "--out", out, "--overwrite", preexec_fn=small_files)
    one_line_error(r.returncode, r.stderr, "File too large", "partial output was removed")
    assert tree(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


# ---- the run directory lock -------------------------------------------------------------------

def test_second_trainer_on_same_run_dir_exits_at_once_and_first_is_unharmed(world, dataset, tmp_path):
    cfg = make_cfg(dataset, train__steps=8, checkpoint__every=4)
    solo = tmp_path / "solo"
    Trainer(cfg, solo).fit()
    cfg_file = write_cfg(tmp_path / "cfg.toml", cfg)
    run = tmp_path / "run"
    first = start("train", cfg_file, "--run-dir", run, out=tmp_path / "first")
    try:
        assert wait_for(lambda: bool(read_jsonl(run / "metrics.jsonl")), first), "the first trainer never stepped"
        first.send_signal(signal.SIGSTOP)  # a holder that is busy, not finished
        r = cli("train", cfg_file, "--run-dir", run)
        one_line_error(r.returncode, r.stderr, "in use", f"pid {first.pid}")
        assert first.poll() is None  # it answered while the first still held the run
        with pytest.raises(CheckpointError, match=f"pid {first.pid}"):  # the Python API is locked out too
            Trainer(cfg, run)
        r = cli("train", cfg_file, "--run-dir", run, "--restart")
        one_line_error(r.returncode, r.stderr, "in use", f"pid {first.pid}")
        assert run.is_dir() and not list(tmp_path.glob("run.bak-*"))
    finally:
        first.send_signal(signal.SIGCONT)
    rc, out, err = finish(first, tmp_path / "first")
    assert rc == 0, err
    assert losses(run) == losses(solo) and sorted(losses(run)) == list(range(1, 9))


def test_a_dead_holders_lock_does_not_block(world, dataset, tmp_path):
    cfg_file = write_cfg(tmp_path / "cfg.toml", make_cfg(dataset, train__steps=8))
    run = tmp_path / "run"
    proc = start("train", cfg_file, "--run-dir", run, out=tmp_path / "a")
    assert wait_for(lambda: (run / "checkpoints" / "latest").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == proc.pid  # the file stays; the kernel freed the lock
    r = cli("train", "--run-dir", run)
    assert r.returncode == 0, r.stderr
    assert any(e["event"] == "resume" for e in read_jsonl(run / "events.jsonl")) and max(losses(run)) == 8


# ---- foreign folders, files, symlinks -------------------------------------------------------

def test_run_dir_foreign_folder_or_file_is_refused_in_one_line(dataset, tmp_path):
    cfg_file = write_cfg(tmp_path / "cfg.toml", make_cfg(dataset))
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.toml").write_text("[tool.mine]\nname = 'my project'\n")
    (project / "report.html").write_text("<p>my report</p>")
    before = tree(project)
    r = cli("train", cfg_file, "--run-dir", project)
    one_line_error(r.returncode, r.stderr, "leantrain did not write", "config.toml")
    # no config file: the project's config.toml is not taken for a run's
    r = cli("train", "--run-dir", project, f"--data.path={dataset}")
    one_line_error(r.returncode, r.stderr, "leantrain did not write")
    r = cli("train", cfg_file, "--run-dir", project, "--restart")
    one_line_error(r.returncode, r.stderr, "leantrain did not write")
    assert tree(project) == before and not list(tmp_path.glob("project.bak-*"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("notes")
    r = cli("train", cfg_file, "--run-dir", a_file)
    one_line_error(r.returncode, r.stderr, "is a file")
    assert a_file.read_text() == "notes"
    # an empty folder and a run from before the run marker are fine
    empty = tmp_path / "empty"
    empty.mkdir()
    Trainer(make_cfg(dataset, train__steps=2), empty).fit()
    (empty / ".leantrain-run").unlink()
    Trainer(make_cfg(dataset, train__steps=3), empty).fit()
    assert max(losses(empty)) == 3


def test_report_out_onto_a_folder_is_one_line_and_leaves_no_temp_file(world, tmp_path):
    root, data, run = world
    folder = tmp_path / "pages"
    folder.mkdir()
    r = cli("report", run, "--out", folder)
    one_line_error(r.returncode, r.stderr, "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pages"] and not list(folder.iterdir())


@pytest.mark.parametrize("name", ["metrics.jsonl", "events.jsonl", "config.toml", "samples.txt", "report.html",
                                  "plan.json", "tokenizer.json", "checkpoints/latest"])
def test_symlink_planted_in_a_run_is_refused_and_never_written_through(world, tmp_path, name):
    root, data, run = world
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file\n")
    (copy / name).unlink(missing_ok=True)
    (copy / name).symlink_to(victim)
    with pytest.raises(CheckpointError, match="symbolic link"):
        Trainer(make_cfg(data, train__steps=STEPS + 2, train__sample_tokens=4), copy).fit()
    assert victim.read_text() == "someone else's file\n"
    assert (copy / name).is_symlink()


def test_symlink_placed_after_start_is_not_appended_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("x\n")
    (tmp_path / "events.jsonl").symlink_to(victim)
    with pytest.raises(CheckpointError, match="symbolic link"):
        RunLog(tmp_path)
    assert victim.read_text() == "x\n"


def test_symlink_report_is_replaced_not_written_through(world, tmp_path):
    root, data, run = world
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    victim = tmp_path / "victim.html"
    victim.write_text("mine")
    (copy / "report.html").unlink(missing_ok=True)
    (copy / "report.html").symlink_to(victim)
    r = cli("report", copy)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "mine" and not (copy / "report.html").is_symlink()


# ---- rewritten files, temporary files ---------------------------------------------------------

def test_resume_config_unwritable_stops_in_one_line_and_stays_resumable(world, dataset, tmp_path):
    """A real write failure as root: the process may not write files past a few kB (RLIMIT_FSIZE), so the
    changed config.toml of the resume cannot be written whole."""
    cfg = make_cfg(dataset, log__every=100, train__sample_prompt="def " + "x" * 6000)  # a config of ~8 kB
    run = tmp_path / "run"
    Trainer(cfg, run).fit()
    kept = {n: (run / n).read_bytes() for n in ("config.toml", "tokenizer.json", "plan.json")}
    # room for the few event lines a resume appends before it writes its config, not for the config
    limit = max((run / n).stat().st_size for n in ("events.jsonl", "metrics.jsonl")) + 2000
    assert limit < len(kept["config.toml"])

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = cli("train", "--resume", run, f"--train.steps={STEPS + 2}", preexec_fn=small_files)
    one_line_error(r.returncode, r.stderr, "config.toml", "resumable")
    assert {n: (run / n).read_bytes() for n in kept} == kept
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]
    r = cli("train", "--resume", run, f"--train.steps={STEPS + 2}")
    assert r.returncode == 0, r.stderr
    assert max(losses(run)) == STEPS + 2 and "steps = 6" in (run / "config.toml").read_text()


def test_stale_temp_files_of_a_killed_writer_are_removed_by_the_next_run(world, dataset, tmp_path):
    root, data, run = world
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    gone = dead_pid()
    stale = [copy / f".config.toml.tmp-{gone}-0a1b2c", copy / f".plan.json.tmp-{gone}-ffffff"]
    for s in stale:
        s.write_text("half a file")
    live = copy / f".config.toml.tmp-{os.getpid()}-0a1b2c"
    live.write_text("a live writer's file")
    Trainer(make_cfg(data, train__steps=STEPS + 1), copy).fit()
    assert not any(s.exists() for s in stale) and live.exists()


# ---- SIGTERM during start-up ------------------------------------------------------------------

def test_sigterm_during_startup(dataset, tmp_path):
    """Frozen once the trainer has written the run's config and before the first step, then SIGTERM:
    one line and exit 143, not a silent death; the same command then trains the run."""
    cfg_file = write_cfg(tmp_path / "cfg.toml", make_cfg(dataset))
    run = tmp_path / "run"
    for _ in range(5):
        shutil.rmtree(run, ignore_errors=True)
        proc = start("train", cfg_file, "--run-dir", run, out=tmp_path / "s")
        assert wait_for(lambda: (run / "config.toml").is_file(), proc), finish(proc, tmp_path / "s")
        proc.send_signal(signal.SIGSTOP)
        started = any(e["event"] == "start" for e in read_jsonl(run / "events.jsonl"))
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        rc, out, err = finish(proc, tmp_path / "s")
        if not started:
            break
    else:
        pytest.skip("start-up never outlasted the lock file on this machine")
    assert rc == 143 and "stopped by SIGTERM" in err and err.strip().count("\n") == 0, (rc, err)
    assert "Traceback" not in err
    r = cli("train", cfg_file, "--run-dir", run)
    assert r.returncode == 0, r.stderr
    assert max(losses(run)) == STEPS
