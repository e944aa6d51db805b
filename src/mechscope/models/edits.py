"""Ready-made hook functions for the common edits: replace, add, scale, zero.

Each returns ``fn(activation, hook)`` for :meth:`HookedModel.hooks`. ``pos``, ``head`` and
``index`` select where the edit applies (an int, a list, a slice, or None for all); the layout
is read from the hook's name, so the same call works on any point:

* ``[batch pos ...]`` residual, MLP and per-head points (``hook_q/k/v/z``: head on axis 2);
* ``[batch head q_pos k_pos]`` for ``hook_pattern``/``hook_attn_scores`` (``pos`` = query position).

``index`` selects along the last axis (neurons of ``mlp.hook_post``, dimensions of the residual).
Edits return a new tensor and never write into the activation, so autograd and caches stay sound.
Selections combine as an outer product: ``pos=[2, 5], head=3`` edits head 3 at both positions.
During cached generation ``activation.shape[1]`` is 1 after the prompt: a ``pos`` that is out of
range for the current step is skipped, so ``pos=None`` is the way to steer every new token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mechscope.models.hook_points import HookFn, HookPoint

Selector = int | Sequence[int] | slice | None


def _axes(hook: HookPoint) -> tuple[int, int | None]:
    """(pos axis, head axis) of the activation at ``hook``."""
    if hook.name.endswith(("hook_pattern", "hook_attn_scores")):
        return 2, 1
    if hook.name.endswith(("hook_q", "hook_k", "hook_v", "hook_z")):
        return 1, 2
    return 1, None


def _axis_mask(size: int, sel: Selector, device: torch.device) -> Tensor | None:
    """Boolean ``[size]`` mask of the selected indices; None selects all."""
    if sel is None:
        return None
    keep = torch.zeros(size, dtype=torch.bool, device=device)
    if isinstance(sel, int):
        sel = [sel]
    if not isinstance(sel, slice):
        # Out-of-range indices are skipped, e.g. prompt positions on a one-token generation step.
        sel = torch.as_tensor([i for i in sel if -size <= i < size], dtype=torch.long, device=device)
    keep[sel] = True
    return keep


def _mask(x: Tensor, hook: HookPoint, pos: Selector, head: Selector, index: Selector) -> Tensor | None:
    """Where the edit applies, broadcastable to ``x``: the outer product of the per-axis selections."""
    pos_axis, head_axis = _axes(hook)
    if head is not None and head_axis is None:
        raise ValueError(f"{hook.name!r} has no head axis; head= applies to q/k/v/z/pattern/attn_scores")
    mask = None
    for axis, sel in ((pos_axis, pos), (head_axis, head), (x.ndim - 1, index)):
        keep = None if axis is None else _axis_mask(x.shape[axis], sel, x.device)
        if keep is None:
            continue
        shape = [1] * x.ndim
        shape[axis] = -1
        keep = keep.view(shape)
        mask = keep if mask is None else mask & keep
    return mask


def _edit(op: Callable[[Tensor], Tensor], pos: Selector, head: Selector, index: Selector) -> HookFn:
    def fn(x: Tensor, hook: HookPoint) -> Tensor:
        mask = _mask(x, hook, pos, head, index)
        edited = op(x).expand_as(x).to(x.dtype)
        return edited if mask is None else torch.where(mask, edited, x)

    return fn


def replace(value: Tensor, *, pos: Selector = None, head: Selector = None, index: Selector = None) -> HookFn:
    """Set the selected entries to ``value``, which broadcasts against the whole activation.

    A full activation from another run (``cache_b[name]``) patches exactly the selected entries.
    """
    value = torch.as_tensor(value)
    return _edit(lambda t: value.to(device=t.device, dtype=t.dtype).expand_as(t), pos, head, index)


def add(vector: Tensor, *, pos: Selector = None, head: Selector = None, index: Selector = None) -> HookFn:
    """Add ``vector`` (e.g. a steering direction ``[d_model]``) to the selected entries."""
    return _edit(lambda t: t + vector.to(device=t.device, dtype=t.dtype), pos, head, index)


def scale(factor: float, *, pos: Selector = None, head: Selector = None, index: Selector = None) -> HookFn:
    """Multiply the selected entries by ``factor``."""
    return _edit(lambda t: t * factor, pos, head, index)


def zero(*, pos: Selector = None, head: Selector = None, index: Selector = None) -> HookFn:
    """Zero-ablate the selected entries."""
    return _edit(torch.zeros_like, pos, head, index)
