"""ROME on SmolLM2: "The Eiffel Tower is located in the city of" -> " Rome", then an exact undo.

A shortened run (fewer prefixes, steps and covariance tokens than the defaults) so the test stays
short; ``scripts/rome_smollm2.py`` runs the defaults on several facts (``docs/rome.md``).
"""

from __future__ import annotations

import pytest
import torch

from mechscope.data.corpus import pydoc_corpus
from mechscope.interventions.causal_trace import subject_positions
from mechscope.probes.rome import RomeConfig, rome
from mechscope.probes.rome_eval import evaluate_edit
from mechscope.probes.rome_request import subject_tokens

pytestmark = pytest.mark.slow
PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


def test_eiffel_tower_moves_to_rome_and_undo_is_exact(smollm2, tmp_path):
    m = smollm2
    first, last = subject_tokens(m, PROMPT, 0, len(SUBJECT))  # BPE: " E", "iffel", " Tower"
    assert list(range(first, last + 1)) == subject_positions(m, PROMPT, SUBJECT)
    cfg = RomeConfig(trace_samples=3, prefixes_per_length=3, steps=10, cov_tokens=3000)
    edit = rome(m, PROMPT, SUBJECT, " Rome", cfg, corpus=pydoc_corpus(), cache_dir=tmp_path)
    assert edit.trace is not None and edit.layer == int(edit.trace.effect.argmax())
    assert edit.trace.answer == " Paris" and edit.trace.clean > 0.5

    logits = m(PROMPT)
    down = m.module(f"model.layers.{edit.layer}.mlp.down_proj")
    weight = down.weight.detach().clone()
    with edit, torch.no_grad():  # the edited HF down_proj itself maps k* to v*
        torch.testing.assert_close(down(edit.value.key), edit.value.value, atol=1e-3, rtol=1e-3)
    ev = evaluate_edit(
        edit,
        paraphrases=["Where is the Eiffel Tower? It is in the city of"],
        neighbours=["The Louvre is located in the city of"],
        max_new_tokens=4,
    )
    assert ev.efficacy.old == " Paris" and ev.efficacy.p_old_before > 0.5
    assert ev.efficacy.top_after == " Rome" and ev.efficacy.p_new_after > 0.5
    assert ev.efficacy.success and ev.paraphrases[0].success
    assert ev.neighbours[0].kept  # the Louvre stays in Paris
    assert " Rome" in ev.generations[0][2]
    # evaluate_edit applied and undid the edit: the model is bit for bit what it was.
    assert not edit.applied
    assert torch.equal(down.weight, weight)
    assert torch.equal(m(PROMPT), logits)
