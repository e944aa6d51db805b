"""Average causal traces (ROME, Meng et al. 2022, Figure 2) as a self-contained SVG figure or HTML page.

:func:`render_average_trace_svg` draws the paper's three heatmaps — average indirect effect of
restoring the hidden state / MLP / attention, token category x layer — in the paper's colours
(purple, green, red), on one scale. :func:`render_average_trace_html` adds, per kind, the same
numbers as one line per category over the layers (with ± one standard error when given), which
makes the layer where each category peaks easy to read. Inline CSS and SVG; no scripts, no network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from html import escape

from jaxtyping import Float
from torch import Tensor

# One colour per ROME token category, in CATEGORIES' order (tab10).
_COLOURS = ("#1f77b4", "#17becf", "#d62728", "#ff7f0e", "#7f7f7f", "#2ca02c")
_LABELS = {"state": "hidden state", "mlp": "MLP", "attn": "attention"}
# The paper's colour maps (matplotlib Purples / Greens / Reds), light to dark end.
_RAMPS = {
    "state": ((252, 251, 253), (63, 0, 125)),
    "mlp": ((247, 252, 245), (0, 68, 27)),
    "attn": ((255, 245, 240), (103, 0, 13)),
}
_CSS = (
    "body{font:13px system-ui,sans-serif;margin:1.5em;color:#222}"
    ".kind{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start;margin-bottom:1.5em}"
)


def _line_plot_svg(
    aie: Tensor,
    stderr: Tensor | None,
    categories: list[str],
    width: int = 460,
    height: int = 240,
) -> str:
    """One polyline per category (rows of ``aie``) over the layers (columns), with a shaded ± stderr band."""
    left, right, top, bottom = 44, 10, 10, 30
    n_layers = aie.shape[1]
    lo_band = aie if stderr is None else aie - stderr
    hi_band = aie if stderr is None else aie + stderr
    lo = min(0.0, float(lo_band.nan_to_num(0.0).min()))
    hi = max(float(hi_band.nan_to_num(0.0).max()), lo + 1e-6)

    def x(layer: int) -> float:
        return left + (width - left - right) * layer / max(n_layers - 1, 1)

    def y(v: float) -> float:
        return top + (height - top - bottom) * (hi - v) / (hi - lo)

    parts = [
        f'<line x1="{left}" x2="{width - right}" y1="{y(0.0):.1f}" y2="{y(0.0):.1f}" stroke="#999"/>',
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" stroke="#999"/>',
    ]
    for t in range(0, n_layers, 5):
        parts.append(
            f'<text x="{x(t):.1f}" y="{height - bottom + 14}" font-size="10" text-anchor="middle">{t}</text>'
        )
    for v in (lo, (lo + hi) / 2, hi):
        parts.append(
            f'<text x="{left - 4}" y="{y(v) + 3:.1f}" font-size="10" text-anchor="end">{v:.2f}</text>'
        )
    parts.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 2}" font-size="10" text-anchor="middle">layer</text>'
    )
    for c, name in enumerate(categories):
        row = aie[c]
        if bool(row.isnan().all()):
            continue
        if stderr is not None:
            up = [f"{x(i):.1f},{y(float(row[i] + stderr[c, i])):.1f}" for i in range(n_layers)]
            down = [f"{x(i):.1f},{y(float(row[i] - stderr[c, i])):.1f}" for i in reversed(range(n_layers))]
            parts.append(
                f'<polygon points="{" ".join(up + down)}" fill="{_COLOURS[c]}" fill-opacity="0.15" stroke="none"/>'
            )
        points = " ".join(f"{x(i):.1f},{y(float(v)):.1f}" for i, v in enumerate(row.tolist()))
        peak = int(row.nan_to_num(float("-inf")).argmax())
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{_COLOURS[c]}" stroke-width="1.8">'
            f"<title>{escape(name)}: peak {float(row[peak]):.3f} at layer {peak}</title></polyline>"
        )
    legend = "".join(
        f'<text x="{width - right - 4}" y="{top + 12 + 12 * c}" font-size="10" text-anchor="end" '
        f'fill="{_COLOURS[c]}">{escape(name)}</text>'
        for c, name in enumerate(categories)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif">{"".join(parts)}{legend}</svg>'
    )


def _ramp(kind: str, t: float) -> str:
    lo, hi = _RAMPS.get(kind, _RAMPS["state"])
    t = min(1.0, max(0.0, t))
    return "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(lo, hi, strict=True))


def render_average_trace_svg(
    aie: Mapping[str, Float[Tensor, "category layer"]],
    *,
    n_prompts: int,
    window: int,
    categories: list[str] | None = None,
    title: str = "Average indirect effect",
    cell: int = 16,
) -> str:
    """The paper's three heatmaps (one per kind in ``aie``), stacked, as one standalone SVG.

    Rows are token categories, columns layers. Colour runs from 0 to the largest average indirect
    effect over all kinds (shared, so panels compare); negative averages are drawn as 0, as ROME's
    plots clip them. Each cell's exact value is in its ``<title>`` (a hover tooltip).
    """
    from mechscope.interventions.causal_trace import CATEGORIES

    categories = list(categories or CATEGORIES)
    vals = {k: v.detach().float().cpu() for k, v in aie.items()}
    for kind, v in vals.items():
        if v.shape[0] != len(categories):
            raise ValueError(f"aie[{kind!r}] has {v.shape[0]} rows but {len(categories)} categories")
    vmax = max((float(v.nan_to_num(0.0).max()) for v in vals.values()), default=0.0) or 1.0
    left, bar, gap, head = 150, 70, 30, 30
    n_layers = max(v.shape[1] for v in vals.values())
    panel = head + cell * len(categories) + gap
    width, height = left + cell * n_layers + bar, 28 + panel * len(vals)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="4" y="16" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    for i, (kind, v) in enumerate(vals.items()):
        y0 = 28 + i * panel
        what = _LABELS.get(kind, kind) + ("" if kind == "state" else f" (window of {window} layers)")
        out.append(
            f'<text x="{left}" y="{y0 + 16}" font-size="12">Average indirect effect of restoring the '
            f"{escape(what)}, {n_prompts} prompts</text>"
        )
        top = y0 + head
        for c, name in enumerate(categories):
            y = top + c * cell
            out.append(f'<text x="{left - 6}" y="{y + cell - 4}" text-anchor="end">{escape(name)}</text>')
            for layer, x in enumerate(v[c].tolist()):
                fill = "#eee" if math.isnan(x) else _ramp(kind, x / vmax)
                tip = "no token" if math.isnan(x) else f"{x:.4f}"
                out.append(
                    f'<rect x="{left + layer * cell}" y="{y}" width="{cell}" height="{cell}" fill="{fill}">'
                    f"<title>{escape(name)}, layer {layer}: {tip}</title></rect>"
                )
        bottom = top + cell * len(categories)
        for layer in range(0, v.shape[1], 5):
            out.append(
                f'<text x="{left + layer * cell + cell / 2}" y="{bottom + 12}" text-anchor="middle">{layer}</text>'
            )
        # Colour bar: 0 at the bottom, vmax at the top.
        bx, steps = left + cell * n_layers + 12, 20
        h = cell * len(categories)
        for k in range(steps):
            out.append(
                f'<rect x="{bx}" y="{top + h * (steps - 1 - k) / steps:.1f}" width="10" '
                f'height="{h / steps + 0.5:.1f}" fill="{_ramp(kind, (k + 0.5) / steps)}"/>'
            )
        out.append(f'<text x="{bx + 14}" y="{top + 8}">{vmax:.2f}</text>')
        out.append(f'<text x="{bx + 14}" y="{bottom}">0</text>')
        out.append(f'<text x="{bx - 2}" y="{bottom + 12}">AIE</text>')
    out.append(
        f'<text x="{left + cell * n_layers / 2}" y="{height - 6}" text-anchor="middle">'
        "layer (MLP / attention: centre of the window)</text>"
    )
    out.append("</svg>")
    return "".join(out)


def render_average_trace_html(
    aie: Mapping[str, Float[Tensor, "category layer"]],
    *,
    n_prompts: int,
    total_effect: float,
    window: int,
    stderr: Mapping[str, Float[Tensor, "category layer"]] | None = None,
    categories: list[str] | None = None,
    title: str = "Average indirect effect",
) -> str:
    """A page with, per kind in ``aie``, the category x layer heatmap and the per-category line plot.

    Args:
        aie: per kind (``state``, ``mlp``, ``attn``), the average indirect effect, as
            :func:`mechscope.interventions.causal_trace.average_indirect_effect` returns it.
        n_prompts, total_effect, window: stated in the page's header (the average total effect is
            the mean of clean minus corrupted probability, the ceiling of an indirect effect).
        stderr: per kind, the standard error of each cell over prompts (a shaded band in the plots).
        categories: row labels (default: ROME's token categories).

    Returns:
        A complete HTML document: inline CSS and SVG, no scripts, no network references.
    """
    from mechscope.interventions.causal_trace import CATEGORIES
    from mechscope.viz.heatmap import render_heatmap_html

    categories = list(categories or CATEGORIES)
    sections = []
    for kind, values in aie.items():
        if values.shape[0] != len(categories):
            raise ValueError(f"aie[{kind!r}] has {values.shape[0]} rows but {len(categories)} categories")
        label = _LABELS.get(kind, kind) + ("" if kind == "state" else f" (window {window})")
        heat = render_heatmap_html(
            values,
            categories,
            [str(i) for i in range(values.shape[1])],
            f"Average indirect effect of restoring the {label}",
            full_page=False,
        )
        err = None if stderr is None else stderr[kind].detach().float().cpu()
        plot = _line_plot_svg(values.detach().float().cpu(), err, categories)
        sections.append(f"<div class='kind'><div>{heat}</div><div><h3>per category</h3>{plot}</div></div>")
    header = (
        f"<h2>{escape(title)}</h2><p>{n_prompts} prompts; average total effect (clean − corrupted "
        f"probability of the answer) {total_effect:.3f}. Indirect effect = probability with one state "
        f"restored − corrupted probability, averaged per token category and layer"
        f"{'; bands: ± one standard error over prompts' if stderr is not None else ''}.</p>"
    )
    figure = render_average_trace_svg(
        aie, n_prompts=n_prompts, window=window, categories=categories, title=title
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{header}<div>{figure}</div>{''.join(sections)}</body></html>"
    )
