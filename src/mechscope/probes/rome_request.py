"""What a ROME edit is asked to do, and where its subject's tokens are (see :mod:`mechscope.probes.rome`)."""

from __future__ import annotations

from dataclasses import dataclass

from mechscope.models import HookedModel
from mechscope.models.errors import MechscopeError
from mechscope.models.tokens import encode


class EditError(MechscopeError, ValueError):
    """An edit that cannot be made: subject not in the prompt, empty target, no MLP, bad layer."""


@dataclass(frozen=True)
class EditRequest:
    """A fact to write: ``template`` with one ``{}`` where ``subject`` goes, followed by ``target``."""

    template: str
    subject: str
    target: str

    @classmethod
    def make(cls, prompt: str, subject: str, target: str) -> EditRequest:
        """Check and normalise a request.

        ``prompt`` is a template with one ``{}`` (ROME's form, ``"{} is located in the city of"``) or
        the full prompt containing ``subject`` (its first occurrence becomes the ``{}``). As in
        ROME, a target starting with a letter or digit after a prompt with no trailing space gets a
        leading space (``"Rome"`` becomes ``" Rome"``).
        """
        if not subject:
            raise EditError(
                "the subject is empty; pass the words naming the subject, e.g. 'The Eiffel Tower'"
            )
        if "{}" in prompt:
            if prompt.count("{}") > 1:
                raise EditError(f"the prompt {prompt!r} has {prompt.count('{}')} '{{}}'; use exactly one")
            template = prompt
        elif subject in prompt:
            template = prompt.replace(subject, "{}", 1)
        else:
            raise EditError(
                f"the subject {subject!r} is not in the prompt {prompt!r}: write the prompt as a template "
                f"with {{}} where the subject goes ('{{}} is located in the city of') or pass a subject "
                "that appears in the prompt exactly (case and spaces included)"
            )
        if not target.strip():
            raise EditError(f"the target {target!r} is empty; pass the new object, e.g. ' Rome'")
        if target[0].isalnum() and not template.replace("{}", subject)[-1].isspace():
            target = " " + target  # ROME's rule: a word after a word needs its space
        return cls(template, subject, target)

    @property
    def prompt(self) -> str:
        return self.template.replace("{}", self.subject)

    @property
    def span(self) -> tuple[int, int]:
        """Characters ``[start, end)`` of the subject in :attr:`prompt`."""
        start = self.template.index("{}")
        return start, start + len(self.subject)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def subject_tokens(model: HookedModel, text: str, start: int, end: int) -> tuple[int, int]:
    """Token positions (first, last) of ``text[start:end]`` in ``model.to_tokens(text)``.

    Tokenising the text up to ``end`` gives the subject's last token, as in ROME's
    ``find_fact_lookup_idx``; where a token straddles the boundary (BPE merged the subject's end
    with what follows) that straddling token is the one.
    """
    bos = model.prepend_bos
    ids = encode(model.tokenizer, text, prepend_bos=bos)
    before = encode(model.tokenizer, text[:start], prepend_bos=bos)
    upto = encode(model.tokenizer, text[:end], prepend_bos=bos)
    first = _common_prefix(ids, before)
    n = _common_prefix(ids, upto)
    last = n - 1 if n == len(upto) else n
    if last < first or last >= len(ids):
        raise EditError(f"cannot find the tokens of {text[start:end]!r} in {text!r}")
    return first, last


def target_ids(model: HookedModel, target: str) -> list[int]:
    ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise EditError(f"the target {target!r} tokenizes to nothing; pass a word, e.g. ' Rome'")
    return ids


def mlp_out_path(model: HookedModel, layer: int) -> str:
    """The HF path of block ``layer``'s MLP output projection (the module ROME edits)."""
    return f"{model.adapter.layers}.{layer}.{model.adapter.mlp_out_proj}"


def check_layer(model: HookedModel, layer: int) -> None:
    if not model.cfg.has_mlp:
        raise EditError(f"{model.name or 'this model'} has no MLPs: ROME edits an MLP's output weights")
    if not 0 <= layer < model.cfg.n_layers:
        raise EditError(f"layer must be in [0, {model.cfg.n_layers}), got {layer}")
