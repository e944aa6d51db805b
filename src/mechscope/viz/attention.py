"""Attention patterns of chosen heads, as a self-contained HTML view (CircuitsVis-like, no dependencies).

For each head: a ``[query key]`` heatmap with the prompt's tokens on both axes, and a token strip
where hovering a token colours every token by how much the hovered one attends to it (the row of
the pattern; opacity relative to the row's maximum, exact value on hover). The page needs no
network and no build step: one short inline script, whose data sits in HTML-escaped ``data-``
attributes so that no token text can end the script or inject markup.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.models import ActivationCache, HookedModel

_CSS = (
    ".ms-attn{font:13px system-ui,sans-serif;color:#222}.ms-attn h3{margin:1.2em 0 .3em}"
    ".ms-strip{line-height:2;max-width:70em}.ms-strip span{font-family:ui-monospace,monospace;"
    "white-space:pre;padding:1px 2px;margin:0 1px;border-radius:3px;cursor:default;border:1px solid #eee}"
    ".ms-strip span.q{outline:2px solid #222}.ms-read{color:#555;min-height:1.4em;font-size:12px}"
)
# Hovering token i paints token j with opacity A[i][j] / max_j A[i][j]; the readout lists the top 3.
_JS = """(function(root){
root.querySelectorAll('.ms-strip').forEach(function(strip){
  var A=JSON.parse(strip.dataset.pattern), toks=JSON.parse(strip.dataset.tokens);
  var spans=strip.querySelectorAll('span'), read=strip.nextElementSibling;
  spans.forEach(function(s,i){
    s.addEventListener('mouseenter',function(){
      var row=A[i], mx=Math.max.apply(null,row)||1;
      spans.forEach(function(t,j){
        t.style.background='rgba(214,39,40,'+(row[j]/mx).toFixed(3)+')';
        t.title='attention from '+i+' to '+j+': '+row[j].toFixed(4);
      });
      s.classList.add('q');
      var top=row.map(function(v,j){return [v,j];}).sort(function(a,b){return b[0]-a[0];}).slice(0,3);
      read.textContent='query '+i+' '+JSON.stringify(toks[i])+' attends to: '+top.map(function(p){
        return JSON.stringify(toks[p[1]])+' ('+p[1]+') '+p[0].toFixed(3);}).join(', ');
    });
    s.addEventListener('mouseleave',function(){
      spans.forEach(function(t){t.style.background='';t.title='';});
      s.classList.remove('q'); read.textContent='';
    });
  });
});
})(document.currentScript.parentElement);"""


@dataclass(frozen=True, eq=False)
class AttentionView:
    """The attention patterns of some heads on one prompt; ``to_html`` draws them."""

    str_tokens: list[str]
    """The prompt's tokens (query and key labels)."""
    heads: list[tuple[int, int]]
    """``(layer, head)`` of each pattern."""
    patterns: Float[Tensor, "n_views q_pos k_pos"]
    """``patterns[i]`` is head ``heads[i]``'s pattern: row ``q`` is where query ``q`` attends (sums to 1)."""

    def to_json(self) -> dict:
        return {
            "tokens": self.str_tokens,
            "heads": [f"L{layer}H{h}" for layer, h in self.heads],
            "patterns": self.patterns.tolist(),
        }

    def to_html(self, full_page: bool = True) -> str:
        """Per head: its heatmap and the hover view; ``full_page=False`` gives a fragment for notebooks."""
        return render_attention_html(self.str_tokens, self.heads, self.patterns, full_page=full_page)

    def _repr_html_(self) -> str:
        return self.to_html(full_page=False)


