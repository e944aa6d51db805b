"""Q-, K- and V-composition scores between every pair of heads in different layers.

Elhage et al. (2021), "A Mathematical Framework for Transformer Circuits", section "Virtual
attention heads": a later head composes with an earlier head's output through its queries, its
keys or its values. With row vectors, head ``a`` writes ``x W_OV^a`` (``W_OV = W_V W_O``) and head
``b`` reads its query with ``W_QK^b = W_Q W_K^T``, so the scores are

    Q: |W_OV^a W_QK^b|_F / (|W_OV^a|_F |W_QK^b|_F)      K: same with (W_QK^b)^T      V: with W_OV^b

Weights are norm-folded (:func:`mechscope.models.weights.fold_norms`) and, in LayerNorm models,
centred along ``d_model`` (TransformerLens' ``fold_ln`` + ``center_writing_weights``): a LayerNorm
removes the residual's mean before any head reads it, so the part of a write or a read along the
all-ones direction composes with nothing and must not count. All matrices are rank
``d_head``, so each score is computed from ``d_head x d_head`` Gram matrices:
``|A M B|_F^2 = tr(A^T A M B B^T M^T)`` with ``M`` the inner product of the factors, batched
over every pair of heads of two layers. The baseline is the same score for random Gaussian
factors of the same shapes (the paper subtracts it), estimated by sampling.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.models import HookedModel
from mechscope.models.weights import fold_norms

MODES = ("Q", "K", "V")


class CompositionScores(NamedTuple):
    """Scores for every (earlier head, later head) pair; ``nan`` where the later head is not later."""

    scores: Float[Tensor, "mode n_layers n_heads n_layers n_heads"]
    """Indexed ``[mode, layer_a, head_a, layer_b, head_b]`` with modes in :data:`MODES` order."""
    baseline: Float[Tensor, " mode"]
    """Mean score of random factors with the same shapes, per mode."""

    def top(self, mode: str, k: int = 10) -> list[tuple[str, str, float]]:
        """The ``k`` highest pairs of ``mode`` above baseline: ``("L0H3", "L1H5", score - baseline)``."""
        i = MODES.index(mode)
        s = (self.scores[i] - self.baseline[i]).nan_to_num(float("-inf"))
        # only real (earlier, later) pairs: a one-layer model has none
        best = s.flatten().topk(min(k, int(self.scores[i].isfinite().sum()))).indices
        out = []
        for flat in best.tolist():
            la, ha, lb, hb = torch.unravel_index(torch.tensor(flat), s.shape)
            out.append((f"L{la}H{ha}", f"L{lb}H{hb}", float(s[la, ha, lb, hb])))
        return out


def _gram_scores(A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor) -> Tensor:
    """``|A1 B1 A2 B2|_F / (|A1 B1|_F |A2 B2|_F)`` for every pair of heads: inputs ``[heads, .., ..]``."""
    G_a1, G_b1 = A1.mT @ A1, B1 @ B1.mT  # [h k k]
    G_a2, G_b2 = A2.mT @ A2, B2 @ B2.mT
    M = torch.einsum("akm,bmj->abkj", B1, A2)  # [h_a h_b k k]: the inner product of the chain
    # |A1 M B2|^2 = tr(G_a1 M G_b2 M^T)
    num = torch.einsum("aik,abkj,bjl,abil->ab", G_a1, M, G_b2, M).clamp(min=0).sqrt()
    n1 = torch.einsum("aik,aki->a", G_a1, G_b1).clamp(min=0).sqrt()
    n2 = torch.einsum("bik,bki->b", G_a2, G_b2).clamp(min=0).sqrt()
    return num / (n1[:, None] * n2[None, :])


def _factors(blocks, layer: int, center: bool) -> dict[str, tuple[Tensor, Tensor]]:
    w = blocks[layer]
    # [h d_model d_head]: centre along d_model (what a LayerNorm cannot see); W_O's d_model is last.
    c = (lambda W, dim: W - W.mean(dim, keepdim=True)) if center else (lambda W, dim: W)  # noqa: E731
    W_Q, W_K, W_V = (c(W, -2) for W in (w.W_Q, w.W_K, w.W_V))
    return {
        "OV": (W_V, c(w.W_O, -1)),  # [h d_model d_head], [h d_head d_model]
        "QK": (W_Q, W_K.mT),
        "QK^T": (W_K, W_Q.mT),
    }


@torch.no_grad()
def composition_scores(model: HookedModel, *, baseline_samples: int = 32, seed: int = 0) -> CompositionScores:
    """Q/K/V composition of every head with every head in a later layer (norm-folded weights)."""
    c = model.cfg
    blocks = fold_norms(model.weights).blocks
    factors = [_factors(blocks, layer, c.norm == "layernorm") for layer in range(c.n_layers)]
    scores = torch.full((3, c.n_layers, c.n_heads, c.n_layers, c.n_heads), float("nan"))
    for la in range(c.n_layers):
        ov_a = factors[la]["OV"]
        for lb in range(la + 1, c.n_layers):
            reads = {"Q": factors[lb]["QK"], "K": factors[lb]["QK^T"], "V": factors[lb]["OV"]}
            for i, mode in enumerate(MODES):
                scores[i, la, :, lb, :] = _gram_scores(*ov_a, *reads[mode]).float()
    return CompositionScores(scores, _baseline(c.d_model, c.d_head, baseline_samples, seed))


def _baseline(d_model: int, d_head: int, samples: int, seed: int) -> Tensor:
    """Composition score of random Gaussian rank-``d_head`` factors; the same for every mode."""
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(samples, *shape, generator=g) for shape in [(d_model, d_head), (d_head, d_model)] * 2]
    value = _gram_scores(*mats).diagonal().mean()
    return value.repeat(3)
