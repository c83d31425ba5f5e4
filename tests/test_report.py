"""report.html: written at the end of `leantrain train` and by `leantrain report`, offline, and it renders."""

import contextlib
import io
import json
import math
import re
import shutil
import subprocess

import pytest

from leantrain import cli
from leantrain.corpus.card import bin_label, histogram, length_edges, length_tables
from leantrain.report import render, write_report
from leantrain.report.svg import heat_map, line_chart, nice_ticks, tick_labels

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


ENERGY_KEYS = {"energy_j", "co2_g", "cost_usd", "power_w", "energy_source"}


def _train_args(dataset, run_dir):
    return ["train", "--run-dir", str(run_dir), f"--data.path={dataset}", "--model.n_layers=1", "--model.dim=32",
            "--model.n_heads=2", "--model.n_kv_heads=2", "--model.seq_len=32", "--model.vocab_size=512",
            "--train.steps=6", "--train.micro_batch_size=2", "--train.eval_every=3", "--train.eval_steps=1",
            "--train.sample_tokens=0", "--precision.dtype=fp32", "--log.every=1", "--log.progress=none",
            "--log.grad_health_every=2"]


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory):
    """One real tiny run, trained through the CLI (which writes report.html at its end)."""
    d = tmp_path_factory.mktemp("report") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the terminal's lines, `done:` among them
        assert cli.main(_train_args(dataset, d)) == 0
    (d.parent / "stdout.txt").write_text(out.getvalue())
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
    for title in ("Power", "Energy, cumulative", "CO2e, cumulative", "Cost, cumulative"):
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


@pytest.mark.parametrize("lo,hi", [(4.0001, 4.0002), (0.0, 1e-9), (1e-9, 3e-9), (2.5e-4, 3e-3), (1.0, 1e12),
                                   (-1e308, 1e308), (6300.0, 6400.0), (999_000.0, 1_001_000.0), (-3.0, -2.99),
                                   (5.0, 5.0), (0.0, 0.0), (-7.25, -7.25), (1e15 + 1, 1e15 + 2), (4.0, 4.0 + 1e-12)])
def test_ticks_stay_distinct_at_any_range(lo, hi):
    ticks = nice_ticks(lo, hi)
    labels = tick_labels(ticks)
    assert 2 <= len(ticks) <= 12
    assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)
    assert ticks[0] <= lo and ticks[-1] >= hi  # the data lies inside the axis
    assert len(set(labels)) == len(labels), labels  # never five "4"s on one axis
    assert all(len(label) <= 10 for label in labels), labels
    steps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert max(steps) - min(steps) <= 1e-6 * max(abs(s) for s in steps)  # evenly spaced
    if lo == hi:  # a constant gets a band around it, not a collapsed axis
        assert ticks[0] < lo < ticks[-1]


def test_tick_labels_read_as_numbers():
    assert tick_labels(nice_ticks(4.0001, 4.0002)) == ["4.00010", "4.00012", "4.00014", "4.00016", "4.00018",
                                                       "4.00020"]
    assert tick_labels(nice_ticks(6300, 6400)) == ["6300", "6320", "6340", "6360", "6380", "6400"]
    assert tick_labels(nice_ticks(0, 60_000)) == ["0", "20k", "40k", "60k"]
    assert tick_labels([0.0, 1e-3, 2e-3, 3e-3]) == ["0", "1e-3", "2e-3", "3e-3"]
    assert nice_ticks(1, 2, integer=True) == [1.0, 2.0] and nice_ticks(7, 7, integer=True) == [6.0, 7.0, 8.0]
    assert nice_ticks(float("nan"), 1) == [] and nice_ticks(0, float("inf")) == []
    for lo, hi in ((4.0001, 4.0002), (3.2, 977.0)):  # the values behind the labels are the ticks
        ticks = nice_ticks(lo, hi)
        assert all(math.isclose(float(label), t, abs_tol=1e-12) for label, t in zip(tick_labels(ticks), ticks,
                                                                                    strict=True))


def test_chart_of_a_single_point_a_constant_and_a_log_axis():
    one = line_chart({"a": [(3, 4.0001)]}, title="One")
    assert one.count("<circle") == 1 and "no data" not in one
    const = line_chart({"a": [(0, 4.0), (5, 4.0)]}, title="Const")
    labels = re.findall(r'text-anchor="end">([^<]+)</text>', const)
    assert len(labels) >= 3 and len(set(labels)) == len(labels)
    log = line_chart({"g": [(1, 1e-3), (2, 2e-2), (3, -1.0), (4, 0.0)]}, title="Log", y_label="r", log_y=True)
    assert "1e-3" in log and "1e-2" in log and "r (log)" in log  # decades; the values <= 0 are dropped
    many = line_chart({f"layers.{i}": [(0, i), (1, i + 1)] for i in range(7)}, title="Many")
    legend_y = {float(y) for y in re.findall(r'<text x="[\d.]+" y="([\d.]+)" font-size="11">layers', many)}
    assert len(legend_y) >= 2  # seven legend entries wrap onto rows under the title


