"""Self-contained HTML table of per-head detector scores (layers x heads, one table per score)."""

from __future__ import annotations

from html import escape

_CSS = "body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}"


def render_head_scores_html(
    title: str, scores: dict[str, list[list[float]]], compositions: list[tuple[str, str, str, float]]
) -> str:
    """``scores[name][layer][head]`` tables shaded by value, then the top composing head pairs."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{_CSS}</style></head><body>"
    ]
    parts.append(f"<h2>{escape(title)}</h2>")
    for name, grid in scores.items():
        n_heads = len(grid[0]) if grid else 0
        head = "".join(f"<th>H{h}</th>" for h in range(n_heads))
        rows = "".join(
            f"<tr><th>L{layer}</th>"
            + "".join(
                f'<td style="background:rgba(234,67,53,{max(0.0, min(1.0, v)):.3f})">{v:.2f}</td>'
                for v in row
            )
            + "</tr>"
            for layer, row in enumerate(grid)
        )
        parts.append(f"<h3>{escape(name)}</h3><table><tr><th></th>{head}</tr>{rows}</table>")
    if compositions:
        rows = "".join(
            f"<tr><td>{m}</td><td>{escape(a)}</td><td>{escape(b)}</td><td>{s:.3f}</td></tr>"
            for m, a, b, s in compositions
        )
        parts.append(
            f"<h3>Top compositions (score minus random baseline)</h3><table><tr><th>mode</th><th>from</th><th>to</th><th>score</th></tr>{rows}</table>"
        )
    return "".join(parts) + "</body></html>"
