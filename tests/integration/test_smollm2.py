"""The embedded default model, SmolLM2-135M: the issue's correctness checks on real weights."""

from __future__ import annotations

import pytest
import torch

from mechscope.models import edits
from tests.helpers import no_hooks_left

pytestmark = pytest.mark.slow
PROMPT = "The Eiffel Tower is in the city of"


def test_facts(smollm2):
    c = smollm2.cfg
    assert (c.family, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head) == (
        "llama",
        30,
        576,
        9,
        3,
        64,
    )


def test_unhooked_forward_is_bit_exact_and_predicts_paris(smollm2):
    tokens = smollm2.to_tokens(PROMPT)
    with torch.no_grad():
        plain = smollm2.hf_model(input_ids=tokens).logits
    logits, cache = smollm2.run_with_cache(PROMPT, ["blocks.12.hook_resid_post"])
    assert torch.equal(smollm2(PROMPT), plain) and torch.equal(logits, plain)
    assert cache["blocks.12.hook_resid_post"].shape == (1, tokens.shape[1], 576)
    assert smollm2.tokenizer.decode(plain[0, -1].argmax()) == " Paris"


@pytest.mark.parametrize("name", ["blocks.12.hook_resid_pre", "blocks.12.hook_resid_mid"])
def test_transplant_gives_the_donor_logits_exactly(smollm2, name):
    a = smollm2.to_tokens(PROMPT)
    b = smollm2.to_tokens("The Colosseum is in the city of")
    assert a.shape == b.shape
    logits_b, cache_b = smollm2.run_with_cache(b, [name])
    with smollm2.hooks({name: lambda x, hook: cache_b[name]}):
        assert torch.equal(smollm2(a), logits_b)


def test_eager_path_and_logit_lens_agree_with_the_model(smollm2):
    logits, cache = smollm2.run_with_cache(PROMPT)  # every point, attention internals included
    with torch.no_grad():
        plain = smollm2.hf_model(input_ids=smollm2.to_tokens(PROMPT)).logits
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)
    lens = smollm2.module("lm_head")(cache.accumulated_resid(apply_ln=True)[-1])
    torch.testing.assert_close(lens, logits)
    torch.testing.assert_close(
        cache.decompose_resid().sum(0), cache["blocks.29.hook_resid_post"], atol=1e-3, rtol=1e-4
    )
    assert cache["blocks.3.attn.hook_k"].shape == (1, 9, 9, 64)  # GQA reported per query head


def test_steering_generate_changes_the_text_and_is_removed(smollm2):
    love, hate = (
        smollm2.run_with_cache(w, ["blocks.6.hook_resid_pre"])[1]["blocks.6.hook_resid_pre"][0, -1]
        for w in (" Love", " Hate")
    )
    prompt = "I hate you because"
    plain = smollm2.generate(prompt, max_new_tokens=12)
    steered = smollm2.generate(
        prompt, hooks={"blocks.6.hook_resid_pre": edits.add(8 * (love - hate))}, max_new_tokens=12
    )
    assert steered != plain and steered.startswith(prompt)
    assert smollm2.generate(prompt, max_new_tokens=12) == plain
    assert no_hooks_left(smollm2)


def test_real_heads_previous_token_and_induction(smollm2):
    """Findings on SmolLM2-135M (documented in docs/findings.md): strong previous-token and
    induction heads exist, and the best previous-token head K-composes with an induction head."""
    from mechscope.circuits.head_detectors import head_scores

    scores = head_scores(smollm2, seq_len=32, batch=4)
    assert scores["previous_token"].max() > 0.7
    assert scores["induction"].max() > 0.7
    prev = scores["previous_token"].flatten().argmax().item()
    ind = scores["induction"].flatten().argmax().item()
    assert prev // 9 < ind // 9  # the previous-token head sits below the induction head


def test_mlp_neurons_are_a_more_privileged_basis_than_the_residual(smollm2):
    from mechscope.circuits.privileged_basis import basis_alignment

    text = [
        "The Eiffel Tower is in the city of Paris, which is the capital of France.",
        "Shakespeare wrote plays and sonnets in London.",
        "def f(x):\n    return x + 1",
        "In 1969, astronauts landed on the Moon for the first time.",
    ]
    resid, neurons = basis_alignment(smollm2, text, ["blocks.20.hook_resid_mid", "blocks.20.mlp.hook_post"])
    assert neurons.privilege > 2.0 and neurons.privilege > resid.privilege + 2.0
