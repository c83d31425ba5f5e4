"""report.html of a run directory: what the run did and cost, next to what the planner predicted.

One self-contained page (inline SVG charts, inline CSS, no scripts, no network) built only from the
files of the run directory: config.toml, plan.json, metrics.jsonl, events.jsonl, samples.txt.
Keys a run may lack (energy_j, co2_g, cost_usd and power_w come from the energy meter) are skipped.
`read_run` and `final_figures` are shared with `leantrain compare` (report/compare.py), so both show
a run's closing tokens/s and MFU exactly as the terminal's `done:` line printed them.
"""

from __future__ import annotations

import json
import statistics
import time
import tomllib
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from leantrain.errors import LeantrainError
from leantrain.files import write_durable
from leantrain.report.federated import section as federated_section
from leantrain.report.svg import heat_map, line_chart

# events marked on the loss chart; the BAD ones are also shown in red in the events table
BAD_EVENTS = {"skip", "rollback", "restart", "preempted", "diverged", "checkpoint_failed", "checkpoint_damaged",
              "grad_warning", "config_changed"}
MARKED_EVENTS = BAD_EVENTS | {"pause", "unpause", "resume"}
# marks the pages leantrain writes: an existing file without it (or an older report's title) is not replaced
GENERATOR = '<meta name=generator content="leantrain {what}">'
OLD_REPORT_HEAD = "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>\n<title>leantrain report"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1140px;
color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-bottom:16px}.grid{display:flex;flex-wrap:wrap;gap:12px}
.grid svg{border:1px solid #ddd;background:#fff}
table{border-collapse:collapse;background:#fff;font-size:13px}td,th{border:1px solid #ddd;padding:4px 10px;
text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f0f0f0}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #ddd;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:18px}.card span{color:#666;font-size:12px}
pre{background:#fff;border:1px solid #ddd;padding:10px;font-size:12px;overflow:auto;max-height:420px}
.bad{color:#b00}.ok{color:#070}
.caveat{background:#fff4e0;border-left:4px solid #e69500;padding:6px 10px;margin:6px 0}
td.basis{color:#555;font-size:12px;max-width:520px}.note{color:#666;font-size:13px}
"""


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _series(metrics: list[dict], key: str, scale: float = 1.0) -> list[tuple[float, float]]:
    return [(r["step"], r[key] * scale) for r in metrics if "step" in r and _num(r.get(key)) is not None]


def _bytes(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v / 1024**3:.2f} GiB" if v >= 1024**3 else f"{v / 1024**2:.0f} MiB"


def _seconds(v: float | None) -> str:
    if v is None:
        return "–"
    if v < 1:
        return f"{v * 1000:.0f} ms"
    if v < 120:
        return f"{v:.1f} s"
    return f"{v / 60:.1f} min" if v < 7200 else f"{v / 3600:.1f} h"


def _plain(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}g}"


def measured(metrics: list[dict], plan: dict) -> dict[str, float | None]:
    """The measured counterparts of the planner's estimate block."""
    def last(key: str) -> float | None:
        vals = [r[key] for r in metrics if _num(r.get(key)) is not None]
        return float(vals[-1]) if vals else None

    logged = [r for r in metrics if _num(r.get("tokens_per_s"))]
    timed = logged[1:] or logged  # the first line holds the warm-up
    tps = statistics.median(r["tokens_per_s"] for r in timed) if timed else None
    tokens_per_step = plan.get("tokens_per_step")
    energy_j = last("energy_j")
    mems = [r["peak_mem_bytes"] for r in metrics if _num(r.get("peak_mem_bytes"))]
    return {
        "peak_memory_bytes": float(max(mems)) if mems else None,
        "step_time_s": tokens_per_step / tps if tps and tokens_per_step else None,
        "time_s": last("elapsed_s"),
        "mfu_assumed": statistics.median(r["mfu"] for r in timed if _num(r.get("mfu")) is not None)
        if any(_num(r.get("mfu")) is not None for r in timed) else None,
        "energy_kwh": energy_j / 3.6e6 if energy_j is not None else None,
        "co2_g": last("co2_g"),
        "cost_usd": last("cost_usd"),
        "tokens_per_s": tps,
    }


def final_figures(metrics: list[dict], events: list[dict]) -> dict[str, Any]:
    """The figures the terminal's closing `done:` line printed: the trainer's summary (the `end` event),
    whose tokens/s and MFU are those of the run's last metrics window. A run killed before its end event
    (or resumed and killed after an earlier one) falls back to its last metrics line, the summary's source."""
    last = metrics[-1] if metrics else {}
    ends = [e for e in events if e.get("event") == "end" and _num(e.get("step")) is not None]
    if ends and ends[-1]["step"] >= (_num(last.get("step")) or 0):
        return dict(ends[-1])
    energy_j = _num(last.get("energy_j"))
    return {"step": last.get("step"), "tokens": last.get("tokens"), "loss": last.get("loss"),
            "val_loss": next((r["val_loss"] for r in reversed(metrics) if _num(r.get("val_loss")) is not None), None),
            "tokens_per_s": last.get("tokens_per_s"), "mfu": last.get("mfu"),
            "energy_kwh": energy_j / 3.6e6 if energy_j is not None else None, "co2_g": last.get("co2_g"),
            "cost_usd": last.get("cost_usd"), "energy_source": last.get("energy_source")}


def _basis(plan: dict, est: dict, config: dict, energy_event: dict) -> dict[str, str]:
    """What each prediction rests on: the calibration (MFU), peak, power and prices the planner used."""
    mfu_src = str(est.get("mfu_source") or "not recorded (plan.json from before the planner wrote it)")
    peak = _num(est.get("peak_flops"))
    peak_txt = (f"peak {peak / 1e12:.3g} TFLOP/s ({escape(str(plan.get('peak_flops_source', 'catalog')))})"
                if peak else "peak not recorded")
    e = config.get("energy") if isinstance(config.get("energy"), dict) else {}
    tdp = _num(est.get("tdp_w"))
    if _num(e.get("tdp_w")):
        tdp_from = "energy.tdp_w in the config"
    elif plan.get("device") == "cpu":
        tdp_from = "3.5 W per logical CPU, the estimate meter's rule"
    else:
        tdp_from = "the hardware catalog's TDP"
    devices = _num(est.get("devices")) or 1
    ram = _num(est.get("ram_w"))
    power = (f"{tdp:.4g} W per device ({tdp_from}) x {devices:g} device(s)" if tdp else f"device TDP ({tdp_from})")
    power += f" + {ram:.3g} W memory power" if ram else ""
    intensity = energy_event.get("intensity") or f"region {e.get('region', 'world')}"
    time_basis = f"FLOPs / ({peak_txt} x MFU {_plain(_num(est.get('mfu_assumed')))}: {escape(mfu_src)})"
    rental = _num(est.get("price_per_device_hour", e.get("price_per_device_hour")))
    rental_from = est.get("price_source", "energy.price_per_device_hour")
    return {
        "peak_memory_bytes": "analytic model of weights, gradients, optimizer state and activations "
                             "(leantrain.plan.memory); no calibration",
        "step_time_s": time_basis, "time_s": time_basis + " x steps, plus evaluation",
        "mfu_assumed": escape(mfu_src),
        "energy_kwh": f"{escape(power)} x predicted run time (before PUE)",
        "co2_g": f"energy x PUE {_plain(_num(e.get('pue')))} x {escape(str(intensity))}",
        "cost_usd": f"facility energy x {_plain(_num(e.get('price_per_kwh')))} USD/kWh"
                    + (f" + {_plain(rental)} USD per device-hour ({escape(str(rental_from))})"
                       if rental and rental > 0 else ""),
    }


def caveats(plan: dict, meas: dict, energy_source: str | None) -> list[str]:
    """Why a predicted-vs-measured pair may disagree, in words: an uncalibrated machine first."""
    est = plan.get("estimate") if isinstance(plan.get("estimate"), dict) else {}
    out = []
    src = est.get("mfu_source")
    if not isinstance(src, str):
        out.append("plan.json does not say which calibration the time prediction used (a run from before the "
                   "planner recorded it): read the time, energy, CO2e and cost predictions as rough.")
    elif not src.startswith("measured"):
        out.append(f"This machine was not calibrated: no measured MFU exists for this device kind and dtype, so "
                   f"time, energy, CO2e and cost assume MFU {_plain(_num(est.get('mfu_assumed')))} ({src}). Run "
                   "`python bench/plan_accuracy.py --calibrate` on it to measure one.")
    assumed, got = _num(est.get("mfu_assumed")), meas.get("mfu_assumed")
    if src and assumed and got and not 0.5 <= got / assumed <= 2:
        out.append(f"The measured MFU ({got:.1%}) is far from the calibrated {assumed:.1%}: the calibration was "
                   "measured on another machine or setting, or other work shared this one; recalibrate on an "
                   "idle machine before trusting time predictions.")
    if energy_source == "estimate":
        out.append("No power meter was readable: the measured energy is itself an estimate (TDP x utilisation), "
                   "so the energy, CO2e and cost rows compare two models, not a model and a meter.")
    return out


def _comparison(plan: dict, meas: dict, config: dict, energy_event: dict, energy_source: str | None) -> str:
    est = plan.get("estimate")
    if not isinstance(est, dict) or "error" in est:
        why = f" ({escape(str(est['error']))})" if isinstance(est, dict) and "error" in est else ""
        return f"<p>plan.json holds no estimate (a run from before the planner, or the estimate failed){why}.</p>"
    basis = _basis(plan, est, config, energy_event)
    rows = [("peak memory", "peak_memory_bytes", _bytes), ("step time", "step_time_s", _seconds),
            ("run time", "time_s", _seconds), ("MFU", "mfu_assumed", lambda v: "–" if v is None else f"{v:.1%}"),
            ("energy (kWh)", "energy_kwh", _plain), ("CO2e (g)", "co2_g", _plain), ("cost (USD)", "cost_usd", _plain)]
    body = []
    for label, key, f in rows:
        p, m = _num(est.get(key)), meas.get(key)
        ratio = f"{p / m:.2f}" if p is not None and m else "–"
        body.append(f"<tr><td>{label}</td><td class=n>{f(p)}</td><td class=n>{f(m)}</td><td class=n>{ratio}</td>"
                    f"<td class=basis>{basis[key]}</td></tr>")
    head = (f"<p>Planned for <b>{escape(str(est.get('hardware', '?')))}</b>, strategy "
            f"<b>{escape(str(est.get('strategy', '?')))}</b>. Measured step time and MFU are medians over the logged "
            "windows (the first, warm-up, left out). Run time counts the steps this process ran; a resumed run "
            "measures only its last part.</p>")
    notes = caveats(plan, meas, energy_source)
    warn = "".join(f"<p class=caveat>{escape(n)}</p>" for n in notes)
    return head + warn + ("<table><tr><th>quantity</th><th>predicted</th><th>measured</th><th>predicted / measured"
                          "</th><th>prediction based on</th></tr>" + "".join(body) + "</table>")


def _events_table(events: list[dict]) -> str:
    shown = [e for e in events if e.get("event") not in ("checkpoint",)]
    if not shown:
        return "<p>No events.</p>"
    rows = []
    for e in shown[-200:]:
        kind = str(e.get("event", "?"))
        detail = e.get("message") or ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("event", "step", "time"))
        cls = ' class="bad"' if kind in BAD_EVENTS else ""
        when = time.strftime("%H:%M:%S", time.gmtime(e["time"])) if _num(e.get("time")) else ""
        rows.append(f"<tr><td class=n>{escape(str(e.get('step', '')))}</td><td>{when}</td><td{cls}>{escape(kind)}</td>"
                    f"<td>{escape(str(detail))[:300]}</td></tr>")
    ckpts = len(events) - len(shown)
    note = f"<p>{ckpts} checkpoint events not listed.</p>" if ckpts else ""
    return ("<table><tr><th>step</th><th>time (UTC)</th><th>event</th><th>detail</th></tr>" + "".join(rows)
            + "</table>" + note)


def _record(line: str) -> dict | None:
    """One JSONL line as a record the page can show: an object whose step and time (if any) are numbers."""
    try:
        r = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(r, dict) or any(k in r and _num(r[k]) is None for k in ("step", "time")):
        return None
    if "time" in r and not 0 <= r["time"] < 2**33:  # time.gmtime refuses what no clock wrote
        return None
    return r


def read_records(path: Path) -> tuple[list[dict], list[int]]:
    """The records of a run's JSONL file and the numbers of the lines that are not records (hand-edited,
    damaged, torn by a kill, not UTF-8): the report skips those and says so instead of failing."""
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return [], []
    except OSError as e:
        raise LeantrainError(f"{path} cannot be read ({e.strerror or e}); check its permissions") from None
    records, bad = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            r = _record(line)
            if r is None:
                bad.append(i)
            else:
                records.append(r)
    return records, bad


def skipped_lines(run_dir: str | Path) -> list[str]:
    """One warning per JSONL file of the run with lines the report had to skip."""
    out = []
    for name in ("metrics.jsonl", "events.jsonl"):
        _, bad = read_records(Path(run_dir) / name)
        if bad:
            lines = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            out.append(f"{Path(run_dir) / name}: {len(bad)} line(s) are not JSON records and were skipped "
                       f"(line {lines})")
    return out


def _text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace") if path.is_file() else ""


@dataclass
class RunFiles:
    """What a run directory holds, read leniently: records that are not JSON objects are skipped (their line
    numbers kept in `bad_lines`), an unreadable plan.json or config.toml reads as empty."""

    path: Path
    metrics: list[dict]
    events: list[dict]
    plan: dict
    config_text: str
    config: dict
    bad_lines: dict[str, list[int]]


def read_run(run_dir: str | Path) -> RunFiles:
    """The files of a run directory (LeantrainError when it is not one)."""
    run = Path(run_dir)
    if not (run / "config.toml").is_file() and not (run / "metrics.jsonl").is_file():
        raise LeantrainError(f"{run} is not a run directory (no config.toml or metrics.jsonl); "
                             "pass the folder that `leantrain train` printed")
    metrics, bad_m = read_records(run / "metrics.jsonl")
    events, bad_e = read_records(run / "events.jsonl")
    try:
        plan = json.loads((run / "plan.json").read_text())
    except (OSError, ValueError, RecursionError):
        plan = {}
    config_text = _text(run / "config.toml")
    try:
        config = tomllib.loads(config_text)
    except (tomllib.TOMLDecodeError, RecursionError):
        config = {}
    return RunFiles(run, metrics, events, plan if isinstance(plan, dict) else {}, config_text, config,
                    {"metrics.jsonl": bad_m, "events.jsonl": bad_e})


def _groups(names: list[str], limit: int = 8) -> list[str]:
    """At most `limit` layer groups to draw: the ones outside the blocks and blocks spread evenly over depth."""
    blocks = sorted((n for n in names if n.startswith("layers.")), key=lambda n: (len(n), n))
    others = [n for n in names if not n.startswith("layers.")]
    room = max(2, limit - len(others))
    if len(blocks) > room:
        blocks = [blocks[round(i * (len(blocks) - 1) / (room - 1))] for i in range(room)]
    return [*blocks, *others][:max(limit, 2)]


def run_charts(metrics: list[dict], events: list[dict]) -> tuple[list[str], list[str]]:
    """(SVG charts of a run's metrics, notes on charts left out and why)."""
    markers = [(float(e["step"]), f"{e['event']} at step {e['step']}") for e in events
               if e.get("event") in MARKED_EVENTS and _num(e.get("step")) is not None]
    charts = [line_chart({"train loss": _series(metrics, "loss"), "val loss (eval)": _series(metrics, "val_loss")},
                         title="Loss", y_label="cross-entropy", markers=markers, dots=["val loss (eval)"]),
              line_chart({"lr": _series(metrics, "lr")}, title="Learning rate", y_label="lr"),
              line_chart({"grad norm": _series(metrics, "grad_norm")}, title="Gradient norm",
                         y_label="global L2 norm, before clipping", markers=markers)]
    notes = []
    ratios = [r for r in metrics if isinstance(r.get("update_ratio"), dict) and _num(r.get("step")) is not None]
    if ratios:
        names = list(dict.fromkeys(k for r in ratios for k in r["update_ratio"]))
        series = {g: [(r["step"], v) for r in ratios if _num(v := r["update_ratio"].get(g)) is not None]
                  for g in _groups(names)}
        charts.append(line_chart(series, title="Update / weight ratio per layer group",
                                 y_label="|update| / |weight|", log_y=True))
    else:
        notes.append("No update/weight ratios: the run logged none (log.grad_health_every is 0 or larger than the "
                     "steps run).")
    charts += [line_chart({"tokens/s": _series(metrics, "tokens_per_s")}, title="Throughput", y_label="tokens/s"),
               line_chart({"MFU %": _series(metrics, "mfu", 100)}, title="Model FLOP utilisation", y_label="%"),
               line_chart({"peak MiB": _series(metrics, "peak_mem_bytes", 1 / 1024**2)}, title="Peak memory",
                          y_label="MiB")]
    if any("power_w" in r for r in metrics):
        charts.append(line_chart({"W": _series(metrics, "power_w")}, title="Power", y_label="W"))
    if any("energy_j" in r for r in metrics):
        charts.append(line_chart({"Wh": _series(metrics, "energy_j", 1 / 3600)}, title="Energy, cumulative",
                                 y_label="Wh"))
    if any("co2_g" in r for r in metrics):
        charts.append(line_chart({"g CO2e": _series(metrics, "co2_g")}, title="CO2e, cumulative", y_label="g"))
    if any("cost_usd" in r for r in metrics):
        charts.append(line_chart({"USD": _series(metrics, "cost_usd")}, title="Cost, cumulative", y_label="USD"))
    if not any("energy_j" in r for r in metrics):
        notes.append("No energy, CO2e or cost curves: the run had no energy meter (energy.meter = off).")
    charts += _moe_charts(metrics)
    return charts, notes


def _moe_charts(metrics: list[dict]) -> list[str]:
    """Mixture-of-experts runs: each layer's share of routed tokens per expert over time (a heat map, white at
    the uniform share) and the balance losses; nothing for a dense run."""
    loads = [r for r in metrics if _num(r.get("step")) is not None and isinstance(r.get("moe_load"), list)
             and r["moe_load"] and all(isinstance(layer, list) for layer in r["moe_load"])]
    if not loads:
        return []
    shape = [len(layer) for layer in loads[-1]["moe_load"]]
    loads = [r for r in loads if [len(layer) for layer in r["moe_load"]] == shape]
    rows = [f"L{i} e{e}" for i, n in enumerate(shape) for e in range(n)]
    values = [[_num(r["moe_load"][i][e]) if _num(r["moe_load"][i][e]) is not None else float("nan") for r in loads]
              for i, n in enumerate(shape) for e in range(n)]
    charts = [heat_map(rows, [float(r["step"]) for r in loads], values, center=1 / max(shape),
                       title="Expert load (share of routed tokens, per MoE layer and expert)",
                       row_h=max(3, min(10, 320 // len(rows))))]
    charts.append(line_chart({"max / mean load": _series(metrics, "moe_load_max_over_mean")},
                             title="Expert imbalance (worst layer)", y_label="max / mean"))
    if any("moe_aux" in r or "moe_z" in r for r in metrics):
        charts.append(line_chart({"aux": _series(metrics, "moe_aux"), "z": _series(metrics, "moe_z")},
                                 title="MoE balance losses", y_label="loss"))
    return charts


def render(run_dir: str | Path) -> str:
    """The report page of `run_dir` as HTML text."""
    rf = read_run(run_dir)
    run, metrics, events, plan = rf.path, rf.metrics, rf.events, rf.plan
    meas = measured(metrics, plan)
    final = final_figures(metrics, events)
    charts, notes = run_charts(metrics, events)
    energy_event = next((e for e in reversed(events) if e.get("event") == "energy"), {})

    last = metrics[-1] if metrics else {}
    val = [r["val_loss"] for r in metrics if _num(r.get("val_loss")) is not None]
    sources = sorted({str(r["energy_source"]) for r in metrics if r.get("energy_source")})
    tps, mfu = _num(final.get("tokens_per_s")), _num(final.get("mfu"))
    cards = [("steps", f"{last.get('step', 0):,}"), ("tokens", f"{last.get('tokens', 0):,}"),
             ("last loss", _plain(_num(last.get("loss")), 4)), ("val loss", _plain(val[-1], 4) if val else "–"),
             # the terminal's `done:` figures: the trainer's summary, the last metrics window
             ("tokens/s", f"{tps:,.0f}" if tps else "–"), ("MFU", f"{mfu:.1%}" if mfu is not None else "–"),
             ("peak memory", _bytes(meas["peak_memory_bytes"])), ("time", _seconds(meas["time_s"]))]
    energy_kwh = _num(final.get("energy_kwh"))
    if energy_kwh is not None:
        cards.append(("energy", f"{energy_kwh * 1000:.3g} Wh"))
    if _num(final.get("co2_g")) is not None:
        cards.append(("CO2e", f"{final['co2_g']:.3g} g"))
    if _num(final.get("cost_usd")) is not None:
        cards.append(("cost", f"${final['cost_usd']:.3g}"))
    sub = [f"{plan['params']:,} parameters" if _num(plan.get("params")) else "",
           escape(str(plan.get("device", ""))), escape(str(plan.get("dtype", ""))),
           escape(str((plan.get("parallel") or {}).get("strategy", ""))
                  if isinstance(plan.get("parallel"), dict) else ""),
           f"energy from {escape(', '.join(sources))}" if sources else ""]
    samples = _text(run / "samples.txt")[-3000:]
    parts = [
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>{GENERATOR.format(what='report')}",
        f"<title>leantrain report · {escape(run.resolve().name)}</title><style>{CSS}</style></head><body>",
        f"<h1>leantrain run {escape(run.resolve().name)}</h1>",
        f"<div class=sub>{' · '.join(s for s in sub if s)} · report written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</div>",
        "<div class=cards>" + "".join(f"<div class=card><b>{escape(v)}</b><span>{escape(k)}</span></div>"
                                      for k, v in cards) + "</div>",
        "<p class=note>tokens/s and MFU are the figures of the terminal's closing <code>done:</code> line: "
        "the last logged window, evaluation time excluded.</p>",
        "<h2>Curves</h2><div class=grid>" + "".join(charts) + "</div>"
        + "".join(f"<p class=note>{escape(n)}</p>" for n in notes),
        federated_section(run, metrics),  # "" unless the run is a federation
        "<h2>Predicted vs measured</h2>" + _comparison(plan, meas, rf.config, energy_event,
                                                         final.get("energy_source") or (sources or [None])[-1]),
        "<h2>Events</h2>" + _events_table(events),
        "<h2>Config</h2><pre>" + escape(rf.config_text) + "</pre>",
    ]
    if samples:
        parts.append("<h2>Sample</h2><pre>" + escape(samples) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def check_page_target(path: Path, flag: str = "--out") -> None:
    """Refuse to write a page over a folder, into a missing folder, or over a file leantrain did not write."""
    if path.is_dir():
        raise LeantrainError(f"{path} is a folder; pass a file path for the page, e.g. {flag} {path / 'report.html'}")
    if not path.parent.is_dir():
        raise LeantrainError(f"cannot write {path}: the folder {path.parent} does not exist; create it or pick "
                             f"another {flag}")
    if path.is_symlink() or (path.exists() and not path.is_file()):  # never opened: a FIFO would block
        raise LeantrainError(f"{path} exists and was not written by leantrain; refusing to replace it: "
                             f"move it away or pick another {flag}")
    if path.exists():
        try:
            with open(path, "rb") as f:
                head = f.read(4096).decode("utf-8", errors="replace")
        except OSError as e:
            raise LeantrainError(f"cannot check {path} before replacing it ({e.strerror or e}); pick another "
                                 f"{flag}") from None
        if not (GENERATOR.split("{")[0] in head or head.startswith(OLD_REPORT_HEAD)):
            raise LeantrainError(f"{path} exists and was not written by leantrain; refusing to replace it: "
                                 f"move it away or pick another {flag}")


def write_page(path: Path, html: str, flag: str = "--out") -> Path:
    """Write a page leantrain made, durably (temp, fsync, rename): a failure leaves no partial page."""
    check_page_target(path, flag)
    try:
        write_durable(path, html)
    except OSError as e:
        raise LeantrainError(f"cannot write {path}: {e.strerror or e}; check free space and permissions") from None
    return path


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write report.html into the run directory (or `out`, a file path); returns its path. Written
    durably (temp, fsync, rename), so a failure leaves no partial page and no temporary file; a file
    there that leantrain did not write is never replaced."""
    html = render(run_dir)  # first: a run folder that is not one is the error to report, not the page's folder
    if out:
        return write_page(Path(out), html)
    # report.html of a run directory is leantrain's own run file: a link planted there is replaced by the
    # rename, never written through (the run's other files follow the same rule)
    path = Path(run_dir) / "report.html"
    try:
        write_durable(path, html)
    except OSError as e:
        raise LeantrainError(f"cannot write {path}: {e.strerror or e}; check free space and permissions") from None
    return path
