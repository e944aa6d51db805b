"""The ``explain`` report: one self-contained HTML page made of each analysis' own view.

Every section is the page its result draws by itself (``to_html``), embedded as an ``iframe``
with ``srcdoc``: the views keep their own CSS and scripts without clashing, the file needs no
network and no server, and a section looks exactly like the same result shown in a notebook.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mechscope.interventions.explain import Explanation

_CSS = """
body{font:14px system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
p.note{color:#555;max-width:70em}
iframe{width:100%;border:1px solid #eee;min-height:120px}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.tok{font-family:ui-monospace,monospace;white-space:pre;background:#eef;padding:1px 3px;margin:1px;border-radius:3px}
"""
# Grow each frame to its content once loaded (srcdoc frames are same-origin, so this is allowed).
_FIT = "this.style.height=(this.contentDocument.documentElement.scrollHeight+24)+'px'"


def _frame(page: str) -> str:
    return f'<iframe srcdoc="{escape(page, quote=True)}" onload="{_FIT}"></iframe>'


def _section(title: str, note: str, *pages: str) -> str:
    return f"<h2>{escape(title)}</h2><p class='note'>{escape(note)}</p>" + "".join(map(_frame, pages))


def _tok(t: str) -> str:
    return f"<span class='tok'>{escape(repr(t)[1:-1])}</span>"


def render_explanation_html(ex: Explanation) -> str:
    """The whole report as one HTML document (inline CSS and scripts only)."""
    cfg = ex.config
    metric = (
        f"logit({cfg.answer!r}) − logit({cfg.wrong!r})" if cfg.wrong is not None else f"log p({cfg.answer!r})"
    )
    preds = "".join(f"<tr><td>{_tok(t)}</td><td>{p:.3f}</td></tr>" for t, p in ex.predictions)
    parts = [
        f"<h1>mechscope explain: {escape(ex.model)}</h1>",
        "<p>" + "".join(_tok(t) for t in ex.str_tokens) + "</p>",
        f"<p>Metric: <b>{escape(metric)}</b> = {ex.metric:.3f} on this prompt"
        + (
            f"; corrupted prompt {_tok(cfg.corrupt)}: {next(iter(ex.patching.values())).corrupted:.3f}"
            if ex.patching
            else ""
        )
        + ".</p>",
        f"<h2>Predictions</h2><table><tr><th>next token</th><th>p</th></tr>{preds}</table>",
        _section(
            "Logit lens",
            "Each layer's residual stream at the last position, read through the final norm and the "
            "unembedding: where the answer first appears.",
            ex.lens._repr_html_(),
        ),
        _section(
            "Direct logit attribution",
            "Each component's direct contribution to the metric's logit direction through the final norm "
            "(its scale frozen at this run's value), by layer and by head.",
            ex.dla.to_html(),
        ),
        _section(
            "Attention of the top heads",
            "The heads with the largest |direct logit attribution|: where each one attends.",
            ex.attention.to_html(),
        ),
    ]
    if ex.patching:
        parts.append(
            _section(
                "Activation patching (denoising)",
                "Each cell runs the corrupted prompt with one activation taken from the clean prompt; "
                "colour = normalised metric (1 = the clean behaviour fully restored, 0 = no effect).",
                *[r.to_html() for r in ex.patching.values()],
            )
        )
        parts.append(
            _section(
                "Attribution patching against real patching",
                "The first-order estimate (gradient × activation difference, 3 passes for every sweep) "
                "plotted against the real patching of the same cells.",
                *[c.to_html() for c in ex.comparisons.values()],
            )
        )
    else:
        parts.append("<p class='note'>No corrupted prompt given (--corrupt): patching sections skipped.</p>")
    if ex.trace is not None:
        parts.append(
            _section(
                "Causal tracing (ROME)",
                "The subject's embeddings corrupted with noise; each cell restores one clean activation "
                "(hidden state, MLP output over a window of layers, attention output) and shows the "
                "answer's probability.",
                ex.trace.to_html(),
            )
        )
    body = "".join(parts)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>mechscope explain: {escape(ex.model)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>"
    )
