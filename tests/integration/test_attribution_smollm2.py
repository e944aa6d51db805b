"""Attribution patching and edge attribution on SmolLM2-135M, the IOI prompt pair."""

from __future__ import annotations

import pytest
import torch

from mechscope.interventions import metrics
from mechscope.interventions.attribution import attribution_patch_all, compare
from mechscope.interventions.circuit import Circuit, circuit_metrics, edge_attribution, faithfulness, prune
from mechscope.interventions.patching import patch_sweep

pytestmark = pytest.mark.slow
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def _metric(model):
    return metrics.logit_diff(model.to_single_token(" Mary"), model.to_single_token(" John"))


def test_ioi_prompts_align_and_the_model_prefers_the_indirect_object(smollm2):
    a, b = smollm2.to_str_tokens(CLEAN), smollm2.to_str_tokens(CORRUPT)
    assert len(a) == len(b) == 14 and [i for i in range(14) if a[i] != b[i]] == [9]
    assert float(_metric(smollm2)(smollm2(CLEAN))) > 5 > -5 > float(_metric(smollm2)(smollm2(CORRUPT)))


def test_attribution_tracks_real_patching(smollm2):
    # Measured on CPU: r = 0.854 (resid_pre: large, saturating patches at the changed name) and
    # r = 0.980 (z per head).
    metric = _metric(smollm2)
    forwards = []
    with smollm2.hooks({"hook_embed": lambda x, hook: forwards.append(1)}):
        attr = attribution_patch_all(smollm2, CLEAN, CORRUPT, metric, ["resid_pre", "z"])
    assert len(forwards) == 2
    for point, floor in (("resid_pre", 0.8), ("z", 0.95)):
        c = compare(attr[point], patch_sweep(smollm2, CLEAN, CORRUPT, metric, point))
        assert c.correlation > floor, (point, c.correlation)


def test_edge_attribution_finds_a_faithful_circuit(smollm2):
    metric = _metric(smollm2)
    scores = edge_attribution(smollm2, CLEAN, CORRUPT, metric)
    g = scores.graph
    assert len(scores) == 123211 and scores.clean == pytest.approx(float(metric(smollm2(CLEAN))), abs=1e-3)
    full, empty = (
        Circuit(g, g.valid.clone(), scores.scores),
        Circuit(g, torch.zeros_like(g.valid), scores.scores),
    )
    small, large = prune(scores, 300), prune(scores, 3000)
    m = circuit_metrics(smollm2, [full, empty, small, large], CLEAN, CORRUPT, metric, "corrupted")
    plain = torch.tensor([float(metric(smollm2(CLEAN))), float(metric(smollm2(CORRUPT)))])
    torch.testing.assert_close(m[:2], plain, atol=2e-3, rtol=1e-4)
    # Measured: 0.48 with 300 edges, 0.77 with 1000, 0.89 with 3000 (corrupted-run ablation).
    f_small, f_large = ((m[i] - m[1]) / (m[0] - m[1]) for i in (2, 3))
    assert 0.3 < f_small < f_large and f_large > 0.8
    assert faithfulness(smollm2, large, CLEAN, CORRUPT, metric, "corrupted") == pytest.approx(
        float(f_large), abs=1e-4
    )
