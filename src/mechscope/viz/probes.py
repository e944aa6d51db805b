"""Probe results as self-contained SVG and HTML (no scripts, no network assets).

* :func:`render_layer_scores_svg` — the "which layer knows" curve: validation score per hook point,
  with the training score and the control task (permuted labels) beside it, so the gap that matters
  (validation minus control) is visible.
* :func:`render_scatter_svg` — 2-D points coloured by label (a PCA projection or a circle fit's
  plane); with ``centres`` the class means are drawn and, for cyclic concepts, joined in order.
* :func:`render_probe_report_html` — a page that puts the panels and tables together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

# Tableau-like categorical palette; cyclic labels get evenly spaced hues instead (see _colours).
_PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def _colours(classes: Sequence, cyclic: bool) -> dict:
    if cyclic or len(classes) > len(_PALETTE):
        return {c: f"hsl({360 * i / len(classes):.0f},70%,45%)" for i, c in enumerate(classes)}
    return {c: _PALETTE[i] for i, c in enumerate(classes)}


def _short(hook: str) -> str:
    """``blocks.12.hook_resid_post`` -> ``12 post``: axis labels that fit."""
    parts = hook.split(".")
    if len(parts) >= 3 and parts[0] == "blocks":
        return f"{parts[1]} {parts[-1].replace('hook_', '').replace('resid_', '')}"
    return hook.replace("hook_", "")


def render_layer_scores_svg(
    records: Sequence[dict],
    *,
    metric: str = "accuracy",
    title: str = "",
    names: dict[str, str] | None = None,
    width: int = 640,
    height: int = 300,
) -> str:
    """Score per hook point: ``records`` rows need ``hook``, ``val``, and optionally ``train``, ``control``.

    ``names`` renames the legend entries (e.g. ``{"val": "CCS", "train": "logistic (upper bound)"}``).
    """
    if not records:
        raise ValueError("no records to plot")
    m = 48
    series = [
        ("val", "#d62728", "validation"),
        ("train", "#1f77b4", "train"),
        ("control", "#7f7f7f", "control (random labels)"),
    ]
    series = [(k, c, (names or {}).get(k, label)) for k, c, label in series]
    series = [s for s in series if all(r.get(s[0]) is not None for r in records)]
    ys = [float(r[k]) for r in records for k, _, _ in series]
    y0, y1 = min(0.0, min(ys)), max(1.0, max(ys))
    n = len(records)

    def px(i: int) -> float:
        return m + (i / max(1, n - 1)) * (width - 1.6 * m)

    def py(y: float) -> float:
        return height - m - (y - y0) / (y1 - y0) * (height - 1.8 * m)

    parts = [
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="600">{escape(title)}</text>',
        f'<line x1="{m}" y1="{height - m}" x2="{width - m / 2}" y2="{height - m}" stroke="#333"/>',
        f'<line x1="{m}" y1="{py(y1):.1f}" x2="{m}" y2="{height - m}" stroke="#333"/>',
        f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle" font-size="11">{escape(metric)}</text>',
    ]
    for i in range(5):
        ty = y0 + (y1 - y0) * i / 4
        parts.append(
            f'<text x="{m - 4}" y="{py(ty) + 3:.1f}" text-anchor="end" font-size="10">{ty:.2g}</text>'
        )
        parts.append(
            f'<line x1="{m}" y1="{py(ty):.1f}" x2="{width - m / 2}" y2="{py(ty):.1f}" stroke="#eee"/>'
        )
    step = max(1, math.ceil(n / 16))
    for i, r in enumerate(records):
        if i % step == 0 or i == n - 1:
            parts.append(
                f'<text x="{px(i):.1f}" y="{height - m + 14}" text-anchor="end" font-size="9" '
                f'transform="rotate(-35 {px(i):.1f} {height - m + 14})">{escape(_short(r["hook"]))}</text>'
            )
    for j, (key, colour, label) in enumerate(series):
        pts = " ".join(f"{px(i):.1f},{py(float(r[key])):.1f}" for i, r in enumerate(records))
        dash = ' stroke-dasharray="4 3"' if key == "control" else ""
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.8"{dash}/>')
        for i, r in enumerate(records):
            parts.append(
                f'<circle cx="{px(i):.1f}" cy="{py(float(r[key])):.1f}" r="2.5" fill="{colour}">'
                f"<title>{escape(r['hook'])}: {label} {float(r[key]):.3f}</title></circle>"
            )
        parts.append(
            f'<text x="{width - m / 2}" y="{30 + 13 * j}" text-anchor="end" font-size="11" fill="{colour}">{escape(label)}</text>'
        )
    return (
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" '
        f'font-family="system-ui,sans-serif" font-size="13">{"".join(parts)}</svg>'
    )


def render_scatter_svg(
    coords: Sequence[Sequence[float]],
    labels: Sequence,
    *,
    classes: Sequence | None = None,
    centres: Sequence[Sequence[float]] | None = None,
    cyclic: bool = False,
    title: str = "",
    size: int = 360,
) -> str:
    """2-D points coloured by label; ``centres`` (one per class, in ``classes`` order) drawn as labelled
    squares and, when ``cyclic``, joined in order round the circle."""
    pts = [(float(p[0]), float(p[1])) for p in coords]
    if len(pts) != len(labels):
        raise ValueError(f"{len(pts)} points but {len(labels)} labels")
    classes = list(classes) if classes is not None else list(dict.fromkeys(labels))
    colour = _colours(classes, cyclic)
    cs = [(float(c[0]), float(c[1])) for c in centres] if centres is not None else []
    xs = [p[0] for p in pts + cs]
    ys = [p[1] for p in pts + cs]
    span = max(max(xs) - min(xs), max(ys) - min(ys)) or 1.0  # equal axes: a circle must look round
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    m = 24

    def px(x: float) -> float:
        return size / 2 + (x - cx) / span * (size - 2 * m)

    def py(y: float) -> float:
        return size / 2 - (y - cy) / span * (size - 2 * m) + 10

    parts = [
        f'<text x="{size / 2}" y="14" text-anchor="middle" font-weight="600" font-size="12">{escape(title)}</text>'
    ]
    for (x, y), lab in zip(pts, labels, strict=True):
        parts.append(
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour.get(lab, "#999")}" fill-opacity="0.65">'
            f"<title>{escape(str(lab))}</title></circle>"
        )
    if cs:
        if cyclic:
            ring = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in cs + cs[:1])
            parts.append(f'<polyline points="{ring}" fill="none" stroke="#333" stroke-width="1"/>')
        for (x, y), c in zip(cs, classes, strict=True):
            parts.append(
                f'<rect x="{px(x) - 4:.1f}" y="{py(y) - 4:.1f}" width="8" height="8" fill="{colour[c]}" stroke="#000"/>'
                f'<text x="{px(x) + 6:.1f}" y="{py(y) - 5:.1f}" font-size="10">{escape(str(c))}</text>'
            )
    return (
        f'<svg width="{size}" height="{size + 10}" viewBox="0 0 {size} {size + 10}" xmlns="http://www.w3.org/2000/svg" '
        f'font-family="system-ui,sans-serif">{"".join(parts)}</svg>'
    )


def render_table_html(rows: Sequence[dict], digits: int = 3) -> str:
    """A plain HTML table of records (floats rounded)."""
    if not rows:
        return "<p>(no rows)</p>"
    keys = list(rows[0])

    def cell(v) -> str:
        return f"{v:.{digits}f}" if isinstance(v, float) else escape(str(v))

    head = "".join(f"<th>{escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{cell(r[k])}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_probe_report_html(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A page of ``(heading, html or svg)`` sections."""
    css = (
        "body{font:14px system-ui,sans-serif;margin:1.5em;max-width:1100px}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:2px 6px}"
        ".grid{display:flex;flex-wrap:wrap;gap:12px}"
    )
    body = "".join(f"<h2>{escape(h)}</h2>{content}" for h, content in sections)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{css}</style>"
        f"</head><body><h1>{escape(title)}</h1>{body}</body></html>"
    )
