"""GPT-2: learned positions, LayerNorm, fused Conv1D q/k/v, GELU MLP."""

from transformers import GPT2Config

from mechscope.models.adapters.base import Adapter, gpt2_fused_qkv
from mechscope.models.adapters.registry import register


def tiny_config(**overrides) -> GPT2Config:
    kw = dict(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=128,
        vocab_size=260,
        initializer_range=0.1,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    return GPT2Config(**(kw | overrides))


ADAPTER = register(
    Adapter(
        name="gpt2",
        model_types=("gpt2",),
        tiny_config=tiny_config,
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        layers="transformer.h",
        final_norm="transformer.ln_f",
        ln1="ln_1",
        attn="attn",
        o_proj="attn.c_proj",
        ln2="ln_2",
        mlp_in="mlp.c_fc",
        mlp_in_linear=None,
        mlp_out_proj="mlp.c_proj",
        attn_out="attn",
        qkv=gpt2_fused_qkv("c_attn"),
        norm="layernorm",
        d_mlp=lambda config: config.n_inner or 4 * config.n_embd,
        # TransformerLens prepends <|endoftext|> to GPT-2 inputs; so do we.
        prepend_bos=True,
    )
)
