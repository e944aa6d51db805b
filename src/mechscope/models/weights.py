"""Weights in TransformerLens form, as views onto the HF parameters.

``model.weights.blocks[L].W_Q`` is ``[n_heads d_model d_head]`` and shares storage with the HF
projection, so editing it edits the model. Exceptions, by necessity: under grouped-query attention
``W_K``/``W_V``/``b_K``/``b_V`` are expanded to one slice per *query* head, which no strided view can
express, so they are copies (``W_K_kv``/``W_V_kv`` are the ``[n_kv_heads d_model d_head]`` views);
absent biases are zeros.

Gated MLPs follow TransformerLens: ``W_gate`` feeds ``mlp.hook_pre`` (the activation's input) and
``W_in`` feeds ``mlp.hook_pre_linear``.

:func:`fold_norms` returns analysis copies with each pre-norm's weight (and LayerNorm bias) folded
into the matrices that read its output, and Gemma's embedding scale folded into ``W_E``. Post-norms
(Gemma's ``hook_attn_out``/``hook_mlp_out`` norms) are not linear maps and are not folded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.models.adapters.base import get_module, in_out

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel


@dataclass(frozen=True)
class LayerWeights:
    """One block's weights, TransformerLens shapes."""

    W_Q: Float[Tensor, "n_heads d_model d_head"]
    W_K: Float[Tensor, "n_heads d_model d_head"]
    W_V: Float[Tensor, "n_heads d_model d_head"]
    W_K_kv: Float[Tensor, "n_kv_heads d_model d_head"]
    W_V_kv: Float[Tensor, "n_kv_heads d_model d_head"]
    b_Q: Float[Tensor, "n_heads d_head"]
    b_K: Float[Tensor, "n_heads d_head"]
    b_V: Float[Tensor, "n_heads d_head"]
    W_O: Float[Tensor, "n_heads d_head d_model"]
    b_O: Float[Tensor, " d_model"]
    ln1_w: Float[Tensor, " d_model"]
    ln1_b: Float[Tensor, " d_model"] | None
    # MLP weights: None in attention-only models (W_gate also in non-gated MLPs).
    W_in: Float[Tensor, "d_model d_mlp"] | None = None
    b_in: Float[Tensor, " d_mlp"] | None = None
    W_gate: Float[Tensor, "d_model d_mlp"] | None = None
    W_out: Float[Tensor, "d_mlp d_model"] | None = None
    b_out: Float[Tensor, " d_model"] | None = None
    ln2_w: Float[Tensor, " d_model"] | None = None
    ln2_b: Float[Tensor, " d_model"] | None = None


def _bias(module, *shape: int, like: Tensor) -> Tensor:
    b = getattr(module, "bias", None)
    return torch.zeros(*shape, dtype=like.dtype, device=like.device) if b is None else b


def _per_query_head(x: Tensor, n_rep: int) -> Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=0)


def _layer_weights(model: HookedModel, index: int) -> LayerWeights:
    a, c = model.adapter, model.cfg
    layer = model.layer(index)
    sub = lambda path: get_module(layer, path)  # noqa: E731
    (wq, wk, wv), (bq, bk, bv) = a.qkv(sub(a.attn), c.n_heads, c.d_head)
    W_Q, W_K_kv, W_V_kv = (w.permute(1, 0, 2) for w in (wq, wk, wv))  # [heads d_model d_head]
    zeros = lambda n: torch.zeros(n, c.d_head, dtype=W_Q.dtype, device=W_Q.device)  # noqa: E731
    n_rep = c.n_heads // c.n_kv_heads
    o_proj, ln1 = sub(a.o_proj), sub(a.ln1)
    return LayerWeights(
        W_Q=W_Q,
        W_K=_per_query_head(W_K_kv, n_rep),
        W_V=_per_query_head(W_V_kv, n_rep),
        W_K_kv=W_K_kv,
        W_V_kv=W_V_kv,
        b_Q=zeros(c.n_heads) if bq is None else bq,
        b_K=_per_query_head(zeros(c.n_kv_heads) if bk is None else bk, n_rep),
        b_V=_per_query_head(zeros(c.n_kv_heads) if bv is None else bv, n_rep),
        W_O=in_out(o_proj).unflatten(0, (c.n_heads, c.d_head)),
        b_O=_bias(o_proj, c.d_model, like=W_Q),
        ln1_w=a.norm_weight(ln1),
        ln1_b=getattr(ln1, "bias", None),
        **(_mlp_weights(model, layer) if a.has_mlp else {}),
    )


def _mlp_weights(model: HookedModel, layer) -> dict[str, Tensor | None]:
    a, c = model.adapter, model.cfg
    sub = lambda path: get_module(layer, path)  # noqa: E731
    mlp_in, mlp_out, ln2 = sub(a.mlp_in), sub(a.mlp_out_proj), sub(a.ln2)
    up = sub(a.mlp_in_linear) if a.gated else mlp_in
    like = mlp_out.weight
    return dict(
        W_in=in_out(up),
        b_in=_bias(up, c.d_mlp, like=like),
        W_gate=in_out(mlp_in) if a.gated else None,
        W_out=in_out(mlp_out),
        b_out=_bias(mlp_out, c.d_model, like=like),
        ln2_w=a.norm_weight(ln2),
        ln2_b=getattr(ln2, "bias", None),
    )


