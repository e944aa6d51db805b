"""A self-contained HTML heatmap (inline CSS, no scripts): rows x columns of numbers with labels.

Values are coloured on a diverging scale centred on zero (blue negative, red positive), so
patching results (normalised: 0 = no effect, 1 = full restoration) read at a glance; the exact
value shows on hover.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

import torch

# Scoped to .ms-heatmap so that a fragment shown in a notebook does not restyle the page around it.
_CSS = (
    ".ms-heatmap{font:13px system-ui,sans-serif}.ms-heatmap table{border-collapse:collapse}"
    ".ms-heatmap td{width:2.6em;height:1.6em;text-align:center;font-size:11px;border:1px solid #fff}"
    ".ms-heatmap th{font-weight:normal;padding:0 4px;font-family:ui-monospace,monospace;white-space:pre}"
)


def _colour(v: float, vmax: float) -> str:
    a = min(1.0, abs(v) / vmax) if vmax > 0 else 0.0
    return f"rgba(214,39,40,{a:.3f})" if v >= 0 else f"rgba(31,119,180,{a:.3f})"


def render_heatmap_html(
    values: torch.Tensor,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    *,
    full_page: bool = True,
) -> str:
    """A ``[rows cols]`` tensor as an HTML table; ``full_page=False`` gives a fragment for notebooks."""
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(values.shape)}")
    v = values.detach().float().cpu()
    vmax = float(v.nan_to_num().abs().max()) or 1.0
    head = "<tr><th></th>" + "".join(f"<th>{escape(str(c))}</th>" for c in col_labels) + "</tr>"
    rows = "".join(
        f"<tr><th>{escape(str(r))}</th>"
        + "".join(
            f'<td style="background:{_colour(x, vmax)}" title="{x:.4f}">{x:.2f}</td>' for x in row.tolist()
        )
        + "</tr>"
        for r, row in zip(row_labels, v, strict=True)
    )
    body = f"<div class='ms-heatmap'><h3>{escape(title)}</h3><table>{head}{rows}</table></div>"
    if not full_page:
        return f"<style>{_CSS}</style>{body}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>body{{margin:1.5em}}{_CSS}</style></head><body>{body}</body></html>"
