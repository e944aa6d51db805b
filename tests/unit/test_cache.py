"""ActivationCache: selection, aliasing, stop_at_layer, residual decomposition and the final norm."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import no_hooks_left, random_tokens


def test_names_select_what_is_cached(tiny):
    tokens = random_tokens(tiny)
    _, by_list = tiny.run_with_cache(tokens, ["blocks.0.hook_resid_post", "hook_embed"])
    assert set(by_list) == {"blocks.0.hook_resid_post", "hook_embed"}
    _, by_filter = tiny.run_with_cache(tokens, lambda n: n.endswith("hook_attn_out"))
    assert set(by_filter) == {f"blocks.{i}.hook_attn_out" for i in range(tiny.cfg.n_layers)}
    assert no_hooks_left(tiny)


def test_aliased_points_are_stored_once(tiny):
    tokens = random_tokens(tiny)
    _, cache = tiny.run_with_cache(tokens, dtype=torch.float16)  # converted once, shared
    assert cache["blocks.0.hook_resid_post"] is cache["blocks.1.hook_resid_pre"]
    assert cache["blocks.0.hook_resid_post"].dtype == torch.float16
    _, cache = tiny.run_with_cache(tokens)  # the forward's own tensor
    assert cache["blocks.0.hook_resid_post"] is cache["blocks.1.hook_resid_pre"]
    grad_from_embed = {"hook_embed": lambda x, h: x.detach().requires_grad_(True)}
    with torch.enable_grad(), tiny.hooks(grad_from_embed):  # detached once, shared
        _, cache = tiny.run_with_cache(tokens)
    assert cache["blocks.0.hook_resid_post"] is cache["blocks.1.hook_resid_pre"]
    assert not any(t.requires_grad for t in cache.values())


def test_stop_at_layer_skips_later_blocks(tiny):
    tokens = random_tokens(tiny)
    calls = []
    last = tiny.layer(tiny.cfg.n_layers - 1)
    handle = last.register_forward_hook(lambda *a: calls.append(1))
    try:
        resid, cache = tiny.run_with_cache(tokens, stop_at_layer=1)
    finally:
        handle.remove()
    assert not calls
    _, full = tiny.run_with_cache(tokens, ["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(resid, full["blocks.1.hook_resid_pre"])
    assert all(not n.startswith("blocks.1.") for n in cache)
    assert no_hooks_left(tiny)


def test_start_at_skips_lower_blocks_and_gives_the_full_run(tiny):
    tokens = random_tokens(tiny, batch=2)
    logits, cache = tiny.run_with_cache(tokens, ["blocks.1.hook_resid_pre"])
    calls = []
    handle = tiny.layer(0).register_forward_hook(lambda m, args, out: calls.append(out is args[0]))
    try:
        with tiny.start_at(1, cache["blocks.1.hook_resid_pre"]):
            resumed = tiny(tokens)
            last = tiny(tokens, logits_to_keep=1)
    finally:
        handle.remove()
    assert calls == [True, True]  # block 0 passed its input through instead of running
    torch.testing.assert_close(resumed, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, logits[:, -1:], atol=1e-5, rtol=1e-5)
    assert no_hooks_left(tiny) and "forward" not in vars(tiny.layer(0))


def test_start_at_refuses_hooks_it_would_skip_and_wrong_shapes(tiny):
    tokens = random_tokens(tiny)
    _, cache = tiny.run_with_cache(tokens, ["blocks.1.hook_resid_pre"])
    resid = cache["blocks.1.hook_resid_pre"]
    with tiny.hooks({"blocks.0.hook_resid_post": lambda x, hook: None}):
        with pytest.raises(ValueError, match="skips it"), tiny.start_at(1, resid):
            pass
    with pytest.raises(ValueError, match="shape"), tiny.start_at(1, resid[:, :-1]):
        tiny(tokens)
    with pytest.raises(ValueError, match="layer must be in"), tiny.start_at(tiny.cfg.n_layers, resid):
        pass


def test_start_at_leaves_the_skipped_blocks_as_they_were(tiny):
    """start_at once wrote and deleted a skipped block's ``forward`` itself: an instance ``forward``
    already there (accelerate's, a raw-path hook's) was deleted, and a hook added inside the context
    kept the pass-through, so the block stayed skipped for good."""
    tokens = random_tokens(tiny)
    logits, cache = tiny.run_with_cache(tokens, ["blocks.1.hook_resid_pre"])
    resid, block = cache["blocks.1.hook_resid_pre"], tiny.layer(0)
    with tiny.start_at(1, resid):
        remove = tiny.add_hook("blocks.0.hook_resid_post", lambda x, hook: None)
    remove()
    assert torch.equal(tiny(tokens), logits)

    own = block.forward  # an instance forward, as accelerate's device hooks install
    block.forward = lambda *args, **kwargs: own(*args, **kwargs)
    instance = vars(block)["forward"]
    with tiny.start_at(1, resid):
        torch.testing.assert_close(tiny(tokens), logits, atol=1e-5, rtol=1e-5)
    assert vars(block)["forward"] is instance
    del block.forward

    with tiny.hooks({f"{tiny.adapter.layers}.0.{tiny.adapter.attn}": lambda x, hook: None}):
        with pytest.raises(ValueError, match="skips it"), tiny.start_at(1, resid):
            pass
    assert no_hooks_left(tiny)


def test_decomposition_sums_to_the_residual(tiny):
    _, cache = tiny.run_with_cache(random_tokens(tiny))
    n = tiny.cfg.n_layers
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels[0] == "embed" and labels[-1] == f"{n - 1}_{'mlp' if tiny.cfg.has_mlp else 'attn'}_out"
    torch.testing.assert_close(stack.sum(0), cache[f"blocks.{n - 1}.hook_resid_post"], atol=1e-5, rtol=1e-5)
    mid = cache.decompose_resid(1).sum(0)
    torch.testing.assert_close(mid, cache["blocks.1.hook_resid_pre"], atol=1e-5, rtol=1e-5)


def test_accumulated_resid_and_logit_lens_end_at_the_real_logits(tiny):
    tokens = random_tokens(tiny)
    logits, cache = tiny.run_with_cache(tokens)
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert len(labels) == tiny.cfg.n_layers + 1 and labels[-1] == "final_post"
    torch.testing.assert_close(stack[-1], cache["ln_final.hook_normalized"])
    lens_logits = tiny.module(tiny.adapter.unembed)(stack[-1])
    if tiny.cfg.final_logit_softcap:
        cap = tiny.cfg.final_logit_softcap
        lens_logits = torch.tanh(lens_logits / cap) * cap
    torch.testing.assert_close(lens_logits, logits)


def test_cached_norm_keeps_components_additive(tiny):
    _, cache = tiny.run_with_cache(random_tokens(tiny))
    normed = cache.decompose_resid(apply_ln=True).sum(0)
    bias = tiny.weights.ln_final_b
    expected = cache["ln_final.hook_normalized"] - (0 if bias is None else bias)
    torch.testing.assert_close(normed, expected, atol=1e-4, rtol=1e-4)


def test_head_results_sum_to_the_attention_output(tiny):
    if tiny.cfg.post_norms:
        pytest.skip("post-norm families normalise the summed heads")
    _, cache = tiny.run_with_cache(random_tokens(tiny))
    heads, labels = cache.stack_head_results(1, return_labels=True)
    assert labels == [f"L0H{h}" for h in range(tiny.cfg.n_heads)]
    total = heads.sum(0) + tiny.weights.blocks[0].b_O
    torch.testing.assert_close(total, cache["blocks.0.hook_attn_out"], atol=1e-5, rtol=1e-5)


def test_logit_attrs_sum_to_the_logit(tiny):
    tokens = random_tokens(tiny, batch=2)
    logits, cache = tiny.run_with_cache(tokens)
    target = tokens[:, -1]
    attrs = cache.logit_attrs(cache.decompose_resid(apply_ln=True, pos_slice=-1), target)
    w = tiny.weights
    const = (0 if w.ln_final_b is None else w.ln_final_b @ w.W_U[:, target]) + w.b_U[target]
    raw = tiny.module(tiny.adapter.unembed)(cache["ln_final.hook_normalized"])[torch.arange(2), -1, target]
    torch.testing.assert_close(attrs.sum(0) + const, raw, atol=1e-4, rtol=1e-4)


def test_missing_name_error_lists_close_cached_names(tiny):
    _, cache = tiny.run_with_cache(random_tokens(tiny), ["blocks.0.hook_resid_post"])
    with pytest.raises(KeyError, match="blocks.0.hook_resid_post"):
        cache["blocks.0.hook_resid_pos"]


def test_stack_counts_negative_layers_like_accumulated_resid(tiny):
    _, cache = tiny.run_with_cache(random_tokens(tiny))
    n = tiny.cfg.n_layers
    assert cache.stack("hook_resid_pre", -1).shape[0] == n  # TransformerLens' -1: all layers
    torch.testing.assert_close(cache.stack("hook_resid_pre", -2), cache.stack("hook_resid_pre")[: n - 1])
    with pytest.raises(ValueError, match="layer"):
        cache.stack("hook_resid_pre", n + 1)
    with pytest.raises(ValueError, match="incl_embeds=True"):  # was torch's empty-stack RuntimeError
        cache.decompose_resid(0, incl_embeds=False)
