"""What a feature does downstream, read from the weights: logit effects and nearest features.

**Logit effects.** A feature adds its direction ``d`` (see
:mod:`mechscope.features.sources`) to the residual stream; its *direct* effect on the logits is
``d`` read through the final norm and the unembedding. The final norm is not linear, so this uses
its linear approximation, as TransformerLens (``fold_ln``) and Neuronpedia do::

    u      = d / ||d||                    # unit direction (effects comparable across features)
    u      = u - mean(u)                  # LayerNorm only: the norm's centring is linear
    effect = (u * w_final) @ W_U          # w_final: the norm's elementwise weight (Gemma: 1 + w)

The norm's division by the residual's scale is a positive factor shared by every token, so it
changes no ranking and is left out; ``b_U`` and the norm's bias do not depend on the feature and
are left out too, as is Gemma 2's final logit soft-capping (monotone, so rankings are unchanged).
The top ``n`` entries are the promoted tokens, the bottom ``n`` the suppressed ones. Computed in
row chunks, so memory stays at ``chunk_elems`` floats whatever ``d_sae x d_vocab`` is.

**Neighbours.** The features whose decoder directions (in the space they write to, before any
map into the residual stream) have the highest cosine similarity, the feature itself excluded;
also in row chunks of ``[chunk, n_features]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.models.hooked import HookedModel

CHUNK_ELEMS = 1 << 24
"""Floats per chunk of the ``[rows d_vocab]`` or ``[rows n_features]`` products (64 MiB)."""


class LogitEffects(NamedTuple):
    """The ``n`` most promoted and most suppressed tokens per feature, strongest first."""

    promoted_values: Float[Tensor, "n_features n"]
    promoted_tokens: Int[Tensor, "n_features n"]
    suppressed_values: Float[Tensor, "n_features n"]
    """Most negative first."""
    suppressed_tokens: Int[Tensor, "n_features n"]


class Neighbours(NamedTuple):
    """The ``n`` nearest features per feature by decoder cosine, nearest first."""

    cosine: Float[Tensor, "n_features n"]
    ids: Int[Tensor, "n_features n"]


@torch.no_grad()
def effective_unembed(model: HookedModel) -> Float[Tensor, "d_model d_vocab"]:
    """``w_final[:, None] * W_U``: the unembedding as seen from the residual stream (module docstring)."""
    w = model.weights
    return w.ln_final_w.detach().float()[:, None] * w.W_U.detach().float()


def _unit(d: Tensor, centre: bool) -> Tensor:
    u = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return u - u.mean(-1, keepdim=True) if centre else u


@torch.no_grad()
def logit_effects(
    model: HookedModel,
    directions: Float[Tensor, "n_features d_model"],
    n: int = 10,
    *,
    chunk_elems: int = CHUNK_ELEMS,
) -> LogitEffects:
    """Each direction's direct effect on the logits (module docstring), top and bottom ``n`` tokens.

    Args:
        model: supplies ``W_U``, the final norm's weight, and whether that norm centres (LayerNorm).
        directions: residual-stream directions, e.g. ``FeatureSource.residual_directions(model)``.
        n: tokens per side (at most ``d_vocab``).
    """
    W = effective_unembed(model)  # [d_model d_vocab] on the model's device
    if directions.shape[1] != W.shape[0]:
        raise ValueError(f"directions are {directions.shape[1]} wide but the residual stream is {W.shape[0]}")
    n = min(n, W.shape[1])
    centre = model.cfg.norm == "layernorm"
    rows = max(1, chunk_elems // W.shape[1])
    parts: list[tuple[Tensor, ...]] = []
    for s in range(0, directions.shape[0], rows):
        u = _unit(directions[s : s + rows].to(W.device, torch.float32), centre)
        logits = u @ W  # [rows d_vocab]
        hi, lo = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        parts.append((hi.values, hi.indices, lo.values, lo.indices))
    cat = [torch.cat([p[i] for p in parts]).cpu() for i in range(4)]
    return LogitEffects(cat[0], cat[1], cat[2], cat[3])


@torch.no_grad()
def nearest_neighbours(
    directions: Float[Tensor, "n_features d"], n: int = 10, *, chunk_elems: int = CHUNK_ELEMS
) -> Neighbours:
    """The ``n`` features with the most similar direction (cosine), excluding the feature itself."""
    F = directions.shape[0]
    n = min(n, F - 1)
    u = _unit(directions.float(), centre=False)
    rows = max(1, chunk_elems // F)
    cos, ids = [], []
    for s in range(0, F, rows):
        sims = u[s : s + rows] @ u.T  # [rows F]
        r = torch.arange(sims.shape[0], device=sims.device)
        sims[r, s + r] = float("-inf")
        top = sims.topk(n, dim=1)
        cos.append(top.values)
        ids.append(top.indices)
    empty = torch.zeros(F, 0)
    return Neighbours(torch.cat(cos).cpu() if cos else empty, torch.cat(ids).cpu() if ids else empty.long())
