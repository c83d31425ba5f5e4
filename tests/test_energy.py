"""Energy meters, carbon intensity, cost, accounting in the trainer and carbon-aware pauses.

The RAPL reader runs on a fake powercap tree; the carbon-aware runs on a compressed clock (a fake
`now`/`sleep`), so nothing here waits for real hours.
"""

from __future__ import annotations

import csv
import json
import math
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from helpers import tiny_config
from leantrain.config import load_config
from leantrain.energy import carbon
from leantrain.energy.accounting import EnergyAccountant
from leantrain.energy.carbon import IntensitySeries, parse_utc
from leantrain.energy.cost import device_hour_price, footprint
from leantrain.energy.meters import (
    EstimateMeter,
    MeterUnavailable,
    NvmlMeter,
    RaplMeter,
    WithRam,
    dimm_count,
    open_meter,
    ram_power_w,
)
from leantrain.energy.schedule import should_pause
from leantrain.errors import ConfigError
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer

T0 = datetime(2026, 1, 1, tzinfo=UTC)


# ---- RAPL on a fake sysfs tree -------------------------------------------------------------

def _zone(path: Path, name: str, uj: int, wrap: int = 1_000_000) -> Path:
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{uj}\n")
    (path / "max_energy_range_uj").write_text(f"{wrap}\n")
    return path


@pytest.fixture
def rapl(tmp_path):
    """Two packages, each with core and dram subzones, plus psys; laid out as the kernel does: zones at the
    top, subzones inside them and linked at the top too."""
    root = tmp_path / "powercap"
    pkg0 = _zone(root / "intel-rapl:0", "package-0", 100)
    _zone(pkg0 / "intel-rapl:0:0", "core", 50)
    _zone(pkg0 / "intel-rapl:0:1", "dram", 10)
    pkg1 = _zone(root / "intel-rapl:1", "package-1", 200)
    _zone(pkg1 / "intel-rapl:1:0", "dram", 20)
    _zone(root / "intel-rapl:2", "psys", 999)
    os.symlink(pkg0 / "intel-rapl:0:1", root / "intel-rapl:0:1")  # the same subzone reached twice
    (root / "intel-rapl-mmio:0").mkdir()  # another powercap driver: not read
    return root


def _set(root: Path, zone: str, uj: int) -> None:
    path = next(p for p in root.rglob(zone) if p.is_dir() and not p.is_symlink())
    (path / "energy_uj").write_text(f"{uj}\n")


def test_rapl_counts_packages_and_dram_once(rapl):
    m = RaplMeter(rapl)
    assert [n for n in m.describe()["domains"]] == [
        "intel-rapl:0 (package-0)", "intel-rapl:0:1 (dram)", "intel-rapl:1 (package-1)", "intel-rapl:1:0 (dram)"]
    assert m.read() == (0.0, 0.0)
    _set(rapl, "intel-rapl:0", 1_100)   # +1000 uJ
    _set(rapl, "intel-rapl:0:1", 510)   # +500
    _set(rapl, "intel-rapl:0:0", 9_999)  # core: inside the package, not added
    _set(rapl, "intel-rapl:2", 99_999)   # psys: not added
    assert m.read() == (0.0, pytest.approx(1500e-6))


def test_rapl_counter_wraparound(rapl):
    m = RaplMeter(rapl)
    _set(rapl, "intel-rapl:1", 999_900)  # +999_700 uJ
    m.read()
    _set(rapl, "intel-rapl:1", 300)  # wrapped at 1_000_000: +100 to the top, +300 after
    assert m.read()[1] == pytest.approx((999_700 + 400) * 1e-6)


def test_rapl_permission_denied_falls_back_to_estimate(rapl, monkeypatch):
    for p in rapl.rglob("energy_uj"):
        p.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the file deny as the kernel does for non-root
        real = Path.read_text

        def denying(self, *a, **k):
            if self.name == "energy_uj":
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "read_text", denying)
    with pytest.raises(MeterUnavailable, match="readable only by root"):
        RaplMeter(rapl)
    meter, why = open_meter("auto", "cpu", rapl_root=str(rapl))
    assert meter.source == "estimate" and "readable only by root" in why[0]
    with pytest.raises(ConfigError, match="energy.meter = 'rapl'.*readable only by root"):
        open_meter("rapl", "cpu", rapl_root=str(rapl))


