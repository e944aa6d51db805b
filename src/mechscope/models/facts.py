"""ModelFacts: the shape facts of a loaded model in the glossary's names (``model.cfg``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import PretrainedConfig

from mechscope.models.adapters.base import Adapter


@dataclass(frozen=True, kw_only=True)
class ModelFacts:
    """Architecture facts, read once from the HF config through the family's adapter."""

    family: str
    """Adapter name (``llama``, ``gpt2``, ...)."""
    model_type: str
    """HF ``config.model_type``."""
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    """Key/value heads; fewer than ``n_heads`` under grouped-query attention."""
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    """Longest context the model accepts."""
    positional: str
    """``learned`` (a position embedding added to the residual), ``rotary``, or ``none``."""
    parallel: bool
    """Attention and MLP both read ``resid_pre`` (no ``resid_mid``)."""
    gated_mlp: bool
    has_mlp: bool
    """False for attention-only models."""
    norm: str
    """``layernorm`` or ``rmsnorm``."""
    post_norms: bool
    """Sublayer outputs are normalised before joining the residual (Gemma 2/3)."""
    act_fn: str
    attn_softcap: float | None
    final_logit_softcap: float | None
    sliding_window: int | None
    layer_types: tuple[str, ...] | None
    """Per layer ``full_attention`` or ``sliding_attention`` where the family alternates."""
    embed_scale: float

    @classmethod
    def from_hf(cls, config: PretrainedConfig, adapter: Adapter, *, learned_pos: bool) -> ModelFacts:
        n_heads = config.num_attention_heads
        d_head = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        act = next(
            (
                getattr(config, a)
                for a in ("hidden_activation", "hidden_act", "activation_function")
                if getattr(config, a, None)
            ),
            "unknown",
        )
        layer_types = getattr(config, "layer_types", None)
        return cls(
            family=adapter.name,
            model_type=config.model_type,
            n_layers=config.num_hidden_layers,
            d_model=config.hidden_size,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            d_head=d_head,
            d_mlp=adapter.d_mlp(config) if adapter.has_mlp else 0,
            d_vocab=config.vocab_size,
            n_ctx=config.max_position_embeddings,
            positional="learned" if learned_pos else ("rotary" if _has_rope(config) else "none"),
            parallel=bool(adapter.parallel(config)),
            gated_mlp=adapter.gated,
            has_mlp=adapter.has_mlp,
            norm=adapter.norm,
            post_norms=adapter.attn_out != adapter.attn,
            act_fn=str(act),
            attn_softcap=getattr(config, "attn_logit_softcapping", None),
            final_logit_softcap=getattr(config, "final_logit_softcapping", None),
            sliding_window=getattr(config, "sliding_window", None) if layer_types else None,
            layer_types=tuple(layer_types) if layer_types else None,
            embed_scale=float(adapter.embed_scale(config)),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _has_rope(config: PretrainedConfig) -> bool:
    return any(
        getattr(config, a, None) for a in ("rope_parameters", "rope_theta", "rope_scaling", "rotary_pct")
    )
