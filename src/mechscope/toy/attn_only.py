"""Attention-only transformers, as HuggingFace models that load into ``HookedModel`` like any other.

Elhage et al. (2021), "A Mathematical Framework for Transformer Circuits", study transformers
with attention layers only: a zero-layer model is a bigram table (``W_E W_U``), a one-layer model
adds skip-trigrams (``A ... B -> C``) read off its QK and OV circuits, and a two-layer model can
compose heads into induction heads. The model below is GPT-2 minus the MLPs: token (and optional
learned position) embeddings, ``n_layers`` pre-LayerNorm attention blocks, a final LayerNorm and
an untied unembedding. Attention dispatches through HF's ``AttentionInterface``, so every
mechscope hook point works on it, and it supports the KV cache, so ``generate`` works too.

Importing this module registers the model with ``transformers``' Auto classes (their documented
extension mechanism) under ``model_type = "mechscope_attn_only"``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

MODEL_TYPE = "mechscope_attn_only"
# transformers 5.25 renamed the output's cache field (``past_key_values`` before); the range we support
# spans both.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class AttnOnlyConfig(PretrainedConfig):
    """HF config with HF's standard attribute names (``hidden_size``, ``num_hidden_layers``, ...)."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 259,
        hidden_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        max_position_embeddings: int = 256,
        positional: str = "learned",
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int = 256,
        eos_token_id: int = 257,
        pad_token_id: int = 258,
        **kwargs,
    ):
        if positional not in ("learned", "none"):
            raise ValueError(f"positional must be 'learned' or 'none', got {positional!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.positional = positional
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs
        )


class AttnOnlyAttention(nn.Module):
    def __init__(self, config: AttnOnlyConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        d = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (
            p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        z, pattern = attention(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0)
        return self.o_proj(z.reshape(*hidden_states.shape[:-1], -1)), pattern


class AttnOnlyBlock(nn.Module):
    def __init__(self, config: AttnOnlyConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = AttnOnlyAttention(config, layer_idx)

    def forward(self, hidden_states, attention_mask=None, cache=None):
        return hidden_states + self.attn(self.ln_1(hidden_states), attention_mask, cache)[0]


class AttnOnlyPreTrainedModel(PreTrainedModel):
    config_class = AttnOnlyConfig
    base_model_prefix = "transformer"
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class AttnOnlyModel(AttnOnlyPreTrainedModel):
    def __init__(self, config: AttnOnlyConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.positional == "learned"
            else None
        )
        self.h = nn.ModuleList(AttnOnlyBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False, **kwargs
    ):
        x = self.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        # Positional: transformers renamed the cache argument (past_key_values before 5.25, cache after).
        mask = create_causal_mask(self.config, x, attention_mask, cache, position_ids=position_ids)
        for block in self.h:
            x = block(x, mask, cache)
        return self.ln_f(x), cache


class AttnOnlyForCausalLM(AttnOnlyPreTrainedModel, GenerationMixin):
    def __init__(self, config: AttnOnlyConfig):
        super().__init__(config)
        self.transformer = AttnOnlyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=None,
        labels=None,
        logits_to_keep=0,
        **kwargs,
    ):
        cache = kwargs.pop("past_key_values", cache)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hidden, cache = self.transformer(input_ids, attention_mask, position_ids, cache, use_cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})


AutoConfig.register(MODEL_TYPE, AttnOnlyConfig, exist_ok=True)
AutoModelForCausalLM.register(AttnOnlyConfig, AttnOnlyForCausalLM, exist_ok=True)
