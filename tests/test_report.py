"""report.html: written at the end of `leantrain train` and by `leantrain report`, offline, and it renders."""

import json
import re
import shutil
import subprocess

import pytest

from leantrain import cli
from leantrain.report import render, write_report
from leantrain.report.svg import line_chart, nice_ticks

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


ENERGY_KEYS = {"energy_j", "co2_g", "cost_usd", "power_w", "energy_source"}


def _train_args(dataset, run_dir):
    return ["train", "--run-dir", str(run_dir), f"--data.path={dataset}", "--model.n_layers=1", "--model.dim=32",
            "--model.n_heads=2", "--model.n_kv_heads=2", "--model.seq_len=32", "--model.vocab_size=512",
            "--train.steps=6", "--train.micro_batch_size=2", "--train.eval_every=3", "--train.eval_steps=1",
            "--train.sample_tokens=0", "--precision.dtype=fp32", "--log.every=1", "--log.progress=none"]


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory):
    """One real tiny run, trained through the CLI (which writes report.html at its end)."""
    d = tmp_path_factory.mktemp("report") / "run"
    assert cli.main(_train_args(dataset, d)) == 0
    return d


def test_train_writes_an_offline_report(run_dir):
    html = (run_dir / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") >= 4
    for section in ("Curves", "Predicted vs measured", "Events", "Config"):
        assert f"<h2>{section}</h2>" in html
    # offline: no scripts, no fetched resources (the SVG namespace is a name, not a download)
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", html)
    assert "@import" not in html and "url(" not in html
    # the planner's estimate next to the measurement
    est = json.loads((run_dir / "plan.json").read_text())["estimate"]
    assert est["hardware"] in html and "peak memory" in html and "[model]" in html


def test_report_shows_energy_and_events_when_present(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with open(run / "metrics.jsonl", "w") as f:  # a run whose meter reported power and energy
        for i, r in enumerate(metrics):
            r.update(energy_j=30.0 * (i + 1), co2_g=0.004 * (i + 1), cost_usd=1e-6 * (i + 1), power_w=7.5,
                     energy_source="rapl")
            f.write(json.dumps(r) + "\n")
    with open(run / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": "rollback", "step": 4, "message": "loss spike 9.1; back to step-0000003"}) + "\n")
        f.write(json.dumps({"event": "pause", "step": 5, "message": "grid at 612 g/kWh"}) + "\n")
    path = write_report(run)
    html = path.read_text()
    assert path == run / "report.html"
    for title in ("Power", "Energy", "CO2e", "Cost"):
        assert f'aria-label="{title}"' in html
    assert "loss spike 9.1" in html and "grid at 612 g/kWh" in html and "energy from rapl" in html
    assert "rollback at step 4" in html  # a marker on the loss curve
    with open(run / "metrics.jsonl", "w") as f:  # a run without a meter: no energy charts, no error
        for r in metrics:
            f.write(json.dumps({k: v for k, v in r.items() if k not in ENERGY_KEYS}) + "\n")
    no_energy = render(run)
    assert 'aria-label="Power"' not in no_energy and 'aria-label="Loss"' in no_energy


def test_report_cli_and_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert cli.main(["report", str(run_dir), "--out", str(out)]) == 0
    assert out.read_text().count("<svg") >= 4
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_a_failing_report_never_costs_the_run(dataset, tmp_path, monkeypatch, capsys):
    import leantrain.report

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(leantrain.report, "write_report", broken)
    run = tmp_path / "run"
    assert cli.main(_train_args(dataset, run)) == 0
    err = capsys.readouterr().err
    assert "report.html not written" in err and "disk on fire" in err
    assert (run / "checkpoints" / "latest").exists() and not (run / "report.html").exists()


def test_svg_chart_handles_edge_cases():
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    one = line_chart({"a": [(1, 2.0)]}, title="One")
    assert "<circle" in one
    empty = line_chart({"a": [(1, float("nan"))]}, title="Empty")
    assert "no data" in empty
    flat = line_chart({"a": [(0, 5.0), (10, 5.0)], "b & c": [(0, 1.0), (10, 2.0)]}, title="Flat <x>")
    assert "<polyline" in flat and "b &amp; c" in flat and "Flat &lt;x&gt;" in flat


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    png = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,2000",
           (run_dir / "report.html").resolve().as_uri()]
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
