"""Architecture adapters, one file per HF family; importing this package registers them all."""

from mechscope.models.adapters import attn_only, gemma, gpt2, gpt_neox, llama  # noqa: F401  (registration)
from mechscope.models.adapters.base import Adapter
from mechscope.models.adapters.registry import adapter_for, adapters, register

__all__ = ["Adapter", "adapter_for", "adapters", "register"]
