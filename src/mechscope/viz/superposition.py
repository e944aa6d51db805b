"""The views of "Toy Models of Superposition" as one self-contained HTML page (inline SVG, no scripts).

One column per instance, as in the paper's Figure 2/3: ``W^T W`` (interference, blue-red), the bias,
``||W_i||`` bars coloured by how much of feature i's direction is shared (black = a dedicated
direction, yellow = in superposition), the 2-D feature geometry when ``n_hidden = 2`` (each
feature's column of W drawn from the origin, darker = more important), and the feature
dimensionality ``D_i`` against the instance's sparsity (the paper's "fractional dimensions" plot,
with reference lines at 1, 1/2, 2/5 and 1/3). The phase diagram has its own renderer.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mechscope.toy.superposition import ToyModel

_CSS = (
    "body{font:13px system-ui,sans-serif;margin:1.5em;color:#222}.row{display:flex;gap:18px;flex-wrap:wrap}"
    ".inst{text-align:center}h3{font-size:1.05em;margin:1.2em 0 .4em}svg{display:block;margin:auto}"
)


def _diverging(v: float, vmax: float) -> str:
    a = min(1.0, abs(v) / vmax) if vmax > 0 else 0.0
    return f"rgba(214,39,40,{a:.3f})" if v >= 0 else f"rgba(31,119,180,{a:.3f})"


def _matrix_svg(m: torch.Tensor, cell: int = 14) -> str:
    rows, cols = m.shape
    vmax = float(m.abs().max()) or 1.0
    rects = "".join(
        f'<rect x="{j * cell}" y="{i * cell}" width="{cell}" height="{cell}" '
        f'fill="{_diverging(float(m[i, j]), vmax)}"><title>{float(m[i, j]):.3f}</title></rect>'
        for i in range(rows)
        for j in range(cols)
    )
    return f'<svg width="{cols * cell}" height="{rows * cell}">{rects}</svg>'


def _bars_svg(norms: torch.Tensor, sup: torch.Tensor, width: int = 120, bar: int = 10) -> str:
    """Horizontal bars of ``||W_i||``; colour from black (sup = 0) to yellow (sup >= 1)."""
    out = []
    for i, (n, s) in enumerate(zip(norms.tolist(), sup.tolist(), strict=True)):
        t = min(1.0, max(0.0, s))
        colour = f"rgb({int(255 * t)},{int(215 * t)},0)"
        w = max(0.0, min(1.2, n)) / 1.2 * width
        out.append(
            f'<rect x="0" y="{i * (bar + 2)}" width="{w:.1f}" height="{bar}" fill="{colour}">'
            f"<title>feature {i}: ||W|| = {n:.3f}, superposition = {s:.3f}</title></rect>"
        )
    return f'<svg width="{width}" height="{len(norms) * (bar + 2)}">{"".join(out)}</svg>'


def _geometry_svg(W: torch.Tensor, importance: torch.Tensor, size: int = 130) -> str:
    """Each feature's column ``W[:, i]`` as a line from the origin (2-D hidden spaces only)."""
    c, scale = size / 2, size / 2 / 1.25
    imp = importance / importance.max()
    lines = "".join(
        f'<line x1="{c}" y1="{c}" x2="{c + scale * float(W[0, i]):.1f}" y2="{c - scale * float(W[1, i]):.1f}" '
        f'stroke="rgba(40,40,40,{0.25 + 0.75 * float(imp[i]):.2f})" stroke-width="2">'
        f"<title>feature {i}: ({float(W[0, i]):.2f}, {float(W[1, i]):.2f})</title></line>"
        for i in range(W.shape[1])
    )
    frame = f'<rect width="{size}" height="{size}" fill="none" stroke="#ddd"/>'
    return f'<svg class="geometry" width="{size}" height="{size}">{frame}{lines}</svg>'


