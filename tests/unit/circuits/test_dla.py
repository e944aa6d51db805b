"""Direct logit attribution on every tiny family: the terms add up to the model's own logit difference,
heads / source positions / neurons add up to their layer, and each term equals knocking that piece out
through hooks with the norms' scales frozen (computed by hand here, not with the module's helpers)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import mechscope as ms
from mechscope.circuits.dla import DLA, direct_logit_attribution
from mechscope.models import TokenizationError, edits
from mechscope.models.adapters import adapters
from mechscope.models.adapters.base import get_module, norm_eps
from mechscope.models.tiny import byte_tokenizer

PROMPTS = ["the cat sat on", "a dog ran to the m"]
ANSWERS, WRONGS = ["a", " "], ["b", "e"]


def _by(model: ms.HookedModel) -> tuple[str, ...]:
    return ("pos", "neuron") if model.cfg.has_mlp else ("pos",)


def _pre_cap_diff(model, prompt, answer, wrong, pos=-1) -> float:
    """The real unembedding's output for ``prompt`` run alone (``unembed.hook_out`` is before any soft-cap)."""
    _, cache = model.run_with_cache(prompt, ["unembed.hook_out"])
    out = cache["unembed.hook_out"][0, pos]
    return float(out[model.to_single_token(answer)] - out[model.to_single_token(wrong)])


def test_terms_sum_to_the_models_logit_difference(tiny):
    dla = direct_logit_attribution(tiny, PROMPTS, ANSWERS, WRONGS, by=_by(tiny))
    total = dla.layer_terms.sum(-1) + dla.bias
    for b, prompt in enumerate(PROMPTS):
        expected = _pre_cap_diff(tiny, prompt, ANSWERS[b], WRONGS[b])
        assert float(total[b]) == pytest.approx(expected, abs=1e-4)
        assert float(dla.logit_diff[b]) == pytest.approx(expected, abs=1e-4)
        logits = tiny(prompt)[0, -1]
        out = logits[tiny.to_single_token(ANSWERS[b])] - logits[tiny.to_single_token(WRONGS[b])]
        assert float(dla.output_logit_diff[b]) == pytest.approx(float(out), abs=1e-5)
    assert dla.by_layer.shape == (len(dla.labels),)


def test_heads_positions_and_neurons_sum_to_their_layer(tiny):
    dla = direct_logit_attribution(tiny, PROMPTS, ANSWERS, WRONGS, by=_by(tiny))
    n = tiny.cfg.n_layers
    attn = dla.layer_terms[:, [dla.labels.index(f"{i}_attn_out") for i in range(n)]]
    torch.testing.assert_close(dla.head_terms.sum(-1) + dla.attn_bias, attn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dla.pos_terms.sum(-1), dla.head_terms, atol=1e-5, rtol=1e-5)
    # Keys after each prompt's read position (its own future and the padding) get nothing.
    for b, p in enumerate(dla.pos):
        assert not dla.pos_terms[b, :, :, p + 1 :].any()
    if tiny.cfg.has_mlp:
        mlp = dla.layer_terms[:, [dla.labels.index(f"{i}_mlp_out") for i in range(n)]]
        torch.testing.assert_close(dla.neuron_terms.sum(-1) + dla.mlp_bias, mlp, atol=1e-5, rtol=1e-5)


def test_layer_terms_match_the_cache_decomposition(tiny):
    # TransformerLens' recipe through the cache: decompose, apply the final norm "cached", logit_attrs.
    prompt = PROMPTS[0]
    dla = direct_logit_attribution(tiny, prompt, "a", "b")
    _, cache = tiny.run_with_cache(prompt)
    stack, labels = cache.decompose_resid(apply_ln=True, pos_slice=-1, return_labels=True)
    attrs = cache.logit_attrs(stack, "a", "b")[:, 0]
    assert labels == dla.labels
    torch.testing.assert_close(dla.layer_terms[0], attrs, atol=1e-5, rtol=1e-5)


def _frozen(x, full, norm, weight, centre):
    """``x``'s share of ``norm(full)`` with the norm's scale frozen at ``full``'s, written out by hand."""
    if centre:
        x, full = x - x.mean(), full - full.mean()
    return x / (full.pow(2).mean() + norm_eps(norm)).sqrt() * weight


