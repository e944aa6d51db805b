"""Known facts: the packaged set is well formed; facts_known_by keeps exactly the unpadded top-1 matches."""

from __future__ import annotations

import json
import re

import pytest
import torch

import mechscope as ms
from mechscope.interventions.known_facts import KnownFactsError, facts_known_by, load_known_facts


def test_packaged_facts_are_well_formed():
    facts = load_known_facts()
    assert len(facts) == 139
    assert len({f.known_id for f in facts}) == len(facts)
    assert len({f.prompt for f in facts}) == len(facts)
    for f in facts:
        assert f.subject in f.prompt and re.fullmatch(r"P\d+", f.relation_id)
        # The answer continues the prompt: a leading space, and the prompt does not end with one.
        assert f.answer.startswith(" ") and f.answer.strip() and not f.prompt.endswith(" ")


def test_facts_known_by_keeps_the_facts_whose_first_answer_token_is_the_top_1(tmp_path):
    model = ms.load_model("tiny-llama")
    entries = []
    for n in range(200):
        prompt = f"fact {n} is" + " x" * (n % 5)  # lengths differ, so the batch is padded
        # Independent of the batched, left-padded run: one unpadded forward of the plain HF model.
        ids = torch.tensor([model.tokenizer.encode(prompt, add_special_tokens=False)])
        top = model.hf_model(ids).logits[0, -1].topk(2).indices.tolist()
        # The random model's choices are bytes; keep prompts whose two best are printable ASCII, so
        # that an answer string starting with that character encodes back to that token.
        if not all(32 <= t <= 126 for t in top):
            continue
        i = len(entries)
        # Even entries: the model's top-1 character, then more text; odd: its second choice.
        answer = model.tokenizer.decode([top[i % 2]]) + "zz"
        entries.append(
            {"known_id": i, "relation_id": "P1", "prompt": prompt, "subject": "fact", "answer": answer}
        )
        if len(entries) == 6:
            break
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(entries))
    facts = load_known_facts(path)
    kept = facts_known_by(model, facts, batch_size=4)  # a padded batch, then a smaller one
    assert [f.known_id for f in kept] == [0, 2, 4]


@pytest.mark.parametrize(
    "content,match",
    [
        ("{}", "JSON list"),
        ("not json", "not JSON"),
        ('[{"known_id": 0, "prompt": "a b", "subject": "a", "answer": " c"}]', "malformed"),
        (
            '[{"known_id": 0, "relation_id": "P1", "prompt": "a b", "subject": "q", "answer": " c"}]',
            "must occur",
        ),
        ('[{"known_id": 0, "relation_id": "P1", "prompt": "a b", "subject": "a", "answer": " "}]', "empty"),
    ],
)
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "facts.json"
    path.write_text(content)
    with pytest.raises(KnownFactsError, match=match):
        load_known_facts(path)
    assert issubclass(KnownFactsError, (ms.MechscopeError, ValueError))
