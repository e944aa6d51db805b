"""Direct logit attribution on SmolLM2-135M's indirect-object identification (Wang et al. 2022)."""

from __future__ import annotations

import pytest
import torch

from mechscope.circuits.dla import direct_logit_attribution
from mechscope.models import edits

pytestmark = pytest.mark.slow
IOI = "When Mary and John went to the store, John gave a drink to"


def test_ioi_terms_sum_to_the_true_logit_difference(smollm2):
    dla = direct_logit_attribution(smollm2, IOI, " Mary", " John", by="pos")
    with torch.no_grad():
        logits = smollm2(IOI)[0, -1]
    true = float(logits[smollm2.to_single_token(" Mary")] - logits[smollm2.to_single_token(" John")])
    assert true > 1  # the model does the task: the indirect object beats the subject
    assert float(dla.layer_terms.sum() + dla.bias.sum()) == pytest.approx(true, abs=1e-3)
    n = smollm2.cfg.n_layers
    attn = dla.layer_terms[0, [dla.labels.index(f"{i}_attn_out") for i in range(n)]]
    torch.testing.assert_close(dla.head_terms[0].sum(-1) + dla.attn_bias[0], attn, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dla.pos_terms.sum(-1), dla.head_terms, atol=1e-4, rtol=1e-4)


def test_top_head_equals_zeroing_its_output_with_the_norm_frozen(smollm2):
    # Independent of the implementation: the real o_proj's output with the head's z zeroed, carried
    # to the logit difference through the final RMSNorm with its scale frozen at the clean run.
    dla = direct_logit_attribution(smollm2, IOI, " Mary", " John")
    layer, head, value = dla.top_heads(1)[0]
    o_proj = f"model.layers.{layer}.self_attn.o_proj"
    final = f"blocks.{smollm2.cfg.n_layers - 1}.hook_resid_post"
    _, clean = smollm2.run_with_cache(IOI, [o_proj, final])
    with smollm2.hooks({f"blocks.{layer}.attn.hook_z": edits.zero(head=head)}):
        _, knocked = smollm2.run_with_cache(IOI, [o_proj])
    delta = clean[o_proj][0, -1] - knocked[o_proj][0, -1]
    resid = clean[final][0, -1]
    norm = smollm2.module("model.norm")
    scale = (resid.pow(2).mean() + norm.variance_epsilon).sqrt()
    W_U = smollm2.weights.W_U
    w = W_U[:, smollm2.to_single_token(" Mary")] - W_U[:, smollm2.to_single_token(" John")]
    assert value == pytest.approx(float((delta / scale * norm.weight) @ w), abs=1e-3)
