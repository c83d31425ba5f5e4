"""The trainer's energy account: joules, CO2 and money so far, continued across resumes.

The job's energy. Each rank has its own meter, but only rank 0 logs, and a collective at every log line
would cost more than the meter. So rank 0 scales what it measures, taking the ranks of a data-parallel
job to draw alike: per-process parts (a GPU through NVML, the estimate's CPU share) times the world
size, per-host parts (RAPL, the estimate's idle floor) times the number of hosts
(world size / processes per host, rounded up). `energy_j` is what the devices drew; CO2 and cost are
of the facility's energy, `pue` times that, at the grid intensity of the moment (an hourly series) or
the region's yearly average.

Energy spent on steps later lost (a crash after the last checkpoint, a rollback) was drawn all the
same: a rollback keeps counting it, but a resumed run continues from the checkpoint's totals, so the
lost steps after it are not counted.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from leantrain.energy.carbon import IntensitySeries, region_info
from leantrain.energy.cost import device_hour_price, footprint
from leantrain.energy.meters import Meter, open_meter

_TOTALS = ("energy_j", "co2_g", "co2_immediate_g", "cost_usd", "device_s", "paused_s")


def _sig(x: float, digits: int = 6) -> float:
    """Rounded to significant digits: a tiny run's cost is 1e-7 USD, not 0."""
    return float(f"{x:.{digits}g}")


def utc_now() -> datetime:
    return datetime.now(UTC)


def _poll(meter: Meter, stop: threading.Event, every: float) -> None:
    """Read the meter now and then, so wrapping counters and sampled power are not missed between logs."""
    while not stop.wait(every):
        with contextlib.suppress(Exception):  # a failed poll only loses resolution; the next log read reports
            meter.read()


