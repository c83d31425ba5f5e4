"""leantrain's energy meter beside CodeCarbon's, on the same training run (goal: within +-10%).

One tiny-recipe training run in this process. CodeCarbon's OfflineEmissionsTracker (no network; its
files go to a temp dir) and a leantrain EnergyAccountant (the meter `energy.meter = auto` picks here)
both measure the same interval: the tracker starts, the accountant opens, `Trainer.fit()` runs, the
accountant is read, the tracker stops. Printed: each one's kWh, split into CPU and memory (RAM), the
mode each used, and the ratio leantrain / CodeCarbon. Compare like with like: where neither can read
RAPL (VMs) both estimate; the line "modes" says which.

What differs by design: CodeCarbon's CPU estimate is TDP x (0.1 + 0.9 x load^3) with the machine's load
and 4 W per thread for a CPU its table lacks; leantrain's is TDP x (0.2 + 0.8 x this process's CPU share)
with 3.5 W per thread (leantrain.energy.meters). Memory is the same rule in both (CodeCarbon 3.3.2's
DIMM heuristic), which is why it is printed apart.

    python bench/energy_vs_codecarbon.py              # 60 steps of the tiny recipe
    python bench/energy_vs_codecarbon.py --steps 30 --country USA
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from pathlib import Path

from _data import dataset  # bench/ is on sys.path when a bench runs as a script

REGION = {"USA": "US", "FRA": "FR", "DEU": "DE", "GBR": "GB", "IRL": "IE", "CHE": "CH"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0, help="train.threads (0: one per physical core)")
    ap.add_argument("--country", default="USA", choices=sorted(REGION), help="ISO 3166 alpha-3 code for CodeCarbon")
    ap.add_argument("--data", default=None, help="a token dataset (default: data/stdlib, else a small one)")
    args = ap.parse_args()

    import codecarbon
    from codecarbon import OfflineEmissionsTracker

    from leantrain.config import load_config
    from leantrain.device import cpu_model
    from leantrain.energy.accounting import EnergyAccountant
    from leantrain.train.trainer import Trainer

    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as scratch:
        data = dataset(args.data, Path(scratch))
        cfg = load_config(recipe="tiny", overrides={
            "data": {"path": data},
            "train": {"steps": args.steps, "eval_every": 0, "eval_steps": 1, "sample_tokens": 0,
                      "threads": args.threads},
            "checkpoint": {"every": 0},
            "log": {"progress": "none", "grad_health_every": 0},
            "energy": {"meter": "auto", "region": REGION[args.country], "pue": 1.0},  # CodeCarbon's PUE is 1
        })
        trainer = Trainer(cfg, Path(scratch) / "run", resume=False)
        tracker = OfflineEmissionsTracker(country_iso_code=args.country, output_dir=scratch, save_to_file=False,
                                          measure_power_secs=5, log_level="error", tracking_mode="machine")
        tracker.start()
        acc = EnergyAccountant(cfg.energy, "cpu")
        t0 = time.monotonic()
        trainer.fit()
        ours = acc.summary()
        ram_j = acc.meter.ram_j() if hasattr(acc.meter, "ram_j") else 0.0
        wall = time.monotonic() - t0
        tracker.stop()
        acc.close()
        cc = tracker.final_emissions_data

    lt_kwh = ours["energy_kwh"]
    lt_ram = ram_j / 3.6e6
    print(f"cpu: {cpu_model()} ({platform.machine()}), codecarbon {codecarbon.__version__}, "
          f"{args.steps} steps in {wall:.1f} s")
    print(f"modes: leantrain source={ours['energy_source']} ({ours['energy_counted']}); "
          f"codecarbon cpu={tracker._conf.get('cpu_model')!r} via {cc.tracking_mode} tracking, "
          f"cpu {cc.cpu_power:.1f} W, ram {cc.ram_power:.1f} W")
    print(f"{'':12}{'total kWh':>12}{'cpu kWh':>12}{'ram kWh':>12}{'CO2 g':>10}")
    print(f"{'leantrain':12}{lt_kwh:12.3e}{lt_kwh - lt_ram:12.3e}{lt_ram:12.3e}{ours['co2_g']:10.3g}")
    print(f"{'codecarbon':12}{cc.energy_consumed:12.3e}{cc.cpu_energy:12.3e}{cc.ram_energy:12.3e}"
          f"{cc.emissions * 1000:10.3g}")
    ratio = lt_kwh / cc.energy_consumed
    print(f"ratio leantrain / codecarbon: energy {ratio:.3f} (cpu {(lt_kwh - lt_ram) / cc.cpu_energy:.3f}, "
          f"ram {lt_ram / cc.ram_energy:.3f}); goal 0.90-1.10: {'PASS' if 0.9 <= ratio <= 1.1 else 'MISS'}")


if __name__ == "__main__":
    main()
