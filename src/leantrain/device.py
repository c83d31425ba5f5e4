"""What this process trains on, decided in one place: device, dtype, attention kernel, peak FLOP/s, threads.

The trainer and the planner both ask `describe_device` (and the planner, for hardware other than this
machine, the same `choose_dtype` / `choose_attention` rules with the catalog's facts), so a plan and the run
it predicts agree by construction. The hardware catalog is data (`hardware.toml`) read here; nothing in it
imports back.

MFU needs a peak. For known GPUs it comes from the catalog's dense (no sparsity) datasheet figure. For CPUs
there is no trustworthy table, so we measure: a short matmul probe at a transformer-like shape, best of
several windows, with the thread count training will use. The probe takes about a second and is cached per
machine in ~/.cache/leantrain/peak_flops.json (keyed by CPU model, threads, dtype and torch version);
LEANTRAIN_CACHE_DIR moves the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import re
import time
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from leantrain.errors import ConfigError
from leantrain.files import write_durable

# ---- the catalog (data) --------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """One device kind. Memory is what a training process may use (the whole device, or the host's RAM)."""

    key: str
    name: str
    kind: str  # "gpu" or "cpu"
    peak_bf16: float  # FLOP/s
    peak_fp32: float
    memory_bytes: float
    bandwidth_bytes_s: float  # memory bandwidth
    tdp_w: float
    link_bytes_s: float  # collective bandwidth per device inside a node
    node_size: int = 8  # devices that share the fast link
    match: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name that mean this device
    source: str = "datasheet"
    bf16_fast: bool = True  # bf16 compute pays off (every catalog GPU; CPUs with AMX / AVX-512 BF16)
    interconnect: str = ""  # the link between devices of a node, in words
    spec_source: str = ""  # the datasheet the figures above come from
    price_hour_usd: float = 0.0  # on-demand rental per device-hour (0: owned, or no listed price)
    price_source: str = ""  # where and when that price was listed
    matmul_efficiency: float = 0.0  # measured best bf16 matmul / peak_bf16 (0: not measured; the planner's default)
    matmul_source: str = ""  # where that measurement comes from

    def peak(self, dtype: str) -> float:
        return self.peak_bf16 if dtype == "bf16" else self.peak_fp32

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _load_catalog() -> dict[str, Hardware]:
    rows = tomllib.loads(resources.files("leantrain").joinpath("hardware.toml").read_text())
    return {key: Hardware(key=key, **{**row, "match": tuple(row.get("match", ()))}) for key, row in rows.items()}


CATALOG: dict[str, Hardware] = _load_catalog()
DEFAULT_GPU = "a100-80gb"  # the peak and plan of a GPU the catalog does not name


def match_gpu(device_name: str) -> Hardware | None:
    """The catalog entry of a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None. Names match as
    whole words, so an L40S is not an L4 and an A100 is not an A10."""
    for hw in CATALOG.values():
        if any(re.search(rf"(?<!\w){re.escape(m)}(?!\w)", device_name) for m in hw.match):
            return hw
    return None


# ---- this machine ----------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config: train.device = {name!r} but no CUDA device is visible; use cpu or auto")
    return dev


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


@functools.cache
def cpu_flags() -> frozenset[str]:
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def cpu_model() -> str:
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (its affinity mask); hyperthreads slow
    matmul-bound training."""
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    siblings = cores = None
    try:
        for line in _cpuinfo_lines():
            if line.startswith("siblings"):
                siblings = int(line.split(":")[1])
            elif line.startswith("cpu cores"):
                cores = int(line.split(":")[1])
            if siblings and cores:
                break
    except ValueError:
        pass
    if siblings and cores and siblings > cores:
        return max(1, avail * cores // siblings)
    return max(1, avail)


def choose_threads(requested: int, local_world_size: int = 1) -> int:
    """Intra-op threads of one process: `requested` (train.threads) when set, else the physical cores
    available to this process divided by the processes sharing the host (two processes that each take
    every core ran ~12x slower here)."""
    return requested or max(1, physical_cores() // max(1, local_world_size))


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays off on CPUs with AMX or AVX-512 BF16 and on GPUs that support it natively."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def choose_dtype(requested: str, bf16_fast: bool) -> str:
    """precision.dtype: `auto` is bf16 where bf16 is fast, else fp32 ("bf16" or "fp32")."""
    if requested in ("fp32", "bf16"):
        return requested
    return "bf16" if bf16_fast else "fp32"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype precision.dtype = `name` means on `device`."""
    fast = name == "auto" and bf16_is_fast(device)
    return torch.bfloat16 if choose_dtype(name, fast) == "bf16" else torch.float32


MATMUL_ATTENTION_MAX_SEQ = 512


def choose_attention(requested: str, device_type: str, dtype: str, seq_len: int) -> str:
    """train.attention: `auto` is matmul attention for bf16 on CPU at short contexts (it beat the flash kernel
    ~2x there), SDPA everywhere else (GPUs, fp32, long contexts where [T, T] scores cost memory)."""
    if requested != "auto":
        return requested
    short = seq_len <= MATMUL_ATTENTION_MAX_SEQ
    return "matmul" if device_type == "cpu" and dtype == "bf16" and short else "sdpa"


def available_memory(device: torch.device) -> tuple[float, str]:
    """(bytes a new allocation may take now, where the number came from): free device memory on CUDA,
    MemAvailable on the CPU."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0]), f"free memory of {torch.cuda.get_device_name(device)}"
    avail = meminfo("MemAvailable")
    if avail is None:
        avail = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    return avail, "MemAvailable of this host"


def meminfo(field: str) -> float | None:
    """A /proc/meminfo field in bytes, or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ---- peak FLOP/s ------------------------------------------------------------------------------


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
_PEAKS: dict[tuple[str, str], float] = {}  # this process's answers: the planner and the trainer read one number


def peak_flops(device: torch.device, dtype: torch.dtype, refresh: bool = False) -> tuple[float, str]:
    """(peak FLOP/s, where the number came from) for MFU.

    A CPU probe can read low when other work shares the cores, so the cache keeps the best of
    all probes for this machine, re-probes after a week, and `refresh=True` (the trainer asks
    when it measures more than the peak) probes again at once.
    """
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        hw = match_gpu(name)
        if hw is not None:
            return hw.peak(kind), f"table:{hw.key}"
        return CATALOG[DEFAULT_GPU].peak(kind), f"table:unknown GPU {name!r}, assumed A100"
    key = f"{cpu_model()}|threads={torch.get_num_threads()}|{kind}|torch={torch.__version__}"
    path = _cache_file()
    source = "probe:matmul 4096x384x1536 (best seen)"
    if not refresh and (str(path), key) in _PEAKS:
        return _PEAKS[str(path), key], source
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
            write_durable(path, json.dumps(cache, indent=1))
        except OSError:
            pass  # an unwritable cache only costs a re-probe next time
    _PEAKS[str(path), key] = entry["flops"]
    return entry["flops"], source


# ---- the answer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """What one training process runs on and how: the facts the trainer uses and the planner predicts with."""

    device: torch.device
    name: str  # the CUDA device's name or the CPU model
    dtype: torch.dtype
    attention: str  # "sdpa" or "matmul"
    threads: int  # intra-op threads of this process
    peak_flops: float  # per device, at `dtype`
    peak_source: str
    bf16_fast: bool
    hardware: Hardware | None = None  # the catalog row of a GPU (None for a CPU or a GPU the catalog lacks)

    @property
    def dtype_name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def to_dict(self) -> dict[str, Any]:
        return {"device": str(self.device), "name": self.name, "dtype": self.dtype_name, "attention": self.attention,
                "threads": self.threads, "peak_flops": self.peak_flops, "peak_flops_source": self.peak_source}


def describe_device(device: str | torch.device = "auto", dtype: str = "auto", attention: str = "auto",
                    seq_len: int = 0, threads: int = 0, local_world_size: int = 1,
                    measure_peak: bool = True) -> DeviceInfo:
    """Decide everything about how this process computes (train.device, precision.dtype, train.attention,
    model.seq_len, train.threads, processes on this host).

    On the CPU it also sets torch's intra-op thread count, before the peak is probed with it (the peak is
    keyed by thread count). `measure_peak=False` skips the CPU probe (peak 0): ranks other than 0 take
    rank 0's number instead of probing all at once. Machine facts and the probe are cached, so asking
    again is cheap and gives the same answer.
    """
    dev = pick_device(device) if isinstance(device, str) else device
    n_threads = torch.get_num_threads()
    if dev.type == "cpu":
        n_threads = choose_threads(threads, local_world_size)
        torch.set_num_threads(n_threads)
    fast = bf16_is_fast(dev)
    dtype_name = choose_dtype(dtype, fast)
    torch_dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    kernel = choose_attention(attention, dev.type, dtype_name, seq_len)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        hw = match_gpu(name)
    else:
        name, hw = cpu_model(), None
    peak, source = peak_flops(dev, torch_dtype) if measure_peak or dev.type == "cuda" else (0.0, "not measured")
    return DeviceInfo(dev, name, torch_dtype, kernel, n_threads, peak, source, fast, hw)