def test_no_rapl_tree_falls_back(tmp_path):
    meter, why = open_meter("auto", "cpu", rapl_root=str(tmp_path / "absent"))
    assert meter.source == "estimate" and why == [f"rapl: no RAPL package zones under {tmp_path / 'absent'}"]


# ---- NVML ---------------------------------------------------------------------------------

def test_nvml_total_energy_counter():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pytest.skip("NVML does not initialise here (no NVIDIA GPU/driver)")
    m = NvmlMeter(0)
    first = m.read()[0]
    x = 0
    for i in range(200_000):
        x += i
    second = m.read()[0]
    assert 0.0 <= first <= second and m.describe()["mode"] in ("energy counter", "sampled power")


# ---- the estimate ---------------------------------------------------------------------------

class Ticks:
    """A settable clock for the meter's wall and CPU time."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_estimate_formula_cpu():
    wall, cpu = Ticks(), Ticks()
    m = EstimateMeter("cpu", tdp_w=100.0, cpus=4, clock=wall, cpu_time=cpu)
    wall.t, cpu.t = 10.0, 20.0  # two of four CPUs busy for 10 s: u = 0.5
    proc, host = m.read()
    assert proc == pytest.approx(100 * 0.8 * 0.5 * 10)  # this process's share above idle
    assert host == pytest.approx(100 * 0.2 * 10)  # the host's idle floor
    wall.t, cpu.t = 20.0, 100.0  # more CPU time than the CPUs have: utilisation caps at 1
    assert m.read()[0] == pytest.approx(400 + 100 * 0.8 * 10)
    assert "process CPU time" in m.describe()["formula"]


def test_estimate_gpu_tdp_sources():
    assert EstimateMeter("cuda", gpu_name="NVIDIA H100 80GB HBM3").tdp_w == 700.0
    assert EstimateMeter("cuda", gpu_name="NVIDIA H100", gpu_limit_w=500.0).tdp_w == 500.0
    assert EstimateMeter("cuda", tdp_w=250.0, gpu_limit_w=500.0).tdp_w == 250.0
    assert EstimateMeter("cuda", gpu_name="Mystery GPU").tdp_w == 300.0


def test_estimate_is_labelled(tmp_path):
    cfg = load_config(overrides={"energy": {"rapl_root": str(tmp_path)}}).energy
    acc = EnergyAccountant(cfg, "cpu")
    d = acc.describe()
    assert d["source"] == "estimate" and d["estimate"] is True and "estimate" in d["message"]
    r = acc.read()
    assert r["energy_source"] == "estimate" and r["energy_j"] >= 0
    assert acc.summary()["energy_source"] == "estimate"


# ---- memory (RAM) power, as CodeCarbon counts it ----------------------------------------------

def test_ram_power_is_codecarbons_rule():
    """5 W per DIMM on x86, DIMMs guessed from installed GB (2^30 bytes), tapering past 4, 8 and 16 DIMMs."""
    gib = 2**30
    assert [dimm_count(g) for g in (2, 8, 16, 24, 32, 64, 96, 128)] == [1, 2, 2, 4, 4, 4, 8, 8]
    assert ram_power_w(16 * gib) == 10.0  # 2 DIMMs
    assert ram_power_w(24 * gib) == ram_power_w(32 * gib) == 20.0  # 4 DIMMs: this VM's 23.5 GB
    assert ram_power_w(128 * gib) == pytest.approx(4 * 5 + 4 * 4.5)  # 8 DIMMs, the last four at 90%
    assert ram_power_w(2048 * gib) == pytest.approx(20 + 18 + 8 * 4)  # 16 x 128 GB DIMMs
    assert ram_power_w(1 * gib) == 10.0 and ram_power_w(1 * gib, arm=True) == 3.0  # the floors
    ram = pytest.importorskip("codecarbon.external.ram")
    cc = ram.RAM.__new__(ram.RAM)  # the rule only: no process is looked at
    cc.is_arm_cpu = False
    for gb in (1, 3, 4, 6, 8, 12, 16, 20, 32, 48, 64, 100, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192):
        assert ram_power_w(gb * gib) == pytest.approx(cc._calculate_ram_power(gb)), gb
        assert dimm_count(gb) == cc._estimate_dimm_count(gb), gb


def test_ram_is_added_to_meters_but_not_to_rapl_with_dram(rapl, tmp_path):
    wall, cpu = Ticks(), Ticks()
    est = EstimateMeter("cpu", tdp_w=100.0, cpus=4, clock=wall, cpu_time=cpu)
    m = WithRam(est, 20.0, "test", clock=wall)
    wall.t, cpu.t = 10.0, 20.0
    proc, host = m.read()
    assert proc == pytest.approx(400) and host == pytest.approx(100 * 0.2 * 10 + 20 * 10)  # + 200 J of memory
    assert m.counted.startswith("CPU (estimate") and "RAM 20 W" in m.counted
    # RAPL with DRAM zones measures memory: nothing is added
    meter, _ = open_meter("rapl", "cpu", rapl_root=str(rapl))
    assert isinstance(meter, RaplMeter) and "DRAM" in meter.counted
    # RAPL without DRAM zones: the estimate is added; energy.ram_w replaces the rule
    nodram = tmp_path / "nodram"
    _zone(nodram / "intel-rapl:0", "package-0", 100)
    meter, _ = open_meter("rapl", "cpu", rapl_root=str(nodram), ram_w=7.0)
    assert isinstance(meter, WithRam) and meter.ram_w == 7.0 and meter.ram_from == "energy.ram_w"
    meter, _ = open_meter("estimate", "cpu")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert meter.ram_w == ram_power_w(total) and "CodeCarbon" in meter.counted


def test_energy_line_says_what_was_counted(tmp_path):
    acc = EnergyAccountant(load_config(overrides={"energy": {"rapl_root": str(tmp_path)}}).energy, "cpu")
    s = acc.summary()
    assert s["energy_source"] == "estimate" and "CPU" in s["energy_counted"] and "RAM" in s["energy_counted"]
    assert acc.describe()["counted"] == s["energy_counted"]
    acc.close()


# ---- carbon table, CO2 and cost -------------------------------------------------------------

def test_table_regions_and_errors():
    keys = carbon.regions()
    assert "world" in keys and "aws:us-east-1" in keys and len(keys) == len(set(k.lower() for k in keys))
    for k in keys:  # every cloud region names a grid of the table
        assert 0 < carbon.intensity(k) < 1200
    assert carbon.intensity("aws:eu-west-3") == carbon.intensity("FR") == carbon.intensity("fr")
    assert carbon.intensity("FR") < carbon.intensity("DE") < carbon.intensity("PL")
    with pytest.raises(ConfigError, match=r"'frnace'.*close names: FR"):
        carbon.intensity("frnace")
    with pytest.raises(ConfigError, match="aws:us-east-2"):
        carbon.intensity("aws:us-east-9")


def test_every_zone_cites_its_source_and_year():
    """Each row with a value names a source of grid_sources.csv and a year; a cloud row names a grid that has."""
    from importlib import resources

    text = resources.files("leantrain.energy").joinpath("grid_intensity.csv").read_text()
    rows = list(csv.DictReader(line for line in text.splitlines() if line and not line.startswith("#")))
    cited = carbon.sources()
    assert set(cited) and all(v["counts"] in ("lifecycle", "direct") and len(v["citation"]) > 40
                              for v in cited.values())
    grids = {r["region"] for r in rows if r["g_per_kwh"]}
    for r in rows:
        if r["g_per_kwh"]:
            assert r["source"] in cited, r
            assert 2015 <= int(r["year"]) <= 2030, r
        else:
            assert r["kind"] == "cloud" and r["grid"] in grids, r
    for key in carbon.regions():  # what the code sees: every region, cloud ones with their grid's source
        info = carbon.region_info(key)
        assert info.source in cited and info.year >= 2015 and str(info.year) in info.source_text


def test_fixed_zones_match_the_published_figures():
    """Ireland, Switzerland and Virginia against the data their sources publish (as codecarbon 3.3.2 ships it)."""
    assert (carbon.intensity("IE"), carbon.intensity("CH"), carbon.intensity("US-VA")) == (291, 35, 245)
    assert carbon.intensity("aws:us-east-1") == 245 and carbon.region_info("aws:us-east-1").source == "egrid2023"
    cc = pytest.importorskip("codecarbon")
    data = Path(cc.__file__).parent / "data" / "private_infra"
    mix = json.loads((data / "global_energy_mix.json").read_text())
    for key in carbon.regions():
        info = carbon.region_info(key)
        if info.source == "ember" and info.kind == "country":
            iso3 = {"US": "USA", "CN": "CHN", "IN": "IND", "JP": "JPN", "KR": "KOR", "SG": "SGP", "ID": "IDN",
                    "AU": "AUS", "ZA": "ZAF", "BR": "BRA", "CA": "CAN", "DE": "DEU", "FR": "FRA", "GB": "GBR",
                    "IE": "IRL", "NL": "NLD", "BE": "BEL", "ES": "ESP", "IT": "ITA", "PL": "POL", "AT": "AUT",
                    "CH": "CHE", "DK": "DNK", "SE": "SWE", "NO": "NOR", "FI": "FIN"}[key]
            assert abs(info.g_per_kwh - mix[iso3]["carbon_intensity"]) <= 0.5, key
            assert info.year == mix[iso3]["year"], key
    states = json.loads((data / "2023" / "usa_emissions.json").read_text())
    assert abs(carbon.intensity("US-VA") - states["virginia"]["emissions"] * 0.45359237) <= 0.5


def test_device_hour_price_rule():
    assert device_hour_price(-1, 3.78, "Lambda") == (3.78, "catalog: Lambda")
    assert device_hour_price(2.5, 3.78, "Lambda") == (2.5, "energy.price_per_device_hour")
    assert device_hour_price(0.0, 3.78, "Lambda")[0] == 0.0  # hardware you own
    assert device_hour_price(-1)[0] == 0.0  # a CPU, an unlisted GPU
    acc = EnergyAccountant(load_config(overrides={"energy": {"meter": "off"}}).energy, "cpu")
    assert acc.price_per_device_hour == 0.0


def test_footprint_arithmetic():
    fp = footprint(2.0, region="DE", pue=1.5, price_per_kwh=0.2, device_hours=3.0, price_per_device_hour=2.0)
    assert fp == {"facility_kwh": 3.0, "co2_g": 3.0 * 381, "cost_usd": pytest.approx(3.0 * 0.2 + 6.0),
                  "energy_cost_usd": pytest.approx(0.6), "rental_usd": 6.0, "intensity_g_per_kwh": 381.0}
    assert footprint(1.0, region="world", pue=1.0, price_per_kwh=0.0, intensity_g_per_kwh=50)["co2_g"] == 50


def test_accountant_scales_and_continues_after_resume(rapl):
    cfg = load_config(overrides={"energy": {"meter": "rapl", "rapl_root": str(rapl), "region": "FR", "pue": 1.25,
                                            "price_per_kwh": 0.5}}).energy
    acc = EnergyAccountant(cfg, "cpu", world_size=8, local_world_size=4)  # 2 hosts
    _set(rapl, "intel-rapl:0", 100 + 1_800_000_000)  # +1800 J on this host
    r = acc.read()
    kwh = 2 * 1800 / 3.6e6  # RAPL is per host: times 2 hosts
    assert r["energy_j"] == pytest.approx(3600) and r["energy_source"] == "rapl"
    assert r["co2_g"] == pytest.approx(kwh * 1.25 * 56, rel=1e-5)
    assert r["cost_usd"] == pytest.approx(kwh * 1.25 * 0.5, rel=1e-5)
    state = acc.state_dict()
    again = EnergyAccountant(cfg, "cpu", world_size=8, local_world_size=4)
    again.load_state_dict(state)
    _set(rapl, "intel-rapl:0", 100 + 2_700_000_000)  # +900 J more
    assert again.read()["energy_j"] == pytest.approx(3600 + 1800)


def test_meter_off_adds_nothing():
    acc = EnergyAccountant(load_config(overrides={"energy": {"meter": "off"}}).energy)
    assert acc.read() == {} and acc.summary() == {} and acc.describe()["source"] == "off"


# ---- hourly series and the pause rule -------------------------------------------------------

def _forecast(path: Path, values: list[float]) -> Path:
    rows = [f"{(T0 + timedelta(hours=h)).isoformat().replace('+00:00', 'Z')},{v}" for h, v in enumerate(values)]
    path.write_text("# hourly forecast\ntimestamp_utc,g_per_kwh\n" + "\n".join(rows) + "\n")
    return path


def test_series_lookup_and_slots(tmp_path):
    s = IntensitySeries.from_csv(_forecast(tmp_path / "f.csv", [300, 100, 200]))
    assert s.at(T0 - timedelta(hours=5)) == 300 and s.at(T0 + timedelta(minutes=90)) == 100
    assert s.at(T0 + timedelta(hours=30)) == 200
    slots = s.slots(T0 + timedelta(minutes=30), T0 + timedelta(hours=4))
    assert [(a.minute, (b - a).total_seconds(), g) for a, b, g in slots] == [
        (30, 1800, 300), (0, 3600, 100), (0, 3600, 200), (0, 3600, 200)]
    (tmp_path / "bad.csv").write_text("timestamp_utc,g_per_kwh\nyesterday,5\n")
    with pytest.raises(ConfigError, match="row 2"):
        IntensitySeries.from_csv(tmp_path / "bad.csv")


def test_should_pause_picks_the_cleanest_hours(tmp_path):
    s = IntensitySeries.from_csv(_forecast(tmp_path / "f.csv", [500, 500, 100, 100, 400, 400, 400, 400]))
    deadline = T0 + timedelta(hours=8)
    pause, until, threshold = should_pause(T0, 2 * 3600, deadline, s)
    assert (pause, until, threshold) == (True, T0 + timedelta(hours=2), 100)
    # 2.5 h of work: the two clean hours are not enough, the first 400 hour is needed too
    assert should_pause(T0, 2.5 * 3600, deadline, s) == (True, T0 + timedelta(hours=2), 400)
    # at the clean hour: run
    assert should_pause(T0 + timedelta(hours=2), 3600, deadline, s)[0] is False
    # the work no longer fits before the deadline: never wait
    assert should_pause(T0, 7.5 * 3600, T0 + timedelta(hours=7), s) == (False, None, math.inf)
    assert should_pause(T0, 0, deadline, s)[0] is False


def test_carbon_aware_config_needs_forecast_and_deadline():
    with pytest.raises(ConfigError, match="intensity_csv.*deadline"):
        load_config(overrides={"energy": {"carbon_aware": True}})
    assert parse_utc("2026-01-01T02:00:00+02:00") == T0
    with pytest.raises(ConfigError, match="ISO 8601"):
        parse_utc("tomorrow")


# ---- in the trainer --------------------------------------------------------------------------

class FakeClock:
    """A compressed clock: each logged step takes `step_s` of simulated time, sleep returns at once."""

    def __init__(self, step_s: float = 600.0):
        self.t, self.step_s, self.slept = T0, step_s, 0.0
        self.on_sleep = None

    def now(self) -> datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.t += timedelta(seconds=seconds)
        if self.on_sleep:
            self.on_sleep()

    # as an observer of the trainer: time passes with the steps
    def on_step(self, r):
        self.t += timedelta(seconds=self.step_s)

    def on_event(self, e):
        pass

    def on_end(self, s):
        pass


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl")}


def _cfg(dataset, tmp_path, **energy):
    over = {f"energy__{k}": v for k, v in energy.items()}
    return tiny_config(dataset, energy__rapl_root=str(tmp_path / "no-rapl"), train__steps=6, train__eval_every=3,
                       checkpoint__every=3, **over)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted run without carbon-awareness: its losses and records."""
    tmp = tmp_path_factory.mktemp("energy-ref")
    summary = Trainer(_cfg(dataset, tmp), tmp / "run").fit()
    return {"losses": _losses(tmp / "run"), "summary": summary, "run": tmp / "run"}


