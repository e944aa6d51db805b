"""Gemma 2 and Gemma 3 (text): post-norms around both sublayers, ``(1 + w)`` RMSNorm, scaled
embeddings, logit soft-capping, and alternating sliding-window / global attention layers.

With post-norms, ``hook_attn_out`` and ``hook_mlp_out`` are the *normalised* sublayer outputs, i.e.
exactly what is added to the residual stream, so the residual decomposition still sums.
"""

import math

from transformers import Gemma2Config, Gemma3TextConfig

from mechscope.models.adapters.base import Adapter
from mechscope.models.adapters.registry import register

_PATHS = dict(
    embed="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    rotary_emb="model.rotary_emb",
    ln2="pre_feedforward_layernorm",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    norm="rmsnorm",
    norm_offset=1.0,
    embed_scale=lambda config: math.sqrt(config.hidden_size),
    prepend_bos=True,
)
_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    max_position_embeddings=128,
    vocab_size=260,
    sliding_window=4,
    initializer_range=0.1,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
)


def tiny_gemma2(**overrides) -> Gemma2Config:
    kw = _TINY | dict(final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    return Gemma2Config(**(kw | overrides))


def tiny_gemma3(**overrides) -> Gemma3TextConfig:
    kw = _TINY | dict(layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    return Gemma3TextConfig(**(kw | overrides))


GEMMA2 = register(Adapter(name="gemma2", model_types=("gemma2",), tiny_config=tiny_gemma2, **_PATHS))
GEMMA3 = register(
    Adapter(
        name="gemma3",
        model_types=("gemma3_text",),
        tiny_config=tiny_gemma3,
        q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm",
        **_PATHS,
    )
)
