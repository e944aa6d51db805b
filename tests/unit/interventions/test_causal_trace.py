"""Causal tracing: batched restoring equals one forward per variant with plain hooks; the ends are exact."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import mechscope as ms
from mechscope.interventions.causal_trace import (
    CATEGORIES,
    average_indirect_effect,
    category_positions,
    category_samples,
    causal_trace,
    noise_scale,
    subject_positions,
    window_layers,
)
from mechscope.models.adapters import adapters
from mechscope.models.tiny import byte_tokenizer

PROMPT, SUBJECT = "the big cat sat on a", "big cat"


@pytest.fixture(scope="module")
def model() -> ms.HookedModel:
    return ms.load_model("tiny-llama")


@pytest.fixture(scope="module")
def deep() -> ms.HookedModel:
    """A 4-layer Llama, so that MLP / attention windows start above layer 0 (the started-late path)."""
    tokenizer = byte_tokenizer()
    config = adapters()["llama"].tiny_config(vocab_size=len(tokenizer), num_hidden_layers=4)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        hf = AutoModelForCausalLM.from_config(config).requires_grad_(False)
    return ms.HookedModel(hf.eval(), tokenizer, adapters()["llama"], name="tiny-llama-4")


def _loop(model, kind_hook, window, samples, sd, seed, target):
    """One forward per variant, every sample in its own row, restores by plain hook functions."""
    ids = model.to_tokens(PROMPT)
    subj = subject_positions(model, PROMPT, SUBJECT)
    n_layers, n_pos = model.cfg.n_layers, ids.shape[1]
    names = [f"blocks.{i}.{kind_hook}" for i in range(n_layers)]
    _, clean = model.run_with_cache(ids, names)
    draws = (
        torch.randn(samples, len(subj), model.cfg.d_model, generator=torch.Generator().manual_seed(seed)) * sd
    )
    out = torch.empty(n_layers, n_pos)
    for layer in range(n_layers):
        lo, hi = (
            (layer, layer + 1)
            if window == 1
            else (max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))
        )
        for p in range(n_pos):
            probs = []
            for s in range(samples):

                def corrupt(x, hook, s=s):
                    y = x.clone()
                    y[0, subj] += draws[s]
                    return y

                def restore(x, hook, p=p):
                    y = x.clone()
                    y[0, p] = clean[hook.name][0, p]
                    return y

                with model.hooks({"hook_embed": corrupt, **{names[j]: restore for j in range(lo, hi)}}):
                    probs.append(model(ids)[0, -1].softmax(-1)[target])
            out[layer, p] = torch.stack(probs).mean()
    return out


@pytest.mark.parametrize(
    "kind,hook,window",
    [("state", "hook_resid_post", 1), ("mlp", "hook_mlp_out", 2), ("attn", "hook_attn_out", 3)],
)
def test_batched_trace_equals_the_loop(deep, kind, hook, window):
    """Started late from the corrupted run, cells before the subject not run, chunked: still equal to
    one full forward per (variant, noise sample)."""
    model = deep
    spans = [window_layers(i, 1 if kind == "state" else window, 4) for i in range(4)]
    assert sorted({s[0] for s in spans})[-1] >= 2  # some variants start at layer 2 or above
    trace = causal_trace(
        model,
        PROMPT,
        SUBJECT,
        "a",
        kinds=[kind],
        window=window,
        samples=2,
        noise=2.0,
        memory_budget=3_000_000,
    )
    ref = _loop(model, hook, 1 if kind == "state" else window, 2, 2.0, 0, model.to_single_token("a"))
    assert float(ref.max() - ref.min()) > 1e-3  # the grid varies, so agreeing is not trivial
    torch.testing.assert_close(trace.scores[kind], ref, atol=1e-5, rtol=1e-4)
    assert trace.corrupted != pytest.approx(trace.clean)


def test_ends_are_exact(model):
    trace = causal_trace(model, PROMPT, SUBJECT, kinds=["state"], samples=4, noise=3.0)
    # The last layer's state at the last position fixes the output: the clean probability comes back.
    assert trace.scores["state"][-1, -1].item() == pytest.approx(trace.clean, rel=1e-5)
    # Restoring a position before the subject restores nothing.
    first = trace.subject[0]
    torch.testing.assert_close(
        trace.scores["state"][:, :first], torch.full((model.cfg.n_layers, first), trace.corrupted)
    )
    quiet = causal_trace(model, PROMPT, SUBJECT, kinds=["attn"], samples=2, noise=0.0)
    assert quiet.corrupted == pytest.approx(quiet.clean, rel=1e-6)


def test_window_subject_noise_and_aggregation(model):
    assert list(window_layers(0, 10, 30)) == list(range(0, 5)) and list(window_layers(29, 10, 30)) == list(
        range(24, 30)
    )
    assert list(window_layers(7, 1, 30)) == [7]
    tokens = model.to_str_tokens(PROMPT)
    pos = subject_positions(model, PROMPT, SUBJECT)
    assert "".join(tokens[i] for i in pos).strip() == SUBJECT
    ids = model.to_tokens(PROMPT)
    _, cache = model.run_with_cache(ids, ["hook_embed"])
    assert noise_scale(model, PROMPT, k=2.0) == pytest.approx(2 * float(cache["hook_embed"].std()), rel=1e-5)
    t = causal_trace(model, PROMPT, SUBJECT, kinds=["state"], samples=2)
    aie = average_indirect_effect([t, t])["state"]
    assert aie.shape == (len(CATEGORIES), model.cfg.n_layers)
    torch.testing.assert_close(aie[-1], t.indirect_effect("state")[:, -1])
    torch.testing.assert_close(aie[0], t.indirect_effect("state")[:, pos[0]])
    page = t.to_html()
    assert "http" not in page and page.count("<table>") == 1 and f"{tokens[pos[0]]}*" in page


def test_bad_input(model):
    with pytest.raises(ValueError, match="not in the prompt"):
        causal_trace(model, PROMPT, "dog")
    with pytest.raises(ms.models.TokenizationError):
        causal_trace(model, PROMPT, SUBJECT, "two tokens")
    with pytest.raises(ValueError, match="kinds"):
        causal_trace(model, PROMPT, SUBJECT, kinds=["neurons"])
    with pytest.raises(ValueError, match="no MLPs"):
        causal_trace(ms.load_model("tiny-attn_only"), PROMPT, SUBJECT, kinds=["mlp"])


# Subjects of one or several tokens (the tiny models' tokenizer has one token per character), so that
# the prompts differ in which ROME categories they have: all; no middle subject tokens; no further
# tokens; a first subsequent token that is also the last token.
PROMPTS = [("the big cat sat on a", "big cat"), ("a cat is", "a"), ("my dog x", "dog"), ("big dog!", "dog")]


def test_average_over_prompts_pools_the_tokens_of_each_category_as_rome_does(model):
    traces = [
        causal_trace(model, p, s, samples=2, window=2, noise=2.0, seed=i) for i, (p, s) in enumerate(PROMPTS)
    ]
    aie = average_indirect_effect(traces)
    for kind in ("state", "mlp", "attn"):
        rows: list[list[torch.Tensor]] = [[] for _ in CATEGORIES]
        for (prompt, subject), trace in zip(PROMPTS, traces, strict=True):
            # ROME's read_knowlege (notebooks/average_causal_effects.ipynb) on character positions,
            # independently of subject_positions: first_e, first_a = subject range; last_e = first_a - 1.
            first_e = prompt.index(subject)
            first_a = first_e + len(subject)
            last_e, last_a = first_a - 1, len(prompt) - 1
            effect = trace.scores[kind] - trace.corrupted
            rows[0].append(effect[:, first_e])
            rows[1].extend(effect[:, p] for p in range(first_e + 1, last_e))  # add_all
            rows[2].append(effect[:, last_e])
            rows[3].append(effect[:, first_a])
            rows[4].extend(effect[:, p] for p in range(first_a + 1, last_a))  # add_all
            rows[5].append(effect[:, last_a])
        # 5 + 0 + 1 + 1 middle tokens, 7 + 5 + 0 + 0 further tokens; "big dog!"'s "!" is both the
        # first subsequent and the last token.
        assert [len(r) for r in rows] == [4, 7, 4, 4, 12, 4]
        expected = torch.stack([torch.stack(r).mean(0) for r in rows])
        torch.testing.assert_close(aie[kind], expected, atol=1e-6, rtol=1e-5)
        samples = category_samples(traces, kind)
        torch.testing.assert_close(samples[4], torch.stack(rows[4]))
    # A category that no prompt has stays NaN rather than 0.
    assert aie["state"].isfinite().all() and average_indirect_effect(traces[1:2])["state"][1].isnan().all()
    assert category_positions([5, 6], 7) == [[5], [], [6], [], [], [6]]


def test_average_figure_is_self_contained_and_shows_the_numbers(model):
    from mechscope.viz.causal_trace import render_average_trace_html, render_average_trace_svg

    traces = [causal_trace(model, p, s, samples=1, window=2, noise=2.0) for p, s in PROMPTS[1:3]]
    aie = average_indirect_effect(traces)
    svg = render_average_trace_svg(aie, n_prompts=2, window=2)
    assert svg.startswith("<svg") and "http://" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert svg.count("Average indirect effect of restoring") == 3
    # One tooltip per cell, carrying the cell's value; the one category neither prompt lacks
    # entirely shows numbers, and a missing one would say so.
    n_layers = model.cfg.n_layers
    assert svg.count("<rect x=") >= 3 * len(CATEGORIES) * n_layers
    assert f"last token, layer {n_layers - 1}: {float(aie['mlp'][5, -1]):.4f}" in svg
    one = average_indirect_effect(traces[:1])  # "a cat is": no middle subject tokens
    assert "middle subject tokens, layer 0: no token" in render_average_trace_svg(one, n_prompts=1, window=2)
    page = render_average_trace_html(aie, n_prompts=2, total_effect=0.5, window=2)
    assert page.startswith("<!doctype html>") and "<script" not in page and svg in page
    with pytest.raises(ValueError, match="categories"):
        render_average_trace_svg({"state": aie["state"][:3]}, n_prompts=2, window=2)


def test_subject_positions_in_a_prompt_whose_tokens_split_a_character(model):
    """Byte tokens of a non-ASCII character do not decode one by one; the subject is still found."""
    prompt = "the café cat sat on a"
    assert subject_positions(model, prompt, "cat") == [10, 11, 12]
    assert subject_positions(model, prompt, "café") == [4, 5, 6, 7, 8]
    trace = causal_trace(model, prompt, "café", kinds=("state",), samples=2)
    assert trace.subject == [4, 5, 6, 7, 8]
