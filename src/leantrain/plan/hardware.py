"""What the device can do: which device to use, whether bf16 is fast on it, and its peak FLOP/s.

MFU needs a peak. For known GPUs it comes from the vendor's dense (no sparsity) tensor-core
figure. For CPUs there is no trustworthy table, so we measure: a short matmul probe at a
transformer-like shape, best of several windows, with the thread count training will use. The
probe takes about a second and is cached per machine in ~/.cache/leantrain/peak_flops.json
(keyed by CPU model, threads, dtype and torch version); LEANTRAIN_CACHE_DIR moves the cache.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from leantrain.errors import ConfigError
from leantrain.plan.catalog import CATALOG, match_gpu


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config: train.device = {name!r} but no CUDA device is visible; use cpu or auto")
    return dev


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Physical cores visible to this process; hyperthreads slow matmul-bound training."""
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        siblings = cores = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("siblings"):
                siblings = int(line.split(":")[1])
            elif line.startswith("cpu cores"):
                cores = int(line.split(":")[1])
            if siblings and cores:
                break
        if siblings and cores and siblings > cores:
            return max(1, avail * cores // siblings)
    except (OSError, ValueError):
        pass
    return max(1, avail)


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays off on CPUs with AMX or AVX-512 BF16 and on GPUs that support it natively."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = cpu_flags()
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def _cache_file() -> Path:
    root = Path(os.environ.get("LEANTRAIN_CACHE_DIR", Path.home() / ".cache" / "leantrain"))
    return root / "peak_flops.json"


def probe_cpu_peak(dtype: torch.dtype, seconds: float = 0.6) -> float:
    """Best FLOP/s of a matmul shaped like a transformer MLP (4096x384 @ 384x1536)."""
    m, k, n = 4096, 384, 1536
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * m * k * n / (time.perf_counter() - t0))
    return best


PEAK_CACHE_MAX_AGE_S = 7 * 24 * 3600


def peak_flops(device: torch.device, dtype: torch.dtype, refresh: bool = False) -> tuple[float, str]:
    """(peak FLOP/s, where the number came from) for MFU.

    A CPU probe can read low when other work shares the cores, so the cache keeps the best of
    all probes for this machine, re-probes after a week, and `refresh=True` (the trainer asks
    when it measures more than the peak) probes again at once.
    """
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        hw = match_gpu(name)  # the planner's catalog: datasheet dense bf16 / fp32 peaks
        if hw is not None:
            return hw.peak(kind), f"table:{hw.key}"
        return CATALOG["a100-80gb"].peak(kind), f"table:unknown GPU {name!r}, assumed A100"
    key = f"{cpu_model()}|threads={torch.get_num_threads()}|{kind}|torch={torch.__version__}"
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if not isinstance(entry, dict):  # missing, or the format of an older version
        entry = None
    if refresh or entry is None or time.time() - entry["time"] > PEAK_CACHE_MAX_AGE_S:
        best = max(probe_cpu_peak(dtype), entry["flops"] if entry else 0.0)
        entry = cache[key] = {"flops": best, "time": time.time()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # an unwritable cache only costs a re-probe next time
    return entry["flops"], "probe:matmul 4096x384x1536 (best seen)"
