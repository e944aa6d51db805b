"""Metrics for interventions: functions of the logits that return one value per batch row.

Per-row values let a sweep put many patched variants on the batch axis and score them all from
one forward. Build a metric with one of the factories below, or pass any callable
``logits [batch pos d_vocab] -> [batch]``. A metric with an attribute ``reads_last = n > 0`` reads
only the last ``n`` positions, so sweeps unembed only those (the factories set it for negative ``pos``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

Metric = Callable[[Tensor], Tensor]


def _ids(tokens: Int[Tensor, " batch"] | int | list[int], like: Tensor) -> Tensor:
    return torch.as_tensor(tokens, device=like.device).reshape(-1)


def _rows(values: Tensor, batch: int) -> Tensor:
    """Broadcast per-prompt targets over the variant rows of a sweep (rows = variants x prompts)."""
    return values.repeat(batch // values.numel()) if batch % values.numel() == 0 else values


def _reads(metric: Metric, pos: int) -> Metric:
    metric.reads_last = -pos if pos < 0 else 0
    return metric


def logit_diff(correct, incorrect, pos: int = -1) -> Metric:
    """``logit[correct] - logit[incorrect]`` at ``pos`` (token ids, one per prompt or shared)."""

    def metric(logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        last = logits[:, pos]
        rows = torch.arange(last.shape[0], device=last.device)
        c = _rows(_ids(correct, last), last.shape[0])
        w = _rows(_ids(incorrect, last), last.shape[0])
        return last[rows, c] - last[rows, w]

    return _reads(metric, pos)


def log_prob(token, pos: int = -1) -> Metric:
    """Log-probability of ``token`` at ``pos``."""

    def metric(logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        lp = logits[:, pos].float().log_softmax(-1)
        return lp[torch.arange(lp.shape[0]), _rows(_ids(token, lp), lp.shape[0])]

    return _reads(metric, pos)


def prob(token, pos: int = -1) -> Metric:
    """Probability of ``token`` at ``pos``."""
    lp = log_prob(token, pos)

    def metric(logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        return lp(logits).exp()

    return _reads(metric, pos)


def kl_to(reference_logits: Float[Tensor, "batch pos d_vocab"], pos: int = -1) -> Metric:
    """``KL(reference || patched)`` of the next-token distributions at ``pos``."""
    ref = reference_logits[:, pos].float().log_softmax(-1)

    def metric(logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        lp = logits[:, pos].float().log_softmax(-1)
        r = ref.repeat(lp.shape[0] // ref.shape[0], 1)
        return F.kl_div(lp, r, log_target=True, reduction="none").sum(-1)

    return _reads(metric, pos)


def next_token_loss(tokens: Int[Tensor, "batch pos"]) -> Metric:
    """Mean next-token cross-entropy over the sequence."""

    def metric(logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        t = tokens.repeat(logits.shape[0] // tokens.shape[0], 1)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), t[:, 1:].flatten(), reduction="none")
        return loss.view(logits.shape[0], -1).mean(-1)

    return metric


def normalise(value: Tensor, clean: Tensor | float, corrupted: Tensor | float) -> Tensor:
    """``(value - corrupted) / (clean - corrupted)``: 1 = fully restored, 0 = no effect."""
    return (value - corrupted) / (clean - corrupted)
