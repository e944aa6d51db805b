"""A steering sweep as a self-contained HTML page: inline SVG line plots and a table, no scripts.

Three panels, one line per steering vector (colour = hook point), its same-norm random control dashed
in the same colour: effect against coefficient, cost (KL on neutral text) against coefficient, and
effect against cost — the panel that says whether a vector steers better than *any* vector that large.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import NamedTuple

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_W, _H, _M = 340, 240, 50  # panel width, height, margin (px)
_CSS = (
    ".ms-steer{font:13px system-ui,sans-serif}.ms-steer svg{margin-right:12px}"
    ".ms-steer table{border-collapse:collapse;margin-top:1em}"
    ".ms-steer td,.ms-steer th{padding:2px 8px;text-align:right;border-bottom:1px solid #eee}"
    ".ms-steer th{font-weight:600}.ms-steer .hook{font-family:ui-monospace,monospace;text-align:left}"
)


class Series(NamedTuple):
    label: str
    colour: str
    dashed: bool
    xs: Sequence[float]
    ys: Sequence[float]


def _ticks(lo: float, hi: float) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) inside ``[lo, hi]``."""
    raw = (hi - lo) / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [float(first + i * step) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _panel(series: Sequence[Series], title: str, xlabel: str, ylabel: str) -> str:
    """One SVG line plot with axes, ticks and a zero line when zero is in range."""
    xs = [x for s in series for x in s.xs]
    ys = [y for s in series for y in s.ys]
    x0, x1 = min(xs + [0.0]), max(xs + [0.0])
    y0, y1 = min(ys + [0.0]), max(ys + [0.0])
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def px(x: float) -> float:
        return _M + (x - x0) / (x1 - x0) * (_W - 1.5 * _M)

    def py(y: float) -> float:
        return _H - _M + -(y - y0) / (y1 - y0) * (_H - 1.8 * _M)

    parts = [
        f'<svg width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{_W / 2}" y="16" text-anchor="middle" font-weight="600">{escape(title)}</text>',
        f'<line x1="{_M}" y1="{_H - _M}" x2="{_W - _M / 2}" y2="{_H - _M}" stroke="#333"/>',
        f'<line x1="{_M}" y1="{py(y1)}" x2="{_M}" y2="{_H - _M}" stroke="#333"/>',
    ]
    for t in _ticks(x0, x1):
        parts.append(
            f'<text x="{px(t):.1f}" y="{_H - _M + 14}" text-anchor="middle" font-size="10">{t:.3g}</text>'
        )
    for t in _ticks(y0, y1):
        parts.append(
            f'<text x="{_M - 4}" y="{py(t) + 3:.1f}" text-anchor="end" font-size="10">{t:.3g}</text>'
        )
    if y0 < 0 < y1:
        parts.append(
            f'<line x1="{_M}" y1="{py(0.0):.1f}" x2="{_W - _M / 2}" y2="{py(0.0):.1f}" stroke="#bbb"/>'
        )
    parts.append(
        f'<text x="{_W / 2}" y="{_H - 8}" text-anchor="middle" font-size="11">{escape(xlabel)}</text>'
    )
    parts.append(
        f'<text x="10" y="{_H / 2}" text-anchor="middle" font-size="11" '
        f'transform="rotate(-90 10 {_H / 2})">{escape(ylabel)}</text>'
    )
    for s in series:
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s.xs, s.ys, strict=True))
        dash = ' stroke-dasharray="4 3"' if s.dashed else ""
        parts.append(
            f'<polyline points="{pts}" fill="none" stroke="{s.colour}" stroke-width="1.6"{dash}>'
            f"<title>{escape(s.label)}</title></polyline>"
        )
        for x, y in zip(s.xs, s.ys, strict=True):
            parts.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.4" fill="{s.colour}">'
                f"<title>{escape(s.label)}: ({x:.3g}, {y:.3g})</title></circle>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _series(result, x: str, y: str) -> list[Series]:
    """Lines for each vector (solid) and its random control (dashed); ``x``/``y`` name result fields."""
    out = []
    for i, label in enumerate(result.labels):
        colour = _PALETTE[i % len(_PALETTE)]
        for rnd in (False, True):
            pre = "random_" if rnd else ""
            if rnd and result.random_effect is None:
                continue

            def get(f: str, pre: str = pre, i: int = i) -> list[float]:
                return list(result.coeffs) if f == "coeff" else getattr(result, pre + f)[i].tolist()

            out.append(Series(label + (" (random)" if rnd else ""), colour, rnd, get(x), get(y)))
    return out


def _table(result) -> str:
    rnd = result.random_effect is not None
    head = "<tr><th class='hook'>hook</th><th>coeff</th><th>effect</th><th>KL</th><th>&Delta;NLL</th>"
    head += "<th>random effect</th><th>random KL</th></tr>" if rnd else "</tr>"
    body = ""
    for r in result.rows():
        body += f"<tr><td class='hook'>{escape(r['hook'])}</td><td>{r['coeff']:g}</td>"
        body += "".join(f"<td>{r[k]:.3f}</td>" for k in ("effect", "kl", "delta_nll"))
        body += "".join(f"<td>{r[k]:.3f}</td>" for k in ("random_effect", "random_kl")) if rnd else ""
        body += "</tr>"
    return f"<table>{head}{body}</table>"


def render_steering_html(
    result, title: str = "Steering: effect against cost", *, full_page: bool = True
) -> str:
    """A :class:`~mechscope.steering.evaluate.SweepResult` as HTML (``full_page=False``: a fragment)."""
    panels = (
        _panel(_series(result, "coeff", "effect"), "effect", "coefficient", "target shift")
        + _panel(_series(result, "coeff", "kl"), "cost", "coefficient", "KL on neutral text (nats/token)")
        + _panel(_series(result, "kl", "effect"), "effect vs cost", "KL (nats/token)", "target shift")
    )
    legend = " ".join(
        f"<span style='color:{_PALETTE[i % len(_PALETTE)]}'>&#9632; {escape(label)}</span>"
        for i, label in enumerate(result.labels)
    )
    note = (
        f"<p>Target: {escape(result.metric)}; unsteered mean {result.baseline:.3f}. "
        "Effect: shift from the unsteered model. Dashed: a random direction of the same norm.</p>"
    )
    body = f"<div class='ms-steer'><h3>{escape(title)}</h3>{note}<div>{legend}</div>{panels}{_table(result)}</div>"
    if not full_page:
        return f"<style>{_CSS}</style>{body}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>body{{margin:1.5em}}{_CSS}</style></head><body>{body}</body></html>"
    )
