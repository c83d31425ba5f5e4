"""STUDY_DIR/report.html (from a tune.results.StudyResult): optimization history, learning curves, parameter
importances, parallel coordinates and (several objectives) the Pareto front, as one offline page of inline
SVG, like a run's report."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from leantrain.report.html import CSS, GENERATOR, write_page
from leantrain.report.svg import COLORS, fmt, line_chart, nice_ticks, tick_labels


def _svg_open(width: int, height: int, title: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} '
            f'{height}" role="img" aria-label="{escape(title)}">', f'<rect width="{width}" height="{height}" '
            f'fill="#fff"/><text x="62" y="18" font-size="14" font-weight="bold">{escape(title)}</text>']


def _empty(title: str, why: str, width: int = 540) -> str:
    return "".join(_svg_open(width, 80, title)) + (f'<text x="{width / 2}" y="55" text-anchor="middle" fill="#888">'
                                                   f'{escape(why)}</text></svg>')


def scatter(points: list[tuple[float, float, str]], front: list[tuple[float, float]], *, title: str, x_label: str,
            y_label: str, width: int = 540, height: int = 300) -> str:
    """Trials as points (hover: their label), the Pareto front as a red step line through its points."""
    pts = [(x, y, s) for x, y, s in points if math.isfinite(x) and math.isfinite(y)]
    if not pts:
        return _empty(title, "no complete trials")
    left, right, top, bottom = 62, 14, 30, 40
    pw, ph = width - left - right, height - top - bottom
    xt, yt = nice_ticks(min(p[0] for p in pts), max(p[0] for p in pts)), nice_ticks(min(p[1] for p in pts),
                                                                                    max(p[1] for p in pts))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    out = _svg_open(width, height, title)
    for t, label in zip(yt, tick_labels(yt), strict=True):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" font-size="11" text-anchor="end">{label}</text>')
    for t, label in zip(xt, tick_labels(xt), strict=True):
        out.append(f'<text x="{px(t):.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{label}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>'
               f'<text x="{left + pw / 2}" y="{height - 6}" font-size="11" text-anchor="middle">{escape(x_label)}'
               f'</text><text x="12" y="{top + ph / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 12 '
               f'{top + ph / 2})">{escape(y_label)}</text>')
    for x, y, label in pts:
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{COLORS[0]}" fill-opacity="0.6">'
                   f'<title>{escape(label)}</title></circle>')
    if front:
        d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(front))
        out.append(f'<polyline points="{d}" fill="none" stroke="{COLORS[1]}" stroke-width="1.5"/>')
        out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4.5" fill="none" stroke="{COLORS[1]}" '
                   'stroke-width="2"/>' for x, y in front)
    out.append("</svg>")
    return "".join(out)


def bars(values: dict[str, float], *, title: str, width: int = 540) -> str:
    """Horizontal bars (parameter importances, summing to 1)."""
    if not values:
        return _empty(title, "needs two or more complete trials", width)
    row, left = 22, 170
    height = 40 + row * len(values)
    out = _svg_open(width, height, title)
    top = max(values.values()) or 1.0
    for i, (name, v) in enumerate(sorted(values.items(), key=lambda kv: -kv[1])):
        y = 30 + i * row
        w = (width - left - 60) * v / top
        out.append(f'<text x="{left - 6}" y="{y + 14}" font-size="11" text-anchor="end">{escape(name)}</text>'
                   f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row - 8}" fill="{COLORS[0]}"/>'
                   f'<text x="{left + w + 4:.1f}" y="{y + 14}" font-size="11">{v:.2f}</text>')
    out.append("</svg>")
    return "".join(out)


def parallel(result: Any, width: int = 1080, height: int = 300) -> str:
    """Parallel coordinates: one axis per parameter and one for val loss; a line per complete trial, darker
    for lower loss (categorical axes place their choices evenly)."""
    rows = [r for r in result.trials if r.state == "complete" and r.values]
    title = "Parallel coordinates (complete trials; darker = lower val loss)"
    if not rows:
        return _empty(title, "no complete trials", width)
    keys = sorted({k for r in rows for k in r.params})
    axes: list[tuple[str, Any]] = []
    for k in keys:
        vals = [r.params.get(k) for r in rows]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
            lo, hi = min(vals), max(vals)
            logs = lo > 0 and hi / lo > 20
            axes.append((k, ("num", lo, hi, logs)))
        else:
            choices = sorted({str(v) for v in vals})
            axes.append((k, ("cat", choices)))
    losses = [r.values[0] for r in rows]
    axes.append(("val_loss", ("num", min(losses), max(losses), False)))
    left, right, top, bottom = 40, 40, 40, 40
    gap = (width - left - right) / max(1, len(axes) - 1)
    ph = height - top - bottom

    def pos(axis: Any, v: Any) -> float:
        if axis[0] == "cat":
            n = len(axis[1])
            frac = 0.5 if n == 1 else axis[1].index(str(v)) / (n - 1)
        else:
            _, lo, hi, logs = axis
            a, b, x = (math.log10(lo), math.log10(hi), math.log10(v)) if logs else (lo, hi, v)
            frac = 0.5 if b == a else (x - a) / (b - a)
        return top + ph - frac * ph

    out = _svg_open(width, height, title)
    lo, hi = min(losses), max(losses)
    for r in sorted(rows, key=lambda r: -r.values[0]):
        shade = 0.15 + 0.85 * (1 - ((r.values[0] - lo) / (hi - lo) if hi > lo else 0.0))
        pts = " ".join(f"{left + i * gap:.1f},{pos(ax, r.values[0] if k == 'val_loss' else r.params[k]):.1f}"
                       for i, (k, ax) in enumerate(axes) if k == "val_loss" or k in r.params)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{COLORS[0]}" stroke-opacity="{shade:.2f}" '
                   f'stroke-width="1.5"><title>trial {r.number}: {escape(str(r.params))} -> {r.values[0]:.4f}'
                   '</title></polyline>')
    for i, (k, ax) in enumerate(axes):
        x = left + i * gap
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" stroke="#666"/>'
                   f'<text x="{x:.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{escape(k)}</text>')
        labels = ([(c, pos(ax, c)) for c in ax[1]] if ax[0] == "cat"
                  else [(fmt(ax[1]), top + ph), (fmt(ax[2]), top)])
        out.extend(f'<text x="{x + 4:.1f}" y="{y + 4:.1f}" font-size="10">{escape(str(t))}</text>' for t, y in labels)
    out.append("</svg>")
    return "".join(out)


def importances(study: Any, result: Any) -> dict[str, float]:
    """Optuna's parameter importances (its default evaluator, PED-ANOVA) for val loss; {} when too few trials
    finished."""
    import warnings

    from optuna.importance import get_param_importances

    done = [r for r in result.trials if r.state == "complete"]
    if len(done) < 2 or not any(len({str(r.params.get(k)) for r in done}) > 1 for k in done[0].params):
        return {}
    try:
        target = None if len(result.objectives) == 1 else (lambda t: t.values[0])
        with warnings.catch_warnings():  # "computes the importances ... to achieve low target values": as meant
            warnings.simplefilter("ignore")
            return dict(get_param_importances(study, target=target))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return escape(f"{v:.4g}")
    return escape(str(v)) if v is not None else ""


def render(result: Any, study: Any) -> str:
    rows = result.trials
    done = [r for r in rows if r.state == "complete" and r.values]
    history = [(float(r.number), r.values[0]) for r in done]
    best_so_far, best = [], math.inf
    for n, v in sorted(history):
        best = min(best, v)
        best_so_far.append((n, best))
    charts = [line_chart({"val loss": history, "best so far": best_so_far}, title="Optimization history",
                         x_label="trial", y_label="val loss", dots=["val loss"])]
    curves = {f"#{t.number}": sorted((float(s), v) for s, v in t.intermediate_values.items())
              for t in study.get_trials(deepcopy=False) if t.intermediate_values}
    if curves:
        charts.append(line_chart(dict(list(curves.items())[:10]), title="Val loss at each evaluation (pruner's view)",
                                 y_label="val loss"))
    charts.append(bars(importances(study, result), title="Parameter importances (PED-ANOVA, val loss)"))
    if len(result.objectives) > 1:
        other = result.objectives[1]
        front = [(result.row(n).values[1], result.row(n).values[0]) for n in result.best]
        charts.append(scatter([(r.values[1], r.values[0], f"trial {r.number}") for r in done], front,
                              title=f"Pareto front: val loss x {other}", x_label=other, y_label="val loss"))
    charts.append(parallel(result))
    head = ["trial", "state", *result.objectives, *sorted({k for r in rows for k in r.params}), "steps", "reason"]
    table = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cells = [r.number, r.state, *((r.values or []) + [None] * (len(result.objectives) - len(r.values or []))),
                 *(r.params.get(k) for k in head[2 + len(result.objectives):-2]), r.attrs.get("steps"), r.reason]
        mark = ' style="background:#eef6ee"' if r.number in result.best else ""
        table.append(f"<tr{mark}>" + "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>")
    table.append("</table>")
    best = ", ".join(f"#{n}" for n in result.best) or "none yet"
    return "\n".join([
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>", GENERATOR.format(what="tune"),
        f"<title>leantrain study {escape(result.study_name)}</title><style>{CSS}</style></head><body>",
        f"<h1>Study {escape(result.study_name)}</h1><div class=sub>{len(rows)} trials, objective "
        f"{escape(', '.join(result.objectives))}; best: {best} (best.toml). Live view: optuna-dashboard on the "
        "same storage.</div>",
        "<h2>Charts</h2><div class=grid>" + "".join(charts) + "</div>",
        "<h2>Trials</h2>" + "".join(table), "</body></html>"])


def write_study_page(result: Any, study: Any) -> Any:
    return write_page(result.study_dir / "report.html", render(result, study))