def _knockout_effect(model, prompt, hook_name, fn, layer, module, post_norm, w) -> float:
    """Knock a piece out with ``fn`` on ``hook_name``: the change of the HF ``module``'s output at the last
    position, carried to the logit difference ``w`` through the (post-norm and) final norm, frozen."""
    raw = f"{model.adapter.layers}.{layer}.{module}"
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    _, clean = model.run_with_cache(prompt, [raw, final])
    with model.hooks({hook_name: fn}):
        _, knocked = model.run_with_cache(prompt, [raw])
    out = clean[raw][0, -1]
    delta = out - knocked[raw][0, -1]
    centre = model.cfg.norm == "layernorm"
    if post_norm is not None:
        norm = get_module(model.layer(layer), post_norm)
        delta = _frozen(delta, out, norm, model.adapter.norm_weight(norm), centre)
    norm = model.module(model.adapter.final_norm)
    return float(_frozen(delta, clean[final][0, -1], norm, model.adapter.norm_weight(norm), centre) @ w)


def test_each_term_equals_knocking_its_piece_out(tiny):
    prompt = PROMPTS[1]
    dla = direct_logit_attribution(tiny, prompt, "a", "b", by=_by(tiny))
    W_U = tiny.weights.W_U
    w = W_U[:, tiny.to_single_token("a")] - W_U[:, tiny.to_single_token("b")]
    a = tiny.adapter
    post = tiny.cfg.post_norms
    layer, head, _ = dla.top_heads(1)[0]
    z = f"blocks.{layer}.attn.hook_z"
    got = _knockout_effect(
        tiny, prompt, z, edits.zero(head=head), layer, a.o_proj, a.attn_out if post else None, w
    )
    assert dla.head_terms[0, layer, head].item() == pytest.approx(got, abs=1e-5)
    # A source position: zeroing head h's value vector at key k removes exactly A[q, k] v_k W_O[h].
    k = int(dla.pos_terms[0, layer, head].abs().argmax())
    v = f"blocks.{layer}.attn.hook_v"
    got = _knockout_effect(
        tiny, prompt, v, edits.zero(pos=k, head=head), layer, a.o_proj, a.attn_out if post else None, w
    )
    assert dla.pos_terms[0, layer, head, k].item() == pytest.approx(got, abs=1e-5)
    if tiny.cfg.has_mlp:
        last = tiny.cfg.n_layers - 1
        neuron = int(dla.neuron_terms[0, last].abs().argmax())
        post_mlp = f"blocks.{last}.mlp.hook_post"
        got = _knockout_effect(
            tiny,
            prompt,
            post_mlp,
            edits.zero(index=neuron),
            last,
            a.mlp_out_proj,
            a.mlp_out if post else None,
            w,
        )
        assert dla.neuron_terms[0, last, neuron].item() == pytest.approx(got, abs=1e-5)


