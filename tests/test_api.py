"""The public Python API: the script in docs/api.md runs as written (on a smaller corpus, model and run),
`import leantrain` stays cheap, and each function's errors are LeantrainErrors."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leantrain
from leantrain.corpus.readers import read_builtin
from leantrain.errors import CheckpointError, ConfigError, LeantrainError

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
# the doc script's sizes, scaled down for a test: a 2-layer model, 8 steps, evaluation at 4 and 8
SMALL = {"model.n_layers": 2, "model.dim": 64, "model.n_heads": 4, "model.n_kv_heads": 2, "model.seq_len": 64,
         "model.vocab_size": 512, "train.steps": 8, "train.micro_batch_size": 4, "train.eval_every": 4,
         "train.eval_steps": 2, "train.sample_tokens": 12, "checkpoint.every": 4, "precision.dtype": "fp32",
         "log.every": 1, "log.progress": "none"}


def doc_script() -> str:
    text = DOC.read_text()
    return re.search(r"## From raw text to a Hugging Face model\n\n```python\n(.*?)```", text, re.S).group(1)


def substitute(script: str, old: str, new: str) -> str:
    assert script.count(old) == 1, f"docs/api.md's script changed: {old!r} is no longer in it once"
    return script.replace(old, new)


class Records:
    """An extra observer: keeps what the trainer hands it."""

    def __init__(self):
        self.steps, self.events, self.summary = [], [], None

    def on_step(self, record):
        self.steps.append(record)

    def on_event(self, event):
        self.events.append(event)

    def on_end(self, summary):
        self.summary = summary


def test_import_is_cheap_and_has_a_version():
    code = "import sys, leantrain; print(leantrain.__version__); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    version, torch_loaded = r.stdout.split()
    assert r.returncode == 0 and version[0].isdigit() and torch_loaded == "False"
    cli = subprocess.run([sys.executable, "-m", "leantrain.cli", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 0 and cli.stdout.strip() == f"leantrain {version}"


def test_doc_script_prepares_trains_generates_evaluates_exports(tmp_path, monkeypatch, capsys):
    """The ten-line script of docs/api.md, with the built-in corpus cut to 40 documents written as files,
    the tiny recipe shrunk by overrides and an extra observer: every stage through the API alone."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(itertools.islice(read_builtin("stdlib"), 40)):
        (corpus / f"doc{i:02d}.py").write_text(doc.text)
    script = doc_script()
    assert len(script.strip().splitlines()) <= 11  # the import and ten lines
    script = substitute(script, 'leantrain.prepare(builtin="stdlib", out="data/stdlib")',
                        'leantrain.prepare([CORPUS], out="data/stdlib", vocab_size=512, '
                        'curation={"executor": "serial"})')
    script = substitute(script, 'overrides={"data.path": "data/stdlib"}',
                        'overrides={"data.path": "data/stdlib", **SMALL}')
    script = substitute(script, 'run_dir="runs/tiny")', 'run_dir="runs/tiny", observers=[RECORDS])')
    records = Records()
    monkeypatch.chdir(tmp_path)
    exec(compile(script, str(DOC), "exec"), {"CORPUS": corpus, "SMALL": SMALL, "RECORDS": records})
    out = capsys.readouterr().out

    meta = json.loads((tmp_path / "data/stdlib/meta.json").read_text())
    assert meta["vocab_size"] <= 512 and (tmp_path / "data/stdlib/data_card.md").is_file()
    run_dir = tmp_path / "runs/tiny"
    assert "trained 8 steps" in out and "run in runs/tiny" in out
    assert (run_dir / "report.html").is_file() and (run_dir / "samples.txt").is_file()
    # the extra observer saw every logged step and the end
    assert [r["step"] for r in records.steps] == list(range(1, 9)) and records.summary["step"] == 8
    # generate: the continuation of "def"; evaluate: the run's own last val loss, from the final checkpoint
    generated = out.split("\n")[1]
    assert generated.startswith("def") and len(generated) > 3
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_val = [r["val_loss"] for r in logged if "val_loss" in r][-1]
    assert f"val loss of the final checkpoint: {last_val:.3f}" in out
    exported = tmp_path / "exports/tiny-hf"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in exported.iterdir()}
    assert json.loads((exported / "config.json").read_text())["num_hidden_layers"] == 2

    # the same run through the other entry points: a checkpoint folder, a LoadedModel, exact val loss
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    m = leantrain.load_model(ckpt)
    assert m.step == 8 and m.run_dir == run_dir and not m.model.training
    ids = torch.tensor([m.tokenizer.encode("def f(x):").ids])
    assert m.model(ids).shape == (1, ids.size(1), 512)
    assert leantrain.evaluate(m) == pytest.approx(last_val, rel=1e-4)
    greedy = leantrain.generate(m, "import ", max_new_tokens=30, temperature=0)
    assert greedy == leantrain.generate(run_dir, "import ", max_new_tokens=30, temperature=0, seed=5)


def test_load_config_override_forms():
    dotted = leantrain.load_config(recipe="tiny", overrides={"train.steps": 7, "optim.lr": 1e-3})
    nested = leantrain.load_config(recipe="tiny", overrides={"train": {"steps": 7}, "optim": {"lr": 1e-3}})
    cli = leantrain.load_config(recipe="tiny", overrides=["--train.steps=7", "--optim.lr=1e-3"])
    assert dotted == nested == cli and cli.train.steps == 7 and cli.model.dim == 256  # the recipe underneath
    with pytest.raises(ConfigError, match="train.stepz"):
        leantrain.load_config(overrides={"train.stepz": 1})
    with pytest.raises(ConfigError, match="section.field"):
        leantrain.load_config(overrides={"steps": 1})


def test_errors_are_leantrain_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a run directory"):
        leantrain.load_model(tmp_path)
    with pytest.raises(CheckpointError, match="not a run directory"):
        leantrain.generate(tmp_path, "x")
    with pytest.raises(ConfigError, match="temperature"):
        leantrain.generate(tmp_path, "x", temperature=-1)  # checked before any model is loaded
    with pytest.raises(ConfigError, match="'tflite'"):
        leantrain.export(tmp_path, tmp_path / "out", format="tflite")
    with pytest.raises(LeantrainError, match="one of the three"):
        leantrain.prepare(out=tmp_path / "ds")


def test_train_and_export_names_are_functions_and_subpackages():
    import leantrain.train.trainer as trainer_module

    assert callable(leantrain.train) and callable(leantrain.export)
    assert trainer_module.Trainer.__name__ == "Trainer"
    assert leantrain.train.trainer is trainer_module
