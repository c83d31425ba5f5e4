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
    ("--train.steps=-1", ["train.steps", "-1", "integer in [1, 10^12]"]),
    ("--train.stepz=3", ["unknown key train.stepz", "steps"]),
    ("--optim.schedule=linear", ["optim.schedule", "'linear'", "cosine, wsd, constant"]),
    ("--precision.dtype=fp16", ["precision.dtype", "fp32, bf16"]),
    ("--train.compile=yes", ["train.compile", "auto, true, false"]),
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
    assert ov == {"train": {"steps": 5, "compile": "true"}, "optim": {"lr": 1e-3}, "data": {"path": "a/b"}}


def test_overrides_are_typed_by_the_field_not_guessed():
    """`--data.path=2024-06-01` is a path, not a TOML date; `--optim.lr=1` a float; quotes, spaces and `=` survive."""
    cfg = load_config(recipe="tiny", overrides=["--data.path=2024-06-01", "--optim.lr=1", "--train.compile=1",
                                                "--train.sample_prompt=a = b c", "--train.init_from=\"with space/x=y\"",
                                                "--energy.deadline=2025-06-01T08:00:00Z", "--train.steps=1_000"])
    assert cfg.data.path == "2024-06-01" and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.compile == "true" and cfg.train.sample_prompt == "a = b c"
    assert cfg.train.init_from == "with space/x=y" and cfg.train.steps == 1000
    assert cfg.energy.deadline == "2025-06-01T08:00:00Z"
    assert load_config(overrides=["--train.compile=FALSE"]).train.compile == "false"
    with pytest.raises(ConfigError, match="train.compile = 'yes'"):
        load_config(overrides=["--train.compile=yes"])


@pytest.mark.parametrize("override", ["--optim.lr=nan", "--guard.sigma=inf", "--energy.pue=-inf",
                                      "--finetune.lora_alpha=nan", "--train.grad_clip=inf"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match="finite number"):
        load_config(overrides=[override])


def test_config_file_that_is_a_folder_or_not_utf8(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes("[train]\nsample_prompt = \"café\"\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_reference_covers_required_fields():
    keys = {row[0] for row in describe()}
    required = """model.n_layers model.dim model.n_heads model.n_kv_heads model.seq_len model.vocab_size
    train.steps train.micro_batch_size train.grad_accum_steps train.seed train.eval_every train.eval_steps
    optim.name optim.lr optim.weight_decay optim.warmup_steps optim.schedule precision.dtype
    checkpoint.every checkpoint.keep data.path log.every""".split()
    assert set(required) <= keys

