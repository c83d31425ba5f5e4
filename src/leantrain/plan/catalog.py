"""The hardware the planner knows by name, and this machine as a planner's device.

The table itself is data (leantrain/hardware.toml, read by leantrain.device, which the trainer's MFU uses
too). "This CPU" is not a table row: its peak is the trainer's measured probe (cached per machine) and its
memory is read from /proc/meminfo. `local_hardware` describes the machine through `describe_device`, the
call the trainer makes, so the plan for this machine uses the dtype, attention kernel, threads and peak of
the run. Between nodes the planner assumes `INTER_NODE_BYTES_S` (a 400 Gb/s NIC per device).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from leantrain.device import (
    CATALOG,
    DEFAULT_GPU,
    DeviceInfo,
    Hardware,
    bf16_is_fast,
    cpu_model,
    describe_device,
    match_gpu,
    meminfo,
    peak_flops,
    physical_cores,
)
from leantrain.errors import ConfigError

__all__ = ["CATALOG", "INTER_NODE_BYTES_S", "Hardware", "get_hardware", "hardware_for", "hardware_names",
           "local_hardware", "match_gpu", "this_cpu"]

INTER_NODE_BYTES_S = 50e9
CPU_WATTS_PER_THREAD = 3.5  # as leantrain.energy's estimate meter: Cloud Carbon Footprint's per-vCPU maximum

ALIASES = {"h100-sxm": "h100", "a100": "a100-80gb", "4090": "rtx4090", "rtx-4090": "rtx4090", "5090": "rtx5090",
           "rtx-5090": "rtx5090", "3090": "rtx3090", "rtx-3090": "rtx3090", "h200-sxm": "h200", "b200-sxm": "b200",
           "this-cpu": "cpu", "this_cpu": "cpu"}


def hardware_names() -> list[str]:
    return [*CATALOG, "cpu"]


def is_this_cpu(name: str) -> bool:
    return ALIASES.get(name.lower(), name.lower()) == "cpu"


def this_cpu(tdp_w: float = 0.0, peaks: dict[str, float] | None = None) -> Hardware:
    """This machine's CPU as a device: peaks from the cached matmul probe at the current thread count
    (`peaks` skips the probe), memory from /proc/meminfo, power from `tdp_w` or CPU_WATTS_PER_THREAD x
    logical CPUs (as the energy meter's estimate, so predicted and metered energy agree without RAPL)."""
    cpu = torch.device("cpu")
    if peaks is None:
        peaks = {"bf16": peak_flops(cpu, torch.bfloat16)[0], "fp32": peak_flops(cpu, torch.float32)[0]}
    cores = physical_cores()
    memory = meminfo("MemTotal") or float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return Hardware("cpu", f"this CPU ({cpu_model()}, {cores} cores)", "cpu", peaks["bf16"], peaks["fp32"],
                    memory, 20e9, tdp_w or CPU_WATTS_PER_THREAD * (os.cpu_count() or 1), 10e9, node_size=1,
                    source="probe", bf16_fast=bf16_is_fast(cpu))


def hardware_for(info: DeviceInfo, tdp_w: float = 0.0) -> Hardware:
    """The planner's device for a process described by `describe_device`: its catalog row on a GPU (an
    unknown GPU is planned as an A100 80GB, as its MFU peak is, but without the A100's rental price, as the
    run's energy account charges none), this CPU with the measured peak on a CPU."""
    if info.device.type == "cpu":
        return this_cpu(tdp_w, peaks={"bf16": info.peak_flops, "fp32": info.peak_flops})
    hw = info.hardware or dataclasses.replace(CATALOG[DEFAULT_GPU], name=f"{info.name} (as A100 80GB)",
                                              price_hour_usd=0.0, price_source="")
    hw = dataclasses.replace(hw, bf16_fast=info.bf16_fast)
    return dataclasses.replace(hw, tdp_w=tdp_w) if tdp_w else hw


def local_hardware(cfg, devices: int = 1, device: str | None = None) -> tuple[Hardware, DeviceInfo]:
    """This machine as the trainer would see it for `cfg` (`devices` processes; on a CPU they share the host)."""
    dev = device or cfg.train.device
    local = devices if (dev == "cpu" or (dev == "auto" and not torch.cuda.is_available())) else 1
    info = describe_device(dev, cfg.precision.dtype, cfg.train.attention, cfg.model.seq_len, cfg.train.threads,
                           local_world_size=local)
    return hardware_for(info, cfg.energy.tdp_w), info


def get_hardware(name: str, tdp_w: float = 0.0) -> Hardware:
    """A catalog entry by key (case-insensitive; `cpu` probes this machine at the current thread count)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "cpu":
        return this_cpu(tdp_w)
    if key not in CATALOG:
        raise ConfigError(f"unknown hardware {name!r}; known: {', '.join(hardware_names())}")
    hw = CATALOG[key]
    return dataclasses.replace(hw, tdp_w=tdp_w) if tdp_w else hw