def test_trainer_logs_energy_and_summary(reference):
    recs = read_jsonl(reference["run"] / "metrics.jsonl")
    energy = [r["energy_j"] for r in recs]
    assert energy == sorted(energy) and energy[-1] > 0
    assert all(r["energy_source"] == "estimate" and r["co2_g"] >= 0 and "cost_usd" in r for r in recs)
    assert all("step_energy_j" in r for r in recs[1:])
    ev = [e for e in read_jsonl(reference["run"] / "events.jsonl") if e["event"] == "energy"]
    assert len(ev) == 1 and ev[0]["estimate"] is True and ev[0]["source"] == "estimate"
    s = reference["summary"]
    assert s["energy_source"] == "estimate" and s["energy_j"] >= energy[-1]
    assert s["co2_g"] == pytest.approx(s["energy_kwh"] * 1.2 * 480, rel=1e-3)


def _carbon_trainer(dataset, tmp_path, clock):
    fc = _forecast(tmp_path / "forecast.csv", [500, 500, 100, 100, 400, 400, 400, 400])
    cfg = _cfg(dataset, tmp_path, intensity_csv=str(fc), deadline="2026-01-01T08:00:00Z", carbon_aware=True)
    t = Trainer(cfg, tmp_path / "run", observers=[clock])
    t.carbon.clock = clock
    t.energy.use_clock(clock.now)
    return t


