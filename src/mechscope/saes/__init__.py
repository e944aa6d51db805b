"""Sparse autoencoders: activation harvesting, the on-disk activation store, training and evaluation."""

from mechscope.saes.harvest import HarvestConfig, HarvestProgress, harvest
from mechscope.saes.store import (
    ActivationStore,
    CorruptStoreError,
    IncompatibleStoreError,
    RowLocation,
    StoreError,
)

__all__ = [
    "ActivationStore",
    "CorruptStoreError",
    "HarvestConfig",
    "HarvestProgress",
    "IncompatibleStoreError",
    "RowLocation",
    "StoreError",
    "harvest",
]
