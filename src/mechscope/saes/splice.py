"""Splicing SAEs into a model: run it with reconstructions in place of activations, latents as hook points.

``with splice(model, sae):`` replaces the activation at ``sae.cfg.hook_name`` by the SAE's
reconstruction for every forward inside the block, and registers three hook points per SAE that
``model.hooks``, ``run_with_cache``, ``run_with_grads`` and name predicates treat like any other:

* ``{hook_name}.hook_sae_acts``: the latents ``[batch pos d_sae]`` (read them, ablate or steer them);
* ``{out}.hook_sae_recons``: the reconstruction, in the activation's own layout;
* ``{out}.hook_sae_error``: ``x - recon``, with ``use_error_term=True`` only.

``out`` is the point the SAE writes: ``hook_name`` for an SAE, ``out_hook_name`` for a transcoder
(which encodes where it reads and decodes where it writes). Per-head points (``attn.hook_z``) are
flattened to ``[batch pos (n_heads d_head)]`` for the SAE and restored after.

With ``use_error_term=True`` the output is ``x + (recon' - recon) + (error' - error)``, where primes
are the values after any hooks on the SAE points. Nothing edited, every difference is exactly zero,
so the model's logits are *bit for bit* the un-spliced ones; with edits it equals ``recon' + error'``
(up to rounding), i.e. feature edits act on top of the unexplained remainder. Gradients are those of
``recon(acts) + error`` with the error an independent node: d/d acts is ``W_dec`` times the
downstream gradient, d/d error is the identity, and d/d x is the identity (no straight-through
trick or detach). When no SAE point is hooked, an error-term splice skips the SAE entirely.

Spliced SAEs run in eval mode (their mode is restored after), so a BatchTopK SAE codes each token
with its learned threshold. User hooks on the host point itself run in the order added: those added
before entering the splice see the model's activation (and change what the SAE encodes); those added
inside see the spliced one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from mechscope.models.hook_names import parse
from mechscope.models.hook_points import HookPoint
from mechscope.models.hooked import HookedModel
from mechscope.saes.sae import SAE, IncompatibleSAEError, eval_mode

_NOT_PER_TOKEN = ("attn.hook_pattern", "attn.hook_attn_scores")


@torch.no_grad()
def hook_widths(model: HookedModel, names: Sequence[str]) -> dict[str, int]:
    """The per-token width (trailing axes flattened) of each hook point, from a 2-token probe forward."""
    for n in names:
        model.hook_point(n)  # an unknown name raises UnknownHookError with the closest valid ones
        if n.endswith(_NOT_PER_TOKEN):
            raise IncompatibleSAEError(f"{n!r} is [batch head q_pos k_pos], not one vector per token")
    layers = []
    for n in names:
        layer = parse(n)[0] if n in model.hook_names else None
        layers.append(-1 if n in ("hook_embed", "hook_pos_embed") else layer)
    stop = None if None in layers else max(layers) + 1  # early exit: the probe stops after the deepest
    probe = torch.zeros(1, 2, dtype=torch.long, device=model.device)
    _, cache = model.run_with_cache(probe, list(names), stop_at_layer=stop)
    return {n: math.prod(cache[n].shape[2:]) for n in names}


def check_fits(sae: SAE, model: HookedModel) -> None:
    """Raise unless ``model`` has the SAE's hook points at the SAE's widths.

    Raises:
        UnknownHookError: a hook point the model lacks (listing the closest valid names).
        IncompatibleSAEError: no hook point named, a width mismatch, or a point that is not per token.
    """
    c = sae.cfg
    if not c.hook_name:
        raise IncompatibleSAEError("this SAE names no hook point (cfg.hook_name is empty); set it to splice")
    widths = hook_widths(model, sae.hook_names())
    want = {c.hook_name: c.d_in} | ({c.out_hook_name: c.d_out} if c.out_hook_name else {})
    for name, width in want.items():
        if widths[name] != width:
            raise IncompatibleSAEError(
                f"{name!r} of {model.name or 'this model'} is {widths[name]} wide but the SAE expects "
                f"{width} ({'d_in' if name == c.hook_name else 'd_out'}); it was trained on another model "
                "or hook point"
            )


def _flat(x: Tensor, width: int) -> Tensor:
    """``[batch pos ...]`` as ``[batch pos width]`` (heads flattened), checked."""
    if x.shape[-1] == width:
        return x
    if x.ndim >= 3 and math.prod(x.shape[2:]) == width:
        return x.flatten(2)
    raise ValueError(f"activation of shape {tuple(x.shape)} does not hold {width}-wide vectors per token")


class _Splice:
    """One SAE's hook points and the two hook functions that run it (``read`` on its input point,
    ``write`` on its output point; one function when they coincide)."""

    def __init__(self, sae: SAE, use_error_term: bool):
        cfg = sae.cfg
        self.sae, self.use_error_term = sae, use_error_term
        self.in_hook, self.out_hook = cfg.hook_name, cfg.out_hook_name or cfg.hook_name
        self.acts = HookPoint(f"{self.in_hook}.hook_sae_acts", parse(self.in_hook)[0])
        self.recons = HookPoint(f"{self.out_hook}.hook_sae_recons", parse(self.out_hook)[0])
        self.error = HookPoint(f"{self.out_hook}.hook_sae_error", parse(self.out_hook)[0])
        self._pending: tuple[Tensor, Tensor] | None = None
        self._skipped = False

    def points(self) -> list[tuple[HookPoint, str]]:
        """``(point, host)`` pairs to register, in forward order."""
        pts = [(self.acts, self.in_hook), (self.recons, self.out_hook)]
        return pts + ([(self.error, self.out_hook)] if self.use_error_term else [])

    def _exact_without_sae(self) -> bool:
        # With the error term and nothing hooked on the SAE's points, the output is the input exactly.
        return self.use_error_term and not (self.acts.active or self.recons.active or self.error.active)

    def read(self, x: Tensor, hook: HookPoint) -> None:
        self._skipped = self._exact_without_sae()
        if self._skipped:
            return None
        if x.device != self.sae.device:
            raise RuntimeError(
                f"the SAE for {self.in_hook!r} is on {self.sae.device}, the model on {x.device}; "
                "move it with sae.to(model.device)"
            )
        acts = self.sae.encode(_flat(x, self.sae.cfg.d_in))
        self._pending = (acts, self.acts.run(acts))
        return None

    def write(self, y: Tensor, hook: HookPoint) -> Tensor | None:
        if self._skipped:
            return None
        if self._pending is None:
            raise RuntimeError(
                f"{self.out_hook!r} ran before {self.in_hook!r} in this forward: a transcoder must read a "
                "point that comes earlier than the one it writes"
            )
        acts, edited = self._pending
        self._pending = None
        flat = _flat(y, self.sae.cfg.d_out)
        recon = self.sae.decode(edited).to(flat.dtype)
        recon_edit = self.recons.run(recon)
        if not self.use_error_term:
            return recon_edit.reshape(y.shape)
        clean = recon if edited is acts else self.sae.decode(acts).to(flat.dtype)
        error = flat - clean
        out = flat + (recon_edit - clean) + (self.error.run(error) - error)
        return out.reshape(y.shape)

    def read_write(self, x: Tensor, hook: HookPoint) -> Tensor | None:
        self.read(x, hook)
        return self.write(x, hook)


def _check(model: HookedModel, splices: list[_Splice]) -> None:
    """Everything that can be wrong, before anything is attached."""
    for sp in splices:
        check_fits(sp.sae, model)  # hook names exist, widths match
        order = model.hook_names
        if sp.in_hook != sp.out_hook and sp.in_hook in order and sp.out_hook in order:
            if order.index(sp.in_hook) > order.index(sp.out_hook):
                raise ValueError(
                    f"a transcoder reads {sp.in_hook!r}, which comes after {sp.out_hook!r} it writes"
                )
    seen: set[str] = set()
    for sp in splices:
        for point, _ in sp.points():
            if point.name in seen:
                raise ValueError(f"two SAEs at one hook point ({point.name!r}); splice one per point")
            if point.name in model.hook_names:
                raise ValueError(f"{point.name!r} already exists: an SAE is already spliced there")
            seen.add(point.name)
    outs = [sp.out_hook for sp in splices]
    if len(set(outs)) != len(outs):
        raise ValueError(f"two SAEs write the same hook point ({outs}); splice one per point")


@contextmanager
def splice(model: HookedModel, *saes: SAE, use_error_term: bool = False) -> Iterator[HookedModel]:
    """Run ``model`` with each SAE's reconstruction at its hook point for the ``with`` block.

    Args:
        model: the model; nothing changes outside the block.
        saes: SAEs (or transcoders) with ``cfg.hook_name`` set, on the model's device, one per point.
        use_error_term: add back ``x - recon`` so the output is exact unless an SAE point is edited.

    Yields:
        The model, with the ``{hook}.hook_sae_*`` points registered (see the module docstring).

    Raises:
        UnknownHookError: an SAE names a hook point the model lacks.
        IncompatibleSAEError: an SAE's width does not match its hook point's.
    """
    if not saes:
        raise ValueError("splice needs at least one SAE")
    splices = [_Splice(s, use_error_term) for s in saes]
    _check(model, splices)
    removers: list[Callable[[], None]] = []
    hooks: list[tuple[str, Callable]] = []
    for sp in splices:
        if sp.in_hook == sp.out_hook:
            hooks.append((sp.in_hook, sp.read_write))
        else:
            hooks += [(sp.in_hook, sp.read), (sp.out_hook, sp.write)]
    try:
        for sp in splices:
            for point, host in sp.points():
                removers.append(model.add_hook_point(point, after=host))
        with eval_mode(*saes), model.hooks(hooks):
            yield model
    finally:
        for remove in reversed(removers):
            remove()


def sae_point_names(sae: SAE, use_error_term: bool = True) -> dict[str, str]:
    """The names :func:`splice` gives an SAE's points: ``{"acts": ..., "recons": ..., "error": ...}``."""
    sp = _Splice(sae, use_error_term)
    return {p.name.rsplit(".hook_sae_", 1)[1]: p.name for p, _ in sp.points()}
