"""Small helpers shared by the test tiers."""

from __future__ import annotations

import torch

import mechscope as ms


def random_tokens(model: ms.HookedModel, batch: int = 2, pos: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, pos), generator=g)


def no_torch_hooks(model: ms.HookedModel) -> bool:
    """True when no PyTorch hook of any kind is left on the HF model."""
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.hf_model.modules()
    )
