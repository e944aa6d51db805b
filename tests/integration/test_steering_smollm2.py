"""ActAdd "Love" - "Hate" on SmolLM2 (docs/steering.md records the full sweep and generations).

What the tests pin down, from runs on this model: at layer 6 with coefficient 10 the greedy
continuation of "I hate you because" turns to love (the unsteered one does not mention it), and over
a small sweep the concept words gain probability while a random direction of the same norm makes
them *less* likely and costs more KL on neutral text.
"""

from __future__ import annotations

import pytest

from mechscope.steering import actadd, generate
from mechscope.steering.evaluate import NEUTRAL_TEXTS, SweepConfig, sweep

pytestmark = pytest.mark.slow
PROMPT = "I hate you because"
WORDS = [" love", " loved", " loving", " lovely", " beautiful", " wonderful", " Love"]
PROMPTS = [
    "I hate you because",
    "My opinion of him is that",
    "Yesterday I told my brother that I",
    "The movie was",
]


def test_love_minus_hate_steers_the_greedy_continuation(smollm2):
    v = actadd(smollm2, "Love", "Hate", 6, coeff=10.0)
    assert [smollm2.to_str_tokens(t) for t in ("Love", "Hate")] == [["Love"], ["H", "ate"]]  # padded: 2 rows
    g = generate(smollm2, PROMPT, v, max_new_tokens=20)
    assert "love" in g.steered[len(PROMPT) :].lower()
    assert "love" not in g.unsteered[len(PROMPT) :].lower()


def test_love_minus_hate_beats_a_random_direction_of_the_same_norm(smollm2):
    v = actadd(smollm2, "Love", "Hate", 6)
    cfg = SweepConfig(coeffs=(5.0, 10.0), random_draws=2, neutral=NEUTRAL_TEXTS[:4])
    r = sweep(smollm2, [v], PROMPTS, WORDS, cfg=cfg)
    assert (r.effect > 1.0).all(), r.rows()  # concept words e^1 times likelier or more
    assert (r.random_effect < 0).all(), r.rows()
    assert (r.kl < r.random_kl).all(), r.rows()
