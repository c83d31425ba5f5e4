"""From energy to CO2 and money: one function, shared by the trainer's accounting and the planner."""

from __future__ import annotations

from leantrain.energy.carbon import intensity


def footprint(energy_kwh: float, *, region: str, pue: float, price_per_kwh: float, device_hours: float = 0.0,
              price_per_device_hour: float = 0.0, intensity_g_per_kwh: float | None = None) -> dict[str, float]:
    """CO2 and cost of `energy_kwh` drawn by the devices.

    The facility draws `pue` times what the devices draw (cooling, power conversion), and that is the
    energy the grid supplies and the bill charges: CO2 = facility kWh x grid intensity, cost = facility
    kWh x price + device-hours x rental price. `intensity_g_per_kwh` overrides the region's yearly average
    (an hourly series' value for the hour).
    """
    g = intensity(region) if intensity_g_per_kwh is None else float(intensity_g_per_kwh)
    facility_kwh = energy_kwh * pue
    return {
        "facility_kwh": facility_kwh,
        "co2_g": facility_kwh * g,
        "cost_usd": facility_kwh * price_per_kwh + device_hours * price_per_device_hour,
        "intensity_g_per_kwh": g,
    }