def test_report_has_the_training_curves(run_dir):
    html = (run_dir / "report.html").read_text()
    for title in ("Loss", "Learning rate", "Gradient norm", "Update / weight ratio per layer group", "Throughput",
                  "Model FLOP utilisation", "Peak memory"):
        assert f'aria-label="{title}"' in html
    loss = html[html.index('aria-label="Loss"'):]
    loss = loss[:loss.index("</svg>")]
    assert loss.count("<circle") == 2  # the two evaluations (steps 3 and 6) as points
    ratio = html[html.index('aria-label="Update / weight ratio'):]
    ratio = ratio[:ratio.index("</svg>")]
    assert "layers.0" in ratio and "tok_embeddings" in ratio and "(log)" in ratio


def test_header_tokens_per_s_is_the_done_line(run_dir):
    done = next(line for line in (run_dir.parent / "stdout.txt").read_text().splitlines() if "done" in line)
    tps, mfu = re.search(r"([\d,]+) tok/s, MFU ([\d.]+)%", done).groups()
    html = (run_dir / "report.html").read_text()
    assert f"<b>{tps}</b><span>tokens/s</span>" in html
    assert f"<b>{mfu}%</b><span>MFU</span>" in html


def test_prediction_shows_its_calibration_and_a_caveat_when_uncalibrated(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    plan = json.loads((run / "plan.json").read_text())
    est = plan["estimate"]
    html = render(run)
    assert "prediction based on" in html and "leantrain.plan.memory" in html
    assert est["mfu_source"].split(":")[0] in html and f"{est['tdp_w']:.4g} W" in html
    assert ("was not calibrated" in html) == (not est["mfu_source"].startswith("measured"))
    est["mfu_source"] = "assumed: not measured by this project"
    (run / "plan.json").write_text(json.dumps(plan))
    assert "This machine was not calibrated" in render(run) and "--calibrate" in render(run)
    est["mfu_source"] = "measured: tiny recipe (2026-11-29)"
    est["mfu_assumed"] = plan["estimate"]["mfu_assumed"]
    (run / "plan.json").write_text(json.dumps(plan))
    assert "was not calibrated" not in render(run)
    del est["mfu_source"]
    (run / "plan.json").write_text(json.dumps(plan))
    assert "does not say which calibration" in render(run)


def test_report_never_replaces_a_file_leantrain_did_not_write(run_dir, tmp_path, capsys):
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    assert cli.main(["report", str(run_dir), "--out", str(mine)]) == 2
    assert "not written by leantrain" in capsys.readouterr().err and mine.read_text() == "<html>my notes</html>"
    ours = tmp_path / "r.html"
    assert cli.main(["report", str(run_dir), "--out", str(ours)]) == 0
    assert cli.main(["report", str(run_dir), "--out", str(ours)]) == 0  # its own page: replaced


@pytest.mark.parametrize("values", [[5], [3, 3, 3], [0, 1, 2, 3], [120, 340, 560, 800, 1000, 990, 130],
                                    list(range(1, 40)), [10, 11, 5000, 20000, 7, 9, 300]])
def test_data_card_histograms_have_no_empty_bin_artefacts(values):
    h = histogram(values)
    edges, counts = h["edges"], h["counts"]
    assert sum(counts) == len(values) and len(counts) == len(edges) - 1
    assert all(isinstance(e, int) for e in edges) and edges == sorted(set(edges))  # integer-aligned bins
    assert edges[0] == min(values) and edges[-1] > max(values)  # from the shortest: no leading empty bins
    assert counts[0] > 0 and counts[-1] > 0
    assert len(counts) <= 1 + math.ceil(math.log2(len(values)))  # bins grow with n, not with the length range
    assert sum(1 for c in counts if c == 0) <= len(counts) // 2


def test_data_card_markdown_lists_the_bins():
    chars_in, chars_out, tokens = [30, 50, 900, 2000], [30, 900], [9, 200]
    edges = length_edges(chars_in, chars_out)
    lengths = {"chars_in": histogram(chars_in, edges), "chars_out": histogram(chars_out, edges),
               "tokens_out": histogram(tokens)}
    assert bin_label(7, 8) == "7" and bin_label(8, 16) == "8-15"
    lines = length_tables(lengths)
    assert "| characters per document | chars in | chars out |" in lines
    assert edges == [30, 1016, 2002]  # 4 documents: 2 bins, not one per power of two from 0
    assert "| 30-1,015 | 3 | 2 |" in lines and "| 1,016-2,001 | 1 | 0 |" in lines
    assert "| 9-104 | 1 |" in lines and "| 105-200 | 1 |" in lines


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


def test_heat_map_colours_around_the_center_and_titles_each_cell():
    svg = heat_map(["L0 e0", "L0 e1"], [10.0, 20.0, 1500.0], [[0.5, 0.0, 1.0], [0.5, float("nan"), 0.0]],
                   title="Expert load", center=0.5)
    cells = re.findall(r'fill="([^"]+)"><title>(L0 e\d) at (\d+): ([^<]+)</title>', svg)
    assert len(cells) == 6
    colour = {(name, int(step)): fill for fill, name, step, _ in cells}
    assert colour["L0 e0", 10] == "rgb(255,255,255)"  # the center is white
    assert colour["L0 e0", 20] == "rgb(0,0,255)"  # nothing routed: full blue
    assert colour["L0 e0", 1500] == "rgb(255,0,0)"  # twice the uniform share or more: full red
    assert colour["L0 e1", 20] == "#ccc"  # not finite: grey
    assert "no data" in heat_map([], [], [], title="Expert load", center=0.5)
