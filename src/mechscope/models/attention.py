"""The exact eager attention path that exposes q, k, v, scores and pattern.

HF attention modules dispatch their core (softmax(q k^T) v) through ``ALL_ATTENTION_FUNCTIONS``
keyed by ``config._attn_implementation``. mechscope registers one more entry, ``"mechscope"``, with
HF's eager mask builder, and switches a model to it only while a point inside attention is hooked.
Otherwise the model keeps its fast kernel (SDPA), untouched.

The inputs HF passes here are already rotated (rotary) and normalised (q/k norms), and k/v include
the KV cache, so ``hook_q``/``hook_k`` are the vectors whose dot products are the scores (what
TransformerLens calls ``hook_rot_q``/``hook_rot_k`` in rotary models). For grouped-query attention
k and v are reported per *query* head (``[batch pos n_heads d_head]``), so each query head's keys
and values can be read or edited on their own.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mechscope.models.hook_points import HookPoint

IMPLEMENTATION = "mechscope"


@dataclass(frozen=True)
class AttentionPoints:
    q: HookPoint
    k: HookPoint
    v: HookPoint
    scores: HookPoint
    pattern: HookPoint


# attention module -> its points; weak so that dropping a model frees everything.
_POINTS: weakref.WeakKeyDictionary[nn.Module, AttentionPoints] = weakref.WeakKeyDictionary()


def bind(module: nn.Module, points: AttentionPoints) -> None:
    """Route ``module``'s eager attention through ``points``."""
    _POINTS[module] = points


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``[batch n_kv_heads pos d_head]`` -> one copy per query head ``[batch n_heads pos d_head]``."""
    if n_rep == 1:
        return x
    b, h, p, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, p, d).reshape(b, h * n_rep, p, d)


def _run(point: HookPoint | None, x: Tensor, tl_layout: bool) -> Tensor:
    """Run a point's hooks; q/k/v are shown in TL layout ``[batch pos n_heads d_head]``."""
    if point is None or not point.active:
        return x
    if not tl_layout:
        return point.run(x)
    view = x.transpose(1, 2)
    out = point.run(view)
    return x if out is view else out.transpose(1, 2)


def mechscope_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Eager attention with hook points; same signature and results as HF's eager functions.

    Computed in HF's ``[batch heads pos d_head]`` layout with plain matmuls (as HF's eager path);
    the hooks see TransformerLens layouts.
    """
    points = _POINTS.get(module)
    n_rep = query.shape[1] // key.shape[1]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)  # [batch n_heads k_pos d_head]
    q = query
    if points is not None:
        q, k, v = _run(points.q, q, True), _run(points.k, k, True), _run(points.v, v, True)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling  # [batch n_heads q_pos k_pos]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : k.shape[2]]
    if points is not None:
        scores = _run(points.scores, scores, False)
    pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if points is not None:
        pattern = _run(points.pattern, pattern, False)
    weights = F.dropout(pattern, p=dropout, training=module.training)
    z = torch.matmul(weights, v).transpose(1, 2).contiguous()  # [batch q_pos n_heads d_head]
    return z, pattern


def register() -> None:
    """Make ``"mechscope"`` a valid HF attention implementation (idempotent; HF's own extension API)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(IMPLEMENTATION, mechscope_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)
