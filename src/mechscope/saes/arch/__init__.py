"""The SAE kinds: one file each, registered here and only here.

``KINDS`` maps a kind name (the file name) to its class; the config, the CLI choices, the loaders,
the tests (parametrised over ``KINDS``) and the docs all read it. Adding a kind is one file plus a
line below.
"""

from __future__ import annotations

from mechscope.saes.arch.batchtopk import BatchTopKSAE
from mechscope.saes.arch.jumprelu import JumpReLUSAE
from mechscope.saes.arch.relu import ReLUSAE
from mechscope.saes.arch.topk import TopKSAE
from mechscope.saes.sae import SAE, SAEConfig

KINDS: dict[str, type[SAE]] = {c.KIND: c for c in (ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE)}


def sae_class(kind: str) -> type[SAE]:
    """The class of a kind name."""
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown SAE kind {kind!r}; choose one of {sorted(KINDS)}") from None


def make_sae(cfg: SAEConfig, *, init: bool = True) -> SAE:
    """A freshly initialised SAE of ``cfg.kind`` (``init=False``: uninitialised storage, for loaders)."""
    return sae_class(cfg.kind)(cfg, init=init)


__all__ = ["KINDS", "BatchTopKSAE", "JumpReLUSAE", "ReLUSAE", "TopKSAE", "make_sae", "sae_class"]
