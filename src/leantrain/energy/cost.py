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
    energy_cost, rental = facility_kwh * price_per_kwh, device_hours * price_per_device_hour
    return {
        "facility_kwh": facility_kwh,
        "co2_g": facility_kwh * g,
        "cost_usd": energy_cost + rental,
        "energy_cost_usd": energy_cost,
        "rental_usd": rental,
        "intensity_g_per_kwh": g,
    }


def device_hour_price(configured: float, listed: float = 0.0, listed_from: str = "") -> tuple[float, str]:
    """(USD per device-hour, where it came from): `energy.price_per_device_hour` when it is >= 0, else (-1)
    the hardware catalog's listed price of the device (`listed`, from `listed_from`), else 0."""
    if configured >= 0:
        return float(configured), "energy.price_per_device_hour"
    if listed > 0:
        return float(listed), f"catalog: {listed_from}" if listed_from else "catalog"
    return 0.0, "no listed price; set energy.price_per_device_hour"
