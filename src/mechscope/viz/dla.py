"""Direct logit attribution drawn as self-contained HTML: inline SVG and CSS, no scripts, no network."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mechscope.circuits.dla import DLA

_CSS = (
    ".ms-dla{font:13px system-ui,sans-serif;color:#222}"
    ".ms-dla td,.ms-dla th{border:1px solid #ddd;padding:2px 8px}.ms-dla table{border-collapse:collapse}"
)


def _bars_svg(labels: list[str], values: list[float]) -> str:
    """Vertical bars around a zero line, one per component, value on hover (``<title>``)."""
    step, height, top, label_room = 14, 160, 10, 70
    vmax = max((abs(v) for v in values), default=0.0) or 1.0
    zero = top + height / 2
    width = step * len(values) + 90  # room for the last rotated labels
    parts = [f'<line x1="50" y1="{zero}" x2="{width}" y2="{zero}" stroke="#888"/>']
    parts.append(f'<text x="45" y="{top + 4}" text-anchor="end" font-size="10">{vmax:.2f}</text>')
    parts.append(f'<text x="45" y="{top + height}" text-anchor="end" font-size="10">{-vmax:.2f}</text>')
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        x, h = 52 + i * step, abs(v) / vmax * height / 2
        colour = "#d62728" if v >= 0 else "#1f77b4"
        y = zero - h if v >= 0 else zero
        parts.append(
            f'<rect x="{x}" y="{y:.2f}" width="{step - 3}" height="{h:.2f}" fill="{colour}">'
            f"<title>{escape(label)}: {v:.4f}</title></rect>"
        )
        ty = top + height + 6
        parts.append(
            f'<text x="{x + 6}" y="{ty}" font-size="9" transform="rotate(60 {x + 6} {ty})">{escape(label)}</text>'
        )
    total = top + height + label_room
    return f'<svg width="{width}" height="{total}" role="img">{"".join(parts)}</svg>'


def render_dla_html(dla: DLA, full_page: bool = True) -> str:
    """Layer terms as bars (inline SVG), heads as a heatmap, the top heads and their source positions."""
    from mechscope.viz.heatmap import render_heatmap_html

    n = len(dla.answers)
    where = f"position {dla.pos[0]}" if n == 1 else f"each prompt's position (mean over {n} prompts)"
    total = float((dla.layer_terms.sum(-1) + dla.bias).mean())
    parts = [
        f"<h3>Direct logit attribution of {escape(dla.metric)} at {escape(where)}</h3>",
        f"<p>Model's logit difference {float(dla.logit_diff.mean()):.4f} = sum of the terms below "
        f"{float(dla.layer_terms.sum(-1).mean()):.4f} + final norm and unembedding biases "
        f"{float(dla.bias.mean()):.4f} (check: {total:.4f}). The final norm's scale is frozen at this run's "
        f"value ({float(dla.scale.mean()):.4f}), so each term is the component's direct path only.</p>",
    ]
    if not torch.allclose(dla.logit_diff, dla.output_logit_diff, atol=1e-4, rtol=1e-4):
        parts.append(
            f"<p>The model soft-caps its logits: the returned difference is "
            f"{float(dla.output_logit_diff.mean()):.4f}; the terms attribute the pre-cap one.</p>"
        )
    parts.append(_bars_svg(dla.labels, dla.by_layer.tolist()))
    by_head = dla.by_head
    rows = [f"L{i}" for i in range(by_head.shape[0])]
    cols = [f"H{h}" for h in range(by_head.shape[1])]
    parts.append(render_heatmap_html(by_head, rows, cols, "Per head (z @ W_O)", full_page=False))
    top = "".join(f"<tr><td>{escape(lab)}</td><td>{v:+.4f}</td></tr>" for lab, v in dla.top(10, "head"))
    parts.append(f"<h3>Top heads</h3><table><tr><th>head</th><th>DLA</th></tr>{top}</table>")
    if dla.pos_terms is not None and n == 1:
        heads = dla.top_heads(5)
        grid = torch.stack([dla.by_pos[la, h, : len(dla.str_tokens[0])] for la, h, _ in heads])
        parts.append(
            render_heatmap_html(
                grid,
                [f"L{la}H{h}" for la, h, _ in heads],
                dla.str_tokens[0],
                "Top heads by source position",
                full_page=False,
            )
        )
    body = f"<div class='ms-dla'>{''.join(parts)}</div>"
    if not full_page:
        return f"<style>{_CSS}</style>{body}"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>direct logit attribution</title>"
        f"<style>body{{margin:1.5em}}{_CSS}</style></head><body>{body}</body></html>"
    )
