"""Config: defaults, recipes, overrides, validation messages, TOML round trip."""

import pytest

from leantrain.config import Config, describe, load_config, parse_overrides, recipe_names, to_toml
from leantrain.errors import ConfigError


def test_defaults_and_recipe_and_override_order(tmp_path):
    assert {"tiny", "small"} <= set(recipe_names())
    cfg = load_config(recipe="small")
    assert (cfg.model.n_layers, cfg.model.dim) == (6, 384)
    f = tmp_path / "c.toml"
    f.write_text("[model]\nn_layers = 3\n[train]\nsteps = 7\n")
    cfg = load_config(f, recipe="small", overrides=["--train.steps=9", "--precision.dtype=fp32"])
    assert cfg.model.n_layers == 3  # file over recipe
    assert cfg.model.dim == 384  # recipe over default
    assert cfg.train.steps == 9  # override over file
    assert cfg.precision.dtype == "fp32"  # a bare word parses as a string


def test_toml_round_trip_and_hash(tmp_path):
    cfg = load_config(recipe="tiny", overrides=["--optim.lr=0.01", "--train.sample_prompt=x = \"a\""])
    f = tmp_path / "r.toml"
    f.write_text(to_toml(cfg))
    again = load_config(f)
    assert again == cfg and again.hash() == cfg.hash()
    assert load_config(overrides=["--train.seed=2"]).hash() != Config().hash()


@pytest.mark.parametrize("override, words", [
    ("--train.steps=-1", ["train.steps", "-1", "integer >= 1"]),
    ("--train.stepz=3", ["unknown key train.stepz", "steps"]),
    ("--optim.schedule=linear", ["optim.schedule", "'linear'", "cosine, wsd, constant"]),
    ("--precision.dtype=fp16", ["precision.dtype", "fp32, bf16"]),
    ("--train.compile=yes", ["train.compile", "true or false"]),
    ("--optim.lr=0", ["optim.lr", "> 0.0"]),
    ("--model.n_layers=2.5", ["model.n_layers", "2.5", "integer"]),
    ("--model.dim=250", ["model.dim = 250", "n_heads"]),
    ("--model.n_kv_heads=3", ["n_kv_heads = 3", "divides n_heads"]),
    ("--modle.dim=3", ["unknown section [modle]"]),
    ("--train.device=tpu", ["train.device", "cuda:N"]),
    ("train.steps", ["--section.field=value"]),
])
def test_errors_name_key_value_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(recipe="tiny", overrides=[override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown recipe 'huge'"):
        load_config(recipe="huge")


def test_override_parsing_types():
    ov = parse_overrides(["--train.steps=5", "--optim.lr=1e-3", "--train.compile=true", "--data.path=a/b"])
    assert ov == {"train": {"steps": 5, "compile": True}, "optim": {"lr": 1e-3}, "data": {"path": "a/b"}}


def test_reference_covers_required_fields():
    keys = {row[0] for row in describe()}
    required = """model.n_layers model.dim model.n_heads model.n_kv_heads model.seq_len model.vocab_size
    train.steps train.micro_batch_size train.grad_accum_steps train.seed train.eval_every train.eval_steps
    optim.name optim.lr optim.weight_decay optim.warmup_steps optim.schedule precision.dtype
    checkpoint.every checkpoint.keep data.path log.every""".split()
    assert set(required) <= keys


def test_readme_reference_matches_config():
    from pathlib import Path

    from leantrain.config import reference_markdown

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert reference_markdown() in readme, "stale README reference: run `leantrain config --reference --markdown`"
    assert len(describe()) > 40
