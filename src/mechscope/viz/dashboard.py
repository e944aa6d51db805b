"""Feature dashboards: one self-contained HTML page per feature, like Anthropic's and sae-dashboard's.

A page shows what a :class:`~mechscope.features.db.FeatureRecord` holds: density and activation
statistics, the activation histogram (inline SVG, log-spaced bins), the promoted and suppressed
tokens, the nearest features (links), the top-activating contexts and samples from each activation
interval. Tokens are shaded by the feature's activation (relative to its max) and show the exact
value on hover; the max-activating token of each context is outlined. Inline CSS only, no scripts,
no network: the file opens anywhere and the same fragment renders in a notebook
(``FeatureRecord._repr_html_``). The web app reuses these renderers (``link`` makes the URLs).

:func:`write_dashboards` writes ``index.html`` (a table of the features) and ``feature-<id>.html``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mechscope.features.db import Example, FeatureDB, FeatureRecord, FeatureSummary

Link = Callable[[int], "str | None"]
"""A feature id -> the address of its page, or None where there is none (the id is shown unlinked)."""

# Scoped to .ms-feature so a fragment in a notebook does not restyle the page around it.
_CSS = """
.ms-feature{font:14px system-ui,sans-serif;color:#222;max-width:1100px}
.ms-feature h1{font-size:1.3em;margin:.2em 0}.ms-feature h2{font-size:1.05em;margin:1.2em 0 .4em;border-bottom:1px solid #ddd}
.ms-feature .sub{color:#666}.ms-feature table{border-collapse:collapse}
.ms-feature td,.ms-feature th{padding:2px 8px;text-align:left;border-bottom:1px solid #eee;vertical-align:top}
.ms-feature .stats td{font-variant-numeric:tabular-nums}
.ms-feature .cols{display:flex;gap:2em;flex-wrap:wrap}
.ms-feature .ctx{font-family:ui-monospace,monospace;font-size:12.5px;white-space:pre-wrap;line-height:1.7;margin:2px 0}
.ms-feature .ctx span{border-radius:2px}.ms-feature .ctx .max{outline:1.5px solid #b34700}
.ms-feature .val{font-family:ui-monospace,monospace;font-size:12px;color:#555;padding-right:8px;white-space:nowrap}
.ms-feature .tok{font-family:ui-monospace,monospace;white-space:pre;background:#f3f3f3;padding:0 3px;border-radius:3px}
.ms-feature .pos{color:#1a6e1a}.ms-feature .neg{color:#a31515}.ms-feature .none{color:#888;font-style:italic}
.ms-feature svg text{font:10px system-ui,sans-serif;fill:#555}
"""


def _shade(value: float, vmax: float) -> str:
    a = min(1.0, max(0.0, value / vmax)) if vmax > 0 else 0.0
    return f"background:rgba(255,120,0,{a * 0.85:.3f})" if a > 0 else ""


_VISIBLE = {0x0A: "↵\n", 0x09: "→"} | {c: chr(0x2400 + c) for c in range(32) if c not in (0x09, 0x0A)}


def _show(token: str) -> str:
    """A token as it reads in running text; line breaks, tabs and other control characters made visible
    (a raw carriage return would not survive a round trip through a text file)."""
    return escape(token.translate(_VISIBLE))


def render_tokens_html(
    strs: Sequence[str], acts: Sequence[float], vmax: float, *, highlight: int | None = None
) -> str:
    """Tokens shaded by activation (``vmax`` is full colour); hovering shows the token and its value."""
    spans = []
    for i, (s, a) in enumerate(zip(strs, acts, strict=True)):
        cls = " class='max'" if i == highlight else ""
        spans.append(
            f"<span{cls} style='{_shade(a, vmax)}' title='{escape(repr(s))}: {a:.4g}'>{_show(s)}</span>"
        )
    return "<div class='ctx'>" + "".join(spans) + "</div>"


def _example_rows(examples: Iterable[Example], vmax: float) -> str:
    rows = [
        f"<tr><td class='val' title='context {e.context}, position {e.position}"
        f"{', ' + escape(e.source) if e.source else ''}'>{e.value:.3g}</td>"
        f"<td>{render_tokens_html(e.strs, e.activations, vmax, highlight=e.max_index)}</td></tr>"
        for e in examples
    ]
    return "<table>" + "".join(rows) + "</table>" if rows else "<p class='none'>none</p>"


def render_histogram_svg(
    counts: Sequence[int], edges: Sequence[float], *, width: int = 380, height: int = 110
) -> str:
    """Counts over log-spaced bins ``[underflow, bins..., overflow]`` as an inline SVG bar chart.

    Only the span from the first to the last non-empty bin is drawn; the x axis is labelled at the
    bin edges that are powers of ten, the y axis is linear. Each bar's tooltip gives its range and count.
    """
    if len(counts) != len(edges) + 1:
        raise ValueError(f"{len(counts)} counts need {len(counts) - 1} edges, got {len(edges)}")
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return "<p class='none'>never fires</p>"
    lo, hi = nz[0], nz[-1]
    bounds = [0.0, *edges, math.inf]
    n, top = hi - lo + 1, max(counts)
    bw, plot_h = width / n, height - 16
    parts = []
    for k, i in enumerate(range(lo, hi + 1)):
        h = plot_h * counts[i] / top
        label = f"[{bounds[i]:.3g}, {bounds[i + 1]:.3g}): {counts[i]}"
        parts.append(
            f"<rect x='{k * bw:.1f}' y='{plot_h - h:.1f}' width='{max(bw - 1, 1):.1f}' height='{h:.1f}' "
            f"fill='#e07000'><title>{escape(label)}</title></rect>"
        )
        lower = bounds[i]
        if lower > 0 and abs(math.log10(lower) - round(math.log10(lower))) < 1e-9:
            parts.append(f"<text x='{k * bw:.1f}' y='{height - 3}'>{lower:g}</text>")
    return f"<svg width='{width}' height='{height}' role='img'><title>activation histogram</title>{''.join(parts)}</svg>"


def _effects_table(title: str, effects, cls: str) -> str:
    rows = "".join(
        f"<tr><td><span class='tok'>{_show(e.str)}</span></td><td class='{cls}'>{e.value:+.3f}</td></tr>"
        for e in effects
    )
    return (
        f"<div><h2>{title}</h2>"
        + (f"<table>{rows}</table>" if rows else "<p class='none'>none</p>")
        + "</div>"
    )


def _default_link(i: int) -> str:
    return f"feature-{i}.html"


def _ref(i: int, link: Link) -> str:
    href = link(i)
    return f"<a href='{escape(href)}'>#{i}</a>" if href else f"#{i}"


def render_feature_body(rec: FeatureRecord, *, link: Link = _default_link) -> str:
    """The dashboard of one feature as an HTML fragment (no ``<style>``; see :func:`render_feature_html`)."""
    fmt = lambda x: "–" if x is None else f"{x:.4g}"  # noqa: E731
    stats = (
        f"<table class='stats'><tr><th>density</th><td>{rec.density:.3%}</td><th>firing tokens</th><td>{rec.n_firing:,}</td></tr>"
        f"<tr><th>max</th><td>{fmt(rec.max)}</td><th>mean (all tokens)</th><td>{fmt(rec.mean)}</td></tr>"
        f"<tr><th>mean when firing</th><td>{fmt(rec.mean_firing)}</td><th>score</th><td>{fmt(rec.score)}</td></tr></table>"
    )
    explanation = (
        f"<p><b>Explanation:</b> {escape(rec.explanation)}</p>"
        if rec.explanation
        else "<p class='none'>no explanation yet</p>"
    )
    neighbours = "".join(
        f"<tr><td>{_ref(n.id, link)}</td><td>{n.cosine:.3f}</td><td>{escape(n.explanation or '')}</td></tr>"
        for n in rec.neighbours
    )
    vmax = rec.max if rec.max > 0 else 1.0
    quantiles = []
    for j in reversed(range(rec.n_quantiles)):  # strongest interval first, as in Anthropic's dashboards
        lo, hi = rec.interval_edges(j)
        quantiles.append(
            f"<h3 class='sub'>interval {j}: activation in [{lo:.3g}, {hi:.3g})</h3>"
            + _example_rows(rec.quantiles[j], vmax)
        )
    return (
        f"<h1>Feature #{rec.id}</h1><div class='sub'>{escape(rec.title)}</div>{explanation}"
        f"<div class='cols'><div><h2>Statistics</h2>{stats}</div>"
        f"<div><h2>Activation histogram (log scale)</h2>{render_histogram_svg(rec.histogram, rec.hist_edges)}</div></div>"
        f"<div class='cols'>{_effects_table('Promoted tokens', rec.promoted, 'pos')}"
        f"{_effects_table('Suppressed tokens', rec.suppressed, 'neg')}"
        f"<div><h2>Nearest features (decoder cosine)</h2>"
        + (f"<table>{neighbours}</table>" if neighbours else "<p class='none'>none</p>")
        + "</div></div>"
        f"<h2>Top activations</h2>{_example_rows(rec.top, vmax)}"
        f"<h2>Samples by activation interval</h2>{''.join(quantiles)}"
    )


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>body{{margin:1.5em}}{_CSS}</style></head><body><div class='ms-feature'>{body}</div></body></html>"
    )


def render_feature_html(rec: FeatureRecord, *, full_page: bool = True, link: Link = _default_link) -> str:
    """One feature's dashboard: a whole page, or (``full_page=False``) a styled fragment for notebooks."""
    body = render_feature_body(rec, link=link)
    if not full_page:
        return f"<style>{_CSS}</style><div class='ms-feature'>{body}</div>"
    return _page(f"Feature #{rec.id} · {rec.title}", body)


def render_index_html(
    rows: Sequence[FeatureSummary], *, title: str, link: Link = _default_link, note: str = ""
) -> str:
    """A table of features (id, density, max, mean, explanation) linking to their pages."""
    body = "".join(
        f"<tr><td>{_ref(r.id, link)}</td><td>{r.density:.3%}</td><td>{r.max:.4g}</td>"
        f"<td>{r.mean:.4g}</td><td>{escape(r.explanation or '')}</td></tr>"
        for r in rows
    )
    return _page(
        title,
        f"<h1>{escape(title)}</h1><p class='sub'>{escape(note)}</p>"
        f"<table><tr><th>feature</th><th>density</th><th>max</th><th>mean</th><th>explanation</th></tr>{body}</table>",
    )


def write_dashboards(
    db: FeatureDB,
    out_dir: str | Path,
    features: Iterable[int] | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``index.html`` and one ``feature-<id>.html`` per feature (default: all) into ``out_dir``.

    Args:
        db: an open :class:`~mechscope.features.db.FeatureDB`.
        features: the ids to write (checked first), listed in this order in the index; None writes
            every feature.
        progress: called as ``progress(done, total)`` after each page.

    Returns:
        The path of ``index.html``.
    """
    ids = list(range(db.n_features)) if features is None else [db.check_id(i) for i in features]
    ids = list(dict.fromkeys(ids))  # a repeated id is one page
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = set(ids)

    def link(j: int) -> str | None:  # a neighbour whose page is not written is shown unlinked
        return _default_link(j) if j in written else None

    for n, i in enumerate(ids, 1):
        (out / _default_link(i)).write_text(render_feature_html(db.feature(i), link=link), encoding="utf-8")
        if progress is not None:
            progress(n, len(ids))
    corpus = db.meta.get("corpus", {}).get("name", "a corpus")
    note = f"{len(ids)} of {db.n_features} features; {db.meta.get('n_tokens', 0):,} tokens of {corpus}"
    index = out / "index.html"
    index.write_text(render_index_html(db.summaries(ids), title=db.title, note=note), encoding="utf-8")
    return index
