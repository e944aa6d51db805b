"""mechscope's own attention-only transformers (``mechscope.toy.attn_only``): GPT-2 without MLPs."""

from mechscope.models.adapters.base import Adapter
from mechscope.models.adapters.registry import register


def tiny_config(**overrides):
    from mechscope.toy.attn_only import AttnOnlyConfig  # also registers the HF classes

    kw = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        initializer_range=0.1,
    )
    return AttnOnlyConfig(**(kw | overrides))


ADAPTER = register(
    Adapter(
        name="attn_only",
        model_types=("mechscope_attn_only",),
        tiny_config=tiny_config,
        hf_module="mechscope.toy.attn_only",
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        layers="transformer.h",
        final_norm="transformer.ln_f",
        ln1="ln_1",
        attn="attn",
        o_proj="attn.o_proj",
        attn_out="attn",
        mlp=None,
        norm="layernorm",
        prepend_bos=True,
    )
)
