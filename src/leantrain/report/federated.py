"""The federated section of report.html (docs/federated.md): what each round of `leantrain federate` did and
cost, from the run's metrics.jsonl (one line per round, `round` in it) and federated.json (the summary and the
partitions). A run that is not a federation has neither, and gets no section.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from leantrain.report.svg import line_chart


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _cell(v: Any, fmt: str) -> str:
    n = _num(v)
    return f"<td class=n>{format(n, fmt) if n is not None else '–'}</td>"


def _mb(v: Any) -> Any:
    n = _num(v)
    return n / 1e6 if n is not None else None


def read_summary(run_dir: str | Path) -> dict:
    """federated.json, or {} when it is missing or damaged (a federation killed before its end)."""
    try:
        data = json.loads((Path(run_dir) / "federated.json").read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def round_lines(metrics: list[dict]) -> list[dict]:
    """The metrics lines of the federation's rounds (round 0 is the initial model), last one per round: a
    resumed federation logs a round again after the checkpoint it resumed from."""
    by_round = {int(r["round"]): r for r in metrics if _num(r.get("round")) is not None}
    return [by_round[k] for k in sorted(by_round)]


def section(run_dir: str | Path, metrics: list[dict]) -> str:
    """The section's HTML, or "" when the run is not a federation."""
    summary, rounds = read_summary(run_dir), round_lines(metrics)
    if not summary and not rounds:
        return ""
    dp = any(_num(r.get("dp_epsilon")) is not None for r in rounds)
    head = ["round", "val loss", "clients' train loss", "clients ok", "clients failed", "MB to clients",
            "MB from clients", "client energy J", "server energy J (cumulative)", "round s"]
    if dp:
        head.append("ε (cumulative)")
    rows = []
    for r in rounds:
        failed = _num(r.get("clients_failed"))
        cells = [f"<td class=n>{int(r['round'])}</td>", _cell(r.get("val_loss"), ".4f"), _cell(r.get("loss"), ".4f"),
                 _cell(r.get("clients_ok"), ".0f"),
                 f"<td class=\"n{' bad' if failed else ''}\">{int(failed) if failed is not None else '–'}</td>",
                 _cell(_mb(r.get("bytes_sent")), ".3f"), _cell(_mb(r.get("bytes_received")), ".3f"),
                 _cell(r.get("client_energy_j"), ".3g"), _cell(r.get("energy_j"), ".3g"),
                 _cell(r.get("round_s"), ".2f")]
        if dp:
            cells.append(_cell(r.get("dp_epsilon"), ".3g"))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>" + "".join(rows)
             + "</table>")

    def series(key: str, scale: float = 1.0) -> list[tuple[float, float]]:
        return [(float(r["round"]), v * scale) for r in rounds if (v := _num(r.get(key))) is not None]

    clients: dict[int, list[tuple[float, float]]] = {}
    for r in rounds:
        for c in r.get("clients") or []:
            if isinstance(c, dict) and _num(c.get("client")) is not None and _num(c.get("loss")) is not None:
                clients.setdefault(int(c["client"]), []).append((float(r["round"]), float(c["loss"])))
    charts = [line_chart({"global val loss": series("val_loss"), "clients' train loss": series("loss")},
                         title="Loss per round", x_label="round", y_label="cross-entropy", dots=["global val loss"]),
              line_chart({"to clients": series("bytes_sent", 1e-6), "from clients": series("bytes_received", 1e-6)},
                         title="Communication per round", x_label="round", y_label="MB")]
    if clients:
        charts.append(line_chart({f"client {k}": v for k, v in sorted(clients.items())[:12]},
                                 title="Train loss per client", x_label="round", y_label="cross-entropy"))
    facts = []
    if summary:
        to_mb, from_mb = _mb(summary.get("bytes_sent")) or 0, _mb(summary.get("bytes_received")) or 0
        facts.append(f"{summary.get('rounds', '?')} rounds, {_num(summary.get('tokens')) or 0:,.0f} tokens, "
                     f"{to_mb:.3f} MB to and {from_mb:.3f} MB from the clients, "
                     f"{(_num(summary.get('energy_j')) or 0):.4g} J (clients and server)")
        if summary.get("secure_aggregation"):
            facts.append("secure aggregation (SecAgg+): the server saw only the sum of the clients' weights")
        if _num(summary.get("dp_epsilon")) is not None:
            facts.append(f"client-level differential privacy: ε = {summary['dp_epsilon']:.3g} at δ = "
                         f"{summary.get('dp_delta')} (noise multiplier {summary.get('noise_multiplier')})")
        if _num(summary.get("resumed_from_round")):
            facts.append(f"resumed after round {int(summary['resumed_from_round'])}")
    parts = summary.get("partitions") if isinstance(summary.get("partitions"), dict) else {}
    if parts:
        facts.append(f"partitions: {parts.get('scheme')}"
                     + (f" (α = {parts['alpha']})" if _num(parts.get("alpha")) is not None else "")
                     + f", size CV {parts.get('size_cv')}, mean label TV distance "
                       f"{parts.get('mean_label_tv_distance')}")
    notes = "".join(f"<p class=note>{escape(f)}</p>" for f in facts)
    return ("<h2>Federation</h2>" + notes + "<div class=grid>" + "".join(charts) + "</div>" + table)
