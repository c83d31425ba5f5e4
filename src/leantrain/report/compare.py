"""`leantrain compare`: two or more runs side by side, as a table for the terminal and one offline page.

Each run is read back from its directory as the report reads it (leantrain.report.html.read_run): the
closing figures (tokens/s, MFU, energy, CO2e, cost) are the trainer's summary, the very numbers its
`done:` line printed, and the config keys shown are those whose values differ between the runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from leantrain.errors import LeantrainError
from leantrain.report.html import CSS, GENERATOR, final_figures, read_run, write_page
from leantrain.report.svg import line_chart

MEASURED = 11  # rows of measurements in the table; the differing config keys follow


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


@dataclass
class RunSummary:
    """One run's row of the comparison."""

    name: str
    path: Path
    steps: int | None
    tokens: int | None
    final_val_loss: float | None
    best_val_loss: float | None
    final_loss: float | None
    wall_s: float | None
    tokens_per_s: float | None
    mfu: float | None
    energy_kwh: float | None
    co2_g: float | None
    cost_usd: float | None
    config: dict[str, Any]
    loss: list[tuple[float, float]] = field(default_factory=list)  # (step, train loss)
    loss_by_tokens: list[tuple[float, float]] = field(default_factory=list)
    val_loss: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Comparison:
    """The runs, the config keys whose values differ ("section.key" -> one value per run, None where a run
    lacks the key), the page written (None when none was asked for) and warnings (skipped lines)."""

    runs: list[RunSummary]
    differing: dict[str, list[Any]]
    page: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def table(self) -> list[tuple[str, list[str]]]:
        """(quantity, one cell per run) rows: MEASURED rows of measurements, then the differing config keys."""
        rows = [("final val loss", [_f(r.final_val_loss, ".4f") for r in self.runs]),
                ("best val loss", [_f(r.best_val_loss, ".4f") for r in self.runs]),
                ("final train loss", [_f(r.final_loss, ".4f") for r in self.runs]),
                ("steps", [_f(r.steps, ",.0f") for r in self.runs]),
                ("tokens", [_f(r.tokens, ",.0f") for r in self.runs]),
                ("wall time", [_duration(r.wall_s) for r in self.runs]),
                ("tokens/s", [_f(r.tokens_per_s, ",.0f") for r in self.runs]),
                ("MFU", [_f(r.mfu, ".1%") for r in self.runs]),
                ("energy (Wh)", [_f(r.energy_kwh * 1000 if r.energy_kwh is not None else None, ".3g")
                                 for r in self.runs]),
                ("CO2e (g)", [_f(r.co2_g, ".3g") for r in self.runs]),
                ("cost (USD)", [_f(r.cost_usd, ".3g") for r in self.runs])]
        rows += [(key, [_cell(v) for v in values]) for key, values in self.differing.items()]
        return rows

    def lines(self, max_width: int = 28) -> list[str]:
        """The table as aligned text lines for a terminal: a column per run."""
        rows = self.table()
        names = [r.name for r in self.runs]
        first = max(len("run"), *(len(q) for q, _ in rows))

        def cut(s: str) -> str:
            return s if len(s) <= max_width else s[:max_width - 1] + "…"

        widths = [max(len(cut(n)), *(len(cut(cells[i])) for _, cells in rows)) for i, n in enumerate(names)]
        out = ["  ".join([f"{'run':<{first}}", *(f"{cut(n):>{w}}" for n, w in zip(names, widths, strict=True))])]
        for i, (q, cells) in enumerate(rows):
            if i == MEASURED and len(rows) > MEASURED:
                out.append(f"{'config (differs)':<{first}}")
            out.append("  ".join([f"{q:<{first}}", *(f"{cut(c):>{w}}" for c, w in zip(cells, widths, strict=True))]))
        if not self.differing:
            out.append("config: the runs' configs are identical")
        return out


def _cell(v: Any) -> str:
    """A config value: – where the run's config lacks the key (a run from an older leantrain), "" when empty."""
    return "–" if v is None else '""' if v == "" else str(v)


def _f(v: Any, spec: str) -> str:
    v = _num(v)
    return "–" if v is None else format(v, spec)


