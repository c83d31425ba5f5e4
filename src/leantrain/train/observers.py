"""What the loop hands on after each step, and the small meter that turns steps into speed.

`StepResult` is what `Trainer.train_step` did: the loss and gradient norm, the lr it used, the tokens it
consumed, and the guard's verdict when the update was dropped. `StepMeter` times the steps between two
metrics lines (tokens/s, MFU, the fraction spent waiting for data), leaving out what is not a training
step: the first step's compile, skipped steps, evaluation, checkpoints and pauses.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class StopRun(Exception):  # noqa: N818 - a request, not an error
    """Raised by an observer's `on_step` to end the run after this step, checkpointed, as SIGTERM would:
    `fit` returns with summary["stopped"] = `reason` (a tune trial's pruner uses it). One process only: under
    torchrun only rank 0 has observers, and the other ranks would not stop."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class StepResult:
    """One optimizer step. `loss` and `grad_norm` stay on the device (reading them syncs it); the same on
    every rank, so decisions taken from them agree. `verdict` is the guard's reason when the step's update
    (and batch) was dropped; `compile_s` is set on the step that compiled the model."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    tokens: int = 0
    verdict: str | None = None
    grad_norms: dict[str, float] | None = None  # per-block gradient norms on grad-health steps
    update_ratio: dict[str, float] | None = None  # per-block |update| / |weight| on grad-health steps
    compile_s: float | None = None

    @property
    def skipped(self) -> bool:
        return self.verdict is not None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA; on CPU the process's peak resident set.

    On Linux it is VmHWM of this process's own memory map: getrusage's ru_maxrss survives exec, so a
    run started from a big Python process (a notebook, pytest) would report its parent's peak.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepMeter:
    """Speed of the steps since the last metrics line. `reprobe`, when given, is called once if the measured
    rate ever exceeds the peak (a CPU peak probed on busy cores) and returns the new peak FLOP/s."""

    def __init__(self, device: torch.device, flops_per_token: float, peak_flops: float, world_size: int,
                 reprobe: Callable[[], float] | None = None):
        self.device, self.flops_per_token, self.world_size = device, flops_per_token, world_size
        self.peak_flops, self.reprobe = peak_flops, reprobe
        self.run_t0 = self.t0 = time.perf_counter()
        self.data_s = 0.0
        self._reset()

    def _reset(self) -> None:
        self.tokens, self.seconds, self.data_wait_s = 0, 0.0, 0.0

    def start_run(self) -> None:
        self.run_t0 = time.perf_counter()

    def step_starts(self) -> None:
        self.t0 = time.perf_counter()

    def data_ready(self) -> None:
        self.data_s = time.perf_counter() - self.t0

    def restart_clock(self) -> None:
        """Count this step's time from now (after a compile, which is reported on its own)."""
        self.t0 = time.perf_counter()

    def step_done(self, tokens: int) -> None:
        self.tokens += tokens
        self.data_wait_s += self.data_s

    def stop_clock(self) -> None:
        """The step's work is done (the caller has synced the device when it needs exact times)."""
        self.seconds += time.perf_counter() - self.t0

    def read(self) -> dict[str, Any]:
        """The window's speed fields of a metrics line; starts the next window."""
        tps = self.tokens / self.seconds
        if self.reprobe is not None and tps * self.flops_per_token > self.peak_flops * self.world_size:
            reprobe, self.reprobe = self.reprobe, None  # measured again at most once per run
            self.peak_flops = reprobe()
        out = {"tokens_per_s": round(tps, 1),
               "mfu": round(tps * self.flops_per_token / (self.peak_flops * self.world_size), 4),
               "peak_mem_bytes": peak_memory_bytes(self.device),
               "data_wait_frac": round(self.data_wait_s / self.seconds, 5),
               "elapsed_s": round(time.perf_counter() - self.run_t0, 2)}
        self._reset()
        return out
