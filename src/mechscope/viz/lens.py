"""Self-contained HTML for the logit lens: inline CSS, no scripts, no network."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mechscope.circuits.logit_lens import LogitLens

_CSS = """
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.tok{font-family:ui-monospace,monospace;white-space:pre}
.prompt span{background:#eef;margin:1px;padding:1px 3px;border-radius:3px;font-family:ui-monospace,monospace;white-space:pre}
.prompt span.read{background:#fc8}
"""


def _cell(token: str, prob: float) -> str:
    # Blue with opacity = probability, so confident predictions stand out.
    return (
        f'<td style="background:rgba(66,133,244,{prob:.3f})" title="p = {prob:.4f}">'
        f'<span class="tok">{escape(repr(token)[1:-1])}</span> {prob:.2f}</td>'
    )


def render_logit_lens_html(lens: LogitLens, k: int | None = None) -> str:
    """A page with the prompt, the model's prediction and a stage x top-k table coloured by probability.

    Args:
        lens: the readout to draw.
        k: tokens per stage (default ``lens.top_k``).

    Returns:
        A complete HTML document with inline CSS, no scripts and no network references; every
        token string is HTML-escaped.
    """
    k = k or lens.top_k
    tops = lens.top_tokens(k)
    read = lens.pos % len(lens.str_tokens)
    prompt = "".join(
        f'<span class="{"read" if i == read else ""}">{escape(t)}</span>'
        for i, t in enumerate(lens.str_tokens)
    )
    rows = "".join(
        f"<tr><th>{escape(label)}</th>{''.join(_cell(t, p) for t, p in top)}</tr>"
        for label, top in zip(lens.labels, tops, strict=True)
    )
    prediction = ", ".join(f"<span class='tok'>{escape(repr(t))}</span> {p:.2f}" for t, p in tops[-1])
    head = "".join(f"<th>#{i + 1}</th>" for i in range(k))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>logit lens</title><style>{_CSS}</style></head><body>"
        f"<h2>Logit lens</h2><p class='prompt'>{prompt}</p><p>Prediction: {prediction}</p>"
        f"<table><tr><th>stage</th>{head}</tr>{rows}</table></body></html>"
    )
