"""Small helpers shared by the test tiers."""

from __future__ import annotations

import torch

import mechscope as ms


def random_tokens(model: ms.HookedModel, batch: int = 2, pos: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, pos), generator=g)


def no_hooks_left(model: ms.HookedModel) -> bool:
    """True when no hook of any kind is left on the HF model: PyTorch's, or a mechscope tap (an instance ``forward``)."""
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or "forward" in m.__dict__)
        for m in model.hf_model.modules()
    )