def _duration(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def wall_seconds(metrics: list[dict]) -> float | None:
    """Training wall time over every process of the run: `elapsed_s` restarts at 0 in a resumed process,
    so the last value of each stretch is summed (time between a kill and its resume is not counted)."""
    total, cur = 0.0, None
    for r in metrics:
        e = _num(r.get("elapsed_s"))
        if e is None:
            continue
        if cur is not None and e < cur:
            total += cur
        cur = e
    return None if cur is None else total + cur


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """{"train": {"steps": 6}} -> {"train.steps": 6}."""
    out = {}
    for section, table in config.items():
        if isinstance(table, dict):
            out.update({f"{section}.{k}": v for k, v in table.items()})
        else:
            out[section] = table
    return out


def summarize(run_dir: str | Path, name: str | None = None) -> tuple[RunSummary, list[str]]:
    """One run read back for the comparison, and warnings about lines that had to be skipped."""
    rf = read_run(run_dir)
    metrics = rf.metrics
    warnings = [f"{rf.path / f}: {len(bad)} line(s) are not JSON records and were skipped" for f, bad in
                rf.bad_lines.items() if bad]
    if not any(_num(r.get("step")) is not None and _num(r.get("loss")) is not None for r in metrics):
        bad = rf.bad_lines["metrics.jsonl"]
        why = f"all {len(bad)} of its lines are damaged" if bad else "the run has not logged a step yet"
        raise LeantrainError(f"{rf.path / 'metrics.jsonl'} holds no metrics records ({why}); compare runs that "
                             "trained at least one logged step")
    final = final_figures(metrics, rf.events)
    vals = [(r["step"], r["val_loss"]) for r in metrics if _num(r.get("step")) is not None
            and _num(r.get("val_loss")) is not None]
    steps = [r for r in metrics if _num(r.get("step")) is not None and _num(r.get("loss")) is not None]
    energy_kwh = _num(final.get("energy_kwh"))
    return RunSummary(
        name=name or rf.path.resolve().name, path=rf.path, steps=_num(final.get("step")) or steps[-1]["step"],
        tokens=_num(final.get("tokens")) or _num(steps[-1].get("tokens")),
        final_val_loss=vals[-1][1] if vals else None, best_val_loss=min(v for _, v in vals) if vals else None,
        final_loss=steps[-1]["loss"], wall_s=wall_seconds(metrics), tokens_per_s=_num(final.get("tokens_per_s")),
        mfu=_num(final.get("mfu")), energy_kwh=energy_kwh, co2_g=_num(final.get("co2_g")),
        cost_usd=_num(final.get("cost_usd")), config=flat_config(rf.config),
        loss=[(r["step"], r["loss"]) for r in steps],
        loss_by_tokens=[(r["tokens"], r["loss"]) for r in steps if _num(r.get("tokens")) is not None],
        val_loss=vals), warnings


def _names(paths: list[Path]) -> list[str]:
    """Short distinct names: the folder name, or parent/name where two runs share a folder name."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def compare_runs(run_dirs: list[str | Path]) -> Comparison:
    """Read two or more run directories and line them up."""
    paths = [Path(p) for p in run_dirs]
    if len(paths) < 2:
        got = f"only {paths[0]}" if paths else "none"
        raise LeantrainError(f"compare needs at least two run directories ({got} given); e.g. "
                             "leantrain compare runs/a runs/b")
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise LeantrainError(f"{p} is given twice (as {seen[key]} and {p}); pass each run directory once")
        seen[key] = p
    runs, warnings = [], []
    for p, name in zip(paths, _names(paths), strict=True):
        run, w = summarize(p, name)
        runs.append(run)
        warnings += w
    with_config = [r for r in runs if r.config]
    warnings += [f"{r.path / 'config.toml'} is missing or not TOML; its config is not compared" for r in runs
                 if not r.config]
    keys = list(dict.fromkeys(k for r in with_config for k in r.config))
    differing = {k: [r.config.get(k) for r in runs] for k in keys
                 if len({repr(r.config.get(k)) for r in with_config}) > 1}
    return Comparison(runs, differing, None, warnings)


def render_compare(c: Comparison) -> str:
    """The comparison page: loss curves overlaid (by step and by tokens), validation points, the table."""
    names = [r.name for r in c.runs]
    charts = [
        line_chart({r.name: r.loss for r in c.runs}, title="Train loss by step", y_label="cross-entropy",
                   width=1100, height=340),
        line_chart({r.name: r.val_loss for r in c.runs}, title="Validation loss by step", y_label="cross-entropy",
                   width=540, height=300, dots=names),
        line_chart({r.name: r.loss_by_tokens for r in c.runs}, title="Train loss by tokens", x_label="tokens",
                   y_label="cross-entropy", width=540, height=300),
    ]
    head = "".join(f"<th>{escape(n)}</th>" for n in names)
    body = []
    for i, (q, cells) in enumerate(c.table()):
        cls = ' class="cfg"' if i >= MEASURED else ""
        body.append(f"<tr{cls}><td>{escape(q)}</td>" + "".join(f"<td class=n>{escape(v)}</td>" for v in cells)
                    + "</tr>")
    same = "" if c.differing else "<p>The runs' configs are identical.</p>"
    paths = "".join(f"<li><b>{escape(r.name)}</b>: {escape(str(r.path.resolve()))}</li>" for r in c.runs)
    return "\n".join([
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>{GENERATOR.format(what='compare')}",
        f"<title>leantrain compare · {escape(', '.join(names))[:200]}</title>",
        f"<style>{CSS}tr.cfg td:first-child{{font-family:monospace}}</style></head><body>",
        f"<h1>leantrain compare: {len(c.runs)} runs</h1>",
        f"<div class=sub>written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</div><ul>{paths}</ul>",
        "<h2>Loss</h2><div class=grid>" + "".join(charts) + "</div>",
        "<h2>Runs</h2><p class=note>tokens/s and MFU are each run's closing figures (the <code>done:</code> line: "
        "the last logged window); wall time sums the training processes of a resumed run. Config rows list only "
        "the keys whose values differ.</p>",
        f"<table><tr><th>quantity</th>{head}</tr>" + "".join(body) + "</table>" + same,
        "</body></html>",
    ])


def write_compare(c: Comparison, out: str | Path) -> Path:
    """Write the comparison page to `out` (never over a file leantrain did not write)."""
    c.page = write_page(Path(out), render_compare(c))
    return c.page
