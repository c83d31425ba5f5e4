"""Power meters: what this process's device drew, in joules, since the meter was opened.

Three sources, best first:

* RAPL (Intel, and AMD on recent kernels) through the powercap sysfs tree: the CPU packages'
  `intel-rapl:N` zones plus their `dram` subzones (`core`/`uncore` subzones lie inside the package and
  are not added again). It measures the whole socket, every process on it, so it is a per-host figure.
  The counters wrap at `max_energy_range_uj` (minutes at full load), so an open meter is read every
  10 s in a background thread. `energy_uj` is readable only by root on kernels since 2020 (a side
  channel fix); without permission the meter is unavailable and `auto` falls back.
* NVML (NVIDIA, the `nvidia-ml-py` extra): the GPU's total-energy counter (Volta and later, mJ), or
  where the driver lacks it, the power draw sampled every 0.1 s and integrated.
* estimate, when nothing can be read (VMs, containers, laptops without permission):
    CPU:  P = TDP x (f_idle + (1 - f_idle) x u),   u = d(process CPU time) / (d(wall time) x n_cpus)
          TDP = energy.tdp_w, or 3.5 W x n_cpus (logical CPUs) and f_idle = 0.2 -- the per-vCPU
          maximum (3.5 W) and minimum (0.74 W) of the Cloud Carbon Footprint methodology's averages.
          The process part (TDP x (1 - f_idle) x u) is this process's; the idle floor is the host's.
    GPU:  P = TDP, the whole time: energy.tdp_w, or NVML's power limit, or the board power of a
          known GPU (else 300 W) -- an upper bound, since training keeps a GPU near its limit.
  Disks and network are not included. Every figure from it is labelled "estimate".

Memory (RAM) power is added to every meter but RAPL with a DRAM zone (which measures it), as CodeCarbon
3.3.2 counts it (codecarbon/external/ram.py, `RAM._calculate_ram_power`, tracking_mode "machine"): the
DIMMs are guessed from the host's installed memory (GB of 2^30 bytes: <= 2 -> 1, <= 16 -> 2, <= 64 -> 4,
<= 128 -> 8, larger -> ceil(GB / the largest of 128/64/32/16/8/4 GB that is <= GB/8), at most 32),
5 W each on x86 (1.5 W on ARM), the 5th-8th DIMM at 90%, the 9th-16th at 80%, the rest at 70%, at least
2 DIMMs' worth on x86 (3 W on ARM). It draws the whole time, so it is a per-host part. `energy.ram_w`
replaces the rule with a figure of your own.

A meter's `read()` returns (process joules, host joules), cumulative: the accountant scales the
first by the number of processes of the job and the second by the number of hosts.
"""

from __future__ import annotations

import math
import os
import platform
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leantrain.errors import ConfigError

CPU_W_PER_THREAD = 3.5
CPU_IDLE_FRACTION = 0.2
GPU_DEFAULT_W = 300.0
# board power (W) of GPUs the estimate may meet without NVML; more specific names first (substring match)
GPU_TDP_W = {"B200": 1000.0, "H200": 700.0, "H100 PCIe": 350.0, "H100": 700.0, "MI300X": 750.0, "A100": 400.0,
             "L40S": 350.0, "L4": 72.0, "A10": 150.0, "RTX 5090": 575.0, "RTX 4090": 450.0, "RTX 3090": 350.0,
             "V100": 300.0, "T4": 70.0}

_ZONE = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")

RAM_W_PER_DIMM_X86 = 5.0  # CodeCarbon 3.3.2 RAM_SLOT_POWER_X86
RAM_W_PER_DIMM_ARM = 1.5
RAM_RULE = "CodeCarbon 3.3.2 rule: 5 W per DIMM (x86), DIMMs guessed from installed memory"


def dimm_count(total_gb: float) -> int:
    """DIMMs CodeCarbon 3.3.2 assumes for `total_gb` of installed memory (`RAM._estimate_dimm_count`)."""
    if total_gb <= 2:
        return 1
    if total_gb <= 16:
        return 2
    if total_gb <= 64:
        return 4
    if total_gb <= 128:
        return 8
    for size in (128, 64, 32, 16, 8, 4):
        if size <= total_gb / 8:
            return min(math.ceil(total_gb / size), 32)
    return 8


