"""The command line as a user meets it: help, one-line errors, train -> generate."""

import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "leantrain.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["data", "prepare", "--help"],
                                  ["generate", "--help"], ["config", "--help"]])
def test_help(args):
    r = run(*args)
    assert r.returncode == 0 and "usage: leantrain" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["train", "--train.stepz=3"], "unknown key train.stepz"),
    (["train", "--optim.lr=-1"], "optim.lr"),
    (["train", "--bogus"], "unknown argument '--bogus'"),
    (["train", "--data.path=/nonexistent/ds"], "/nonexistent/ds"),
    (["generate", "/nonexistent/run", "--prompt", "x"], "not a run directory"),
    (["data", "prepare", "/nonexistent/file.txt", "--out", "/tmp/x"], "does not exist"),
])
def test_user_errors_are_one_line(args, words, tmp_path):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert words in r.stderr and r.stderr.strip().count("\n") == 0


def test_config_reference_lists_fields():
    r = run("config", "--reference")
    assert r.returncode == 0 and "train.micro_batch_size" in r.stdout and "optim.schedule" in r.stdout


def test_train_then_generate(dataset, tmp_path):
    run_dir = tmp_path / "run"
    r = run("train", "--run-dir", str(run_dir), f"--data.path={dataset}", "--model.n_layers=1", "--model.dim=32",
            "--model.n_heads=2", "--model.n_kv_heads=2", "--model.seq_len=32", "--model.vocab_size=512",
            "--train.steps=4", "--train.micro_batch_size=2", "--train.eval_steps=1", "--train.sample_tokens=8",
            "--precision.dtype=fp32")
    assert r.returncode == 0, r.stderr
    assert str(run_dir) in r.stdout and "sample" in r.stdout and "step 4/4" in r.stdout
    g = run("generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "10")
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("def ") and len(g.stdout) > 5
    # Pointed at the finished run again: it resumes at the end instead of starting over.
    again = run("train", "--run-dir", str(run_dir), f"--data.path={dataset}", "--model.n_layers=1",
                "--model.dim=32", "--model.n_heads=2", "--model.n_kv_heads=2", "--model.seq_len=32",
                "--model.vocab_size=512", "--train.steps=4", "--train.micro_batch_size=2",
                "--train.eval_steps=1", "--train.sample_tokens=0", "--precision.dtype=fp32")
    assert again.returncode == 0 and "resume" in again.stdout
