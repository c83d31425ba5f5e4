"""report.html of a run directory: what the run did and cost, next to what the planner predicted.

One self-contained page (inline SVG charts, inline CSS, no scripts, no network) built only from the
files of the run directory: config.toml, plan.json, metrics.jsonl, events.jsonl, samples.txt.
Keys a run may lack (energy_j, co2_g, cost_usd and power_w come from the energy meter) are skipped.
"""

from __future__ import annotations

import json
import statistics
import time
from html import escape
from pathlib import Path
from typing import Any

from leantrain.errors import LeantrainError
from leantrain.files import write_durable
from leantrain.report.svg import line_chart

# events marked on the loss chart; the BAD ones are also shown in red in the events table
BAD_EVENTS = {"skip", "rollback", "restart", "preempted", "diverged", "checkpoint_failed", "checkpoint_damaged",
              "grad_warning", "config_changed"}
MARKED_EVENTS = BAD_EVENTS | {"pause", "unpause", "resume"}

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


def _comparison(plan: dict, meas: dict) -> str:
    est = plan.get("estimate")
    if not isinstance(est, dict):
        return "<p>plan.json holds no estimate (a run from before the planner, or the estimate failed).</p>"
    rows = [("peak memory", "peak_memory_bytes", _bytes), ("step time", "step_time_s", _seconds),
            ("run time", "time_s", _seconds), ("MFU", "mfu_assumed", lambda v: "–" if v is None else f"{v:.1%}"),
            ("energy (kWh)", "energy_kwh", _plain), ("CO2e (g)", "co2_g", _plain), ("cost (USD)", "cost_usd", _plain)]
    body = []
    for label, key, f in rows:
        p, m = _num(est.get(key)), meas.get(key)
        ratio = f"{p / m:.2f}" if p is not None and m else "–"
        body.append(f"<tr><td>{label}</td><td class=n>{f(p)}</td><td class=n>{f(m)}</td><td class=n>{ratio}</td></tr>")
    head = (f"<p>Planned for <b>{escape(str(est.get('hardware', '?')))}</b>, strategy "
            f"<b>{escape(str(est.get('strategy', '?')))}</b>. Run time counts the steps this process ran; "
            "a resumed run measures only its last part.</p>")
    return head + ("<table><tr><th>quantity</th><th>predicted</th><th>measured</th><th>predicted / measured</th></tr>"
                   + "".join(body) + "</table>")


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


