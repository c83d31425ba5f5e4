"""Grid carbon intensity: the shipped yearly table and optional hourly series.

The table (grid_intensity.csv, next to this file) holds yearly averages per country, some US states and
Canadian provinces, and the major cloud regions; every row names its source (a key of grid_sources.csv,
which cites it and says whether it counts lifecycle or direct emissions) and the year it is for.
Yearly averages hide a factor of two or more between the clean and dirty hours of a day; an hourly
series (`energy.intensity_csv`: timestamp_utc,g_per_kwh) gives the time-varying figure, which is also
the forecast that carbon-aware scheduling plans on.
"""

from __future__ import annotations

import bisect
import csv
import difflib
import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path

from leantrain.errors import ConfigError

TABLE = "grid_intensity.csv"
SOURCES = "grid_sources.csv"


@dataclass(frozen=True)
class Region:
    key: str
    g_per_kwh: float
    kind: str  # aggregate, country, subnational, cloud
    name: str
    grid: str  # the grid region a cloud region takes its value from; "" for a grid itself
    source: str = ""  # a key of grid_sources.csv (a cloud region's is its grid's)
    year: int = 0  # the year the figure is for

    @property
    def source_text(self) -> str:
        """e.g. "ember, 2023, lifecycle": where the figure comes from, in a line."""
        counts = sources().get(self.source, {}).get("counts", "")
        return ", ".join(x for x in (self.source, str(self.year), counts) if x)


def _rows(name: str) -> list[dict[str, str]]:
    text = resources.files("leantrain.energy").joinpath(name).read_text()
    return list(csv.DictReader(line for line in text.splitlines() if line and not line.startswith("#")))


@functools.cache
def sources() -> dict[str, dict[str, str]]:
    """The citations of the table's sources: key -> {"counts": lifecycle|direct, "citation": ...}."""
    return {r["source"]: {"counts": r["counts"], "citation": r["citation"]} for r in _rows(SOURCES)}


@functools.cache
def _table() -> dict[str, Region]:
    rows = _rows(TABLE)
    grids = {r["region"].lower(): r for r in rows if r["g_per_kwh"]}
    out = {}
    for r in rows:
        own = grids[r["grid"].lower()] if r["grid"] else grids[r["region"].lower()]
        out[r["region"].lower()] = Region(r["region"], float(own["g_per_kwh"]), r["kind"], r["name"], r["grid"],
                                          own["source"], int(own["year"] or 0))
    return out


def regions() -> list[str]:
    """Every region key of the shipped table, as written there (e.g. "FR", "US-VA", "aws:us-east-1")."""
    return [r.key for r in _table().values()]


def region_info(region: str) -> Region:
    """The table row of `region` (case-insensitive); unknown names raise ConfigError with close matches."""
    table = _table()
    found = table.get(region.strip().lower())
    if found is not None:
        return found
    names = {r.name.lower(): r.key for r in table.values()}
    close = difflib.get_close_matches(region.lower(), list(table) + list(names), n=5, cutoff=0.5)
    suggestions = list(dict.fromkeys(table[c].key if c in table else names[c] for c in close))
    hint = f"close names: {', '.join(suggestions)}" if suggestions else f"e.g. {', '.join(regions()[:6])}, ..."
    raise ConfigError(f"config: energy.region = {region!r} is not in the carbon-intensity table; {hint} "
                      "(leantrain.energy.carbon.regions() lists all)")


def intensity(region: str) -> float:
    """Yearly-average grid carbon intensity of `region` in gCO2e/kWh."""
    return region_info(region).g_per_kwh


def parse_utc(text: str) -> datetime:
    """An ISO 8601 time as an aware UTC datetime; a time without an offset is taken as UTC."""
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{text!r} is not an ISO 8601 time; write e.g. 2025-06-01T08:00:00Z") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


class IntensitySeries:
    """Grid intensity over time: row i holds from its timestamp until the next row's (the last row for
    as long as the gap before it). Before the first row the first value holds, after the last the last."""

    def __init__(self, points: list[tuple[datetime, float]]):
        if not points:
            raise ConfigError("the carbon-intensity series is empty; give rows of timestamp_utc,g_per_kwh")
        self.times = [t for t, _ in points]
        self.values = [float(v) for _, v in points]
        if any(b <= a for a, b in zip(self.times, self.times[1:], strict=False)):
            raise ConfigError("the carbon-intensity series' timestamps must rise strictly; sort the rows by time")
        last_gap = self.times[-1] - self.times[-2] if len(self.times) > 1 else timedelta(hours=1)
        self.end = self.times[-1] + last_gap

    @classmethod
    def from_csv(cls, path: str | Path) -> IntensitySeries:
        """Read a CSV with columns timestamp_utc and g_per_kwh (any order, more columns ignored)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: energy.intensity_csv = {str(path)!r} does not exist; check the path")
        with open(p, newline="") as f:
            reader = csv.DictReader(line for line in f if line.strip() and not line.startswith("#"))
            if not reader.fieldnames or not {"timestamp_utc", "g_per_kwh"} <= set(reader.fieldnames):
                raise ConfigError(f"{p}: needs a header with columns timestamp_utc,g_per_kwh")
            points = []
            for i, row in enumerate(reader, start=2):
                try:
                    points.append((parse_utc(row["timestamp_utc"]), float(row["g_per_kwh"])))
                except (ConfigError, ValueError, TypeError):
                    raise ConfigError(f"{p}: row {i} ({dict(row)}) is not an ISO time and a number; "
                                      "fix or remove it") from None
        return cls(sorted(points))

    def at(self, t: datetime) -> float:
        """Intensity at time t."""
        i = bisect.bisect_right(self.times, t) - 1
        return self.values[max(i, 0)]

    def slots(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime, float]]:
        """(from, to, g_per_kwh) pieces covering [start, end) in time order."""
        if end <= start:
            return []
        bounds = [start, *(t for t in self.times[1:] if start < t < end)]
        if start < self.end < end:
            bounds.append(self.end)
        bounds.append(end)
        return [(a, b, self.at(a)) for a, b in zip(bounds, bounds[1:], strict=False)]
