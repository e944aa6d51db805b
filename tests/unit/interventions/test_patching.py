"""Patching sweeps equal the one-cell-per-forward loop; edge cases recover 1 and 0; ablations and metrics."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.interventions import ablation, metrics
from mechscope.interventions.patching import patch_sweep
from mechscope.models import edits


@pytest.fixture(scope="module")
def model() -> ms.HookedModel:
    return ms.load_model("tiny-llama")


CLEAN, CORRUPT = (
    ["the cat sat", "a dog ran!!"],
    ["the car sat", "a fog ran!!"],
)  # one length: metrics read pos -1


def _loop(model, metric, name_of, index_of, cells, source_input, base_input):
    """One forward per cell with plain edits: the reference."""
    names = sorted({name_of(c) for c in cells})
    _, src = model.run_with_cache(source_input, names)
    out = []
    for c in cells:
        name, idx = name_of(c), index_of(c)

        def fn(x, hook, name=name, idx=idx):
            y = x.clone()
            y[(slice(None), *idx)] = src[name][(slice(None), *idx)]
            return y

        with model.hooks({name: fn}):
            out.append(metric(model(base_input)).mean())
    return torch.stack(out)


@pytest.mark.parametrize("point", ["resid_pre", "resid_mid", "attn_out", "mlp_out"])
def test_batched_resid_sweep_equals_the_loop(model, point):
    metric = metrics.logit_diff(model.to_single_token("t"), model.to_single_token("r"))
    result = patch_sweep(model, CLEAN, CORRUPT, metric, point, memory_budget=2_000_000)
    n_pos = len(model.to_tokens(CLEAN[0])[0])
    cells = [(layer, p) for layer in range(model.cfg.n_layers) for p in range(n_pos)]
    ref = _loop(
        model, metric, lambda c: f"blocks.{c[0]}.hook_{point}", lambda c: (c[1],), cells, CLEAN, CORRUPT
    )
    torch.testing.assert_close(result.values.flatten(), ref, atol=1e-5, rtol=1e-5)
    assert result.axes == ("layer", "pos") and len(result.str_tokens) == n_pos
    page = result.to_html()
    assert page.count("<tr>") == model.cfg.n_layers + 1 and "http" not in page


@pytest.mark.parametrize("point,per", [("z", "head"), ("pattern", "head"), ("v", "head_pos")])
def test_batched_head_sweep_equals_the_loop(model, point, per):
    metric = metrics.log_prob(model.to_single_token("t"))
    result = patch_sweep(model, CLEAN, CORRUPT, metric, point, per=per, direction="noise")
    hook = "attn.hook_pattern" if point == "pattern" else f"attn.hook_{point}"
    n_pos = len(model.to_tokens(CLEAN[0])[0])
    if per == "head":
        cells = [(layer, h) for layer in range(2) for h in range(4)]
        index = (lambda c: (c[1],)) if point == "pattern" else (lambda c: (slice(None), c[1]))
    else:
        cells = [(layer, h, p) for layer in range(2) for h in range(4) for p in range(n_pos)]
        index = lambda c: (c[2], c[1])  # noqa: E731
    ref = _loop(model, metric, lambda c: f"blocks.{c[0]}.{hook}", index, cells, CORRUPT, CLEAN)
    torch.testing.assert_close(result.values.flatten(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("point", ["resid_post", "z"])
def test_sweeps_equal_the_loop_on_every_family(tiny, point):
    # Each forward starts at its lowest patched layer and unembeds the last position only: check
    # every family's block signature and unembedding against full forwards.
    metric = metrics.logit_diff(tiny.to_single_token("t"), tiny.to_single_token("r"))
    result = patch_sweep(tiny, CLEAN, CORRUPT, metric, point, memory_budget=1_500_000)
    n_pos, L, H = len(tiny.to_tokens(CLEAN[0])[0]), tiny.cfg.n_layers, tiny.cfg.n_heads
    hook = "hook_resid_post" if point == "resid_post" else "attn.hook_z"
    cells = [(layer, i) for layer in range(L) for i in range(n_pos if point == "resid_post" else H)]
    index = (lambda c: (c[1],)) if point == "resid_post" else (lambda c: (slice(None), c[1]))
    ref = _loop(tiny, metric, lambda c: f"blocks.{c[0]}.{hook}", index, cells, CLEAN, CORRUPT)
    torch.testing.assert_close(result.values.flatten(), ref, atol=1e-4, rtol=1e-4)


def test_full_layer_zero_patch_restores_the_clean_metric_and_nothing_gives_zero(model):
    metric = metrics.logit_diff(model.to_single_token("t"), model.to_single_token("r"))
    result = patch_sweep(model, CLEAN, CORRUPT, metric, "resid_pre")
    _, clean_cache = model.run_with_cache(CLEAN, ["blocks.0.hook_resid_pre"])
    with model.hooks({"blocks.0.hook_resid_pre": edits.replace(clean_cache["blocks.0.hook_resid_pre"])}):
        restored = metric(model(CORRUPT)).mean()
    assert metrics.normalise(restored, result.clean, result.corrupted).item() == pytest.approx(1.0, abs=1e-5)
    assert metrics.normalise(torch.tensor(result.corrupted), result.clean, result.corrupted).item() == 0.0
    # The final residual at the answer position determines the answer completely.
    final = patch_sweep(model, CLEAN, CORRUPT, metric, "resid_post")
    assert final.normalised[-1, -1].item() == pytest.approx(1.0, abs=1e-4)


def test_bad_inputs_are_clear(model):
    metric = metrics.log_prob(5)
    with pytest.raises(ValueError, match="same token shape"):
        patch_sweep(model, "short", "much longer text", metric)
    with pytest.raises(ValueError, match="below one variant"):
        patch_sweep(model, CLEAN, CORRUPT, metric, memory_budget=10)
    with pytest.raises(ValueError, match="point must be one of"):
        patch_sweep(model, CLEAN, CORRUPT, metric, "mlp_pre")
    with pytest.raises(ms.models.TokenizationError):
        model.to_single_token("two tokens")


def test_metrics_match_direct_computations(model):
    logits = model(CLEAN)
    t, f = 5, 9
    torch.testing.assert_close(metrics.logit_diff(t, f)(logits), logits[:, -1, t] - logits[:, -1, f])
    torch.testing.assert_close(metrics.prob(t)(logits), logits[:, -1].softmax(-1)[:, t])
    assert torch.allclose(metrics.kl_to(logits)(logits), torch.zeros(2), atol=1e-6)
    tokens = model.to_tokens(CLEAN)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    torch.testing.assert_close(metrics.next_token_loss(tokens)(logits)[0], loss)


def test_ablations(model):
    tokens = model.to_tokens(CLEAN)
    name = "blocks.0.hook_mlp_out"
    means = ablation.mean_activations(model, ["the quick brown fox", "jumps over", "the lazy dog"], [name])
    assert means[name].shape == (model.cfg.d_model,)
    seen = {}
    keep = lambda x, h: seen.__setitem__("x", x)  # noqa: E731
    with model.hooks({name: ablation.mean_ablation(means[name], pos=1)}), model.hooks({name: keep}):
        model(tokens)
    torch.testing.assert_close(seen["x"][:, 1], means[name].expand(2, -1))
    with model.hooks({name: ablation.noise_ablation(3.0, std=1.0, pos=0)}), model.hooks({name: keep}):
        model(tokens)
    _, cache = model.run_with_cache(tokens, [name])
    noise = seen["x"] - cache[name]
    assert torch.all(noise[:, 1:] == 0) and 2.0 < noise[:, 0].std() < 4.0
    _, other = model.run_with_cache(model.to_tokens(CORRUPT), [name])
    with model.hooks({name: ablation.resample_ablation(other[name], pos=2)}), model.hooks({name: keep}):
        model(tokens)
    assert all(any(torch.equal(seen["x"][i, 2], other[name][j, 2]) for j in range(2)) for i in range(2))


def test_prompts_that_pad_differently_are_refused(model):
    # Same padded shape, but prompt 0 is long in clean and short in corrupted: patching position p
    # would copy padding into real tokens (and real tokens into padding) without a word.
    from mechscope.interventions.attribution import attribution_patch

    clean, corrupt = ["the cat sat on a mat", "hi"], ["hi", "the dog sat on a mat"]
    assert model.tokenize(clean).ids.shape == model.tokenize(corrupt).ids.shape
    metric = metrics.logit_diff(1, 2)
    with pytest.raises(ValueError, match="pad differently"):
        patch_sweep(model, clean, corrupt, metric)
    with pytest.raises(ValueError, match="pad differently"):
        attribution_patch(model, clean, corrupt, metric)


def test_a_metric_reading_from_the_end_of_padded_prompts_is_refused(model):
    """Right-padded prompts of different lengths: logits[:, -1] of the shorter one is padding."""
    from mechscope.interventions.attribution import attribution_patch
    from mechscope.interventions.circuit import edge_attribution
    from mechscope.interventions.path_patching import path_patch

    clean, corrupt = ["the cat sat on a mat", "hi"], ["the dog sat on a mat", "yo"]
    assert model.tokenize(clean).mask is not None
    last, first = metrics.logit_diff(1, 2), metrics.logit_diff(1, 2, pos=0)
    for run in (
        lambda m: patch_sweep(model, clean, corrupt, m),
        lambda m: attribution_patch(model, clean, corrupt, m),
        lambda m: edge_attribution(model, clean, corrupt, m),
        lambda m: path_patch(model, clean, corrupt, m, senders=[(0, 0)], receivers="logits"),
    ):
        with pytest.raises(ValueError, match="reads from the end"):
            run(last)
    assert patch_sweep(model, clean, corrupt, first).values.isfinite().all()  # a fixed position is fine
