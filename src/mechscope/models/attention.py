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


# attention module -> its points. Weak, so dropping a model frees everything, which holds only while
# no value references its key: the points reach the model through nothing but an EagerSwitch.
_POINTS: weakref.WeakKeyDictionary[nn.Module, AttentionPoints] = weakref.WeakKeyDictionary()


def bind(module: nn.Module, points: AttentionPoints) -> None:
    """Route ``module``'s eager attention through ``points``."""
    _POINTS[module] = points


class EagerSwitch:
    """Counts the hooked points inside a model's attention; runs this eager path while any is.

    Holds the model's config only (never a module), so that :data:`_POINTS` stays weak.
    """

    def __init__(self, config):
        self.config = config
        self.fast = config._attn_implementation  # the kernel to return to
        self.users = 0

    def __call__(self, delta: int) -> None:
        before, self.users = self.users, self.users + delta
        if (before > 0) != (self.users > 0):  # only a change of state touches the config
            self.config._attn_implementation = IMPLEMENTATION if self.users > 0 else self.fast


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

    Computed in HF's ``[batch heads pos d_head]`` layout; the hooks see TransformerLens layouts.
    The ``group`` query heads that share a KV head are stacked along positions, so one matmul per
    KV head does their work without copying k and v once per query head; scale, mask and softmax
    work in place where nothing else holds the scores. (HF's eager path copies and allocates at each
    step: on SmolLM2 at 8 x 128 its 30 layers take 215 ms against SDPA's 110 ms, these 143 ms.)
    Only a hook on k or v gets per-query-head copies, since it may edit one head's keys.
    """
    points = _POINTS.get(module)
    batch, n_heads, q_pos, d_head = query.shape
    if scaling is None:
        scaling = d_head**-0.5
    q, k, v = query, key, value
    if points is not None:
        q = _run(points.q, q, True)
        if points.k.active or points.v.active:
            n_rep = n_heads // k.shape[1]
            k, v = _run(points.k, _repeat_kv(k, n_rep), True), _run(points.v, _repeat_kv(v, n_rep), True)
    n_kv, k_pos = k.shape[1], k.shape[2]
    # bmm on 3-d tensors: torch.matmul's 4-d batching costs ~10 us a call, as much as the product at 1 x 32
    k3 = k.reshape(batch * n_kv, k_pos, d_head)
    stacked = q.reshape(batch * n_kv, -1, d_head)  # [(batch n_kv) (group q_pos) d_head]
    scores = torch.bmm(stacked, k3.transpose(1, 2)).view(batch, n_heads, q_pos, k_pos)
    scores.mul_(scaling)  # in place: the matmul's backward needs its inputs, not its output
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap  # out of place: tanh's backward needs its output
    if attention_mask is not None:
        scores.add_(attention_mask[:, :, :, :k_pos])
    scores_hooked = points is not None and points.scores.active
    if scores_hooked:
        scores = _run(points.scores, scores, False)
    if scores_hooked or scores.requires_grad or scores.dtype != torch.float32:
        pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:  # nothing else holds these scores: the pattern reuses their memory (one buffer less per layer)
        pattern = torch.softmax(scores, dim=-1, out=scores)
    if points is not None:
        pattern = _run(points.pattern, pattern, False)
    weights = F.dropout(pattern, p=dropout) if dropout and module.training else pattern
    stacked = weights.reshape(batch * n_kv, -1, k_pos)  # [(batch n_kv) (group q_pos) k_pos]
    z = torch.bmm(stacked, v.reshape(batch * n_kv, k_pos, d_head))  # [(batch n_kv) (group q_pos) d_head]
    z = z.view(batch, n_heads, q_pos, d_head).transpose(1, 2).contiguous()  # [batch q_pos n_heads d_head]
    return z, pattern


def register() -> None:
    """Make ``"mechscope"`` a valid HF attention implementation (idempotent; HF's own extension API)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(IMPLEMENTATION, mechscope_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)
