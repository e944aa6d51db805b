"""ActivationCache: cached activations by hook name, plus the residual-stream helpers of TransformerLens.

The residual stream is a sum: ``resid = embed (+ pos_embed) + sum over layers of (attn_out + mlp_out)``.
:meth:`ActivationCache.decompose_resid` returns those terms, :meth:`accumulated_resid` the running
sums (the logit lens' inputs), :meth:`stack_head_results` each head's ``z @ W_O``. The final norm is
applied to a stack in one of two ways (:meth:`apply_ln_to_stack`):

* ``"recompute"``: run the real norm module on each element (the true logit lens: each partial
  residual normalised by its own scale). Applied to the full residual it reproduces the model.
* ``"cached"``: divide every element by the *full* residual's scale (and centre, for LayerNorm),
  which is linear, so the normalised components still sum to the normalised residual minus the
  norm's bias. This is direct logit attribution's convention.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.models.adapters.base import get_module, norm_eps
from mechscope.models.hook_names import ALIASES

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel


class ActivationCache:
    """A read-only mapping ``hook name -> tensor`` from one run, bound to its model."""

    def __init__(self, store: dict[str, Tensor], model: HookedModel):
        self._store = store
        self.model = model

    # ---------------------------------------------------------------- mapping
    def __getitem__(self, name: str) -> Tensor:
        name = ALIASES.get(name, name)
        try:
            return self._store[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._store), n=5, cutoff=0.5)
            hint = f" Closest cached: {', '.join(close)}." if close else ""
            raise KeyError(
                f"{name!r} is not in this cache ({len(self._store)} names).{hint} Cache it with run_with_cache(names=...)"
            ) from None

    def __contains__(self, name: object) -> bool:
        return ALIASES.get(name, name) in self._store  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def keys(self):
        return self._store.keys()

    def values(self):
        return self._store.values()

    def items(self):
        return self._store.items()

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} tensors: {', '.join(list(self._store)[:4])}{', ...' if len(self) > 4 else ''})"

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ActivationCache:
        """A copy with every tensor moved / cast (aliases stay shared)."""
        moved: dict[int, Tensor] = {}
        store = {}
        for n, t in self._store.items():
            if id(t) not in moved:
                moved[id(t)] = t.to(device=device or t.device, dtype=dtype or t.dtype)
            store[n] = moved[id(t)]
        return ActivationCache(store, self.model)

    # ---------------------------------------------------------------- stacks
    def stack(self, point: str, layers: int | None = None) -> Tensor:
        """``blocks.{L}.<point>`` for ``L < layers`` (default all; negative counts as in ``accumulated_resid``,
        ``-1`` all) stacked on a new leading ``layer`` axis."""
        n = self._layer(layers)
        if n == 0:
            raise ValueError(f"layers={layers} selects no block; pass 1 .. {self.model.cfg.n_layers} or None")
        return torch.stack([self[f"blocks.{i}.{point}"] for i in range(n)])

    def _resid_at(self, layer: int) -> Tensor:
        n = self.model.cfg.n_layers
        return (
            self[f"blocks.{layer}.hook_resid_pre"] if layer < n else self[f"blocks.{n - 1}.hook_resid_post"]
        )

    def _layer(self, layer: int | None) -> int:
        n = self.model.cfg.n_layers
        layer = n if layer is None else (layer + n + 1 if layer < 0 else layer)
        if not 0 <= layer <= n:
            raise ValueError(f"layer must be in [0, {n}], got {layer}")
        return layer

    def accumulated_resid(
        self,
        layer: int | None = None,
        *,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: int | slice | None = None,
        return_labels: bool = False,
    ) -> Float[Tensor, "component batch *pos d_model"] | tuple[Tensor, list[str]]:
        """The residual stream before each block up to ``layer`` (default: all, then the final one).

        With ``apply_ln`` each entry goes through the final norm itself (the logit lens).
        """
        layer = self._layer(layer)
        parts, labels = [], []
        for i in range(layer):
            parts.append(self[f"blocks.{i}.hook_resid_pre"])
            labels.append(f"{i}_pre")
            if incl_mid and f"blocks.{i}.hook_resid_mid" in self.model.hook_names:
                parts.append(self[f"blocks.{i}.hook_resid_mid"])
                labels.append(f"{i}_mid")
        parts.append(self._resid_at(layer))
        labels.append("final_post" if layer == self.model.cfg.n_layers else f"{layer}_pre")
        stack = _slice_pos(torch.stack(parts), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mode="recompute")
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        *,
        mode: str = "all",
        incl_embeds: bool = True,
        apply_ln: bool = False,
        pos_slice: int | slice | None = None,
        return_labels: bool = False,
    ) -> Float[Tensor, "component batch *pos d_model"] | tuple[Tensor, list[str]]:
        """The terms that sum to the residual stream before block ``layer`` (default: the final one).

        Args:
            mode: ``"all"``, ``"attn"`` or ``"mlp"``: which sublayer outputs to include.
            incl_embeds: include ``embed`` (and ``pos_embed`` for learned positions).
            apply_ln: apply the final norm in ``"cached"`` mode (components stay additive).
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._layer(layer)
        parts, labels = [], []
        if incl_embeds:
            parts.append(self["hook_embed"])
            labels.append("embed")
            if "hook_pos_embed" in self.model.hook_names:
                parts.append(self["hook_pos_embed"].expand_as(self["hook_embed"]))  # [1 pos d_model] in HF
                labels.append("pos_embed")
        for i in range(layer):
            for kind in ("attn", "mlp") if self.model.cfg.has_mlp else ("attn",):
                if mode in ("all", kind):
                    parts.append(self[f"blocks.{i}.hook_{kind}_out"])
                    labels.append(f"{i}_{kind}_out")
        if not parts:
            raise ValueError(
                f"no terms before block {layer} without the embeddings; pass incl_embeds=True or layer > 0"
            )
        stack = _slice_pos(torch.stack(parts), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mode="cached", pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(
        self,
        layer: int | None = None,
        *,
        apply_ln: bool = False,
        pos_slice: int | slice | None = None,
        return_labels: bool = False,
    ) -> Float[Tensor, "component batch *pos d_model"] | tuple[Tensor, list[str]]:
        """Each head's output ``z_h @ W_O[h]`` for the blocks before ``layer``; labels ``L{l}H{h}``.

        They sum (plus ``b_O``) to the attention output, except in post-norm families (Gemma), where
        ``hook_attn_out`` is their sum passed through a norm.
        """
        layer = self._layer(layer)
        weights = self.model.weights
        parts, labels = [], []
        for i in range(layer):
            z = _slice_pos(self[f"blocks.{i}.attn.hook_z"], pos_slice, axis=1)
            W_O = weights.blocks[i].W_O.to(z.dtype)
            parts.append(torch.einsum("b...hd,hdm->hb...m", z, W_O))
            labels += [f"L{i}H{h}" for h in range(self.model.cfg.n_heads)]
        stack = torch.cat(parts) if parts else torch.empty(0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mode="cached", pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # ---------------------------------------------------------------- norms and logits
    def apply_ln_to_stack(
        self,
        stack: Float[Tensor, "*component batch *pos d_model"],
        layer: int | None = None,
        *,
        mode: str = "cached",
        pos_slice: int | slice | None = None,
    ) -> Float[Tensor, "*component batch *pos d_model"]:
        """Apply the norm that reads the residual at ``layer`` (the final norm by default).

        ``mode="recompute"`` runs the real norm module on every element; ``mode="cached"`` scales
        every element by the full residual's statistics (see the module docstring), which needs
        that residual in the cache.
        """
        layer = self._layer(layer)
        model, n = self.model, self.model.cfg.n_layers
        norm = (
            model.module(model.adapter.final_norm)
            if layer == n
            else get_module(model.layer(layer), model.adapter.ln1)
        )
        if mode == "recompute":
            return norm(stack)
        if mode != "cached":
            raise ValueError(f"mode must be 'cached' or 'recompute', got {mode!r}")
        resid = _slice_pos(self._resid_at(layer), pos_slice).float()
        x = stack.float()
        if model.cfg.norm == "layernorm":
            resid = resid - resid.mean(-1, keepdim=True)
            x = x - x.mean(-1, keepdim=True)
        scale = (resid.pow(2).mean(-1, keepdim=True) + norm_eps(norm)).sqrt()
        return (x / scale * model.adapter.norm_weight(norm).float()).to(stack.dtype)

    def logit_attrs(
        self,
        stack: Float[Tensor, "*component batch d_model"],
        tokens: Int[Tensor, " batch"] | int | str,
        incorrect_tokens: Int[Tensor, " batch"] | int | str | None = None,
    ) -> Float[Tensor, "*component batch"]:
        """Each component's direct contribution to the logit of ``tokens`` (minus ``incorrect_tokens``).

        ``stack`` should already be normalised (``apply_ln=True``) and sliced to one position.
        """
        W_U = self.model.weights.W_U
        directions = W_U[:, _token_ids(self.model, tokens, stack.shape[-2])]  # [d_model batch]
        if incorrect_tokens is not None:
            directions = directions - W_U[:, _token_ids(self.model, incorrect_tokens, stack.shape[-2])]
        return torch.einsum("...bm,mb->...b", stack, directions.to(stack.dtype))


def _slice_pos(x: Tensor, pos_slice: int | slice | None, axis: int = -2) -> Tensor:
    """Select positions on ``axis`` (the ``pos`` axis), keeping it when given a slice."""
    if pos_slice is None:
        return x
    index = [slice(None)] * x.ndim
    index[axis] = pos_slice
    return x[tuple(index)]


def _token_ids(model: HookedModel, tokens: Tensor | int | str, batch: int) -> Tensor:
    if isinstance(tokens, str):
        tokens = model.to_single_token(tokens)
    if isinstance(tokens, int):
        return torch.full((batch,), tokens, dtype=torch.long, device=model.device)
    return tokens.to(device=model.device, dtype=torch.long)  # indexes W_U, which lives on the model's device
