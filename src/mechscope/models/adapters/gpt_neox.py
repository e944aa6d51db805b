"""GPT-NeoX / Pythia: partial rotary, LayerNorm, fused q/k/v, attention and MLP in parallel."""

from transformers import GPTNeoXConfig

from mechscope.models.adapters.base import Adapter, neox_fused_qkv
from mechscope.models.adapters.registry import register


def tiny_config(**overrides) -> GPTNeoXConfig:
    kw = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        vocab_size=260,
        rotary_pct=0.5,
        use_parallel_residual=True,
        initializer_range=0.1,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    return GPTNeoXConfig(**(kw | overrides))


ADAPTER = register(
    Adapter(
        name="gpt_neox",
        model_types=("gpt_neox",),
        tiny_config=tiny_config,
        embed="gpt_neox.embed_in",
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        rotary_emb="gpt_neox.rotary_emb",
        unembed="lm_head",
        attn="attention",
        o_proj="attention.dense",
        mlp_in="mlp.dense_h_to_4h",
        mlp_in_linear=None,
        mlp_out_proj="mlp.dense_4h_to_h",
        attn_out="attention",
        qkv=neox_fused_qkv("query_key_value"),
        norm="layernorm",
        parallel=lambda config: config.use_parallel_residual,
        prepend_bos=True,
    )
)
