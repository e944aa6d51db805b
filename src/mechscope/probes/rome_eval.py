"""How well a ROME edit worked: efficacy, generalisation, specificity (ROME §3.3, CounterFact).

Every prompt is scored before and after the edit by the mean log-probability per token of a
continuation (teacher forcing), as ROME's CounterFact evaluation does; probabilities are reported
as ``exp`` of that mean (for a one-token continuation, its probability).

* **Efficacy**: on the edit prompt, success is ``p(new) > p(old)`` after the edit (ROME's ES). The
  old object is the model's top prediction before the edit unless given.
* **Paraphrases** (ROME's PS): the same comparison on other wordings of the fact; a template with
  ``{}`` gets the subject filled in.
* **Specificity** (ROME's NS): prompts about *other* subjects sharing the relation ("The Colosseum
  is located in the city of") should keep their prediction: ``kept`` when their top token is
  unchanged, "prefer own" when their own answer still beats the new object (not counted for a
  neighbour whose answer *is* the new object), and the KL of their next-token distribution.
* **Generations**: greedy continuations before and after, to read, and their **fluency** (ROME's
  GE): the weighted n-gram entropy of :func:`ngram_entropy`, averaged over the generations. An
  edit that makes the model repeat itself lowers it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.models import HookedModel
from mechscope.models.tokens import encode
from mechscope.probes.rome import Edit
from mechscope.probes.rome_request import target_ids


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text: the mean over ``ns`` of ``weight x`` the entropy (bits) of its n-gram
    frequencies (``compute_n_gram_entropy`` in ROME's ``experiments/py/eval_utils_counterfact.py``).

    Words and punctuation marks are the tokens (a regex standing in for ``nltk.word_tokenize``). A
    text that repeats one phrase has few distinct n-grams and a low entropy; 0 for fewer than 3 words.
    """
    words = re.findall(r"\w+|[^\w\s]", text)
    out = []
    for n, w in zip(ns, weights, strict=True):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        out.append(w * -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0)
    return sum(out) / len(out)


@dataclass(frozen=True)
class PromptScore:
    """One prompt scored before and after the edit; ``new`` is the target, ``old`` the prompt's own answer."""

    prompt: str
    old: str
    p_new_before: float
    p_old_before: float
    p_new_after: float
    p_old_after: float
    top_before: str
    """Top next token before the edit."""
    top_after: str
    kl: float
    """KL(before ‖ after) of the next-token distribution."""

    @property
    def success(self) -> bool:
        """``p(new) > p(old)`` after the edit."""
        return self.p_new_after > self.p_old_after

    @property
    def kept(self) -> bool:
        """The top next token did not change."""
        return self.top_before == self.top_after

    def to_json(self) -> dict:
        return {**asdict(self), "success": self.success, "kept": self.kept}


@dataclass(frozen=True)
class EditEvaluation:
    """Scores of one edit (see the module docstring)."""

    target: str
    efficacy: PromptScore
    paraphrases: list[PromptScore]
    neighbours: list[PromptScore]
    generations: list[tuple[str, str, str]]
    """(prompt, before, after) greedy continuations."""

    def summary(self) -> dict[str, float | bool | None]:
        """ROME's headline numbers: efficacy success, paraphrase success rate, neighbourhood scores."""

        def rate(xs: list) -> float | None:  # a fraction of bools, or a mean of floats
            return sum(xs) / len(xs) if xs else None

        return {
            "efficacy_success": self.efficacy.success,
            "p_new": self.efficacy.p_new_after,
            "p_old": self.efficacy.p_old_after,
            "paraphrase_success": rate([p.success for p in self.paraphrases]),
            "neighbours_kept": rate([n.kept for n in self.neighbours]),
            # A neighbour whose own answer is the new object cannot tell (Colosseum -> " Rome").
            "neighbours_prefer_own": rate([not n.success for n in self.neighbours if n.old != self.target]),
            "neighbour_kl": rate([n.kl for n in self.neighbours]),
            "fluency_before": rate([ngram_entropy(b) for _, b, _ in self.generations]),
            "fluency_after": rate([ngram_entropy(a) for _, _, a in self.generations]),
        }

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "summary": self.summary(),
            "efficacy": self.efficacy.to_json(),
            "paraphrases": [p.to_json() for p in self.paraphrases],
            "neighbours": [n.to_json() for n in self.neighbours],
            "generations": [dict(prompt=p, before=b, after=a) for p, b, a in self.generations],
        }


