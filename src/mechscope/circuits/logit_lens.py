"""The logit lens (nostalgebraist 2020): decode the residual stream after every block as if it were the last.

Each accumulated residual goes through the model's real final norm and unembedding module (and
Gemma 2's final soft-cap), so the last row is exactly the model's own next-token logits and the
earlier rows show how the prediction forms layer by layer. Going through the real modules, rather
than ``W_U`` and a re-implemented norm, is what makes that equality exact in every family.

Only the tokens that are shown get decoded: a full vocabulary (262k entries for Gemma 3) costs
seconds to decode and would make the result heavy to keep and print.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.models import HookedModel


@dataclass(frozen=True, eq=False)
class LogitLens:
    """Logit-lens readout of one prompt at one position; ``_repr_html_`` draws it in notebooks."""

    labels: list[str]
    """One per residual stage: ``0_pre`` (the embeddings) ... ``final_post`` (the model's output)."""
    str_tokens: list[str]
    """The prompt's tokens."""
    pos: int
    """The position read, as given (negative counts from the end)."""
    logits: Float[Tensor, "component d_vocab"]
    """Next-token logits decoded from each stage; the last row equals the model's logits."""
    top_k: int = 5
    """Default ``k`` of :meth:`top_tokens`, :attr:`prediction`, :meth:`to_records` and the HTML view."""
    decode: Callable[[int], str] = field(default=str, repr=False)
    """Token id -> its text (the model's tokenizer)."""

    @property
    def probs(self) -> Float[Tensor, "component d_vocab"]:
        """Softmax of :attr:`logits`, in float32."""
        return self.logits.float().softmax(-1)

    def _top(self, k: int | None) -> tuple[list[list[int]], list[list[float]]]:
        top = self.probs.topk(k or self.top_k, dim=-1)
        return top.indices.tolist(), top.values.tolist()

    def top_tokens(self, k: int | None = None) -> list[list[tuple[str, float]]]:
        """Per stage, the ``k`` (default :attr:`top_k`) most likely next tokens with their probabilities."""
        ids, probs = self._top(k)
        return [
            [(self.decode(i), p) for i, p in zip(row_ids, row_ps, strict=True)]
            for row_ids, row_ps in zip(ids, probs, strict=True)
        ]

    @property
    def prediction(self) -> list[tuple[str, float]]:
        """The model's own top-:attr:`top_k` next tokens (the final stage)."""
        return self.top_tokens()[-1]

    def to_records(self, k: int | None = None) -> list[dict]:
        """Tidy rows ``stage, rank, token, token_id, prob, logit`` (top ``k`` per stage) for JSON and data frames."""
        ids, probs = self._top(k)
        logits = self.logits.float().cpu()
        return [
            dict(
                stage=self.labels[stage],
                rank=rank + 1,
                token=self.decode(i),
                token_id=i,
                prob=p,
                logit=float(logits[stage, i]),
            )
            for stage, (row_ids, row_ps) in enumerate(zip(ids, probs, strict=True))
            for rank, (i, p) in enumerate(zip(row_ids, row_ps, strict=True))
        ]

    def _repr_html_(self) -> str:
        from mechscope.viz.lens import render_logit_lens_html

        return render_logit_lens_html(self)


@torch.no_grad()
def logit_lens(model: HookedModel, prompt: str, *, pos: int = -1, top_k: int = 5) -> LogitLens:
    """Run ``prompt`` and decode every stage of the residual stream at position ``pos``.

    Args:
        model: the model to read.
        prompt: the text (tokenized with the model's default BOS policy).
        pos: the token position whose next-token prediction is read; negative counts from the end.
        top_k: how many tokens per stage the result shows by default.

    Returns:
        A :class:`LogitLens` with one row of logits per residual stage.

    Raises:
        IndexError: ``pos`` is outside the prompt's tokens.
        ValueError: ``top_k`` is not between 1 and the vocabulary size.
    """
    if not 1 <= top_k <= model.cfg.d_vocab:
        raise ValueError(f"top_k must be between 1 and the vocabulary size {model.cfg.d_vocab}, got {top_k}")
    str_tokens = model.to_str_tokens(prompt)
    n = len(str_tokens)
    if not -n <= pos < n:
        raise IndexError(f"pos {pos} is outside the prompt's {n} tokens {str_tokens!r}; use -{n} .. {n - 1}")
    _, cache = model.run_with_cache(prompt, lambda name: name.endswith(("hook_resid_pre", "hook_resid_post")))
    stack, labels = cache.accumulated_resid(apply_ln=True, pos_slice=pos, return_labels=True)
    logits = model.module(model.adapter.unembed)(stack[:, 0])  # [component d_vocab]
    if cap := model.cfg.final_logit_softcap:
        logits = torch.tanh(logits / cap) * cap  # as HF applies it after the lm_head
    tokenizer = model.tokenizer
    return LogitLens(labels, str_tokens, pos, logits, top_k, lambda i: tokenizer.decode([i]))
