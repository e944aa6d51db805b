"""Causal tracing: batched restoring equals one forward per variant with plain hooks; the ends are exact."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.interventions.causal_trace import (
    CATEGORIES,
    average_indirect_effect,
    causal_trace,
    noise_scale,
    subject_positions,
    window_layers,
)

PROMPT, SUBJECT = "the big cat sat on a", "big cat"


@pytest.fixture(scope="module")
def model() -> ms.HookedModel:
    return ms.load_model("tiny-llama")


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
    [("state", "hook_resid_post", 1), ("mlp", "hook_mlp_out", 3), ("attn", "hook_attn_out", 2)],
)
def test_batched_trace_equals_the_loop(model, kind, hook, window):
    trace = causal_trace(
        model,
        PROMPT,
        SUBJECT,
        "a",
        kinds=[kind],
        window=window,
        samples=3,
        noise=2.0,
        memory_budget=3_000_000,
    )
    ref = _loop(model, hook, 1 if kind == "state" else window, 3, 2.0, 0, model.to_single_token("a"))
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