@torch.no_grad()
def continuation_scores(
    model: HookedModel, prompts: Sequence[str], continuations: Sequence[Sequence[str]]
) -> tuple[Float[Tensor, "prompt cont"], Float[Tensor, "prompt d_vocab"]]:
    """Mean log-probability per token of each continuation after its prompt, and each prompt's
    next-token log-probabilities; one padded forward (ids joined, never re-tokenised).

    Every prompt must have the same number of continuations.
    """
    rows, where, first = [], [], []
    for prompt, conts in zip(prompts, continuations, strict=True):
        head = encode(model.tokenizer, prompt, prepend_bos=model.prepend_bos)
        first.append(len(rows))
        for c in conts:
            ids = target_ids(model, c)
            where.append((len(rows), len(head) - 1, ids))
            rows.append(head + ids)
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    logp = model(ids.to(model.device), attention_mask=mask.to(model.device)).float().log_softmax(-1).cpu()
    scores = torch.tensor([float(logp[r, p + torch.arange(len(t)), t].mean()) for r, p, t in where]).view(
        len(prompts), -1
    )
    nexts = torch.stack([logp[r, where[r][1]] for r in first])
    return scores, nexts


def _generate(model: HookedModel, prompts: list[str], max_new_tokens: int) -> list[str]:
    return [model.generate(p, max_new_tokens=max_new_tokens) for p in prompts] if prompts else []


def evaluate_edit(
    edit: Edit,
    *,
    paraphrases: Sequence[str] = (),
    neighbours: Sequence[str] = (),
    old: str | None = None,
    generation_prompts: Sequence[str] | None = None,
    max_new_tokens: int = 20,
) -> EditEvaluation:
    """Score ``edit`` on its prompt, ``paraphrases`` and ``neighbours`` before and after applying it.

    The edit is left as it was found (applied or not). ``old`` defaults to the model's top token on
    the edit prompt before the edit; each neighbour's own answer is its top token before the edit.
    Greedy generations start from ``generation_prompts`` (``{}`` takes the subject; default: the
    edit prompt, the first paraphrase and the first neighbour).
    """
    model, req = edit.model, edit.request
    was_applied = edit.applied
    if was_applied:
        edit.undo()
    para = [p.replace("{}", req.subject) for p in paraphrases]
    prompts = [req.prompt, *para, *neighbours]
    if generation_prompts is None:
        gen_prompts = [req.prompt, *para[:1], *list(neighbours)[:1]]
    else:
        gen_prompts = [p.replace("{}", req.subject) for p in generation_prompts]
    try:
        before_next = continuation_scores(model, prompts, [[req.target]] * len(prompts))[1]
        tops = [model.tokenizer.decode([int(t)]) for t in before_next.argmax(-1)]
        old = tops[0] if old is None else old
        answers = [old] * (1 + len(para)) + tops[1 + len(para) :]
        conts = [[req.target, a] for a in answers]
        before, before_next = continuation_scores(model, prompts, conts)
        gen_before = _generate(model, gen_prompts, max_new_tokens)
        with edit:
            after, after_next = continuation_scores(model, prompts, conts)
            gen_after = _generate(model, gen_prompts, max_new_tokens)
    finally:
        if was_applied:
            edit.apply()
    kl = (before_next.exp() * (before_next - after_next)).sum(-1)
    scores = [
        PromptScore(
            prompts[i],
            answers[i],
            float(before[i, 0].exp()),
            float(before[i, 1].exp()),
            float(after[i, 0].exp()),
            float(after[i, 1].exp()),
            model.tokenizer.decode([int(before_next[i].argmax())]),
            model.tokenizer.decode([int(after_next[i].argmax())]),
            float(kl[i]),
        )
        for i in range(len(prompts))
    ]
    return EditEvaluation(
        req.target,
        scores[0],
        scores[1 : 1 + len(para)],
        scores[1 + len(para) :],
        list(zip(gen_prompts, gen_before, gen_after, strict=True)),
    )
