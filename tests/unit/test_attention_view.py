"""The attention view: numbers equal the cached patterns, every token is shown and escaped, no network."""

from __future__ import annotations

import json
import re
from html import escape, unescape

import pytest
import torch

import mechscope as ms
from mechscope.viz.attention import AttentionView, attention_view, render_attention_html

PROMPT = "a <b> & c\td  </script>"


@pytest.fixture(scope="module")
def model() -> ms.HookedModel:
    return ms.load_model("tiny-gpt2")


def test_patterns_are_the_models_and_rows_sum_to_one(tiny):
    heads = [(layer, layer % tiny.cfg.n_heads) for layer in range(tiny.cfg.n_layers)]
    view = attention_view(tiny, PROMPT, heads)
    _, cache = tiny.run_with_cache(PROMPT, lambda n: n.endswith("hook_pattern"))
    for (layer, h), pattern in zip(heads, view.patterns, strict=True):
        torch.testing.assert_close(pattern, cache[f"blocks.{layer}.attn.hook_pattern"][0, h])
    n = len(view.str_tokens)
    assert view.patterns.shape == (len(heads), n, n)
    torch.testing.assert_close(view.patterns.sum(-1), torch.ones(len(heads), n))
    assert not view.patterns.triu(1).any()  # causal: nothing attends to the future


def test_every_token_is_shown_escaped(model):
    view = attention_view(model, PROMPT, [(0, 1), (1, 2)])
    page = view.to_html()
    tokens = model.to_str_tokens(PROMPT)
    assert {"<", "&", " ", "\t"} <= set(tokens)
    shown = [t.replace("\t", "\\t") for t in tokens]
    for i, t in enumerate(shown):
        assert f'<span data-i="{i}">{escape(t)}</span>' in page
        assert f"<th>{escape(t)}</th>" in page
    # The prompt's own "</script>" and "<b>" never reach the page as markup.
    assert page.count("<script") == 1 and page.count("</script>") == 1 and "<b>" not in page
    assert "http" not in page and "src=" not in page


def test_numbers_shown_equal_the_cached_pattern(model):
    heads = [(0, 1), (1, 2)]
    view = attention_view(model, PROMPT, heads)
    page = view.to_html()
    _, cache = model.run_with_cache(PROMPT, ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"])
    expected = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0, h] for layer, h in heads])
    # The hover view's data: one matrix per head.
    data = [json.loads(unescape(m)) for m in re.findall(r'data-pattern="([^"]*)"', page)]
    torch.testing.assert_close(torch.tensor(data), expected, atol=1e-6, rtol=0)
    tokens = [json.loads(unescape(m)) for m in re.findall(r'data-tokens="([^"]*)"', page)]
    assert tokens[0] == [t.replace("\t", "\\t") for t in model.to_str_tokens(PROMPT)]
    # The heatmaps: every cell's exact value on hover, row by row, head by head.
    cells = [float(v) for v in re.findall(r'<td style="[^"]*" title="([-0-9.]+)"', page)]
    torch.testing.assert_close(torch.tensor(cells), expected.flatten(), atol=1e-4, rtol=0)


def test_a_cache_gives_the_same_view_and_a_wrong_one_is_refused(model):
    _, cache = model.run_with_cache(PROMPT, ["blocks.1.attn.hook_pattern"])
    from_cache = attention_view(cache, PROMPT, [(1, 3)])
    torch.testing.assert_close(from_cache.patterns, attention_view(model, PROMPT, [(1, 3)]).patterns)
    with pytest.raises(ValueError, match="not of this prompt"):
        attention_view(cache, "something else entirely", [(1, 3)])
    with pytest.raises(KeyError, match="blocks.0.attn.hook_pattern"):
        attention_view(cache, PROMPT, [(0, 0)])


def test_bad_heads_say_what_exists(model):
    with pytest.raises(ValueError, match="layers 0..1, heads 0..3"):
        attention_view(model, PROMPT, [(2, 0)])
    with pytest.raises(ValueError, match="no heads"):
        attention_view(model, PROMPT, [])


def test_fragment_and_renderer_without_a_model():
    view = AttentionView(["<a>", "&"], [(0, 0)], torch.tensor([[[1.0, 0.0], [0.25, 0.75]]]))
    fragment = view._repr_html_()
    assert "<!doctype" not in fragment and "&lt;a&gt;" in fragment and "&amp;" in fragment
    assert fragment.count("<script") == 1 and 'title="0.7500"' in fragment
    with pytest.raises(ValueError, match="expected \\(1, 3, 3\\)"):
        render_attention_html(["a", "b", "c"], [(0, 0)], view.patterns)
