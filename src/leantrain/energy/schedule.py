"""Carbon-aware scheduling: run in the cleanest hours that still finish the run by its deadline.

The rule. Given the intensity forecast from now to the deadline and the time the rest of the run
needs, pick the cleanest slots of the forecast until they add up to that time; the dirtiest picked
slot sets the threshold. Run while the grid is at or below it; above it, pause until the next slot
that is not. Re-deciding at every check with the updated remaining time keeps the plan honest when
steps run faster or slower than measured. When even running without a break would miss the deadline,
never pause.

The pause itself (in the trainer) happens at a step boundary after a checkpoint, so a kill during it
loses nothing, and the process simply sleeps: the run's numbers are those of an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from leantrain.energy.carbon import IntensitySeries, parse_utc
from leantrain.errors import ConfigError

SAFETY = 1.1  # remaining time is planned 10% long: steps slow down, evals and checkpoints take time
MAX_SLEEP_S = 60.0  # a pause sleeps in pieces, so a signal is noticed within a minute


def should_pause(now: datetime, remaining_s: float, deadline: datetime,
                 forecast: IntensitySeries) -> tuple[bool, datetime | None, float]:
    """(pause now?, until when, threshold g/kWh) for `remaining_s` seconds of work due by `deadline`."""
    if remaining_s <= 0:
        return False, None, math.inf
    slots = forecast.slots(now, deadline)
    if sum((b - a).total_seconds() for a, b, _ in slots) < remaining_s:
        return False, None, math.inf  # no room to wait: run now
    need, threshold = remaining_s, math.inf
    for a, b, g in sorted(slots, key=lambda s: (s[2], s[0])):
        need -= (b - a).total_seconds()
        threshold = g
        if need <= 0:
            break
    if slots[0][2] <= threshold:
        return False, None, threshold
    until = next(a for a, _, g in slots if g <= threshold)
    return True, until, threshold


class SystemClock:
    """Real UTC time and real sleep; tests pass a fake with the same two methods."""

    def now(self) -> datetime:
        from leantrain.energy.accounting import utc_now

        return utc_now()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class CarbonScheduler:
    """Decides, at the trainer's checks, whether to pause, and waits out a pause.

    Step time is measured between checks (pauses excluded) and the remaining time is that times the
    steps left, times SAFETY.
    """

    def __init__(self, cfg: Any, accountant: Any, clock: Any = None):
        if not (cfg.intensity_csv and cfg.deadline):
            raise ConfigError("energy.carbon_aware needs energy.intensity_csv (an hourly forecast) and "
                              "energy.deadline (ISO 8601 UTC); set both")
        self.deadline = parse_utc(cfg.deadline)
        self.accountant = accountant
        self.forecast = accountant.series  # the accountant loaded energy.intensity_csv (set, checked above)
        self.clock = clock or SystemClock()
        self._mark: tuple[datetime, int] | None = None
        self.run_s, self.run_steps = 0.0, 0

    def start(self, step: int) -> None:
        """Begin measuring step time (the trainer calls this as fit() starts)."""
        self._mark = (self.clock.now(), step)

    def check(self, step: int, total_steps: int) -> dict[str, Any] | None:
        """None to go on, or the pause decision (the fields of the `pause` event)."""
        now = self.clock.now()
        if self._mark is not None:
            self.run_s += (now - self._mark[0]).total_seconds()
            self.run_steps += step - self._mark[1]
        self._mark = (now, step)
        if self.run_steps <= 0:
            return None
        remaining = (total_steps - step) * self.run_s / self.run_steps * SAFETY
        pause, until, threshold = should_pause(now, remaining, self.deadline, self.forecast)
        if not pause:
            return None
        return {"until": until.isoformat(), "intensity_g_per_kwh": self.forecast.at(now),
                "threshold_g_per_kwh": threshold, "remaining_s": round(remaining, 1),
                "deadline": self.deadline.isoformat()}

    def wait(self, decision: dict[str, Any], stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Sleep until the decision's `until` (or `stop()`); returns the fields of the `resume` event."""
        self.accountant.read()  # close the running window: what follows is the pause's idle draw
        start, until = self.clock.now(), parse_utc(decision["until"])
        while not stop():
            left = (until - self.clock.now()).total_seconds()
            if left <= 0:
                break
            self.clock.sleep(min(left, MAX_SLEEP_S))
        end = self.clock.now()
        paused = (end - start).total_seconds()
        self.accountant.mark_pause(paused)
        if self._mark is not None:
            self._mark = (end, self._mark[1])  # the pause is not step time
        return {"paused_s": round(paused, 1), "intensity_g_per_kwh": self.forecast.at(end)}