def _dimensionality_svg(dims: torch.Tensor, sparsities: list[float], w: int = 420, h: int = 200) -> str:
    """``D_i`` per feature against ``1 / (1 - S)`` on a log axis, with the paper's reference fractions."""
    import math

    xs = [math.log10(1 / (1 - s)) for s in sparsities]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    px = lambda x: 40 + (x - x0) / (x1 - x0) * (w - 60)  # noqa: E731
    py = lambda y: h - 20 - min(1.1, y) / 1.1 * (h - 30)  # noqa: E731
    refs = "".join(
        f'<line x1="40" x2="{w - 20}" y1="{py(f):.1f}" y2="{py(f):.1f}" stroke="#ccc" stroke-dasharray="3 3"/>'
        f'<text x="4" y="{py(f) + 4:.1f}" font-size="10">{label}</text>'
        for f, label in ((1, "1"), (1 / 2, "1/2"), (2 / 5, "2/5"), (1 / 3, "1/3"))
    )
    dots = "".join(
        f'<circle cx="{px(x):.1f}" cy="{py(float(d)):.1f}" r="3" fill="#1f77b4" fill-opacity="0.7">'
        f"<title>S = {s:.3f}, feature {i}: D = {float(d):.3f}</title></circle>"
        for x, s, row in zip(xs, sparsities, dims, strict=True)
        for i, d in enumerate(row)
    )
    axis = f'<text x="{w / 2}" y="{h - 3}" font-size="10" text-anchor="middle">1/(1-S), log scale</text>'
    return f'<svg width="{w}" height="{h}">{refs}{dots}{axis}</svg>'


def render_superposition_html(model: ToyModel, *, full_page: bool = True) -> str:
    """Every instance's ``W^T W``, bias, feature norms and geometry, and the dimensionality plot."""
    from mechscope.toy import superposition as sp

    cfg = model.cfg
    gram, norms, sup = sp.gram(model), sp.feature_norms(model), sp.superposition(model)
    dims = sp.feature_dimensionality(model)
    W, b = model.W.detach(), model.b.detach()
    cols = []
    for i, s in enumerate(cfg.sparsities):
        parts = [
            f"<b>S = {s:g}</b>",
            "W<sup>T</sup>W" + _matrix_svg(gram[i]),
            "b" + _matrix_svg(b[i][:, None]),
            "||W<sub>i</sub>||" + _bars_svg(norms[i], sup[i]),
        ]
        if cfg.n_hidden == 2:
            parts.append(_geometry_svg(W[i], model.importance[i]))
        cols.append(f'<div class="inst">{"<br>".join(parts)}</div>')
    body = (
        f"<h3>{cfg.n_features} features in {cfg.n_hidden} dimensions, one column per instance</h3>"
        f'<div class="row">{"".join(cols)}</div>'
        "<h3>Feature dimensionality D<sub>i</sub> against sparsity</h3>"
        + _dimensionality_svg(dims, list(cfg.sparsities))
    )
    if not full_page:
        return f"<style>{_CSS}</style>{body}"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>toy models of superposition</title>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>"
    )


def render_phase_diagram_html(
    phase: torch.Tensor, densities: list[float], relative_importances: list[float]
) -> str:
    """The ``[importance density]`` phase grid of :func:`~mechscope.toy.superposition.phase_diagram`."""
    from mechscope.toy.superposition import PHASES

    colours = ("#bbb", "#1f77b4", "#ff7f0e")
    cell = 22
    rects = "".join(
        f'<rect x="{60 + j * cell}" y="{i * cell}" width="{cell}" height="{cell}" fill="{colours[int(p)]}">'
        f"<title>density {d:g}, importance {r:g}: {PHASES[int(p)]}</title></rect>"
        for i, (r, row) in enumerate(zip(relative_importances, phase.tolist(), strict=True))
        for j, (d, p) in enumerate(zip(densities, row, strict=True))
    )
    labels = "".join(
        f'<text x="55" y="{i * cell + 15}" font-size="10" text-anchor="end">{r:g}</text>'
        for i, r in enumerate(relative_importances)
    )
    h = len(relative_importances) * cell
    svg = f'<svg width="{70 + len(densities) * cell}" height="{h}">{labels}{rects}</svg>'
    legend = " ".join(
        f'<span style="color:{c}">&#9632;</span> {escape(name)}'
        for c, name in zip(colours, PHASES, strict=True)
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>phase diagram</title>"
        f"<style>{_CSS}</style></head><body><h3>Feature 2's phase: rows = relative importance, columns = "
        f"density 1 - S ({densities[0]:g} to {densities[-1]:g})</h3>{svg}<p>{legend}</p></body></html>"
    )
