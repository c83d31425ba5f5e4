"""`leantrain compare`: two real tiny runs side by side, a table in the terminal and one offline page."""

import json
import re
import shutil
import subprocess

import pytest

import leantrain
from leantrain import cli
from leantrain.report.compare import compare_runs, flat_config, wall_seconds

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _train_args(dataset, run_dir, *extra):
    return ["train", "--run-dir", str(run_dir), f"--data.path={dataset}", "--model.n_layers=1", "--model.dim=32",
            "--model.n_heads=2", "--model.n_kv_heads=2", "--model.seq_len=32", "--model.vocab_size=512",
            "--train.steps=4", "--train.micro_batch_size=2", "--train.eval_every=2", "--train.eval_steps=1",
            "--train.sample_tokens=0", "--precision.dtype=fp32", "--log.every=1", "--log.progress=none", *extra]


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """Two real tiny runs that differ in learning rate and micro-batch size."""
    root = tmp_path_factory.mktemp("compare")
    a, b = root / "lr-low", root / "lr-high"
    assert cli.main(_train_args(dataset, a)) == 0
    assert cli.main(_train_args(dataset, b, "--optim.lr=0.01", "--train.micro_batch_size=4")) == 0
    return a, b


def _end(run):
    return next(json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()
                if json.loads(line)["event"] == "end")


def test_compare_prints_the_table_and_writes_the_page(runs, tmp_path, monkeypatch, capsys):
    a, b = runs
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    for quantity in ("final val loss", "best val loss", "tokens", "wall time", "tokens/s", "MFU", "energy (Wh)",
                     "CO2e (g)", "cost (USD)"):
        assert quantity in out
    # the config keys that differ, and only those
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert lines["optim.lr"] == ["0.003", "0.01"] and lines["train.micro_batch_size"] == ["2", "4"]
    assert "train.run_dir" not in lines and "model.dim" not in lines
    # tokens/s is each run's closing figure, the number its `done:` line printed
    assert lines["tokens/s"] == [f"{_end(r)['tokens_per_s']:,.0f}" for r in runs]
    assert lines["tokens"] == [f"{_end(r)['tokens']:,}" for r in runs] == ["256", "512"]
    page = (tmp_path / "compare.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "leantrain compare" in page
    assert 'aria-label="Train loss by step"' in page and 'aria-label="Validation loss by step"' in page
    assert page.count("<polyline") >= 4 and "lr-low" in page and "lr-high" in page
    assert "<script" not in page.lower() and not re.search(r"""(src|href)\s*=\s*["']?https?:""", page)
    # a second compare replaces the page it wrote before
    assert cli.main(["compare", str(b), str(a), "--out", "compare.html"]) == 0


def test_compare_api(runs):
    a, b = runs
    c = leantrain.compare([a, b], out=None)
    assert c.page is None and [r.name for r in c.runs] == ["lr-low", "lr-high"]
    assert set(c.differing) == {"optim.lr", "train.micro_batch_size"}
    for r, run in zip(c.runs, runs, strict=True):
        end = _end(run)
        assert r.tokens_per_s == end["tokens_per_s"] and r.mfu == end["mfu"] and r.steps == 4
        assert r.final_val_loss == end["val_loss"] and r.best_val_loss <= r.final_val_loss
        assert len(r.loss) == 4 and len(r.val_loss) == 2 and r.wall_s > 0


def test_compare_skips_damaged_lines_with_a_warning(runs, tmp_path, capsys):
    a, b = runs
    torn = tmp_path / "torn"
    shutil.copytree(b, torn)
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1, "tok')  # a line cut by a kill
    assert cli.main(["compare", str(a), str(torn), "--out", str(tmp_path / "c.html")]) == 0
    captured = capsys.readouterr()
    assert "1 line(s) are not JSON records" in captured.err and "final val loss" in captured.out


def test_same_folder_names_are_told_apart(runs, tmp_path):
    a, _ = runs
    other = tmp_path / "x" / a.name
    shutil.copytree(a, other)
    c = compare_runs([a, other])
    assert [r.name for r in c.runs] == [f"{a.parent.name}/{a.name}", f"x/{a.name}"] and c.differing == {}
    assert "config: the runs' configs are identical" in c.lines()


def test_a_run_without_its_config_is_compared_on_its_metrics(runs, tmp_path):
    a, b = runs
    bare = tmp_path / "bare"
    shutil.copytree(a, bare)
    (bare / "config.toml").unlink()
    c = compare_runs([a, b, bare])
    assert c.differing == {"optim.lr": [0.003, 0.01, None], "train.micro_batch_size": [2, 4, None]}
    assert any("config.toml is missing" in w for w in c.warnings) and c.runs[2].final_val_loss is not None


def test_wall_time_sums_the_processes_of_a_resumed_run():
    metrics = [{"elapsed_s": 1.0}, {"elapsed_s": 2.5}, {"elapsed_s": 0.5}, {"elapsed_s": 4.0}, {"loss": 1}]
    assert wall_seconds(metrics) == 6.5 and wall_seconds([{"loss": 1}]) is None
    assert flat_config({"train": {"steps": 3}, "x": 1}) == {"train.steps": 3, "x": 1}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_compare_page_renders_in_headless_chromium(runs, tmp_path):
    page = leantrain.compare(list(runs), out=tmp_path / "compare.html").page
    png = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,1400",
           page.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert png.is_file(), "chromium wrote no screenshot"
    import matplotlib.image
    import numpy as np

    img = matplotlib.image.imread(png)[..., :3]
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    colours = np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    non_white = (img < 0.95).any(axis=-1).mean()
    assert len(colours) > 50, "the page rendered (almost) one colour"
    assert non_white > 0.03, f"only {non_white:.1%} of the page is not white"
