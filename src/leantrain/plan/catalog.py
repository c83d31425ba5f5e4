"""The hardware the planner knows: peak FLOP/s, memory, bandwidth, power and links of each device.

GPU figures are the vendors' datasheet numbers (dense, no sparsity; bf16 is the tensor-core figure
with fp32 accumulation, fp32 the non-tensor-core one). `link_bytes_s` is the collective bandwidth
one device sees inside a node (NVLink where there is one, else PCIe 4.0 x16); between nodes the
planner assumes `INTER_NODE_BYTES_S` (a 400 Gb/s NIC per device). "This CPU" is not a table row:
its peaks are measured by plan/hardware.py's matmul probe (cached per machine) and its memory is
read from /proc/meminfo, so the plan for this machine uses the numbers the trainer's MFU uses.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from leantrain.errors import ConfigError

GiB = 1024**3
INTER_NODE_BYTES_S = 50e9
CPU_WATTS_PER_THREAD = 3.5  # as leantrain.energy's estimate meter: Cloud Carbon Footprint's per-vCPU maximum


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

    def peak(self, dtype: str) -> float:
        return self.peak_bf16 if dtype == "bf16" else self.peak_fp32

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CATALOG: dict[str, Hardware] = {h.key: h for h in (
    Hardware("h200", "NVIDIA H200 SXM 141GB", "gpu", 989e12, 67e12, 141e9, 4.8e12, 700, 450e9, match=("H200",)),
    Hardware("h100", "NVIDIA H100 SXM 80GB", "gpu", 989e12, 67e12, 80 * GiB, 3.35e12, 700, 450e9, match=("H100",)),
    Hardware("a100-80gb", "NVIDIA A100 SXM 80GB", "gpu", 312e12, 19.5e12, 80 * GiB, 2.039e12, 400, 300e9,
             match=("A100-SXM4-80GB", "A100 80GB", "A100-PCIE-80GB", "A100 PCIe 80GB")),
    Hardware("a100-40gb", "NVIDIA A100 SXM 40GB", "gpu", 312e12, 19.5e12, 40 * GiB, 1.555e12, 400, 300e9,
             match=("A100",)),
    Hardware("l4", "NVIDIA L4 24GB", "gpu", 121e12, 30.3e12, 24e9, 300e9, 72, 25e9, match=("L4",)),
    Hardware("rtx4090", "NVIDIA GeForce RTX 4090 24GB", "gpu", 165e12, 82.6e12, 24 * GiB, 1.008e12, 450, 25e9,
             node_size=4, match=("RTX 4090",)),
    Hardware("a10", "NVIDIA A10 24GB", "gpu", 125e12, 31.2e12, 24e9, 600e9, 150, 25e9, match=("A10",)),
)}

ALIASES = {"h100-sxm": "h100", "a100": "a100-80gb", "4090": "rtx4090", "rtx-4090": "rtx4090",
           "this-cpu": "cpu", "this_cpu": "cpu"}


def hardware_names() -> list[str]:
    return [*CATALOG, "cpu"]


def _meminfo(field: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def this_cpu(tdp_w: float = 0.0, peaks: dict[str, float] | None = None) -> Hardware:
    """This machine's CPU as a device: peaks from the cached matmul probe (`peaks` skips the probe),
    memory from /proc/meminfo, power from `tdp_w` or CPU_WATTS_PER_THREAD x logical CPUs (as the energy
    meter's estimate, so predicted and metered energy agree on a machine without RAPL)."""
    from leantrain.plan import hardware  # torch lives there; the table above needs none

    if peaks is None:
        import torch

        cpu = torch.device("cpu")
        peaks = {"bf16": hardware.peak_flops(cpu, torch.bfloat16)[0],
                 "fp32": hardware.peak_flops(cpu, torch.float32)[0]}
    cores = hardware.physical_cores()
    memory = _meminfo("MemTotal") or float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return Hardware("cpu", f"this CPU ({hardware.cpu_model()}, {cores} cores)", "cpu", peaks["bf16"], peaks["fp32"],
                    memory, 20e9, tdp_w or CPU_WATTS_PER_THREAD * (os.cpu_count() or 1), 10e9, node_size=1,
                    source="probe")


def get_hardware(name: str, tdp_w: float = 0.0) -> Hardware:
    """A catalog entry by key (case-insensitive; `cpu` probes this machine)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "cpu":
        return this_cpu(tdp_w)
    if key not in CATALOG:
        raise ConfigError(f"unknown hardware {name!r}; known: {', '.join(hardware_names())}")
    hw = CATALOG[key]
    return dataclasses.replace(hw, tdp_w=tdp_w) if tdp_w else hw


def match_gpu(device_name: str) -> Hardware | None:
    """The catalog entry of a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None. Names match as
    whole words, so an L40S is not an L4 and an A100 is not an A10."""
    for hw in CATALOG.values():
        if any(re.search(rf"(?<!\w){re.escape(m)}(?!\w)", device_name) for m in hw.match):
            return hw
    return None
