"""Applying steering vectors: forwards and generation against plain PyTorch hooks on the HF layers."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.models.generate import generate as gen
from mechscope.steering import (
    PositionTracker,
    SteeringError,
    SteeringVector,
    actadd,
    generate,
    hook_fn,
    steer,
)


@pytest.fixture(scope="module")
def llama() -> ms.HookedModel:
    return ms.load_model("tiny-llama")


def _plain_add(model, layer: int, add: torch.Tensor, positions: list[int] | None):
    """A plain PyTorch pre-hook adding ``add`` to the input of HF layer ``layer`` at ``positions``
    of the *full* sequence (the reference knows positions because it never uses a KV cache)."""

    def pre(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        y = x.clone()
        if positions is None:
            y = y + add
        else:
            for i, p in enumerate(positions):
                if p < y.shape[1]:
                    y[:, p] += add[i] if add.ndim == 2 else add
        return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})

    return model.layer(layer).register_forward_pre_hook(pre, with_kwargs=True)


def _greedy_reference(model, prompt: str, n_new: int, layer: int, add, positions) -> list[int]:
    """Greedy decoding without a cache: the whole sequence each step, steered by the plain hook."""
    ids = model.to_tokens(prompt)
    handle = _plain_add(model, layer, add, positions)
    try:
        with torch.no_grad():
            for _ in range(n_new):
                nxt = model.hf_model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
    finally:
        handle.remove()
    return ids[0].tolist()


def test_actadd_forward_equals_a_plain_hook_at_the_front_positions(tiny):
    v = actadd(tiny, "Love", "Hate", 1, coeff=4.0)
    x = tiny.to_tokens("I hate you because")
    with steer(tiny, v):
        got = tiny(x)
    handle = _plain_add(tiny, 1, 4.0 * v.direction, list(range(v.direction.shape[0])))
    try:
        with torch.no_grad():
            want = tiny.hf_model(input_ids=x).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, tiny(x))


def test_cached_steered_generation_equals_uncached_and_a_plain_reference(tiny):
    v = actadd(tiny, "Love", "Hate", 1, coeff=8.0)
    prompt = "I hate you because"
    with steer(tiny, v):
        cached = gen(tiny, prompt, max_new_tokens=8, return_tokens=True).tolist()
        uncached = gen(tiny, prompt, max_new_tokens=8, return_tokens=True, use_cache=False).tolist()
    plain = gen(tiny, prompt, max_new_tokens=8, return_tokens=True).tolist()
    ref = _greedy_reference(tiny, prompt, 8, 1, 8.0 * v.direction, list(range(v.direction.shape[0])))
    assert cached == uncached == ref
    assert cached != plain  # the vector changed the continuation, so the check has teeth


def test_left_padded_batch_steers_each_row_from_its_first_real_token(llama):
    v = actadd(llama, "Love", "Hate", 1, coeff=8.0)
    prompts = ["a long prompt here", "hi"]
    with steer(llama, v):
        batch = gen(llama, prompts, max_new_tokens=6)
        alone = [gen(llama, p, max_new_tokens=6) for p in prompts]
    assert batch == alone


def test_everywhere_vector_steers_every_generated_token(llama):
    d = torch.randn(llama.cfg.d_model)
    v = SteeringVector(hook_name="blocks.1.hook_resid_pre", direction=d, coeff=3.0)
    got = generate(llama, "hello", v, max_new_tokens=6, return_tokens=True)
    ref = _greedy_reference(llama, "hello", 6, 1, 3.0 * d, None)
    assert got.steered.tolist() == ref and got.unsteered.tolist() != ref
    with llama.hooks({v.hook_name: hook_fn(v)}):  # positions=None needs no tracker
        assert gen(llama, "hello", max_new_tokens=6, return_tokens=True).tolist() == ref


@pytest.mark.parametrize("positions", [2, [0, 3], slice(3, None)])
def test_position_selection_edits_exactly_those_positions(llama, positions):
    d = torch.ones(llama.cfg.d_model)
    v = SteeringVector(hook_name="blocks.0.hook_resid_post", direction=d, positions=positions, coeff=2.0)
    x = llama.to_tokens("abcdef")
    _, clean = llama.run_with_cache(x, ["blocks.0.hook_resid_post"])
    with steer(llama, v):
        _, steered = llama.run_with_cache(x, ["blocks.0.hook_resid_post"])
    delta = (steered["blocks.0.hook_resid_post"] - clean["blocks.0.hook_resid_post"])[0]
    expected = torch.zeros(6, dtype=torch.bool)
    expected[positions if not isinstance(positions, list) else torch.tensor(positions)] = True
    changed = delta.abs().amax(-1) > 0
    assert changed.tolist() == expected.tolist()
    torch.testing.assert_close(delta[expected], torch.full((int(expected.sum()), llama.cfg.d_model), 2.0))


def test_per_row_coefficients_equal_separate_runs(llama):
    v = actadd(llama, "Love", "Hate", 1)
    x = llama.to_tokens(["I hate you because"] * 3)
    with (
        PositionTracker(llama) as t,
        llama.hooks({v.hook_name: hook_fn(v, t, torch.tensor([0.0, 2.0, -5.0]))}),
    ):
        batched = llama(x)
    for i, c in enumerate([0.0, 2.0, -5.0]):
        with steer(llama, v.with_coeff(c)):
            torch.testing.assert_close(batched[i], llama(x[i : i + 1])[0], atol=1e-5, rtol=1e-5)


def test_padding_never_gets_the_vector(llama):
    d = torch.ones(llama.cfg.d_model)
    v = SteeringVector(hook_name="blocks.0.hook_resid_post", direction=d, coeff=1.0)
    v0 = SteeringVector(hook_name=v.hook_name, direction=d, positions=slice(0, None))
    toks = llama.tokenize(["abcdef", "ab"])  # right-padded: row 1 has 4 pads
    _, c0 = llama.run_with_cache(toks.ids, [v.hook_name], attention_mask=toks.mask)
    with steer(llama, v0):
        _, c1 = llama.run_with_cache(toks.ids, [v.hook_name], attention_mask=toks.mask)
    changed = (c1[v.hook_name] - c0[v.hook_name]).abs().amax(-1) > 0
    assert changed.tolist() == [[True] * 6, [True] * 2 + [False] * 4]


def test_errors_are_clear(llama):
    v = actadd(llama, "Love", "Hate", 1, coeff=1.0)
    with pytest.raises(SteeringError, match="steer\\(model, vector\\)"):
        with llama.hooks({v.hook_name: hook_fn(v)}):
            llama("hello")
    wrong = SteeringVector(hook_name="blocks.0.mlp.hook_post", direction=torch.ones(llama.cfg.d_model))
    with pytest.raises(SteeringError, match="wide"):
        with steer(llama, wrong):
            llama("hello")
    with pytest.raises(SteeringError, match="2 coefficients for 1 vectors"):
        with steer(llama, v, coeffs=[1.0, 2.0]):
            pass


@pytest.mark.parametrize("positions", [-1, [0, -1], slice(-2, None), slice(0, -1)])
def test_negative_positions_are_refused_not_silently_ignored(llama, positions):
    # Positions are absolute: -1 matched no token (a silent no-op) and slice(-2, None) every token.
    with pytest.raises(SteeringError, match="negative"):
        SteeringVector(hook_name="blocks.0.hook_resid_post", direction=torch.ones(4), positions=positions)
    with pytest.raises(SteeringError, match="negative"):
        SteeringVector(hook_name="blocks.0.hook_resid_post", direction=torch.ones(2, 4), positions=-2)
    with pytest.raises(SteeringError, match="negative"):
        actadd(llama, "Love", "Hate", 1, start=-1)