class EnergyAccountant:
    """Cumulative energy, CO2 and cost of a run; `read()` at each metrics line.

    `cfg` is the `[energy]` config section. `clock` gives the UTC time used to look intensity up in an
    hourly series (tests pass a fake one); power is timed with the monotonic clock. `meter` replaces the
    one `cfg.meter` would open (tests, or a meter of your own with the same read/describe/source).
    """

    def __init__(self, cfg: Any, device: Any = "cpu", world_size: int = 1, local_world_size: int = 1, *,
                 clock: Callable[[], datetime] | None = None, meter: Meter | None = None):
        self.cfg = cfg
        self.enabled = cfg.meter != "off"
        self.clock = clock or utc_now
        self.series = IntensitySeries.from_csv(cfg.intensity_csv) if cfg.intensity_csv else None
        self.region = region_info(cfg.region)  # an unknown region fails here, before training starts
        self.yearly = self.region.g_per_kwh
        self.price_per_device_hour, self.price_from = device_hour_price(cfg.price_per_device_hour,
                                                                        *_listed_price(device))
        self.processes = max(1, world_size)
        self.hosts = max(1, math.ceil(world_size / max(1, local_world_size)))
        self.totals = dict.fromkeys(_TOTALS, 0.0)
        self.fallbacks: list[str] = []
        self.meter: Meter | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.power_w = 0.0
        self._step_mark: tuple[int, float] | None = None
        if not self.enabled:
            return
        if meter is None:
            dev_type, index, uuid, name = _device_facts(device)
            meter, self.fallbacks = open_meter(cfg.meter, dev_type, index, rapl_root=cfg.rapl_root,
                                               tdp_w=cfg.tdp_w, gpu_uuid=uuid, gpu_name=name, ram_w=cfg.ram_w)
        self.meter = meter
        self._proc_j, self._host_j = self.meter.read()
        self._wall = time.monotonic()
        self._time = self.clock()
        if self.meter.poll_s:
            self._poller = threading.Thread(target=_poll, args=(self.meter, self._stop, self.meter.poll_s),
                                            daemon=True, name="leantrain-energy-poll")
            self._poller.start()

    def use_clock(self, clock: Callable[[], datetime]) -> None:
        """Take UTC time from `clock` from now on (carbon-aware tests run on a compressed clock)."""
        self.clock = clock
        self._time = clock()

    @property
    def source(self) -> str:
        return self.meter.source if self.meter is not None else "off"

    @property
    def counted(self) -> str:
        """What the energy figure covers, e.g. "CPU (estimate from TDP and utilisation) + RAM 20 W (...)"."""
        if self.meter is None:
            return "nothing (energy.meter = off)"
        return getattr(self.meter, "counted", self.meter.source)

    def intensity_at(self, t: datetime) -> float:
        return self.series.at(t) if self.series is not None else self.yearly

    def _advance(self, paused: bool = False) -> None:
        """Add what was drawn since the last reading. A paused window is charged to the actual CO2 only;
        the counterfactual "ran at once" total sees each running window shifted back by the pauses before it."""
        if self.meter is None:
            return
        proc, host = self.meter.read()
        wall, now = time.monotonic(), self.clock()
        joules = (proc - self._proc_j) * self.processes + (host - self._host_j) * self.hosts
        dt = wall - self._wall
        mid = self._time + (now - self._time) / 2
        fp = footprint(joules / 3.6e6, region=self.cfg.region, pue=self.cfg.pue, price_per_kwh=self.cfg.price_per_kwh,
                       device_hours=dt * self.processes / 3600, price_per_device_hour=self.price_per_device_hour,
                       intensity_g_per_kwh=self.intensity_at(mid))
        t = self.totals
        t["energy_j"] += joules
        t["co2_g"] += fp["co2_g"]
        t["cost_usd"] += fp["cost_usd"]
        t["device_s"] += dt * self.processes
        if not paused:
            t["co2_immediate_g"] += fp["facility_kwh"] * self.intensity_at(mid - timedelta(seconds=t["paused_s"]))
        if dt > 0:
            self.power_w = joules / dt
        self._proc_j, self._host_j, self._wall, self._time = proc, host, wall, now

    def read(self, step: int | None = None) -> dict[str, Any]:
        """Cumulative totals for a metrics line ({} with energy.meter = off); with `step`, also the mean
        energy per step since the last call that passed one."""
        if self.meter is None:
            return {}
        self._advance()
        t = self.totals
        out = {"energy_j": _sig(t["energy_j"]), "co2_g": _sig(t["co2_g"]), "cost_usd": _sig(t["cost_usd"]),
               "power_w": _sig(self.power_w, 4), "energy_source": self.source}
        if step is not None:
            if self._step_mark is not None and step > self._step_mark[0]:
                out["step_energy_j"] = _sig((t["energy_j"] - self._step_mark[1]) / (step - self._step_mark[0]))
            self._step_mark = (step, t["energy_j"])
        return out

    def mark_pause(self, seconds: float) -> None:
        """Close the window of a carbon-aware pause that lasted `seconds` (idle draw, actual CO2 only)."""
        self._advance(paused=True)
        self.totals["paused_s"] += seconds

    def carbon_saved(self) -> dict[str, float]:
        """CO2 of this run against the same work started at once without pauses."""
        t = self.totals
        return {"co2_g": _sig(t["co2_g"]), "co2_immediate_g": _sig(t["co2_immediate_g"]),
                "co2_saved_g": _sig(t["co2_immediate_g"] - t["co2_g"]), "paused_s": round(t["paused_s"], 1)}

    def describe(self) -> dict[str, Any]:
        """The `energy` event: what measures, how it is scaled, where CO2 and price come from."""
        out: dict[str, Any] = {"source": self.source, "estimate": self.source == "estimate", "counted": self.counted}
        if self.meter is not None:
            out["meter"] = self.meter.describe()
        if self.fallbacks:
            out["fallback"] = self.fallbacks
        out.update(processes=self.processes, hosts=self.hosts, region=self.cfg.region, pue=self.cfg.pue,
                   price_per_device_hour=self.price_per_device_hour, price_from=self.price_from,
                   intensity=f"hourly series {self.cfg.intensity_csv}" if self.series is not None
                   else f"{self.yearly:g} g/kWh yearly average ({self.region.source_text})")
        if self.source == "estimate":
            out["message"] = ("no readable power meter; energy, CO2 and cost are estimates from TDP and utilisation"
                              " (plus memory power)")
        return out

    def summary(self) -> dict[str, Any]:
        """Energy totals for the run summary ({} when off)."""
        if self.meter is None:
            return {}
        self._advance()
        t = self.totals
        return {"energy_j": _sig(t["energy_j"]), "energy_kwh": _sig(t["energy_j"] / 3.6e6),
                "co2_g": _sig(t["co2_g"]), "cost_usd": _sig(t["cost_usd"]), "energy_source": self.source,
                "energy_counted": self.counted}

    def state_dict(self) -> dict[str, Any]:
        self._advance()
        return {**self.totals, "source": self.source}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the totals of a checkpoint; the meter's own baseline stays this process's."""
        for k in _TOTALS:
            self.totals[k] = float(state.get(k, 0.0))

    def close(self) -> None:
        """Stop the background reads and wait for the poller to end (reading on demand still works); a thread
        left inside a native meter read at interpreter shutdown can abort the process."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join()


def _listed_price(device: Any) -> tuple[float, str]:
    """(USD per device-hour, source) the hardware catalog lists for a CUDA device; (0, "") otherwise."""
    if not str(device).startswith("cuda"):
        return 0.0, ""
    from leantrain.device import match_gpu

    hw = match_gpu(_device_facts(device)[3])
    return (hw.price_hour_usd, hw.price_source) if hw is not None else (0.0, "")


def _device_facts(device: Any) -> tuple[str, int, str | None, str]:
    """(type, index, uuid, name) of a torch device (or a string naming one)."""
    text = str(device)
    dev_type = text.split(":")[0]
    index = int(text.split(":")[1]) if ":" in text else 0
    uuid = name = None
    if dev_type == "cuda":
        try:
            import torch

            index = torch.device(text).index if torch.device(text).index is not None else torch.cuda.current_device()
            props = torch.cuda.get_device_properties(index)
            name = props.name
            uuid = str(getattr(props, "uuid", "") or "") or None
        except Exception:  # noqa: BLE001 - facts are a help for finding the NVML handle, not a need
            pass
    return dev_type, index, uuid, name or ""
