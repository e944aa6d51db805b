"""Steering vectors on tiny models, checked against plain HF hidden states and a planted direction."""

from __future__ import annotations

import random

import pytest
import torch

import mechscope as ms
from mechscope.models.errors import TokenizationError
from mechscope.saes.arch import make_sae
from mechscope.saes.sae import SAEConfig
from mechscope.steering import (
    SteeringError,
    SteeringVector,
    actadd,
    mean_difference,
    random_like,
    sae_direction,
)


def _hidden(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The input of HF decoder layer ``layer`` (= resid_pre), read by a plain PyTorch pre-hook."""
    seen = []

    def grab(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = model.layer(layer).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.hf_model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0]


def _ids(model, text: str) -> list[int]:
    return model.to_tokens(text)[0].tolist()


def test_actadd_is_the_positionwise_difference_of_hf_hidden_states(tiny):
    v = actadd(tiny, "Love", "Hate", 1, coeff=3.0)
    ids = torch.tensor([_ids(tiny, "Love"), _ids(tiny, "Hate")])
    h = _hidden(tiny, ids, 1)
    torch.testing.assert_close(v.direction, (h[0] - h[1]).float())
    assert v.hook_name == "blocks.1.hook_resid_pre" and v.coeff == 3.0 and v.start == 0 and v.per_position


def test_actadd_pads_the_shorter_prompt_on_the_right_with_the_pad_token():
    model = ms.load_model("tiny-llama")  # byte tokens: "ab" is 2 tokens, "abcd" 4
    v = actadd(model, "ab", "abcd", "blocks.0.hook_resid_post", pad=" ")
    space = model.to_single_token(" ")
    ids = torch.tensor([_ids(model, "ab") + [space, space], _ids(model, "abcd")])
    h = _hidden(model, ids, 1)
    torch.testing.assert_close(v.direction, (h[0] - h[1]).float())
    assert v.direction.shape == (4, model.cfg.d_model)


def test_actadd_length_mismatch_without_pad_is_a_clear_error():
    model = ms.load_model("tiny-llama")
    with pytest.raises(SteeringError, match=r"different token lengths \(2 vs 3.*pad=' '"):
        actadd(model, "ab", "abc", 0, pad=None)
    with pytest.raises(TokenizationError):
        actadd(model, "ab", "abc", 0, pad="xy")


def test_mean_difference_matches_a_plain_hf_computation(tiny):
    pos, neg = ["a happy day", "so glad", "joy"], ["a sad day", "so grim", "woe!"]
    v = mean_difference(tiny, pos, neg, 1, batch_size=2)
    last = [_hidden(tiny, torch.tensor([_ids(tiny, t)]), 1)[0, -1] for t in pos + neg]
    expected = torch.stack(last[:3]).mean(0) - torch.stack(last[3:]).mean(0)
    torch.testing.assert_close(v.direction, expected.float(), atol=1e-5, rtol=1e-4)
    m = mean_difference(tiny, pos, neg, 1, read="mean")
    avg = [_hidden(tiny, torch.tensor([_ids(tiny, t)]), 1)[0].mean(0) for t in pos + neg]
    torch.testing.assert_close(
        m.direction, (torch.stack(avg[:3]).mean(0) - torch.stack(avg[3:]).mean(0)).float()
    )


def test_mean_difference_finds_a_direction_planted_in_the_residual():
    """Plant ``v`` in the embeddings of the capitals A-J: prompts ending in a capital carry ``v`` in the
    residual, others do not. The mean difference over 64 random pairs must point along ``v``; before
    planting it must not."""
    model = ms.load_model("tiny-llama")  # a fresh copy: this test edits its weights
    g = torch.Generator().manual_seed(1)
    v = torch.randn(model.cfg.d_model, generator=g)
    v = 3 * v / v.norm()
    rng = random.Random(0)

    def text(ends: str) -> str:
        return "".join(rng.choice("abcdefghij ") for _ in range(8)) + rng.choice(ends)

    pos, neg = [text("ABCDEFGHIJ") for _ in range(64)], [text("abcdefghij") for _ in range(64)]
    cos = torch.nn.functional.cosine_similarity
    before = mean_difference(model, pos, neg, 0).direction
    emb = model.hf_model.get_input_embeddings().weight
    with torch.no_grad():
        emb[[ord(c) for c in "ABCDEFGHIJ"]] += v
    after = mean_difference(model, pos, neg, 0).direction
    assert abs(float(cos(before, v, dim=0))) < 0.3
    assert float(cos(after, v, dim=0)) > 0.95
    torch.testing.assert_close(after - before, v, atol=1e-4, rtol=1e-4)


def test_mean_difference_bad_pairs_are_clear_errors():
    model = ms.load_model("tiny-llama")
    with pytest.raises(SteeringError, match="3 positive prompts but 2 negative"):
        mean_difference(model, ["a", "b", "c"], ["d", "e"], 0)
    with pytest.raises(SteeringError, match="no prompt pairs"):
        mean_difference(model, [], [], 0)
    with pytest.raises(SteeringError, match="lists of prompts"):
        mean_difference(model, "a", "b", 0)


def test_sae_direction_is_what_decode_adds_per_unit_of_the_latent():
    model = ms.load_model("tiny-llama")
    sae = make_sae(
        SAEConfig(d_in=model.cfg.d_model, d_sae=32, kind="relu", hook_name="blocks.1.hook_resid_pre")
    )
    with torch.no_grad():
        sae.output_scale.fill_(2.0)
        one = torch.zeros(32)
        one[5] = 1.0
        expected = sae.decode(one) - sae.decode(torch.zeros(32))
    v = sae_direction(sae, 5, coeff=4.0)
    torch.testing.assert_close(v.direction, expected.float())
    assert v.hook_name == "blocks.1.hook_resid_pre" and v.coeff == 4.0 and not v.per_position
    with pytest.raises(SteeringError, match="32 latents"):
        sae_direction(sae, 32)


def test_random_like_keeps_each_rows_norm_and_is_seeded():
    d = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
    v = SteeringVector(hook_name="blocks.0.hook_resid_pre", direction=d)
    r = random_like(v, seed=3)
    torch.testing.assert_close(r.direction.norm(dim=-1), d.norm(dim=-1))
    torch.testing.assert_close(r.direction, random_like(v, seed=3).direction)
    assert not torch.allclose(r.direction, random_like(v, seed=4).direction)
    assert r.hook_name == v.hook_name and r.positions == v.positions


def test_vector_validation():
    with pytest.raises(SteeringError, match="non-empty"):
        SteeringVector(hook_name="h", direction=torch.zeros(2, 3, 4))
    with pytest.raises(SteeringError, match="first\\s+row"):
        SteeringVector(hook_name="h", direction=torch.zeros(2, 3), positions=[0, 1])
    with pytest.raises(SteeringError, match="hook_name is empty"):
        SteeringVector(hook_name="", direction=torch.zeros(3))
    v = SteeringVector(hook_name="h", direction=torch.ones(4), coeff=2.0)
    assert v.norm() == pytest.approx(4.0) and v.with_coeff(-1.0).coeff == -1.0