def test_batch_rows_equal_prompts_run_alone_at_any_position():
    model = ms.load_model("tiny-llama")  # no BOS: prompts of different lengths really are padded
    for pos in (-2, 3):
        batch = direct_logit_attribution(model, PROMPTS, ANSWERS, WRONGS, pos=pos, by="pos")
        for b, prompt in enumerate(PROMPTS):
            alone = direct_logit_attribution(model, prompt, ANSWERS[b], WRONGS[b], pos=pos, by="pos")
            assert batch.pos[b] == alone.pos[0] and batch.str_tokens[b] == alone.str_tokens[0]
            torch.testing.assert_close(batch.layer_terms[b], alone.layer_terms[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch.head_terms[b], alone.head_terms[0], atol=1e-5, rtol=1e-5)
            k = alone.pos_terms.shape[-1]
            torch.testing.assert_close(batch.pos_terms[b, ..., :k], alone.pos_terms[0], atol=1e-5, rtol=1e-5)
            assert float(batch.logit_diff[b]) == pytest.approx(
                _pre_cap_diff(model, prompt, ANSWERS[b], WRONGS[b], pos), abs=1e-4
            )
        torch.testing.assert_close(batch.by_head, batch.head_terms.mean(0))


def test_answer_alone_attributes_its_logit():
    model = ms.load_model("tiny-gpt2")
    dla = direct_logit_attribution(model, PROMPTS[0], "a")
    logit = model(PROMPTS[0])[0, -1, model.to_single_token("a")]
    assert float(dla.layer_terms.sum() + dla.bias.sum()) == pytest.approx(float(logit), abs=1e-4)
    assert dla.wrongs is None and dla.metric == "logit('a')"


def test_soft_capped_logits_are_attributed_before_the_cap():
    # A tiny Gemma 2 with a cap low enough to bend its logits visibly.
    adapter = adapters()["gemma2"]
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(
        adapter.tiny_config(vocab_size=len(tokenizer), final_logit_softcapping=0.5)
    )
    model = ms.HookedModel(hf, tokenizer, adapter)
    dla = direct_logit_attribution(model, PROMPTS, ANSWERS, WRONGS)
    for b, prompt in enumerate(PROMPTS):
        _, cache = model.run_with_cache(prompt, ["unembed.hook_out"])
        raw = cache["unembed.hook_out"][0, -1]
        la, lw = raw[model.to_single_token(ANSWERS[b])], raw[model.to_single_token(WRONGS[b])]
        assert float(dla.layer_terms[b].sum() + dla.bias[b]) == pytest.approx(float(la - lw), abs=1e-4)
        capped = 0.5 * (torch.tanh(la / 0.5) - torch.tanh(lw / 0.5))
        assert float(dla.output_logit_diff[b]) == pytest.approx(float(capped), abs=1e-5)
    assert (dla.logit_diff - dla.output_logit_diff).abs().max() > 1e-2
    assert "soft-caps" in dla.to_html()


def test_top_labels_and_json():
    model = ms.load_model("tiny-gpt2")
    dla = direct_logit_attribution(model, PROMPTS, ANSWERS, WRONGS, by=("pos", "neuron"))
    top = dla.top(5)
    values = sorted(dla.by_head.flatten().tolist(), key=abs, reverse=True)[:5]
    assert [v for _, v in top] == pytest.approx(values)
    layer, head, v = dla.top_heads(1)[0]
    assert top[0] == (f"L{layer}H{head}", v) and dla.by_head[layer, head].item() == pytest.approx(v)
    label, v = dla.top(1, "layer")[0]
    assert dla.by_layer[dla.labels.index(label)].item() == pytest.approx(v)
    assert dla.top(1, "pos")[0][0].count("@") == 1 and dla.top(1, "neuron")[0][0].startswith("L")
    data = json.loads(json.dumps(dla.to_json()))
    assert data["by_layer"][dla.labels[0]] == pytest.approx(dla.by_layer[0].item())
    assert len(data["by_head"]) == model.cfg.n_layers and len(data["top_neurons"]) == 20


def test_bad_arguments_say_what_to_do():
    model = ms.load_model("tiny-llama")
    with pytest.raises(TokenizationError, match="answer: 'ab' is 2 tokens"):
        direct_logit_attribution(model, "hi", "ab")
    with pytest.raises(TokenizationError, match="wrong"):
        direct_logit_attribution(model, "hi", "a", "xy")
    with pytest.raises(ValueError, match="one per prompt"):
        direct_logit_attribution(model, PROMPTS, ["a", "b", "c"])
    with pytest.raises(IndexError, match=r"-2 \.\. 1"):
        direct_logit_attribution(model, "hi", "a", pos=2)
    with pytest.raises(ValueError, match="by must be"):
        direct_logit_attribution(model, "hi", "a", by="block")
    with pytest.raises(ValueError, match="attention-only"):
        direct_logit_attribution(ms.load_model("tiny-attn_only"), "hi", "a", by="neuron")
    with pytest.raises(ValueError, match="by=\\(..., 'pos'\\)"):
        _ = direct_logit_attribution(model, "hi", "a").by_pos


def test_html_is_self_contained_and_escaped():
    model = ms.load_model("tiny-gpt2")
    dla = direct_logit_attribution(model, "x <y> & z", "<", "&", by="pos")
    page = dla.to_html()
    assert isinstance(dla, DLA) and page.startswith("<!doctype html>")
    assert "<svg" in page and page.count("<rect") == len(dla.labels)
    assert "logit(&#x27;&lt;&#x27;) − logit(&#x27;&amp;&#x27;)" in page and "'<'" not in page
    assert "http" not in page and "<script" not in page and "src=" not in page
    assert "Top heads by source position" in page and "&lt;" in page
    fragment = dla._repr_html_()
    assert "<!doctype" not in fragment and "<svg" in fragment
