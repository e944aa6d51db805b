"""Tokens, padding, context limits and generation with hooks."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.models import edits
from tests.helpers import no_hooks_left


def test_round_trip_and_single_token(tiny):
    assert tiny.to_string(tiny.to_tokens("héllo", prepend_bos=False)[0]) == "héllo"
    assert "".join(tiny.to_str_tokens("ab", prepend_bos=False)) == "ab"
    assert tiny.to_single_token("a") == ord("a")  # byte-level tokenizer: ids are bytes
    with pytest.raises(ms.models.TokenizationError, match="2 tokens"):
        tiny.to_single_token("ab")


def test_bos_policy_is_the_familys(tiny):
    ids = tiny.to_tokens("hi")[0]
    assert (ids[0].item() == tiny.tokenizer.bos_token_id) == tiny.prepend_bos
    assert tiny.to_tokens("hi", prepend_bos=False)[0, 0].item() == ord("h")


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_match_single_runs(tiny, side):
    texts = ["a longer prompt here", "short"]
    toks = tiny.tokenize(texts, padding_side=side)
    assert toks.mask is not None and toks.mask.sum(1).tolist() == [len(tiny.to_tokens(t)[0]) for t in texts]
    batch = tiny(texts, padding_side=side)
    for i, text in enumerate(texts):
        alone = tiny(text)[0]
        real = toks.mask[i].bool()
        torch.testing.assert_close(batch[i][real], alone, atol=1e-5, rtol=1e-5)


def test_too_many_tokens_fails_before_running(tiny):
    with pytest.raises(ms.models.ContextTooLongError, match="exceed"):
        tiny(torch.zeros(1, tiny.cfg.n_ctx + 1, dtype=torch.long))


def test_steering_during_generate_applies_to_every_token_and_is_removed(tiny):
    prompt = "hello"
    plain = tiny.generate(prompt, max_new_tokens=8, min_new_tokens=8)
    steps = []
    vec = torch.randn(tiny.cfg.d_model) * 20

    def count(x, hook):
        steps.append(x.shape[1])

    spec = [("blocks.0.hook_resid_post", edits.add(vec)), ("blocks.0.hook_resid_post", count)]
    steered = tiny.generate(prompt, hooks=spec, max_new_tokens=8, min_new_tokens=8)
    assert steered != plain
    assert (
        steps[0] == len(tiny.to_tokens(prompt)[0]) and steps[1:] == [1] * 7
    )  # KV cache on, hook on each new token
    assert tiny.generate(prompt, max_new_tokens=8, min_new_tokens=8) == plain
    assert no_hooks_left(tiny)


def test_batched_generation_left_pads(tiny):
    outs = tiny.generate(["hello there", "hi"], max_new_tokens=4, min_new_tokens=4)
    assert isinstance(outs, list) and outs[1].startswith("hi") and outs[0].startswith("hello there")
    assert outs[1] == tiny.generate("hi", max_new_tokens=4, min_new_tokens=4)


def test_generate_takes_left_padded_ids_with_their_mask(tiny):
    texts = ["hello there", "hi"]
    toks = tiny.tokenize(texts, padding_side="left")
    outs = tiny.generate(toks.ids, attention_mask=toks.mask, max_new_tokens=4, min_new_tokens=4)
    assert outs == tiny.generate(texts, max_new_tokens=4, min_new_tokens=4)


def test_position_lists_out_of_range_on_cached_steps_are_skipped(tiny):
    vec = torch.randn(tiny.cfg.d_model) * 20
    hooks = [("blocks.0.hook_resid_post", edits.add(vec, pos=[1, 2]))]
    steered = tiny.generate("hello", hooks=hooks, max_new_tokens=4, min_new_tokens=4)
    assert steered.startswith("hello")
    assert no_hooks_left(tiny)