class Weights:
    """``model.weights``: embedding, unembedding and per-block weights; stacked properties copy."""

    def __init__(self, model: HookedModel):
        self.model = model

    @cached_property
    def blocks(self) -> list[LayerWeights]:
        return [_layer_weights(self.model, i) for i in range(self.model.cfg.n_layers)]

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """The embedding matrix as stored (Gemma's module multiplies it by ``cfg.embed_scale``)."""
        return self.model.module(self.model.adapter.embed).weight

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"] | None:
        pos = self.model._pos_embed
        return self.model.module(pos).weight if pos else None

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return in_out(self.model.module(self.model.adapter.unembed))

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return _bias(self.model.module(self.model.adapter.unembed), self.model.cfg.d_vocab, like=self.W_U)

    @property
    def ln_final_w(self) -> Float[Tensor, " d_model"]:
        return self.model.adapter.norm_weight(self.model.module(self.model.adapter.final_norm))

    @property
    def ln_final_b(self) -> Float[Tensor, " d_model"] | None:
        return getattr(self.model.module(self.model.adapter.final_norm), "bias", None)

    def stacked(self, name: str) -> Tensor:
        """One per-block weight stacked over layers, e.g. ``stacked("W_Q")`` is ``[n_layers n_heads d_model d_head]``."""
        return torch.stack([getattr(b, name) for b in self.blocks])

    def __getattr__(self, name: str) -> Tensor:
        if name in {f.name for f in fields(LayerWeights)}:
            return self.stacked(name)
        raise AttributeError(name)


@dataclass(frozen=True)
class FoldedWeights:
    """Copies with the pre-norms folded in: reading matrices act on the *normalised, unscaled* residual."""

    W_E: Float[Tensor, "d_vocab d_model"]
    W_U: Float[Tensor, "d_model d_vocab"]
    b_U: Float[Tensor, " d_vocab"]
    blocks: list[LayerWeights]


@torch.no_grad()
def fold_norms(weights: Weights) -> FoldedWeights:
    """Fold each norm's weight and bias into the matrices that read it (TransformerLens' ``fold_ln``).

    For a reading matrix ``W`` after a norm with weight ``w`` and bias ``b``:
    ``norm(x) @ W + c = x_hat @ (w[:, None] * W) + (b @ W + c)``, where ``x_hat`` is the normalised
    residual (centred for LayerNorm). ``ln*_w`` become ones and ``ln*_b`` None in the result.
    """
    c = weights.model.cfg

    def fold(W: Tensor, bias: Tensor, w: Tensor, b: Tensor | None, heads: bool) -> tuple[Tensor, Tensor]:
        if heads:  # W [heads d_model d_head], bias [heads d_head]
            new_b = bias if b is None else bias + torch.einsum("m,hmd->hd", b, W)
            return W * w[None, :, None], new_b
        new_b = bias if b is None else bias + b @ W
        return W * w[:, None], new_b

    blocks = []
    for lw in weights.blocks:
        W_Q, b_Q = fold(lw.W_Q, lw.b_Q, lw.ln1_w, lw.ln1_b, True)
        W_K, b_K = fold(lw.W_K, lw.b_K, lw.ln1_w, lw.ln1_b, True)
        W_V, b_V = fold(lw.W_V, lw.b_V, lw.ln1_w, lw.ln1_b, True)
        W_K_kv, _ = fold(lw.W_K_kv, lw.W_K_kv[:, 0], lw.ln1_w, None, True)
        W_V_kv, _ = fold(lw.W_V_kv, lw.W_V_kv[:, 0], lw.ln1_w, None, True)
        mlp = {}
        if lw.W_in is not None:
            W_in, b_in = fold(lw.W_in, lw.b_in, lw.ln2_w, lw.ln2_b, False)
            W_gate = None if lw.W_gate is None else fold(lw.W_gate, lw.b_in, lw.ln2_w, None, False)[0]
            mlp = dict(
                W_in=W_in,
                b_in=b_in,
                W_gate=W_gate,
                ln2_w=torch.ones_like(lw.ln2_w),
                ln2_b=None,
                W_out=lw.W_out.clone(),
                b_out=lw.b_out.clone(),
            )
        ones = torch.ones_like(lw.ln1_w)
        blocks.append(
            replace(
                lw,
                W_Q=W_Q,
                b_Q=b_Q,
                W_K=W_K,
                b_K=b_K,
                W_V=W_V,
                b_V=b_V,
                W_K_kv=W_K_kv,
                W_V_kv=W_V_kv,
                ln1_w=ones,
                ln1_b=None,
                W_O=lw.W_O.clone(),
                b_O=lw.b_O.clone(),
                **mlp,
            )
        )
    W_U, b_U = fold(weights.W_U, weights.b_U, weights.ln_final_w, weights.ln_final_b, False)
    return FoldedWeights(W_E=weights.W_E * c.embed_scale, W_U=W_U, b_U=b_U, blocks=blocks)
