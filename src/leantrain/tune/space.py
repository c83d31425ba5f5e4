"""The search space of a study: `[tune] space` entries read, checked and turned into Optuna suggestions.

An entry is a dotted config key with a range or a list of choices:

    "optim.lr" = [1e-4, 3e-2, "log"]     float on a log scale
    "optim.warmup_steps" = [0, 50]        int (the key's type), uniform
    "model.n_layers" = [2, 6, "int"]      int
    "optim.name" = ["adamw", "muon"]      categorical (any list that is not [low, high] or [low, high, kind])

Every bound and choice is checked as the config file's own value would be (type, range, choices), so a
typo or an impossible range stops the study before any trial runs; combinations that only fail together
(dim not divisible by n_heads) fail their trial, with the reason recorded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from leantrain.config import Config, check_value, field_type, load_config
from leantrain.errors import ConfigError

KINDS = ("log", "linear", "int", "float")


@dataclass(frozen=True)
class Param:
    """One dimension of the space: a float or int range (optionally log-scaled) or a list of choices."""

    key: str
    kind: str  # float, int or categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def spec(self) -> dict[str, Any]:
        """JSON-able identity of the dimension: a study remembers it to refuse a changed space."""
        if self.kind == "categorical":
            return {"key": self.key, "choices": list(self.choices)}
        return {"key": self.key, "kind": self.kind, "low": self.low, "high": self.high, "log": self.log}


def _flatten(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": [..]}} (unquoted dotted keys in TOML) -> {"optim.lr": [..]}."""
    out: dict[str, Any] = {}
    for k, v in space.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _where(key: str) -> str:
    return f"tune.space {json.dumps(key)}"


def _checked(key: str, value: Any, what: str) -> Any:
    """`value` as the config key's own value, or one line naming the space entry."""
    try:
        return check_value(key, value)
    except ConfigError as e:
        detail = str(e).removeprefix("config: ")
        raise ConfigError(f"{_where(key)}: {what} {value!r} does not fit the key ({detail})") from None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def parse_param(key: str, value: Any) -> Param:
    """One space entry, checked; a one-line ConfigError says what is wrong and how to write it."""
    want = field_type(key)
    if want is None or key.startswith("tune."):
        raise ConfigError(f"{_where(key)}: unknown config key {key}; the space takes keys of the other sections "
                          "(`leantrain config --reference` lists them), e.g. \"optim.lr\"")
    if want in (tuple, dict) or key in ("data.path", "train.device"):
        raise ConfigError(f"{_where(key)}: {key} cannot be searched; pick numeric, boolean or named settings")
    if not isinstance(value, list):
        raise ConfigError(f"{_where(key)} = {value!r} is not allowed; expected [low, high], [low, high, \"log\"] "
                          "or a list of choices")
    if not value:
        raise ConfigError(f"{_where(key)} = [] is an empty range; give [low, high] or at least one choice")
    is_range = (len(value) == 2 and all(_is_number(v) for v in value)) or \
        (len(value) == 3 and all(_is_number(v) for v in value[:2]) and isinstance(value[2], str))
    if not is_range:
        if len(value) == 3 and all(_is_number(v) for v in value[:2]) and not _is_number(value[2]):
            raise ConfigError(f"{_where(key)}: the third element {value[2]!r} is not a kind; use one of "
                              f"{', '.join(KINDS)}")
        if len(set(map(json.dumps, value))) != len(value):
            raise ConfigError(f"{_where(key)} = {value!r} repeats a choice; list each once")
        choices = tuple(_checked(key, v, "choice") for v in value)
        return Param(key, "categorical", choices=choices)
    kind = value[2] if len(value) == 3 else ("int" if want is int else "linear")
    if kind not in KINDS:
        raise ConfigError(f"{_where(key)}: kind {kind!r} is not allowed; use one of {', '.join(KINDS)}")
    if want not in (int, float):
        raise ConfigError(f"{_where(key)}: {key} is a {want.__name__} setting, not a number, so it takes a list of "
                          "choices, not a range")
    if want is int and kind == "float":
        raise ConfigError(f"{_where(key)}: {key} is an integer setting; use kind \"int\" or \"log\", not \"float\"")
    as_int = want is int or kind == "int"
    low, high = value[0], value[1]
    if as_int and not all(isinstance(v, int) for v in (low, high)):
        raise ConfigError(f"{_where(key)}: {'an integer range' if want is float else key + ' is an integer setting'}"
                          f" but the bounds are {value[:2]!r}; give whole numbers")
    low, high = _checked(key, low, "lower bound"), _checked(key, high, "upper bound")
    if low >= high:
        word = "empty" if low == high else "inverted"
        raise ConfigError(f"{_where(key)} = {value!r} is an {word} range (low {low} >= high {high}); give "
                          "[low, high] with low < high, or one value as a choice list [value]")
    log = kind == "log"
    if log and low <= 0:
        raise ConfigError(f"{_where(key)}: a log range needs low > 0, not {low}; raise low or drop \"log\"")
    if as_int:
        return Param(key, "int", int(low), int(high), log)
    return Param(key, "float", float(low), float(high), log)


def parse_space(space: dict[str, Any]) -> list[Param]:
    """The whole `[tune] space`, checked; an empty space is an error (there would be nothing to tune)."""
    flat = _flatten(space)
    if not flat:
        raise ConfigError("tune.space is empty; add the keys to search, e.g. [tune] space = { \"optim.lr\" = "
                          "[1e-4, 3e-2, \"log\"] }")
    return [parse_param(k, v) for k, v in flat.items()]


def space_spec(params: list[Param]) -> str:
    """The space as canonical JSON: two configs describe the same study when their specs are equal."""
    return json.dumps(sorted((p.spec() for p in params), key=lambda s: s["key"]), sort_keys=True)


def suggest(trial: Any, params: list[Param]) -> dict[str, Any]:
    """The values an Optuna trial takes for each dimension (param names are the dotted keys)."""
    out: dict[str, Any] = {}
    for p in params:
        if p.kind == "categorical":
            out[p.key] = trial.suggest_categorical(p.key, list(p.choices))
        elif p.kind == "int":
            out[p.key] = trial.suggest_int(p.key, p.low, p.high, log=p.log)
        else:
            out[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log)
    return out


def budget_steps(cfg: Config, tune: Any) -> int:
    """Optimizer steps of one trial of `cfg`: tune.budget_steps, or tune.budget_tokens in whole steps (the
    trial's own batch and sequence length), else cfg's train.steps."""
    if tune.budget_steps:
        return tune.budget_steps
    if tune.budget_tokens:
        per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.model.seq_len
        return max(1, math.ceil(tune.budget_tokens / per_step))
    return cfg.train.steps


def apply_params(base: Config, values: dict[str, Any], *, trial_run: bool = True, threads: int = 0) -> Config:
    """`base` with the trial's values, validated whole (relations included); `[tune]` back at its defaults. For a
    trial run (`trial_run`) the steps are the per-trial budget and the terminal display is off; `threads` (> 0)
    sets train.threads, for workers that share the cores."""
    data = {s: dict(v) for s, v in base.to_dict().items() if s not in ("curation", "tune")}
    for key, value in values.items():
        section, name = key.split(".", 1)
        data[section][name] = value
    cfg = load_config(None, None, data)
    if not trial_run:
        return cfg
    data["train"]["steps"] = budget_steps(cfg, base.tune)
    data["log"]["progress"] = "none"
    if threads:
        data["train"]["threads"] = threads
    return load_config(None, None, data)
