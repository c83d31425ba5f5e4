"""Whether a run compiles its model: `train.compile = auto` (the default) compiles when the run is long
enough to pay back the compile, and says why either way.

torch.compile makes a training step faster (on the reference model on a 2-core AMD EPYC: 0.85-0.90x the
step time; more where AMX or a GPU makes matmuls cheap and the rest of the step dominates), but the
first step compiles for about a minute on a 2-core CPU, less when Inductor's on-disk cache already
holds this model's kernels. A short run (the demo, a test, a smoke run) loses time to it, a long one
gains. `auto` compiles when the planner's estimate of the run's eager time, times the expected gain,
is at least PAYBACK times the expected compile time. The cache lives in leantrain's own cache folder
(TORCHINDUCTOR_CACHE_DIR, when the user has not set one), so it survives /tmp being cleared; a small
marker per model shape and layout records that a compile has succeeded before, which tells the next
run its compile will be warm.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from leantrain.config import Config, compile_mode
from leantrain.files import write_text_durable

# measured on the reference model (recipe small, 2-core AMD EPYC): eager 3,116 -> compiled 3,680 tok/s (2026-11-29),
# 2,233 -> 2,563 and 2,971 -> 3,312 (2026-12-03): 10-15% of the eager step
EXPECTED_GAIN = 0.15  # the share of eager step time compile saves
COLD_COMPILE_S = 60.0  # first compile of a model on 2 CPU cores (45-75 s measured)
WARM_COMPILE_S = 15.0  # the same with Inductor's cache holding its kernels
PAYBACK = 2.0  # compile only when it should save at least twice what it costs


@dataclass(frozen=True)
class CompileChoice:
    on: bool
    reason: str
    key: str = ""  # the model shape and layout this choice was made for (names the warm-cache marker)

    def as_dict(self) -> dict[str, object]:
        return {"on": self.on, "reason": self.reason}


def cache_root() -> Path:
    """leantrain's cache folder: $LEANTRAIN_CACHE, else $XDG_CACHE_HOME/leantrain, else ~/.cache/leantrain."""
    if os.environ.get("LEANTRAIN_CACHE"):
        return Path(os.environ["LEANTRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "leantrain"


def use_persistent_cache() -> None:
    """Point Inductor's on-disk cache at leantrain's cache folder unless the user chose one (it defaults to
    /tmp, which many machines clear at boot)."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")


def compile_key(cfg: Config, device_type: str, dtype: torch.dtype, strategy: str) -> str:
    """What a compiled graph depends on: the model's shape, micro-batch, dtype, layout, device and torch."""
    parts = {"model": {k: str(v) for k, v in vars(cfg.model).items()}, "mb": cfg.train.micro_batch_size,
             "dtype": str(dtype), "layout": strategy, "device": device_type, "torch": torch.__version__,
             "ac": cfg.train.activation_checkpointing}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _marker(key: str) -> Path:
    return cache_root() / "compiled" / key


def seen_before(key: str) -> bool:
    return _marker(key).is_file()


def remember_compiled(key: str, seconds: float) -> None:
    """Record that this shape compiled (so the next run expects a warm cache); a cache that cannot be
    written costs only the next run's estimate."""
    try:
        _marker(key).parent.mkdir(parents=True, exist_ok=True)
        write_text_durable(_marker(key), f"{seconds:.1f}\n")
    except OSError:
        pass


def compiler_missing(device_type: str) -> str | None:
    """Why torch.compile cannot build kernels on this machine, or None."""
    if device_type == "cpu":
        cxx = os.environ.get("CXX") or "g++"
        if not (shutil.which(cxx) or shutil.which("c++") or shutil.which("clang++")):
            return "no C++ compiler found (Inductor builds CPU kernels with one; install g++)"
    elif device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (Inductor builds GPU kernels with it)"
    else:
        return f"torch.compile is not used on {device_type}"
    return None


def choose_compile(cfg: Config, device_type: str, eager_run_s: float | None, key: str, *, tp: int = 1,
                   ep: int = 1) -> CompileChoice:
    """The decision for `train.compile` (true, false or auto) and the one-line reason shown at the start."""
    mode = compile_mode(cfg.train.compile)
    if mode == "true":
        return CompileChoice(True, "train.compile = true", key)
    if mode == "false":
        return CompileChoice(False, "train.compile = false", key)
    why_not = compiler_missing(device_type)
    if why_not:
        return CompileChoice(False, f"auto: {why_not}", key)
    if tp > 1 or ep > 1:
        return CompileChoice(False, f"auto: not with parallel.{'tp' if tp > 1 else 'ep'} > 1 yet", key)
    if eager_run_s is None:
        return CompileChoice(False, "auto: no time estimate for this run", key)
    warm = seen_before(key)
    cost = WARM_COMPILE_S if warm else COLD_COMPILE_S
    saving = eager_run_s * EXPECTED_GAIN
    on = saving >= PAYBACK * cost
    how = (f"run ~{_minutes(eager_run_s)} eager, compile saves ~{_minutes(saving)}, costs ~{cost:.0f} s "
           f"({'warm' if warm else 'cold'} cache)")
    if on:
        return CompileChoice(True, f"auto: {how}", key)
    return CompileChoice(False, f"auto: {how}; too short to pay back (--train.compile=true forces it)", key)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
