"""Llama and its look-alikes (Mistral, Qwen2, SmolLM): rotary, RMSNorm, gated SiLU MLP, GQA."""

from transformers import LlamaConfig

from mechscope.models.adapters.base import Adapter
from mechscope.models.adapters.registry import register


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        vocab_size=260,
        initializer_range=0.1,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    return LlamaConfig(**(kw | overrides))


ADAPTER = register(
    Adapter(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        tiny_config=tiny_config,
        embed="model.embed_tokens",
        layers="model.layers",
        final_norm="model.norm",
        rotary_emb="model.rotary_emb",
    )
)
