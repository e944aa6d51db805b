"""The logit lens on tiny models: its last stage must be the model's own logits, soft-cap included."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.circuits.logit_lens import LogitLens, logit_lens
from mechscope.models.adapters import adapters
from mechscope.viz.lens import render_logit_lens_html


@pytest.fixture(scope="module", params=sorted(adapters()))
def model(request) -> ms.HookedModel:
    return ms.load_model(f"tiny-{request.param}")


def test_the_softcap_path_is_covered():
    # The exactness test below only checks the soft-cap if some family has one that matters.
    assert ms.load_model("tiny-gemma2").cfg.final_logit_softcap


@pytest.mark.parametrize("pos", [-1, 1])
def test_last_stage_is_the_models_logits(model, pos):
    lens = logit_lens(model, "hello there", pos=pos)
    assert len(lens.labels) == model.cfg.n_layers + 1 and lens.labels[-1] == "final_post"
    assert lens.logits.shape == (model.cfg.n_layers + 1, model.cfg.d_vocab)
    torch.testing.assert_close(lens.logits[-1], model("hello there")[0, pos], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lens.probs.sum(-1), torch.ones(len(lens.labels)))


def test_top_tokens_prediction_and_records_agree(model):
    lens = logit_lens(model, "hello", top_k=3)
    top = lens.top_tokens()
    assert len(top) == len(lens.labels) and all(len(row) == 3 for row in top)
    assert lens.prediction == top[-1]
    assert [p for _, p in top[-1]] == sorted((p for _, p in top[-1]), reverse=True)
    records = lens.to_records()
    assert len(records) == 3 * len(lens.labels)
    final_1 = next(r for r in records if r["stage"] == "final_post" and r["rank"] == 1)
    expected = int(model("hello")[0, -1].argmax())
    assert final_1["token_id"] == expected and final_1["token"] == model.tokenizer.decode([expected])
    assert final_1["prob"] == pytest.approx(top[-1][0][1])
    assert len(lens.top_tokens(7)[0]) == 7


def test_bad_arguments_name_the_fix():
    model = ms.load_model("tiny-llama")
    n = len(model.to_str_tokens("hi"))
    with pytest.raises(IndexError, match=f"-{n} .. {n - 1}"):
        logit_lens(model, "hi", pos=n)
    with pytest.raises(ValueError, match="top_k"):
        logit_lens(model, "hi", top_k=0)


def test_html_is_self_contained_and_escaped():
    model = ms.load_model("tiny-llama")
    lens = logit_lens(model, "<script>alert(1)</script>")
    page = lens._repr_html_()
    assert page == render_logit_lens_html(lens)
    assert "<script" not in page and "&lt;" in page
    assert "http" not in page and "src=" not in page
    assert page.count("<tr>") == len(lens.labels) + 1


def test_renderer_needs_no_model():
    # viz/ renders data: a LogitLens built by hand (no tokenizer) draws, ids standing in for text.
    lens = LogitLens(["0_pre", "final_post"], ["a", "&"], -1, torch.tensor([[0.0, 1.0], [2.0, 0.0]]), 2)
    page = render_logit_lens_html(lens)
    assert "&amp;" in page and "final_post" in page
