"""Line charts as inline SVG, written by hand: no JavaScript, no CDN, so a report opens anywhere offline.

Axis ticks are round numbers (1, 2, 5 x 10^k) and their labels carry as many digits as it takes to keep
them distinct, so a loss that moves between 4.0001 and 4.0002 gets five ticks with five different labels,
not five "4"s; a constant series gets a band around its value instead of a collapsed axis.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
LEGEND_W = 110  # px per legend entry


def _band(lo: float, hi: float, integer: bool) -> tuple[float, float]:
    """[lo, hi] ordered, with a constant (or a span below float resolution) widened to a band around it."""
    lo, hi = min(lo, hi), max(lo, hi)
    scale = max(abs(lo), abs(hi))
    if hi - lo <= scale * 1e-9:  # constant, or differences no pixel could show
        pad = abs(lo) * 0.1 if lo else 1.0
        pad = max(pad, 1.0) if integer else pad
        lo, hi = lo - pad, hi + pad
    return lo, hi


def nice_ticks(lo: float, hi: float, n: int = 5, *, integer: bool = False) -> list[float]:
    """About n round tick values (steps of 1, 2, 5 x 10^k) from at or below `lo` to at or above `hi`.

    Ticks are k x step (no accumulated float error), rounded to the step's decimals; `integer` keeps the
    step at 1 or more (optimizer steps on an x axis). Non-finite bounds give no ticks."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    lo, hi = _band(lo, hi, integer)
    raw = hi / max(1, n) - lo / max(1, n)  # no overflow at +-1e308
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-6))
    if integer:
        step = max(step, 1.0)
    decimals = max(0, 1 - math.floor(math.log10(step)))
    ticks = []
    for k in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1):
        t = round(k * step, decimals) if decimals < 300 else k * step
        if math.isfinite(t) and (not ticks or t != ticks[-1]):
            ticks.append(t + 0.0)  # no -0.0
    return ticks


def _decimals(x: float) -> int:
    """Decimals that show a difference of x."""
    return max(0, math.ceil(-math.log10(x) - 1e-9)) if x > 0 else 0


