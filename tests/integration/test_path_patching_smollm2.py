"""Path patching on SmolLM2: the IOI name-mover sweep (Wang et al. 2022, section 3.1) on real weights."""

from __future__ import annotations

import pytest
import torch

from mechscope.interventions import metrics
from mechscope.interventions.path_patching import path_patch, path_patch_sweep
from mechscope.models import edits

pytestmark = pytest.mark.slow
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Alice and Bob went to the store, Charlie gave a drink to"  # ABC: tokens align


@torch.no_grad()
def test_ioi_name_mover_sweep(smollm2):
    m = smollm2
    metric = metrics.logit_diff(m.to_single_token(" Mary"), m.to_single_token(" John"))
    result = path_patch_sweep(m, CLEAN, CORRUPT, metric, "logits")
    assert result.values.shape == (30, 9) and not result.values.isnan().any()
    assert result.clean > 4 and result.corrupted < 1  # the model does IOI; ABC removes the answer
    # Heads whose direct path to the logits carries the name (the paper's name movers) drop it.
    order = result.values.flatten().argsort()
    top = [divmod(int(i), 9) for i in order[:3]]
    assert result.values.min() < result.clean - 1.0

    # The batched sweep equals single path_patch calls and two plain hooked forwards.
    for layer, head in top[:2]:
        single = path_patch(m, CLEAN, CORRUPT, metric, [(layer, head)])
        assert single.value == pytest.approx(float(result.values[layer, head]), abs=2e-3)
    layer, head = top[0]
    z = [f"blocks.{i}.attn.hook_z" for i in range(30)]
    _, base = m.run_with_cache(CLEAN, z)
    _, src = m.run_with_cache(CORRUPT, z)
    frozen = {n: edits.replace(base[n]) for n in z}
    patched = base[z[layer]].clone()
    patched[:, :, head] = src[z[layer]][:, :, head]
    frozen[z[layer]] = edits.replace(patched)
    with m.hooks(frozen):
        final = m.run_with_cache(CLEAN, ["blocks.29.hook_resid_post"])[1]["blocks.29.hook_resid_post"]
    with m.hooks({"blocks.29.hook_resid_post": edits.replace(final)}):
        assert float(metric(m(CLEAN))) == pytest.approx(float(result.values[layer, head]), abs=2e-3)
