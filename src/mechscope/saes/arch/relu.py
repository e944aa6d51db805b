"""ReLU SAE with an L1 penalty (Bricken et al. 2023, "Towards Monosemanticity"; Anthropic, April 2024 update).

``acts = ReLU(pre)``. The April 2024 update weights each latent's L1 by its decoder norm,
``sum_i f_i ||W_dec_i||``, and leaves decoder norms free: shrinking ``f_i`` while growing ``W_dec_i``
no longer dodges the penalty, so no unit-norm constraint is needed. With
``l1_scale_by_decoder_norm=False`` it is the original recipe: plain ``sum_i f_i`` and unit-norm rows.
"""

from __future__ import annotations

from typing import ClassVar

from jaxtyping import Float
from torch import Tensor

from mechscope.saes.sae import SAE, SAEConfig


class ReLUSAE(SAE):
    """ReLU activation; loss ``mse + l1_coefficient * l1``."""

    KIND = "relu"
    DEFAULTS: ClassVar = {"l1_coefficient": 5.0, "l1_scale_by_decoder_norm": True}
    COEFFICIENTS: ClassVar = {"l1": "l1_coefficient"}
    SPARSITY_LOSS = "l1"

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if cfg.l1_coefficient < 0:
            raise ValueError(f"l1_coefficient must be >= 0, got {cfg.l1_coefficient}")

    @property
    def unit_norm_decoder(self) -> bool:
        return not self.cfg.l1_scale_by_decoder_norm

    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        return pre.relu()

    def aux_losses(self, pre, acts, recon_n, target_n, dead_mask) -> dict[str, Tensor]:
        weighted = acts * self.W_dec.norm(dim=-1) if self.cfg.l1_scale_by_decoder_norm else acts
        return {"l1": weighted.sum(-1).mean()}
