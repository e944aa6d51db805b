"""Is a hook point's basis privileged? Kurtosis in the stored basis against a random rotation.

Elhage et al. (2022), "Privileged Bases in the Transformer Residual Stream": elementwise
nonlinearities (MLP neurons) make their basis special, so features align with single neurons and
activations are heavy-tailed coordinate by coordinate. The residual stream has no such reason,
but Adam's per-coordinate updates can make it privileged too. The test: excess kurtosis of each
coordinate's distribution over tokens, averaged over coordinates, in the model's basis and
after a random orthogonal rotation (which keeps every geometric property and destroys basis
alignment). A large positive difference means the basis is privileged.

Position 0 is left out by default: many models put huge "attention sink" activations on the first
token, which makes every coordinate heavy-tailed in any basis and swamps the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.models import HookedModel


def excess_kurtosis(x: Float[Tensor, "n d"]) -> Float[Tensor, " d"]:
    """Per-column excess kurtosis (0 for a Gaussian)."""
    x = x.double()
    c = x - x.mean(0)
    var = c.pow(2).mean(0)
    return (c.pow(4).mean(0) / var.pow(2) - 3).float()


@dataclass(frozen=True)
class BasisAlignment:
    """Kurtosis of one hook point's coordinates, in its own basis and in a random one."""

    name: str
    kurtosis: float
    """Mean excess kurtosis over coordinates in the model's basis."""
    rotated_kurtosis: float
    """The same after a random orthogonal rotation."""

    @property
    def privilege(self) -> float:
        """Kurtosis the basis has beyond a random one (a difference: a ratio explodes near zero)."""
        return self.kurtosis - self.rotated_kurtosis


@torch.no_grad()
def basis_alignment(
    model: HookedModel,
    input: str | list[str] | Tensor,
    names: list[str],
    *,
    skip_first: bool = True,
    seed: int = 0,
) -> list[BasisAlignment]:
    """Compare basis alignment of ``names`` (e.g. ``blocks.5.hook_resid_post`` vs ``blocks.5.mlp.hook_post``)."""
    toks = model.prepare(input, None, None, "right")
    _, cache = model.run_with_cache(toks.ids, names, attention_mask=toks.mask)
    real = torch.ones_like(toks.ids, dtype=torch.bool) if toks.mask is None else toks.mask.bool()
    if skip_first:
        real[:, 0] = False
    g = torch.Generator().manual_seed(seed)
    out = []
    for name in names:
        acts = cache[name][real].float().cpu()  # [tokens d]: real tokens only, no padding
        rotation, _ = torch.linalg.qr(torch.randn(acts.shape[-1], acts.shape[-1], generator=g))
        out.append(
            BasisAlignment(
                name, excess_kurtosis(acts).mean().item(), excess_kurtosis(acts @ rotation).mean().item()
            )
        )
    return out
