"""Line charts as inline SVG, written by hand: no JavaScript, no CDN, so a report opens anywhere offline."""

from __future__ import annotations

import math
from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi] (1, 2, 5 x 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def fmt(v: float) -> str:
    """A short tick label: 1.2k, 3.4M, 0.05."""
    a = abs(v)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str = "step",
               y_label: str = "", width: int = 540, height: int = 260, markers: list[tuple[float, str]] = ()) -> str:
    """An SVG line chart of named (x, y) series; `markers` are labelled vertical lines (events).

    Non-finite points are dropped; a series of one point is drawn as a dot.
    """
    clean = {k: [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)] for k, pts in series.items()}
    clean = {k: v for k, v in clean.items() if v}
    left, right, top, bottom = 62, 14, 30, 40
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
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1 = min(xt[0], min(xs)), max(xt[-1], max(xs))
    y0, y1 = min(yt[0], min(ys)), max(yt[-1], max(ys))
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    for t in yt:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" font-size="11" text-anchor="end">{fmt(t)}</text>')
    for t in xt:
        out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + ph}" stroke="#f0f0f0"/>'
                   f'<text x="{px(t):.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{fmt(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" font-size="11" text-anchor="middle">'
               f'{escape(x_label)}</text>')
    if y_label:
        out.append(f'<text x="12" y="{top + ph / 2}" font-size="11" text-anchor="middle" '
                   f'transform="rotate(-90 12 {top + ph / 2})">{escape(y_label)}</text>')
    for x, label in markers:
        if x0 <= x <= x1:
            out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{top + ph}" stroke="#aaa" '
                       f'stroke-dasharray="3 3"><title>{escape(label)}</title></line>')
    for i, (name, pts) in enumerate(clean.items()):
        color = COLORS[i % len(COLORS)]
        if len(pts) == 1:
            out.append(f'<circle cx="{px(pts[0][0]):.1f}" cy="{py(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        else:
            d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        lx = width - right - 110 * (len(clean) - i) + 14  # legend in the title row, right-aligned as a whole
        out.append(f'<rect x="{lx - 14}" y="{12}" width="10" height="3" fill="{color}"/>'
                   f'<text x="{lx}" y="{17}" font-size="11">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)