def render(run_dir: str | Path) -> str:
    """The report page of `run_dir` as HTML text."""
    run = Path(run_dir)
    if not (run / "config.toml").is_file() and not (run / "metrics.jsonl").is_file():
        raise LeantrainError(f"{run} is not a run directory (no config.toml or metrics.jsonl); "
                             "pass the folder that `leantrain train` printed")
    metrics, _ = read_records(run / "metrics.jsonl")
    events, _ = read_records(run / "events.jsonl")
    try:
        plan = json.loads((run / "plan.json").read_text())
    except (OSError, ValueError, RecursionError):
        plan = {}
    plan = plan if isinstance(plan, dict) else {}
    config = _text(run / "config.toml")
    meas = measured(metrics, plan)
    markers = [(float(e["step"]), f"{e['event']} at step {e['step']}") for e in events
               if e.get("event") in MARKED_EVENTS and _num(e.get("step")) is not None]

    charts = [line_chart({"train loss": _series(metrics, "loss"), "val loss": _series(metrics, "val_loss")},
                         title="Loss", y_label="cross-entropy", markers=markers),
              line_chart({"tokens/s": _series(metrics, "tokens_per_s")}, title="Throughput", y_label="tokens/s"),
              line_chart({"MFU %": _series(metrics, "mfu", 100)}, title="Model FLOP utilisation", y_label="%"),
              line_chart({"peak MiB": _series(metrics, "peak_mem_bytes", 1 / 1024**2)}, title="Peak memory",
                         y_label="MiB")]
    if any("power_w" in r for r in metrics):
        charts.append(line_chart({"W": _series(metrics, "power_w")}, title="Power", y_label="W"))
    if any("energy_j" in r for r in metrics):
        charts.append(line_chart({"Wh": _series(metrics, "energy_j", 1 / 3600)}, title="Energy", y_label="Wh"))
    if any("co2_g" in r for r in metrics):
        charts.append(line_chart({"g CO2e": _series(metrics, "co2_g")}, title="CO2e", y_label="g"))
    if any("cost_usd" in r for r in metrics):
        charts.append(line_chart({"USD": _series(metrics, "cost_usd")}, title="Cost", y_label="USD"))

    last = metrics[-1] if metrics else {}
    val = [r["val_loss"] for r in metrics if _num(r.get("val_loss")) is not None]
    sources = sorted({str(r["energy_source"]) for r in metrics if r.get("energy_source")})
    cards = [("steps", f"{last.get('step', 0):,}"), ("tokens", f"{last.get('tokens', 0):,}"),
             ("last loss", _plain(_num(last.get("loss")), 4)), ("val loss", _plain(val[-1], 4) if val else "–"),
             ("tokens/s", f"{meas['tokens_per_s']:,.0f}" if meas["tokens_per_s"] else "–"),
             ("MFU", f"{meas['mfu_assumed']:.1%}" if meas["mfu_assumed"] is not None else "–"),
             ("peak memory", _bytes(meas["peak_memory_bytes"])), ("time", _seconds(meas["time_s"]))]
    if meas["energy_kwh"] is not None:
        cards.append(("energy", f"{meas['energy_kwh'] * 1000:.3g} Wh"))
    if meas["co2_g"] is not None:
        cards.append(("CO2e", f"{meas['co2_g']:.3g} g"))
    if meas["cost_usd"] is not None:
        cards.append(("cost", f"${meas['cost_usd']:.3g}"))
    sub = [f"{plan['params']:,} parameters" if "params" in plan else "",
           escape(str(plan.get("device", ""))), escape(str(plan.get("dtype", ""))),
           escape(str((plan.get("parallel") or {}).get("strategy", ""))),
           f"energy from {escape(', '.join(sources))}" if sources else ""]
    samples = _text(run / "samples.txt")[-3000:]
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>leantrain report · {escape(run.resolve().name)}</title><style>{CSS}</style></head><body>",
        f"<h1>leantrain run {escape(run.resolve().name)}</h1>",
        f"<div class=sub>{' · '.join(s for s in sub if s)} · report written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</div>",
        "<div class=cards>" + "".join(f"<div class=card><b>{escape(v)}</b><span>{escape(k)}</span></div>"
                                      for k, v in cards) + "</div>",
        "<h2>Curves</h2><div class=grid>" + "".join(charts) + "</div>",
        "<h2>Predicted vs measured</h2>" + _comparison(plan, meas),
        "<h2>Events</h2>" + _events_table(events),
        "<h2>Config</h2><pre>" + escape(config) + "</pre>",
    ]
    if samples:
        parts.append("<h2>Sample</h2><pre>" + escape(samples) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write report.html into the run directory (or `out`, a file path); returns its path. Written
    durably (temp, fsync, rename), so a failure leaves no partial page and no temporary file."""
    path = Path(out) if out else Path(run_dir) / "report.html"
    html = render(run_dir)  # first: a run folder that is not one is the error to report, not the page's folder
    if path.is_dir():
        raise LeantrainError(f"{path} is a folder; pass a file path for the page, e.g. --out {path / 'report.html'}")
    if not path.parent.is_dir():
        raise LeantrainError(f"cannot write {path}: the folder {path.parent} does not exist; create it or pick "
                             "another --out")
    try:
        write_durable(path, html)
    except OSError as e:
        raise LeantrainError(f"cannot write {path}: {e.strerror or e}; check free space and permissions") from None
    return path
