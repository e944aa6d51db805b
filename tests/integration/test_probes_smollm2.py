"""Probes, calendar geometry and CCS on the embedded SmolLM2-135M: the results docs/probes.md records.

A subset of layers keeps each test short; ``mechscope probe layers|calendar|ccs smollm2-135m`` runs
every layer.
"""

from __future__ import annotations

import pytest
import torch

from mechscope.probes import datasets
from mechscope.probes.activations import one_thread
from mechscope.probes.calendar import analyse_calendar
from mechscope.probes.ccs import CCSConfig, ccs_layers
from mechscope.probes.linear import probe_layers

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread():
    # Small-batch forwards on a shared 2-core runner: a second intra-op thread mostly spins (measured
    # 3.4 s with one thread vs 14 s with two for the calendar forwards under load).
    with one_thread():
        yield


# The forward stops after the deepest of these: layers past 16 add cost, not information (the full
# sweep in docs/probes.md shows nothing new after it).
LAYERS = [f"blocks.{i}.hook_resid_post" for i in (0, 4, 8, 12, 16)]


def test_sentiment_is_linearly_readable_at_the_full_stop(smollm2):
    data = datasets.sentiment()  # validation: held-out sentiment words and hand-written sentences
    result = probe_layers(smollm2, data.texts, data.labels, names=LAYERS, val_indices=data.val_indices)
    best = result.best()
    assert best.val_score >= 0.85, result.to_records()
    for p in result.probes.values():
        assert p.control_score <= 0.7  # permuted labels stay near chance at every layer
    assert best.selectivity >= 0.25
    # Layer 0 reads only its own token (".") and a little context: near chance on unseen words.
    assert result.probes[LAYERS[0]].val_score <= 0.7


def test_days_of_the_week_lie_on_an_ordered_circle(smollm2):
    r = analyse_calendar(smollm2, "days", LAYERS, n_permutations=200)
    for h, fit in r.circles.items():
        assert fit.in_order, h
        assert fit.circle_r2 > fit.chance_r2 + 0.1 and fit.p_value < 0.02, (h, fit.circle_r2, fit.chance_r2)
        assert fit.aspect > 0.8  # a circle, not a flattened ellipse
    # A probe fitted on six days places the seventh near its angle well above chance (1/7).
    assert max(r.angle_accuracy.values()) > 3 / 7


def test_ccs_finds_a_direction_planted_in_smollm2_and_logistic_reads_real_sentiment(smollm2):
    pairs = datasets.sentiment_pairs()
    n = len(pairs.pos)
    hook = "blocks.8.hook_resid_post"
    cfg = CCSConfig(n_restarts=5, epochs=500, lr=1e-2)
    real = ccs_layers(smollm2, pairs.pos, pairs.neg, pairs.labels, names=[hook], cfg=cfg)[hook]
    # The supervised upper bound reads sentiment from the answer token; CCS itself does not (recorded).
    assert real.lr_accuracy >= 0.9
    assert 0.5 <= real.accuracy <= 1.0
    # Planted: a consistent direction added at block 4 (true-"Yes" and false-"No" rows get +u).
    g = torch.Generator().manual_seed(0)
    u = torch.randn(smollm2.cfg.d_model, generator=g)
    u = u / u.norm()
    truth = torch.tensor(pairs.labels)
    sign = torch.cat([2 * truth - 1, 1 - 2 * truth]).float()
    rows = iter(sign.split(64))  # the rows of each batch of 64, in order

    def plant(x, hook):
        return x + 20.0 * next(rows)[:, None, None] * u

    with smollm2.hooks({"blocks.4.hook_attn_out": plant}):
        planted = ccs_layers(
            smollm2, pairs.pos, pairs.neg, pairs.labels, names=[hook], cfg=cfg, batch_size=64
        )
    assert planted[hook].accuracy > 0.95
    assert n == len(pairs.labels)