def tick_labels(ticks: list[float]) -> list[str]:
    """Short labels (0.25, 4.00012, 6300, 12.5k, 1.2M, 2.5e-4), all distinct when the ticks are."""
    if not ticks:
        return []
    top = max(abs(t) for t in ticks)
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False) if b != a]
    step = min(gaps) if gaps else (top or 1.0)

    def one(t: float, extra: int) -> str:
        if abs(t) <= step * 1e-9:
            return "0"
        if top >= 1e15 or top < 1e-2:  # a common power of ten: 0.5e-3, 1.0e-3
            e = math.floor(math.log10(top))
            return f"{t / 10 ** e:.{_decimals(step / 10 ** e) + extra}f}e{e}"
        if top >= 1e4:
            e3 = 3 * math.floor(math.log10(top) / 3)
            suffix = {3: "k", 6: "M", 9: "G", 12: "T"}[e3]
            return f"{t / 10 ** e3:.{_decimals(step / 10 ** e3) + extra}f}{suffix}"
        return f"{t:.{_decimals(step) + extra}f}"

    for extra in range(0, 17):
        labels = [one(t, extra) for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def fmt(v: float) -> str:
    """A short number: 1.2k, 3.4M, 0.05."""
    a = abs(v)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def _log_labels(ticks: list[float]) -> list[str]:
    """Labels of ticks on a log10 axis: 1e-3 at whole decades, else the value with enough digits."""
    if all(float(t).is_integer() for t in ticks):
        return [f"1e{int(t)}" for t in ticks]
    for digits in range(2, 17):
        labels = [f"{10 ** t:.{digits}g}" for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def _short(name: str, keep: int = 16) -> str:
    """A legend entry that fits its slot: the start and end of a long name (run names end in their time)."""
    return name if len(name) <= keep else name[:keep // 2 - 1] + "…" + name[-(keep // 2):]


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str = "step",
               y_label: str = "", width: int = 540, height: int = 260, markers: Iterable[tuple[float, str]] = (),
               dots: Iterable[str] = (), log_y: bool = False, integer_x: bool = True) -> str:
    """An SVG line chart of named (x, y) series; `markers` are labelled vertical lines (events); series
    named in `dots` are drawn as points (evaluations); `log_y` plots positive values on a log10 axis.

    Non-finite points (and, on a log axis, values <= 0) are dropped; a series of one point is a dot."""
    dots = set(dots)

    def keep(y: float) -> bool:
        return math.isfinite(y) and (y > 0 or not log_y)

    clean = {k: [(x, math.log10(y) if log_y else y) for x, y in pts if math.isfinite(x) and keep(y)]
             for k, pts in series.items()}
    clean = {k: v for k, v in clean.items() if v}
    left, right, top, bottom = 62, 14, 30, 40
    per_row = max(1, (width - left - right) // LEGEND_W)
    legend_rows = math.ceil(len(clean) / per_row) if len(clean) > 2 else 0  # two fit beside the title
    top += 15 * legend_rows  # many series: legend rows under the title
    height += 15 * legend_rows
    pw, ph = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
           f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{left}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>']
    if not clean:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#888">no data</text></svg>')
        return "".join(out)
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    xt = nice_ticks(min(xs), max(xs), integer=integer_x and all(float(x).is_integer() for x in xs))
    yt = nice_ticks(min(ys), max(ys), integer=log_y and max(ys) - min(ys) >= 1)
    x0, x1 = min(xt[0], min(xs)), max(xt[-1], max(xs))
    y0, y1 = min(yt[0], min(ys)), max(yt[-1], max(ys))

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    for t, label in zip(yt, _log_labels(yt) if log_y else tick_labels(yt), strict=True):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" font-size="11" text-anchor="end">{label}</text>')
    for t, label in zip(xt, tick_labels(xt), strict=True):
        out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + ph}" stroke="#f0f0f0"/>'
                   f'<text x="{px(t):.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{label}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" font-size="11" text-anchor="middle">'
               f'{escape(x_label)}</text>')
    if y_label:
        out.append(f'<text x="12" y="{top + ph / 2}" font-size="11" text-anchor="middle" '
                   f'transform="rotate(-90 12 {top + ph / 2})">{escape(y_label + (" (log)" if log_y else ""))}</text>')
    for x, label in markers:
        if x0 <= x <= x1:
            out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{top + ph}" stroke="#aaa" '
                       f'stroke-dasharray="3 3"><title>{escape(label)}</title></line>')
    for i, (name, pts) in enumerate(clean.items()):
        color = COLORS[i % len(COLORS)]
        if name in dots or len(pts) == 1:
            if len(pts) > 1:
                d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
                out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="1" '
                           'stroke-dasharray="4 3"/>')
            out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}"/>' for x, y in pts)
        else:
            d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        if legend_rows:
            lx, ly = left + LEGEND_W * (i % per_row) + 14, 32 + 15 * (i // per_row)
        else:  # in the title row, right-aligned as a whole
            lx, ly = width - right - LEGEND_W * (len(clean) - i) + 14, 17
        out.append(f'<rect x="{lx - 14}" y="{ly - 5}" width="10" height="3" fill="{color}"/>'
                   f'<text x="{lx}" y="{ly}" font-size="11">{escape(_short(name))}<title>{escape(name)}</title></text>')
    out.append("</svg>")
    return "".join(out)


def heat_map(rows: list[str], cols: list[float], values: list[list[float]], *, title: str, x_label: str = "step",
             center: float, width: int = 540, row_h: int = 10) -> str:
    """An SVG heat map: `values[r][c]` of row `rows[r]` at x `cols[c]`, white at `center`, blue below it and
    red above it, full colour at 0 and at 2 x center (a routed-expert load heat map: center is the uniform
    share). Non-finite cells are grey; the hover title of each cell gives its value."""
    left, right, top, bottom = 62, 14, 30, 40
    if not rows or not cols:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="80" role="img" '
                f'aria-label="{escape(title)}"><rect width="{width}" height="80" fill="#fff"/><text x="{left}" y="18" '
                f'font-size="14" font-weight="bold">{escape(title)}</text><text x="{width / 2}" y="55" '
                f'text-anchor="middle" fill="#888">no data</text></svg>')
    pw, ph = width - left - right, row_h * len(rows)
    height = top + ph + bottom
    cw = pw / len(cols)

    def color(v: float) -> str:
        if not math.isfinite(v):
            return "#ccc"
        t = max(-1.0, min(1.0, (v - center) / center if center else 0.0))
        fade = round(255 * (1 - abs(t)))
        return f"rgb({fade},{fade},255)" if t < 0 else f"rgb(255,{fade},{fade})"

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
           f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{left}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>']
    for r, name in enumerate(rows):
        y = top + r * row_h
        for c, x in enumerate(cols):
            v = values[r][c]
            out.append(f'<rect x="{left + c * cw:.1f}" y="{y}" width="{cw + 0.5:.1f}" height="{row_h}" '
                       f'fill="{color(v)}"><title>{escape(name)} at {x:g}: {fmt(v)}</title></rect>')
    # a label per row when rows are tall enough to read, else per group of rows named by its first
    step = max(1, math.ceil(11 / row_h))
    for r in range(0, len(rows), step):
        out.append(f'<text x="{left - 6}" y="{top + r * row_h + min(row_h, 11) - 1}" font-size="10" '
                   f'text-anchor="end">{escape(_short(rows[r], 10))}</text>')
    xt = nice_ticks(min(cols), max(cols), integer=all(float(x).is_integer() for x in cols))
    lo, hi = min(cols), max(cols)
    for t, label in zip(xt, tick_labels(xt), strict=True):
        if lo <= t <= hi:
            px = left + (0.5 if hi == lo else (t - lo) / (hi - lo) * (len(cols) - 1) + 0.5) * cw
            out.append(f'<text x="{px:.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{label}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" font-size="11" text-anchor="middle">'
               f'{escape(x_label)} (white = {fmt(center)}, red above, blue below)</text></svg>')
    return "".join(out)
