"""Feature steering against independent computations: strength 0 is the plain model bit for bit; add is
the decoder row added by hand; clamp equals splicing the SAE with its error term and setting the latent."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.features import Neurons, UnknownFeatureError
from mechscope.features.steer import (
    FeatureSteer,
    FeatureSteerError,
    generate_steered,
    steer_features,
    steered_logits,
)
from mechscope.saes.arch import make_sae
from mechscope.saes.sae import SAEConfig

HOOK = "blocks.0.hook_resid_post"
PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def llama() -> ms.HookedModel:
    return ms.load_model("tiny-llama")


@pytest.fixture(scope="module")
def sae(llama):
    return make_sae(SAEConfig(d_in=llama.cfg.d_model, d_sae=48, kind="relu", hook_name=HOOK, seed=5))


def test_strength_zero_reproduces_the_plain_output_exactly(llama, sae):
    with torch.no_grad():
        plain = llama(PROMPT)
    for mode_feature in [FeatureSteer(3, 0.0), FeatureSteer(7, 0.0, "add")]:
        assert torch.equal(steered_logits(llama, sae, PROMPT, [mode_feature]), plain)
    out = generate_steered(llama, sae, PROMPT, [FeatureSteer(3, 0.0)], max_new_tokens=8)
    assert out.steered == out.unsteered == llama.generate(PROMPT, max_new_tokens=8)
    moved = generate_steered(llama, sae, PROMPT, [FeatureSteer(3, 50.0)], max_new_tokens=8)
    assert moved.unsteered == out.unsteered and moved.steered != moved.unsteered  # the test can fail


def test_add_equals_the_decoder_row_added_by_hand(llama, sae):
    d = (sae.W_dec[5] / sae.output_scale).detach()
    with torch.no_grad(), llama.hooks([(HOOK, lambda x, hook: x + 4.0 * d)]):
        want = llama(PROMPT)
    got = steered_logits(llama, sae, PROMPT, [FeatureSteer(5, 4.0)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, llama(PROMPT).detach(), atol=1e-3)  # it did something


def test_clamp_equals_splicing_with_the_latent_set(llama, sae):
    def set_latent(acts, hook):
        acts = acts.clone()
        acts[..., [2, 9]] = torch.tensor([3.0, 0.0])
        return acts

    with torch.no_grad(), llama.saes(sae, use_error_term=True):
        with llama.hooks([(f"{HOOK}.hook_sae_acts", set_latent)]):
            want = llama(PROMPT)
    got = steered_logits(llama, sae, PROMPT, [FeatureSteer(2, 3.0, "clamp"), FeatureSteer(9, 0.0, "clamp")])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_clamp_at_zero_is_a_no_op_where_the_feature_never_fires(llama, sae):
    _, cache = llama.run_with_cache(PROMPT, [HOOK])
    acts = sae.encode(cache[HOOK])[0]
    silent = int((acts.max(0).values <= 0).nonzero()[0])
    with torch.no_grad():
        plain = llama(PROMPT)
    torch.testing.assert_close(
        steered_logits(llama, sae, PROMPT, [FeatureSteer(silent, 0.0, "clamp")]), plain
    )


def test_neurons_clamp_sets_the_neuron(llama):
    gpt2 = ms.load_model("tiny-gpt2")
    hook = "blocks.1.mlp.hook_post"

    def set_neuron(x, hook):
        x = x.clone()
        x[..., 4] = 2.5
        return x

    with torch.no_grad(), gpt2.hooks([(hook, set_neuron)]):
        want = gpt2(PROMPT)
    got = steered_logits(gpt2, Neurons(1), PROMPT, [FeatureSteer(4, 2.5, "clamp")])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_steering_is_removed_after_the_block(llama, sae):
    with torch.no_grad():
        plain = llama(PROMPT)
        with steer_features(llama, sae, [FeatureSteer(1, 10.0)]):
            pass
        assert torch.equal(llama(PROMPT), plain)


def test_bad_steers_are_refused(llama, sae):
    with pytest.raises(FeatureSteerError, match="mode"):
        FeatureSteer(1, 1.0, "multiply")
    with pytest.raises(FeatureSteerError, match="finite"):
        FeatureSteer(1, float("nan"))
    with pytest.raises(UnknownFeatureError, match="48 features"):
        steered_logits(llama, sae, PROMPT, [FeatureSteer(48, 1.0)])
    with pytest.raises(FeatureSteerError, match="nothing to steer"):
        steered_logits(llama, sae, PROMPT, [])