def ram_power_w(total_bytes: float, arm: bool = False) -> float:
    """Memory power in W of a host with `total_bytes` installed, by CodeCarbon 3.3.2's rule (module docstring)."""
    n = dimm_count(total_bytes / 2**30)
    per = RAM_W_PER_DIMM_ARM if arm else RAM_W_PER_DIMM_X86
    tiers = ((4, 1.0), (4, 0.9), (8, 0.8), (math.inf, 0.7))  # DIMMs at each marginal power
    watts, left = 0.0, n
    for count, factor in tiers:
        take = min(left, count)
        watts += per * factor * take
        left -= take
    return max(3.0 if arm else 2 * per, watts)


def host_memory_bytes() -> float:
    """Installed memory of this host (MemTotal, what psutil.virtual_memory().total reports)."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def is_arm() -> bool:
    return any(a in platform.machine().lower() for a in ("arm", "aarch"))


class MeterUnavailable(Exception):
    """This meter cannot be read here; the message says why (and `auto` tries the next one)."""


class RaplMeter:
    """CPU package + DRAM energy from /sys/class/powercap (see the module docstring)."""

    source = "rapl"
    poll_s: float | None = 10.0

    def __init__(self, root: str | Path = "/sys/class/powercap"):
        self.root = Path(root)
        self.domains = self._find(self.root)
        if not self.domains:
            raise MeterUnavailable(f"no RAPL package zones under {self.root}")
        self._lock = threading.Lock()
        self._last = [self._raw(path) for path, _, _ in self.domains]
        self._total_uj = 0

    @staticmethod
    def _find(root: Path) -> list[tuple[Path, str, int]]:
        """(zone folder, name, wrap range) of each counted zone. The top level of the real tree links
        every zone and subzone; a zone's folder also holds its subzones: both layouts are read."""
        zones: dict[str, Path] = {}
        try:
            tops = [p for p in root.iterdir() if _ZONE.match(p.name)]
        except OSError:
            return []
        for p in tops:
            zones.setdefault(p.name, p)
            for sub in p.iterdir() if p.is_dir() else ():
                if _ZONE.match(sub.name):
                    zones.setdefault(sub.name, sub)
        out = []
        for zid in sorted(zones):
            path = zones[zid]
            try:
                name = (path / "name").read_text().strip()
                wrap = int((path / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            subzone = _ZONE.match(zid).group(2) is not None
            if (not subzone and name.startswith("package")) or (subzone and name == "dram"):
                out.append((path, f"{zid} ({name})", wrap))
        return out

    @staticmethod
    def _raw(path: Path) -> int:
        try:
            return int((path / "energy_uj").read_text())
        except PermissionError:
            raise MeterUnavailable(f"{path / 'energy_uj'} is readable only by root; allow it with "
                                   f"`sudo chmod a+r {path.parent}/intel-rapl:*/energy_uj` "
                                   "(until reboot) or use energy.meter = estimate") from None
        except (OSError, ValueError) as e:
            raise MeterUnavailable(f"cannot read {path / 'energy_uj'}: {e}") from None

    def read(self) -> tuple[float, float]:
        with self._lock:
            for i, (path, _, wrap) in enumerate(self.domains):
                raw = self._raw(path)
                delta = raw - self._last[i]
                if delta < 0:  # the counter passed max_energy_range_uj and started again at 0
                    delta += wrap
                self._total_uj += delta
                self._last[i] = raw
            return 0.0, self._total_uj / 1e6

    @property
    def has_dram(self) -> bool:
        return any(name.endswith("(dram)") for _, name, _ in self.domains)

    @property
    def counted(self) -> str:
        return "CPU packages + DRAM (RAPL)" if self.has_dram else "CPU packages (RAPL)"

    def describe(self) -> dict[str, Any]:
        return {"domains": [name for _, name, _ in self.domains], "scope": "host (all processes on the sockets)"}


def _nvml():
    try:
        import pynvml
    except ImportError:
        raise MeterUnavailable("nvidia-ml-py is not installed (pip install 'leantrain[energy]')") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise MeterUnavailable(f"NVML does not initialise ({e})") from None
    return pynvml


def nvml_handle(pynvml, index: int, uuid: str | None = None):
    """The NVML handle of CUDA device `index`: by its UUID when known (CUDA and NVML may number GPUs
    differently), else through CUDA_VISIBLE_DEVICES, else by index."""
    if uuid:
        for u in (uuid, f"GPU-{uuid}"):
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(u)
            except pynvml.NVMLError:
                pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    try:
        if index < len(visible):
            v = visible[index]
            return pynvml.nvmlDeviceGetHandleByIndex(int(v)) if v.isdigit() else pynvml.nvmlDeviceGetHandleByUUID(v)
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except pynvml.NVMLError as e:
        raise MeterUnavailable(f"NVML has no GPU {index} ({e})") from None


def nvml_power_limit_w(index: int, uuid: str | None = None) -> float | None:
    """The GPU's enforced power limit in W, or None where NVML cannot tell."""
    try:
        pynvml = _nvml()
        return pynvml.nvmlDeviceGetEnforcedPowerLimit(nvml_handle(pynvml, index, uuid)) / 1000.0
    except Exception:  # noqa: BLE001 - any NVML trouble: no figure
        return None


class NvmlMeter:
    """One NVIDIA GPU's energy: the total-energy counter, else integrated power samples."""

    source = "nvml"

    def __init__(self, index: int = 0, uuid: str | None = None, clock: Callable[[], float] = time.monotonic):
        self.pynvml = _nvml()
        self.handle = nvml_handle(self.pynvml, index, uuid)
        self.index, self.clock = index, clock
        self._lock = threading.Lock()
        self._total_j = 0.0
        try:
            self._last = self.pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.mode, self.poll_s = "energy counter", None
        except self.pynvml.NVMLError:
            try:
                self._last_w = self.pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
            except self.pynvml.NVMLError as e:
                raise MeterUnavailable(f"GPU {index} reports neither energy nor power ({e})") from None
            self._last_t = clock()
            self.mode, self.poll_s = "sampled power", 0.1

    def read(self) -> tuple[float, float]:
        with self._lock:
            if self.mode == "energy counter":
                raw = self.pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
                delta = raw - self._last if raw >= self._last else raw  # a driver reload restarts it
                self._total_j += delta / 1000.0
                self._last = raw
            else:
                w, t = self.pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0, self.clock()
                self._total_j += (w + self._last_w) / 2 * (t - self._last_t)
                self._last_w, self._last_t = w, t
            return self._total_j, 0.0

    counted = "GPU (NVML)"

    def describe(self) -> dict[str, Any]:
        return {"gpu": self.index, "mode": self.mode, "scope": "this process's GPU"}


class EstimateMeter:
    """Energy from TDP and measured CPU utilisation (see the module docstring for the formula)."""

    source = "estimate"
    poll_s: float | None = None

    def __init__(self, device_type: str = "cpu", tdp_w: float = 0.0, *, cpus: int | None = None,
                 gpu_name: str = "", gpu_limit_w: float | None = None,
                 clock: Callable[[], float] = time.monotonic, cpu_time: Callable[[], float] = time.process_time):
        self.device_type = device_type
        self.cpus = cpus or os.cpu_count() or 1
        self.clock, self.cpu_time = clock, cpu_time
        if device_type == "cuda":
            known = next((w for k, w in GPU_TDP_W.items() if k.lower() in gpu_name.lower()), None)
            self.tdp_w = tdp_w or gpu_limit_w or known or GPU_DEFAULT_W
            self.tdp_from = "energy.tdp_w" if tdp_w else ("NVML power limit" if gpu_limit_w else
                                                          (f"{gpu_name} board power" if known else "default"))
        else:
            self.tdp_w = tdp_w or CPU_W_PER_THREAD * self.cpus
            self.tdp_from = "energy.tdp_w" if tdp_w else f"{CPU_W_PER_THREAD} W x {self.cpus} CPUs"
        self._t, self._c = clock(), cpu_time()
        self._proc_j = self._host_j = 0.0

    def read(self) -> tuple[float, float]:
        t, c = self.clock(), self.cpu_time()
        wall, busy = max(t - self._t, 0.0), max(c - self._c, 0.0)
        self._t, self._c = t, c
        if self.device_type == "cuda":
            self._proc_j += self.tdp_w * wall
        else:
            self._proc_j += self.tdp_w * (1 - CPU_IDLE_FRACTION) * min(busy / self.cpus, wall)
            self._host_j += self.tdp_w * CPU_IDLE_FRACTION * wall
        return self._proc_j, self._host_j

    @property
    def counted(self) -> str:
        return "GPU (estimate at TDP)" if self.device_type == "cuda" else "CPU (estimate from TDP and utilisation)"

    def describe(self) -> dict[str, Any]:
        if self.device_type == "cuda":
            formula = "P = TDP while training (upper bound)"
        else:
            formula = (f"P = TDP x ({CPU_IDLE_FRACTION} + {1 - CPU_IDLE_FRACTION:.1f} x process CPU time / "
                       "(wall time x CPUs))")
        return {"tdp_w": self.tdp_w, "tdp_from": self.tdp_from, "formula": formula}


class WithRam:
    """A meter plus the host's memory power: `ram_w` x wall time since opening, added to the host part."""

    def __init__(self, inner: RaplMeter | NvmlMeter | EstimateMeter, ram_w: float, ram_from: str,
                 clock: Callable[[], float] = time.monotonic):
        self.inner, self.ram_w, self.ram_from, self.clock = inner, ram_w, ram_from, clock
        self.source, self.poll_s = inner.source, inner.poll_s
        self._t0 = clock()

    @property
    def counted(self) -> str:
        return f"{self.inner.counted} + RAM {self.ram_w:g} W ({self.ram_from})"

    def ram_j(self) -> float:
        return self.ram_w * max(self.clock() - self._t0, 0.0)

    def read(self) -> tuple[float, float]:
        proc, host = self.inner.read()
        return proc, host + self.ram_j()

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "ram_w": self.ram_w, "ram_from": self.ram_from}


Meter = RaplMeter | NvmlMeter | EstimateMeter | WithRam


def with_ram(meter: RaplMeter | NvmlMeter | EstimateMeter, ram_w: float = 0.0) -> Meter:
    """`meter` with the host's memory power added (`ram_w`, or 0 for CodeCarbon's rule), unless it is
    RAPL with a DRAM zone, which measures memory already."""
    if isinstance(meter, RaplMeter) and meter.has_dram:
        return meter
    if ram_w:
        return WithRam(meter, ram_w, "energy.ram_w")
    total = host_memory_bytes()
    return WithRam(meter, ram_power_w(total, is_arm()), f"{RAM_RULE}; {total / 2**30:.1f} GB here")


def open_meter(kind: str, device_type: str = "cpu", device_index: int = 0, *, rapl_root: str = "/sys/class/powercap",
               tdp_w: float = 0.0, gpu_uuid: str | None = None, gpu_name: str = "",
               ram_w: float = 0.0) -> tuple[Meter, list[str]]:
    """The meter for `kind` (auto, rapl, nvml, estimate) on this device, with memory power added
    (`with_ram`), and why better ones were passed over.

    `auto` reads the device that trains: on a GPU, NVML; on the CPU, RAPL; else it estimates. An explicit
    kind that cannot be read is a ConfigError, since the user asked for a measurement.
    """
    reasons: list[str] = []
    tries = {"auto": ["nvml"] if device_type == "cuda" else ["rapl"], "rapl": ["rapl"], "nvml": ["nvml"],
             "estimate": []}[kind]
    for t in tries:
        try:
            if t == "rapl":
                return with_ram(RaplMeter(rapl_root), ram_w), reasons
            return with_ram(NvmlMeter(device_index, gpu_uuid), ram_w), reasons
        except MeterUnavailable as e:
            if kind != "auto":
                raise ConfigError(f"config: energy.meter = {kind!r} but {e}; fix that or set energy.meter = auto "
                                  "(falls back to an estimate)") from None
            reasons.append(f"{t}: {e}")
    limit = nvml_power_limit_w(device_index, gpu_uuid) if device_type == "cuda" and not tdp_w else None
    return with_ram(EstimateMeter(device_type, tdp_w, gpu_name=gpu_name, gpu_limit_w=limit), ram_w), reasons
