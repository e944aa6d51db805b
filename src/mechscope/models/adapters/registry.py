"""The one registry of architecture adapters. The CLI, the tests and the docs all read it."""

from __future__ import annotations

from transformers import PretrainedConfig

from mechscope.models.adapters.base import Adapter
from mechscope.models.errors import UnsupportedArchitectureError

_ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Add a family; called once at the bottom of each family's file."""
    if adapter.name in _ADAPTERS:
        raise ValueError(f"adapter {adapter.name!r} is registered twice")
    _ADAPTERS[adapter.name] = adapter
    return adapter


def adapters() -> dict[str, Adapter]:
    """Every registered adapter by family name."""
    return dict(_ADAPTERS)


def adapter_for(config: PretrainedConfig) -> Adapter:
    """The adapter whose ``model_types`` include ``config.model_type``."""
    for adapter in _ADAPTERS.values():
        if config.model_type in adapter.model_types:
            return adapter
    supported = sorted(t for a in _ADAPTERS.values() for t in a.model_types)
    raise UnsupportedArchitectureError(
        f"no adapter for HF model_type {config.model_type!r}. Supported: {', '.join(supported)}. "
        "Add one: a short file in mechscope/models/adapters/ (see llama.py) that calls register()."
    )
