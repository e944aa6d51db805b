"""Factual prompts for causal tracing, in the style of ROME's ``known_1000.json`` (Meng et al. 2022, §2.1).

ROME averages its causal traces over 1,000 facts that GPT-2 XL completes correctly: a prompt that
names a subject and ends where the fact's object should come ("The Eiffel Tower is located in the
city of" -> " Paris"). ``data/known_facts.json`` holds 139 such facts — landmarks, capitals,
languages, companies, instruments, sports, occupations, authors — hand-written for mechscope
(well-known facts, phrased for small models; not copied from ROME's ``known_1000.json``, which is
GPT-2 XL's own selection). ``known_id`` numbers this file only; ``relation_id`` is the Wikidata
property, as in ROME's data. :func:`facts_known_by` keeps the ones a given model knows (the
answer's first token is its top-1 next token), as ROME kept only the facts its model got right:
tracing a fact the model does not know measures nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from mechscope.models import HookedModel
from mechscope.models.errors import MechscopeError


class KnownFactsError(MechscopeError, ValueError):
    """A known-facts file that cannot be read as facts (see ``docs/errors.md``)."""


@dataclass(frozen=True)
class KnownFact:
    """One factual prompt: ``prompt`` names ``subject``; the model should continue with ``answer``."""

    known_id: int
    relation_id: str
    """Wikidata property of the relation (ROME's ``relation_id``), e.g. ``P36`` capital."""
    prompt: str
    subject: str
    """A substring of ``prompt``: the tokens that causal tracing corrupts."""
    answer: str
    """The expected continuation, with its leading space (``" Paris"``); may span several tokens."""


def load_known_facts(path: str | Path | None = None) -> list[KnownFact]:
    """The facts in ``path`` (a JSON list of objects with :class:`KnownFact`'s fields), by default the
    package's ``data/known_facts.json``.

    Raises:
        KnownFactsError: the file is not a JSON list, an entry lacks a field or has an extra one,
            its subject is not in its prompt, or its answer is empty.
    """
    if path is None:
        text = resources.files("mechscope.interventions").joinpath("data/known_facts.json").read_text()
    else:
        text = Path(path).read_text()
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise KnownFactsError(f"the known facts are not JSON ({e}); give a JSON list of objects") from e
    if not isinstance(entries, list):
        raise KnownFactsError(f"the known facts must be a JSON list of objects, got {type(entries).__name__}")
    fields = "known_id, relation_id, prompt, subject, answer"
    facts = []
    for i, entry in enumerate(entries):
        try:
            fact = KnownFact(**entry)
        except TypeError as e:
            raise KnownFactsError(f"entry {i} of the known facts is malformed ({e}); give {fields}") from e
        if not fact.subject or fact.subject not in fact.prompt:
            raise KnownFactsError(f"entry {i}: subject {fact.subject!r} must occur in prompt {fact.prompt!r}")
        if not fact.answer.strip():
            raise KnownFactsError(f"entry {i}: the answer is empty; give the continuation, e.g. ' Paris'")
        facts.append(fact)
    return facts


@torch.no_grad()
def facts_known_by(model: HookedModel, facts: Sequence[KnownFact], batch_size: int = 64) -> list[KnownFact]:
    """The facts whose answer's first token is ``model``'s top-1 next token after the prompt.

    Prompts run in left-padded batches (positions follow the mask, so a padded row equals its
    unpadded run up to float rounding).
    """
    kept = []
    for i in range(0, len(facts), batch_size):
        part = list(facts[i : i + batch_size])
        logits = model([f.prompt for f in part], padding_side="left", logits_to_keep=1)
        top = logits[:, -1].argmax(-1).tolist()
        for fact, t in zip(part, top, strict=True):
            if model.tokenizer.encode(fact.answer, add_special_tokens=False)[0] == t:
                kept.append(fact)
    return kept
