"""train.compile = auto: compile only when the run is long enough to pay the compile back, and say why."""

import json

import pytest

from helpers import tiny_config
from leantrain.config import load_config
from leantrain.train import compile_choice as cc
from leantrain.train.compile_choice import choose_compile, remember_compiled
from leantrain.train.trainer import Trainer


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path / "cache"))


def test_explicit_settings_win():
    cfg = load_config(overrides=["--train.compile=true"])
    assert choose_compile(cfg, "cpu", 1.0, "k").on
    cfg = load_config(overrides=["--train.compile=false"])
    assert not choose_compile(cfg, "cpu", 1e9, "k").on


def test_auto_compiles_a_long_run_and_not_a_short_one():
    cfg = load_config()
    assert cfg.train.compile == "auto"
    if cc.compiler_missing("cpu"):
        pytest.skip("no C++ compiler here: auto is off for that reason")
    short = choose_compile(cfg, "cpu", 90.0, "k")
    assert not short.on and "too short" in short.reason and "--train.compile=true" in short.reason
    # the threshold follows the constants: saving >= PAYBACK x cold compile time
    needed = cc.PAYBACK * cc.COLD_COMPILE_S / cc.EXPECTED_GAIN
    assert choose_compile(cfg, "cpu", needed * 1.01, "k").on
    assert not choose_compile(cfg, "cpu", needed * 0.99, "k").on
    assert not choose_compile(cfg, "cpu", None, "k").on  # no estimate: no gamble


def test_a_warm_cache_lowers_the_bar():
    cfg = load_config()
    if cc.compiler_missing("cpu"):
        pytest.skip("no C++ compiler here")
    run_s = cc.PAYBACK * cc.WARM_COMPILE_S / cc.EXPECTED_GAIN * 1.5  # pays only when the compile is warm
    assert not choose_compile(cfg, "cpu", run_s, "shape-a").on
    remember_compiled("shape-a", 40.0)
    warm = choose_compile(cfg, "cpu", run_s, "shape-a")
    assert warm.on and "warm cache" in warm.reason
    assert not choose_compile(cfg, "cpu", run_s, "shape-b").on  # another shape is still cold


def test_auto_is_off_where_compile_is_not_supported_yet():
    cfg = load_config()
    assert "parallel.tp" in choose_compile(cfg, "cpu", 1e9, "k", tp=2).reason
    assert not choose_compile(cfg, "mps", 1e9, "k").on


def test_a_short_run_records_its_decision(dataset, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(dataset, train__steps=2, train__eval_every=0), run).fit()
    plan = json.loads((run / "plan.json").read_text())
    assert plan["compile"]["on"] is False and plan["compile"]["reason"].startswith("auto: ")
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["message"] for e in events if e["event"] == "compile"] == [plan["compile"]["reason"]]
