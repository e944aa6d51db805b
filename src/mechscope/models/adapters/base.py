"""The declarative architecture adapter: where a HuggingFace family keeps each part.

mechscope never re-implements a model. An :class:`Adapter` only names the HF
modules that carry each TransformerLens hook point and each weight, plus the
few shape facts that HF configs spell differently. Everything generic (hook
points, caches, weight views, analyses) is written once against this
description, so adding a family is one short file that registers an adapter.

Module paths are dotted attribute paths: model-level ones from the
``*ForCausalLM`` root, layer-level ones from one decoder layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

# Per-head weight views: (W_Q, W_K, W_V) each [d_model, heads, d_head] and
# (b_Q, b_K, b_V) each [heads, d_head] or None; K and V have n_kv_heads heads.
QKVViews = tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor | None, Tensor | None, Tensor | None]]


def in_out(module: nn.Module) -> Tensor:
    """A projection's weight as a ``[d_in, d_out]`` view (HF Linear stores ``[out, in]``, Conv1D ``[in, out]``)."""
    if isinstance(module, Conv1D):
        return module.weight
    if isinstance(module, nn.Linear):
        return module.weight.T
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.0.c`` for ``path='a.b.0.c'``; raises with the path on a miss."""
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise AttributeError(
            f"{type(root).__name__} has no submodule {path!r}: the adapter is out of date"
        ) from e


def separate_qkv(
    q: str = "q_proj", k: str = "k_proj", v: str = "v_proj"
) -> Callable[[nn.Module, int, int], QKVViews]:
    """Layout of families with one projection each for q, k and v (Llama, Gemma, Mistral, Qwen2)."""

    def views(attn: nn.Module, n_heads: int, d_head: int) -> QKVViews:
        mods = [get_module(attn, p) for p in (q, k, v)]
        ws = tuple(in_out(m).unflatten(1, (-1, d_head)) for m in mods)
        bs = tuple(None if m.bias is None else m.bias.unflatten(0, (-1, d_head)) for m in mods)
        return ws, bs  # type: ignore[return-value]

    return views


def gpt2_fused_qkv(path: str = "c_attn") -> Callable[[nn.Module, int, int], QKVViews]:
    """GPT-2's Conv1D ``[d_model, 3 * d_model]``: q, k, v as three contiguous blocks of columns."""

    def views(attn: nn.Module, n_heads: int, d_head: int) -> QKVViews:
        mod = get_module(attn, path)
        ws = tuple(w.unflatten(1, (n_heads, d_head)) for w in in_out(mod).chunk(3, dim=1))
        bs = tuple(b.unflatten(0, (n_heads, d_head)) for b in mod.bias.chunk(3, dim=0))
        return ws, bs  # type: ignore[return-value]

    return views


def neox_fused_qkv(path: str = "query_key_value") -> Callable[[nn.Module, int, int], QKVViews]:
    """GPT-NeoX's fused projection, whose output is laid out ``[head, (q|k|v), d_head]``."""

    def views(attn: nn.Module, n_heads: int, d_head: int) -> QKVViews:
        mod = get_module(attn, path)
        w = in_out(mod).unflatten(1, (n_heads, 3, d_head))
        ws = tuple(w[:, :, i] for i in range(3))
        b = None if mod.bias is None else mod.bias.unflatten(0, (n_heads, 3, d_head))
        bs = tuple(None if b is None else b[:, i] for i in range(3))
        return ws, bs  # type: ignore[return-value]

    return views


@dataclass(frozen=True, kw_only=True)
class Adapter:
    """Where one HF family keeps each part, and how its config spells the shape facts."""

    name: str
    """Family key; also the ``tiny-<name>`` alias of its random test model."""
    model_types: tuple[str, ...]
    """HF ``config.model_type`` values this adapter handles."""
    tiny_config: Callable[..., PretrainedConfig]
    """A small random config of this family (keyword overrides allowed) for tests and ``tiny-*``."""

    # model-level module paths
    embed: str
    layers: str
    final_norm: str
    unembed: str = "lm_head"
    pos_embed: str | None = None

    # layer-level module paths
    ln1: str = "input_layernorm"
    attn: str = "self_attn"
    o_proj: str = "self_attn.o_proj"
    ln2: str = "post_attention_layernorm"
    mlp: str | None = "mlp"
    """None for attention-only models: then no MLP, ``ln2`` or ``resid_mid`` points exist."""
    mlp_in: str = "mlp.gate_proj"
    """Its output is ``mlp.hook_pre`` (the gate pre-activation in gated MLPs, as in TransformerLens)."""
    mlp_in_linear: str | None = "mlp.up_proj"
    """Gated MLPs only: its output is ``mlp.hook_pre_linear``."""
    mlp_out_proj: str = "mlp.down_proj"
    """Its input is ``mlp.hook_post`` (the neuron activations)."""
    attn_out: str = "self_attn"
    """Its output is ``hook_attn_out``: what the attention sublayer adds to the residual stream."""
    mlp_out: str = "mlp"
    """Its output is ``hook_mlp_out``."""
    qkv: Callable[[nn.Module, int, int], QKVViews] = field(default_factory=separate_qkv)
    q_norm: str | None = None
    """Per-head norm applied to q after the projection (Gemma 3), for weight-based circuits."""
    k_norm: str | None = None
    rotary_emb: str | None = None
    """Model-level path of the HF rotary-embedding module (rotary families), whose frequencies
    ``circuits.qk_ov`` reads for the QK circuit at a relative offset (HF ``rotate_half`` layout)."""

    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_offset: float = 0.0
    """Added to stored norm weights (Gemma stores ``w - 1``)."""
    parallel: Callable[[PretrainedConfig], bool] = lambda config: False
    """Whether attention and MLP both read ``resid_pre`` (GPT-NeoX/Pythia); then there is no ``resid_mid``."""
    d_mlp: Callable[[PretrainedConfig], int] = lambda config: config.intermediate_size
    embed_scale: Callable[[PretrainedConfig], float] = lambda config: 1.0
    """Factor the embedding module multiplies its output by (Gemma: ``sqrt(d_model)``)."""
    hf_module: str | None = None
    """A module to import before loading, for families whose HF classes register on import."""
    prepend_bos: bool | None = None
    """Default BOS policy; None follows the tokenizer's own ``add_special_tokens`` behaviour."""

    @property
    def gated(self) -> bool:
        return self.has_mlp and self.mlp_in_linear is not None

    @property
    def has_mlp(self) -> bool:
        return self.mlp is not None

    def norm_weight(self, module: nn.Module) -> Tensor:
        """The effective multiplicative weight of a norm module ``[d_model]``."""
        w = module.weight
        return w + self.norm_offset if self.norm_offset else w


def norm_eps(module: nn.Module) -> float:
    """Epsilon of an HF norm module, whatever the attribute is called."""
    for attr in ("eps", "variance_epsilon", "epsilon"):
        if hasattr(module, attr):
            return float(getattr(module, attr))
    raise AttributeError(f"cannot find the epsilon of {type(module).__name__}")


def zeros_like_bias(*shape: int, like: Tensor) -> Tensor:
    return torch.zeros(*shape, dtype=like.dtype, device=like.device)
