"""QK and OV circuits of attention heads, read off the weights as factored ``d_vocab x d_vocab`` matrices.

For head ``h`` of layer ``L`` (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"):

* QK circuit ``E_q W_Q^h (E_k W_K^h)^T``: entry ``[i, j]`` is the attention score (before the
  ``1/sqrt(d_head)`` scaling and the softmax) of a query token ``i`` on a key token ``j``.
* OV circuit ``E W_V^h W_O^h W_U``: row ``i`` is what attending to token ``i`` adds to the logits.

Norms are folded in by applying the head's real pre-attention norm (``ln1``) to the embedding
rows, and the q/k/v biases are kept (they make each factor affine, still rank ``d_head``); a
per-head q/k norm (Gemma 3) is applied to the projected rows, which keeps the product factored
because the norm acts on each row alone. For layer 0 this is exactly what the model computes,
and the tests check it against the model's own scores:

* learned positions: pass ``pos=`` to add that position's embedding to every token;
* rotary positions: pass ``offset=Δ`` for a query ``Δ`` tokens after its key. Rotary makes the
  score depend on positions only through ``Δ``, ``(R(i+Δ) q)·(R(i) k) = q^T R(Δ)^T k``, so rotating
  the query rows by ``Δ`` and the key rows by ``0`` gives ``W_E^T W_Q^T R(Δ)^T W_K W_E`` for every
  ``i``. The frequencies and the attention scaling are read from the model's own HF rotary module
  (so any rope scaling it was built with counts), in HF's ``rotate_half`` layout, and only the
  first ``2 * len(inv_freq)`` dimensions of a head rotate (partial rotary, GPT-NeoX ``rotary_pct``).
  Without ``offset`` the rotation is left out: the position-free content circuit, equal to
  ``offset=0`` up to the rope's attention scaling.

The OV circuit stops at the head's write into the residual stream followed by the unembedding;
the final norm's per-token scale is ignored (the convention of the literature).
"""

from __future__ import annotations

import torch
from jaxtyping import Float

from mechscope.circuits.factored import FactoredMatrix
from mechscope.models import HookedModel
from mechscope.models.adapters.base import get_module
from mechscope.models.errors import MechscopeError


class PositionalSchemeError(MechscopeError, ValueError):
    """A positional circuit the model's position scheme does not have (learned vs rotary), or a bad offset."""


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
            raise PositionalSchemeError(
                f"pos= needs learned position embeddings; {model.cfg.family} has {model.cfg.positional} "
                "positions"
                + ("; pass offset= (query minus key position) instead" if _is_rotary(model) else "")
            )
        x = x + model.weights.W_pos[pos]
    return get_module(model.layer(layer), model.adapter.ln1)(x)


def _is_rotary(model: HookedModel) -> bool:
    return model.cfg.positional == "rotary" and model.adapter.rotary_emb is not None


def rotary_frequencies(model: HookedModel, layer: int) -> tuple[Float[torch.Tensor, " n_freq"], float]:
    """``(inv_freq, attention_scaling)`` of ``layer``'s rotary embedding, read from the HF module.

    Reading the module (not the config) picks up whatever rope scaling it was built with; Gemma 3
    keeps one set per layer type (local sliding-window layers rotate at another base than global ones).
    """
    if not _is_rotary(model):
        raise PositionalSchemeError(
            f"{model.cfg.family} models have {model.cfg.positional} positions, not rotary ones: there is no "
            "QK circuit at a relative offset"
            + ("; pass pos= instead" if model.weights.W_pos is not None else "")
        )
    rope = model.module(model.adapter.rotary_emb)
    layer_types = getattr(model.hf_model.config, "layer_types", None) or ()
    prefix = (
        f"{layer_types[layer]}_" if layer_types and hasattr(rope, f"{layer_types[layer]}_inv_freq") else ""
    )
    return getattr(rope, f"{prefix}inv_freq").float(), float(getattr(rope, f"{prefix}attention_scaling"))


