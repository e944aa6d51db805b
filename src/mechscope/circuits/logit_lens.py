"""The logit lens (nostalgebraist 2020): decode the residual stream after every block as if it were the last.

Each accumulated residual goes through the model's real final norm and unembedding (and Gemma's
final soft-cap), so the last row is exactly the model's own next-token distribution and earlier
rows show how the prediction forms layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.models import HookedModel


@dataclass(frozen=True)
class LogitLens:
    """Logit-lens readout of one prompt at one position."""

    labels: list[str]
    """One per residual stage: ``0_pre`` (the embeddings) ... ``final_post``."""
    str_tokens: list[str]
    """The prompt's tokens."""
    pos: int
    """The position read (negative counts from the end)."""
    logits: Float[Tensor, "component d_vocab"]
    token_strings: list[str]
    """Decoded vocabulary entries (for display)."""

    @property
    def probs(self) -> Float[Tensor, "component d_vocab"]:
        return self.logits.float().softmax(-1)

    def top_tokens(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per stage, the ``k`` most likely next tokens with their probabilities."""
        top = self.probs.topk(k, dim=-1)
        return [
            [(self.token_strings[i], p) for i, p in zip(idx, ps, strict=True)]
            for idx, ps in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]

    @property
    def prediction(self) -> list[tuple[str, float]]:
        """The model's own top-5 (the final stage)."""
        return self.top_tokens(5)[-1]

    def to_records(self, k: int = 5) -> list[dict]:
        """Tidy rows ``stage, rank, token, token_id, prob, logit`` for JSON and data frames."""
        top = self.probs.topk(k, dim=-1)
        rows = []
        for stage, (idx, ps) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True)):
            for rank, (i, p) in enumerate(zip(idx, ps, strict=True)):
                rows.append(
                    dict(
                        stage=self.labels[stage],
                        rank=rank + 1,
                        token=self.token_strings[i],
                        token_id=i,
                        prob=p,
                        logit=float(self.logits[stage, i]),
                    )
                )
        return rows

    def _repr_html_(self) -> str:
        from mechscope.viz.lens import render_logit_lens_html

        return render_logit_lens_html(self)


@torch.no_grad()
def logit_lens(model: HookedModel, prompt: str, *, pos: int = -1) -> LogitLens:
    """Run ``prompt`` and decode every stage of the residual stream at ``pos``."""
    _, cache = model.run_with_cache(prompt, lambda n: n.endswith(("hook_resid_pre", "hook_resid_post")))
    stack, labels = cache.accumulated_resid(apply_ln=True, pos_slice=pos, return_labels=True)
    logits = model.module(model.adapter.unembed)(stack[:, 0])  # [component d_vocab]
    if model.cfg.final_logit_softcap:
        cap = model.cfg.final_logit_softcap
        logits = torch.tanh(logits / cap) * cap
    vocab = [model.tokenizer.decode([i]) for i in range(logits.shape[-1])]
    return LogitLens(labels, model.to_str_tokens(prompt), pos, logits, vocab)
