"""A discovered circuit drawn as inline SVG (no scripts, no network): nodes by layer, edges by score."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mechscope.interventions.circuit import Circuit, Edge


def render_circuit_svg(circuit: Circuit, edges: list[Edge]) -> str:
    """Layers as rows (input at the bottom, logits on top); each edge a curve, width ~ |score|."""
    g = circuit.graph
    left, row_h, pad = 50, 34, 24
    width = max(460, 64 * g.n_heads + 160)
    span = width - left - 90  # heads spread over [left, left + span]; the MLP sits at the right end
    height = (g.n_layers + 1) * row_h + 2 * pad

    def place(node: str):  # -> (x, y)
        if node in ("input", "logits"):
            return left + span / 2, float(height - pad if node == "input" else pad)
        layer, _, head = node[1:].partition(".h")
        y = float(height - pad - (int(layer) + 1) * row_h)
        return (width - 40 if node[0] == "m" else left + (int(head) + 0.5) * span / g.n_heads), y

    used = set(circuit.nodes)
    top = max((abs(e.score) for e in edges), default=1.0) or 1.0
    shift = {"q": -6, "k": 0, "v": 6, "": 0}
    paths = []
    for e in reversed(edges):  # strongest drawn last, on top
        (x1, y1), (x2, y2) = place(e.upstream), place(e.downstream)
        x2 += shift[e.input]
        # Same-row edges (a head into its own layer's MLP) bow upwards instead of crossing the row.
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 - (row_h * 0.6 if y1 == y2 else 0)
        colour = "#d62728" if e.score >= 0 else "#1f77b4"
        label = f"{e.upstream} -> {e.downstream}{f' <{e.input}>' if e.input else ''}: {e.score:.4g}"
        paths.append(
            f'<path d="M{x1:.1f},{y1:.1f} Q{cx:.1f},{cy:.1f} {x2:.1f},{y2:.1f}" fill="none" stroke="{colour}" '
            f'stroke-opacity="0.7" stroke-width="{0.5 + 5 * abs(e.score) / top:.2f}"><title>{escape(label)}</title></path>'
        )
    dots = [f'<text x="4" y="{place(f"m{i}")[1] + 4:.1f}">L{i}</text>' for i in range(g.n_layers)]
    for node in g.upstream + ["logits"]:
        (x, y), on = place(node), node in used
        dots.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{5 if on else 2.5}" fill="{"#333" if on else "#ccc"}">'
            f"<title>{node}</title></circle>"
            + (f'<text x="{x + 7:.1f}" y="{y - 6:.1f}">{node}</text>' if on else "")
        )
    return (
        f'<svg width="{width}" height="{height + 16}" font-size="10" font-family="ui-monospace,monospace">'
        f'{"".join(paths)}{"".join(dots)}<text x="4" y="{height + 10}">red: positive score, blue: negative; '
        f"q / k / v enter a head left / centre / right; width ~ |score|</text></svg>"
    )
