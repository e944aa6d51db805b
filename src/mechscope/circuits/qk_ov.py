"""QK and OV circuits of attention heads, read off the weights as factored ``d_vocab x d_vocab`` matrices.

For head ``h`` of layer ``L`` (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"):

* QK circuit ``E_q W_Q^h (E_k W_K^h)^T``: entry ``[i, j]`` is the attention score (before the
  ``1/sqrt(d_head)`` scaling and the softmax) of a query token ``i`` on a key token ``j``.
* OV circuit ``E W_V^h W_O^h W_U``: row ``i`` is what attending to token ``i`` adds to the logits.

Norms are folded in by applying the head's real pre-attention norm (``ln1``) to the embedding
rows, and the q/k/v biases are kept (they make each factor affine, still rank ``d_head``). For
layer 0 and a query and key at the same position (rotary is the identity there; learned
positions via ``pos=``) this is exactly what
the model computes, and the tests check it against the model's own scores. The OV circuit
stops at the head's write into the residual stream followed by the unembedding; the final norm's
per-token scale is ignored (the convention of the literature). Rotary models have no positional
QK circuit here, and the rotary QK circuit at a non-zero relative offset is not implemented yet.
"""

from __future__ import annotations

import torch
from jaxtyping import Float

from mechscope.circuits.factored import FactoredMatrix
from mechscope.models import HookedModel
from mechscope.models.adapters.base import get_module


def _check(model: HookedModel, layer: int, head: int | None) -> None:
    c = model.cfg
    if not 0 <= layer < c.n_layers:
        raise IndexError(f"layer {layer} is out of range: the model has layers 0..{c.n_layers - 1}")
    if head is not None and not 0 <= head < c.n_heads:
        raise IndexError(f"head {head} is out of range: layer {layer} has heads 0..{c.n_heads - 1}")


@torch.no_grad()
def normalised_embeddings(
    model: HookedModel, layer: int, pos: int | None = None
) -> Float[torch.Tensor, "d_vocab d_model"]:
    """Token embeddings (times the family's embedding scale, plus ``W_pos[pos]`` if given) through ``ln1``."""
    x = model.weights.W_E * model.cfg.embed_scale
    if pos is not None:
        if model.weights.W_pos is None:
            raise ValueError(
                f"pos= needs learned position embeddings; {model.cfg.family} has {model.cfg.positional} positions"
            )
        x = x + model.weights.W_pos[pos]
    return get_module(model.layer(layer), model.adapter.ln1)(x)


def _head_norm(model: HookedModel, layer: int, path: str | None, x: torch.Tensor) -> torch.Tensor:
    """Apply a per-head q/k norm (Gemma 3) where the family has one."""
    return x if path is None else get_module(model.layer(layer), path)(x)


@torch.no_grad()
def qk_circuit(
    model: HookedModel, layer: int, head: int | None = None, *, pos: int | None = None
) -> FactoredMatrix:
    """``[n_heads] d_vocab(query) x d_vocab(key)`` token QK circuit(s) of ``layer`` (one head if given).

    ``pos`` adds that position's learned embedding to every token (learned-position models only).
    """
    _check(model, layer, head)
    w, a = model.weights.blocks[layer], model.adapter
    x = normalised_embeddings(model, layer, pos)
    q = torch.einsum("vm,hmd->hvd", x, w.W_Q) + w.b_Q[:, None]  # [n_heads d_vocab d_head]
    k = torch.einsum("vm,hmd->hvd", x, w.W_K) + w.b_K[:, None]
    q = _head_norm(model, layer, a.q_norm, q.transpose(0, 1)).transpose(
        0, 1
    )  # norms act on [.. n_heads d_head]
    k = _head_norm(model, layer, a.k_norm, k.transpose(0, 1)).transpose(0, 1)
    fm = FactoredMatrix(q, k.transpose(-1, -2))
    return fm if head is None else fm[head]


@torch.no_grad()
def positional_qk_circuit(model: HookedModel, layer: int, head: int | None = None) -> FactoredMatrix:
    """``[n_heads] n_ctx(query) x n_ctx(key)`` QK circuit of the learned position embeddings alone."""
    _check(model, layer, head)
    W_pos = model.weights.W_pos
    if W_pos is None:
        raise ValueError(
            f"{model.cfg.family} models have {model.cfg.positional} positions, not learned position embeddings: "
            "there is no positional QK circuit to read off the weights"
        )
    w = model.weights.blocks[layer]
    x = get_module(model.layer(layer), model.adapter.ln1)(W_pos)
    q = torch.einsum("pm,hmd->hpd", x, w.W_Q)
    k = torch.einsum("pm,hmd->hpd", x, w.W_K)
    fm = FactoredMatrix(q, k.transpose(-1, -2))
    return fm if head is None else fm[head]


@torch.no_grad()
def ov_circuit(
    model: HookedModel, layer: int, head: int | None = None, *, pos: int | None = None
) -> FactoredMatrix:
    """``[n_heads] d_vocab(source) x d_vocab(logit)`` OV circuit(s): attended token -> direct logit effect."""
    _check(model, layer, head)
    w = model.weights.blocks[layer]
    x = normalised_embeddings(model, layer, pos)
    v = torch.einsum("vm,hmd->hvd", x, w.W_V) + w.b_V[:, None]  # [n_heads d_vocab d_head]
    out = torch.einsum("hdm,mv->hdv", w.W_O, model.weights.W_U)  # [n_heads d_head d_vocab]
    fm = FactoredMatrix(v, out)
    return fm if head is None else fm[head]
