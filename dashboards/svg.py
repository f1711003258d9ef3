"""Small, dependency-free SVG charts for the downloadable governance report.

The report must open anywhere, offline, years later, so its plots are inline SVG
written here (no JavaScript, no fonts, no network). Pure: values in, text out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6")
W, H = 560, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 28, 52
TARGET_SCALE = 4.0  # a target above this multiple of the tallest bar is noted, not drawn
MIN_BAR_PX = 2.0


def _nice_max(v: float) -> float:
    if v <= 0 or not math.isfinite(v):
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp


def _fmt(v: float) -> str:
    """A tick or value label: 200k, 1,500, 18.75, 0.025 (never rounded to a wrong tick)."""
    if abs(v) >= 10_000:
        return f"{v / 1000:,.0f}k" if v % 1000 == 0 else f"{v / 1000:,.1f}k"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}".rstrip("0").rstrip(".") if abs(v) >= 0.01 else f"{v:.3g}"


def _label_lines(cat: str, width_px: float) -> list[str]:
    """A category name on at most two lines that fit ``width_px`` (about 6.5 px a
    character at 11 px); "arrival_to_published" -> ["arrival to", "published"]."""
    import textwrap

    chars = max(4, int(width_px / 6.5))
    lines = textwrap.wrap(cat.replace("_", " "), chars) or [""]
    if len(lines) > 2:
        lines = [lines[0], lines[1][:chars - 1] + "…"]
    return lines


def _frame(title: str, ymax: float, y_label: str) -> list[str]:
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">',
             f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>']
    ph = H - TOP - BOTTOM
    for k in range(5):
        v = ymax * k / 4
        y = TOP + ph - ph * k / 4
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
    parts.append(f'<text x="12" y="{TOP + ph / 2:.1f}" transform="rotate(-90 12 '
                 f'{TOP + ph / 2:.1f})" text-anchor="middle">{escape(y_label)}</text>')
    return parts


def bar_chart(title: str, categories: Sequence[str], series: Sequence[tuple[str, Sequence[float]]],
              y_label: str = "", target: float | None = None, stacked: bool = False) -> str:
    """Grouped (or stacked) bars: one group per category, one bar per series.

    ``target`` is a dashed red line drawn *behind* the bars; a target more than
    ``TARGET_SCALE`` times the tallest bar would flatten the bars into it, so it is
    then written as a note ("target 600 s, above the scale") instead of setting the
    scale. A non-zero value always shows as at least ``MIN_BAR_PX`` pixels."""
    if not categories or not series:
        return empty_chart(title)
    if stacked:
        top = max(sum(s[1][i] for s in series) for i in range(len(categories)))
    else:
        top = max(max(vals, default=0.0) for _, vals in series)
    off_scale = target is not None and top > 0 and target > TARGET_SCALE * top
    ymax = _nice_max(top if off_scale else max(top, target or 0.0))
    parts = _frame(title, ymax, y_label)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    if target is not None and off_scale:
        parts.append(f'<text x="{W - RIGHT}" y="{TOP - 4}" text-anchor="end" '
                     f'fill="#d62728">target {_fmt(target)} {escape(y_label)}, above the '
                     'scale</text>')
    elif target is not None:
        y = TOP + ph - ph * target / ymax
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#d62728" stroke-dasharray="5,3"/>')
    group = pw / len(categories)
    bw = group * 0.8 / (1 if stacked else len(series))
    for i, cat in enumerate(categories):
        x0 = LEFT + group * i + group * 0.1
        base = 0.0
        for j, (_, vals) in enumerate(series):
            v = max(0.0, float(vals[i]))
            h = max(ph * v / ymax, MIN_BAR_PX if v > 0 else 0.0)
            x = x0 if stacked else x0 + bw * j
            y = TOP + ph - h - (ph * base / ymax if stacked else 0)
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{h:.1f}" '
                         f'fill="{PALETTE[j % len(PALETTE)]}"><title>{escape(cat)}: '
                         f'{_fmt(v)}</title></rect>')
            if stacked:
                base += v
        step = max(1, math.ceil(len(categories) / 12))
        if i % step == 0:
            lines = _label_lines(cat, group * step)
            spans = "".join(f'<tspan x="{x0 + group * 0.4:.1f}" dy="{0 if k == 0 else 12}">'
                            f'{escape(line)}</tspan>' for k, line in enumerate(lines))
            parts.append(f'<text y="{TOP + ph + 13}" text-anchor="middle"><title>'
                         f'{escape(cat)}</title>{spans}</text>')
    if target is not None and not off_scale:  # its label above the bars, on a white band
        y = TOP + ph - ph * target / ymax
        parts.append(f'<text x="{W - RIGHT}" y="{max(y - 3, TOP - 4):.1f}" text-anchor="end" '
                     f'fill="#d62728" stroke="white" stroke-width="3" paint-order="stroke">'
                     f'target {_fmt(target)}</text>')
    parts.extend(_legend([name for name, _ in series]))
    parts.append("</svg>")
    return "".join(parts)


def line_chart(title: str, x: Sequence[float], series: Sequence[tuple[str, Sequence[float]]],
               y_label: str = "", x_label: str = "", diagonal: bool = False,
               ymax: float | None = None) -> str:
    """Lines over a numeric x axis (an ROC curve, with ``diagonal``)."""
    if not x or not series:
        return empty_chart(title)
    xmax = max(x) or 1.0
    top = ymax or _nice_max(max(max(v, default=0.0) for _, v in series))
    parts = _frame(title, top, y_label)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(v: float) -> float:
        return LEFT + pw * v / xmax

    def py(v: float) -> float:
        return TOP + ph - ph * v / top

    if diagonal:
        parts.append(f'<line x1="{px(0):.1f}" y1="{py(0):.1f}" x2="{px(xmax):.1f}" '
                     f'y2="{py(top):.1f}" stroke="#999" stroke-dasharray="4,3"/>')
    for j, (_, vals) in enumerate(series):
        pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, vals, strict=True))
        parts.append(f'<polyline points="{pts}" fill="none" stroke-width="2" '
                     f'stroke="{PALETTE[j % len(PALETTE)]}"/>')
    for k in range(5):
        v = xmax * k / 4
        parts.append(f'<text x="{px(v):.1f}" y="{TOP + ph + 14}" text-anchor="middle">'
                     f'{_fmt(v)}</text>')
    if x_label:
        parts.append(f'<text x="{LEFT + pw / 2:.1f}" y="{H - 4}" text-anchor="middle">'
                     f'{escape(x_label)}</text>')
    parts.extend(_legend([name for name, _ in series]))
    parts.append("</svg>")
    return "".join(parts)


def _legend(names: Sequence[str]) -> list[str]:
    out = []
    x = LEFT
    for j, name in enumerate(names):
        out.append(f'<rect x="{x}" y="{H - 14}" width="10" height="10" '
                   f'fill="{PALETTE[j % len(PALETTE)]}"/>')
        out.append(f'<text x="{x + 14}" y="{H - 5}">{escape(name)}</text>')
        x += 20 + 7 * len(name)
    return out


def empty_chart(title: str, why: str = "not enough data") -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="60" '
            f'font-family="sans-serif" font-size="12"><text x="8" y="18" font-weight="bold">'
            f'{escape(title)}</text><text x="8" y="40" fill="#666">{escape(why)}</text></svg>')