def rotate(
    x: Float[torch.Tensor, "*batch d_head"],
    position: int,
    inv_freq: Float[torch.Tensor, " n_freq"],
    scaling: float,
) -> Float[torch.Tensor, "*batch d_head"]:
    """HF's rotary embedding of ``x`` at ``position`` (``rotate_half`` layout: dimension ``j`` pairs with
    ``j + n_freq``); dimensions past ``2 * n_freq`` pass through unrotated and unscaled, as in HF."""
    freqs = position * inv_freq.to(x.device)
    emb = torch.cat([freqs, freqs])
    cos, sin = (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)
    n = emb.shape[0]
    x_rot, x_pass = x[..., :n], x[..., n:]
    half = torch.cat([-x_rot[..., n // 2 :], x_rot[..., : n // 2]], dim=-1)
    return torch.cat([x_rot * cos + half * sin, x_pass], dim=-1)


def _head_norm(model: HookedModel, layer: int, path: str | None, x: torch.Tensor) -> torch.Tensor:
    """Apply a per-head q/k norm (Gemma 3) where the family has one."""
    return x if path is None else get_module(model.layer(layer), path)(x)


@torch.no_grad()
def qk_circuit(
    model: HookedModel,
    layer: int,
    head: int | None = None,
    *,
    pos: int | None = None,
    offset: int | None = None,
) -> FactoredMatrix:
    """``[n_heads] d_vocab(query) x d_vocab(key)`` token QK circuit(s) of ``layer`` (one head if given).

    ``pos`` adds that position's learned embedding to every token (learned-position models only).
    ``offset`` (rotary models only) is the query's position minus the key's, ``>= 0`` in a causal
    model: entry ``[a, b]`` is then the score of token ``a`` at position ``i + offset`` on token
    ``b`` at position ``i``, for any ``i``. (In a sliding-window layer, offsets at or past the window
    are masked out by the model, whatever this score is.)

    Raises:
        PositionalSchemeError: ``pos`` on a model without learned positions, ``offset`` on a model
            without rotary ones, or a negative ``offset``.
    """
    _check(model, layer, head)
    if offset is not None:
        inv_freq, scaling = rotary_frequencies(model, layer)
        if offset < 0:
            raise PositionalSchemeError(
                f"offset {offset} puts the query before its key, which a causal model never attends; "
                "give the query position minus the key position (>= 0)"
            )
    w, a = model.weights.blocks[layer], model.adapter
    x = normalised_embeddings(model, layer, pos)
    q = torch.einsum("vm,hmd->hvd", x, w.W_Q) + w.b_Q[:, None]  # [n_heads d_vocab d_head]
    k = torch.einsum("vm,hmd->hvd", x, w.W_K) + w.b_K[:, None]
    q = _head_norm(model, layer, a.q_norm, q.transpose(0, 1)).transpose(
        0, 1
    )  # norms act on [.. n_heads d_head]
    k = _head_norm(model, layer, a.k_norm, k.transpose(0, 1)).transpose(0, 1)
    if offset is not None:  # after the q/k norms, as in the model
        q, k = rotate(q, offset, inv_freq, scaling), rotate(k, 0, inv_freq, scaling)
    fm = FactoredMatrix(q, k.transpose(-1, -2))
    return fm if head is None else fm[head]


@torch.no_grad()
def positional_qk_circuit(model: HookedModel, layer: int, head: int | None = None) -> FactoredMatrix:
    """``[n_heads] n_ctx(query) x n_ctx(key)`` QK circuit of the learned position embeddings alone."""
    _check(model, layer, head)
    W_pos = model.weights.W_pos
    if W_pos is None:
        raise PositionalSchemeError(
            f"{model.cfg.family} models have {model.cfg.positional} positions, not learned position embeddings: "
            "there is no positional QK circuit to read off the weights"
            + ("; for rotary models use qk_circuit(..., offset=Δ)" if _is_rotary(model) else "")
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