@torch.no_grad()
def attention_view(
    source: HookedModel | ActivationCache, prompt: str, heads: Sequence[tuple[int, int]]
) -> AttentionView:
    """The patterns of ``heads`` on ``prompt``, from a model (run once) or a cache of that prompt.

    Args:
        source: a model, or an :class:`ActivationCache` of ``prompt`` holding the heads' ``hook_pattern``.
        prompt: the text (tokenised with the model's default BOS policy).
        heads: ``(layer, head)`` pairs, e.g. ``[(9, 6), (9, 9)]``.

    Raises:
        ValueError: no heads, a head outside the model, or a cache that is not of this one prompt.
        KeyError: the cache lacks a needed ``hook_pattern``.
    """
    model = source.model if isinstance(source, ActivationCache) else source
    heads = [(int(layer), int(h)) for layer, h in heads]
    if not heads:
        raise ValueError("no heads to show: pass e.g. heads=[(0, 1)]")
    c = model.cfg
    for layer, h in heads:
        if not (0 <= layer < c.n_layers and 0 <= h < c.n_heads):
            raise ValueError(
                f"head ({layer}, {h}) is outside the model: layers 0..{c.n_layers - 1}, heads 0..{c.n_heads - 1}"
            )
    str_tokens = model.to_str_tokens(prompt)
    names = sorted({f"blocks.{layer}.attn.hook_pattern" for layer, _ in heads})
    cache = source if isinstance(source, ActivationCache) else model.run_with_cache(prompt, names)[1]
    patterns = []
    for layer, h in heads:
        p = cache[f"blocks.{layer}.attn.hook_pattern"]
        if p.shape[0] != 1 or p.shape[-1] != len(str_tokens):
            raise ValueError(
                f"the cache holds patterns of shape {tuple(p.shape)}, not of this prompt's "
                f"{len(str_tokens)} tokens (batch 1); cache run_with_cache(prompt) or pass the model"
            )
        patterns.append(p[0, h].float().cpu())
    return AttentionView(str_tokens, heads, torch.stack(patterns))


def _shown(token: str) -> str:
    """A token as displayed: control characters made visible (HTML escaping happens separately)."""
    return token.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _data(value: object) -> str:
    """JSON for a ``data-`` attribute: HTML-escaped, so any token text stays inert."""
    return escape(json.dumps(value, ensure_ascii=False), quote=True)


def render_attention_html(
    str_tokens: Sequence[str],
    heads: Sequence[tuple[int, int]],
    patterns: Float[Tensor, "n_views q_pos k_pos"],
    *,
    full_page: bool = True,
) -> str:
    """Heatmaps and hover views of ``patterns`` (one per head), as a page or a notebook fragment."""
    from mechscope.viz.heatmap import render_heatmap_html

    if patterns.shape != (len(heads), len(str_tokens), len(str_tokens)):
        raise ValueError(
            f"patterns have shape {tuple(patterns.shape)}, expected ({len(heads)}, {len(str_tokens)}, "
            f"{len(str_tokens)}) for {len(heads)} heads and {len(str_tokens)} tokens"
        )
    labels = [_shown(t) for t in str_tokens]
    spans = "".join(f'<span data-i="{i}">{escape(t)}</span>' for i, t in enumerate(labels))
    sections = []
    for (layer, h), pattern in zip(heads, patterns, strict=True):
        rows = [[round(x, 6) for x in row] for row in pattern.tolist()]
        sections.append(
            f"<h3>L{layer}H{h}</h3>"
            f'<div class=\'ms-strip\' data-pattern="{_data(rows)}" data-tokens="{_data(labels)}">{spans}</div>'
            "<div class='ms-read'></div>"
            + render_heatmap_html(
                pattern, labels, labels, f"L{layer}H{h}: query (rows) x key (columns)", full_page=False
            )
        )
    body = (
        "<div class='ms-attn'><p>Hover a token: colours show where it attends.</p>"
        f"{''.join(sections)}<script>{_JS}</script></div>"
    )
    if not full_page:
        return f"<style>{_CSS}</style>{body}"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>attention patterns</title>"
        f"<style>body{{margin:1.5em}}{_CSS}</style></head><body>{body}</body></html>"
    )