def test_carbon_aware_pauses_resumes_and_matches_uninterrupted(dataset, tmp_path, reference):
    clock = FakeClock(step_s=600)  # 6 steps of 10 min: 1 h of work, 8 h to the deadline
    summary = _carbon_trainer(dataset, tmp_path, clock).fit()
    assert _losses(tmp_path / "run") == reference["losses"]
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    kinds = [(e["event"], e["step"]) for e in events]
    # after step 1 the grid is at 500 and two 100 hours come at 02:00: checkpoint, then pause until then
    assert kinds.index(("checkpoint", 1)) < kinds.index(("pause", 1)) < kinds.index(("unpause", 1))
    pause = next(e for e in events if e["event"] == "pause")
    assert pause["until"] == "2026-01-01T02:00:00+00:00" and pause["threshold_g_per_kwh"] == 100
    assert sum(e["event"] == "pause" for e in events) == 1
    assert clock.slept == pytest.approx(110 * 60)
    saved = next(e for e in events if e["event"] == "carbon_saved")
    assert saved["co2_saved_g"] > 0 and saved["co2_immediate_g"] > saved["co2_g"]
    assert saved["paused_s"] == pytest.approx(110 * 60) and summary["co2_saved_g"] == saved["co2_saved_g"]


def test_kill_during_carbon_pause_loses_nothing_and_energy_continues(dataset, tmp_path, reference):
    clock = FakeClock(step_s=600)
    t = _carbon_trainer(dataset, tmp_path, clock)
    clock.on_sleep = lambda: t.request_stop("SIGTERM")  # SIGTERM arrives while paused
    assert t.fit()["stopped"] == "SIGTERM"
    assert [e["step"] for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["event"] == "preempted"] == [1]
    at_stop = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["energy_j"]
    cfg = _cfg(dataset, tmp_path)  # resumed without carbon-awareness: it runs straight on
    Trainer(cfg, tmp_path / "run").fit()
    assert _losses(tmp_path / "run") == reference["losses"]
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert recs[1]["step"] == 2 and recs[1]["energy_j"] > at_stop  # the totals went on from the checkpoint


def test_a_failed_setup_leaves_no_energy_poller(rapl, dataset, tmp_path):
    """The RAPL meter polls in a thread from the moment the accountant exists; a Trainer whose setup fails
    after that (here: its only checkpoint is damaged) must stop it, or it outlives the error."""
    import threading

    from leantrain.errors import CheckpointError

    cfg = tiny_config(dataset, train__steps=2, checkpoint__every=2, energy__rapl_root=str(rapl))
    Trainer(cfg, tmp_path / "run").fit()
    for f in (tmp_path / "run" / "checkpoints").glob("step-*/model.safetensors"):
        f.write_bytes(b"not safetensors")
    def pollers() -> set[threading.Thread]:  # other tests' accountants may still be polling
        return {t for t in threading.enumerate() if t.name == "leantrain-energy-poll" and t.is_alive()}

    before = pollers()
    with pytest.raises(CheckpointError):
        Trainer(cfg, tmp_path / "run")
    assert pollers() - before == set()
