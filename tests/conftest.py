"""Shared fixtures. Tiers are directories (see tests/README.md); the real model loads once per session."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import mechscope as ms
from mechscope.models.adapters import adapters

FAMILIES = sorted(adapters())


@pytest.fixture(autouse=True)
def reproducibility():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session", params=FAMILIES)
def tiny(request) -> ms.HookedModel:
    """One tiny random model per registered family (read-only: tests must not leave hooks on)."""
    return ms.load_model(f"tiny-{request.param}")


@pytest.fixture(scope="session")
def smollm2() -> ms.HookedModel:
    """The embedded default model, loaded once."""
    return ms.load_model("smollm2-135m")
