"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; the architecture of Gemma Scope).

``acts = JumpReLU_theta(ReLU(pre)) = ReLU(pre) * H(ReLU(pre) - theta)`` with a learned threshold per
latent, and an L0 penalty ``sum_i H(ReLU(pre_i) - theta_i)`` (as in the paper's pseudo-code).
Both are step functions, so the paper trains theta with straight-through estimators whose
pseudo-derivatives replace the Dirac delta by a rectangle kernel ``K(u) = 1[-1/2 < u < 1/2]`` of
bandwidth epsilon (section 4):

* JumpReLU: ``d/dz = H(z - theta)``, ``d/dtheta = -(theta / eps) K((z - theta) / eps)``;
* Heaviside (the L0 term): ``d/dz = 0``, ``d/dtheta = -(1 / eps) K((z - theta) / eps)``.

So the L0 penalty trains only the thresholds, and the encoder learns from the reconstruction alone.
theta is a plain parameter (not ``log theta`` as in the paper: Adam's ~lr-sized steps move a log
multiplicatively and barely shift a small threshold, SAELens issue #494), clamped at 0 by
:meth:`apply_constraints_`. Decoder rows are kept at unit norm, as in DeepMind's Gated and JumpReLU
training setups.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.saes.sae import SAE, SAEConfig


def rectangle(u: Tensor) -> Tensor:
    """The kernel ``K(u) = 1`` on ``(-1/2, 1/2)``, else 0."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _per_latent(t: Tensor) -> Tensor:
    """Sum a ``[... d_sae]`` gradient over the leading axes onto a ``[d_sae]`` threshold."""
    return t.reshape(-1, t.shape[-1]).sum(0)


class JumpReLUFunction(torch.autograd.Function):
    """``z * H(z - theta)`` with the paper's pseudo-derivative for ``theta``."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(theta / eps) * rectangle((z - theta) / eps) * grad
        return (z > theta).to(grad.dtype) * grad, _per_latent(grad_theta), None


class StepFunction(torch.autograd.Function):
    """``H(z - theta)`` with the paper's pseudo-derivative for ``theta`` and none for ``z``."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        return torch.zeros_like(z), _per_latent(-(1.0 / eps) * rectangle((z - theta) / eps) * grad), None


class JumpReLUSAE(SAE):
    """Per-latent thresholds; loss ``mse + l0_coefficient * l0``."""

    KIND = "jumprelu"
    DEFAULTS: ClassVar = {"l0_coefficient": 1.0, "jumprelu_bandwidth": 0.05, "jumprelu_init_threshold": 0.01}
    COEFFICIENTS: ClassVar = {"l0": "l0_coefficient"}
    SPARSITY_LOSS = "l0"

    def __init__(self, cfg: SAEConfig, *, init: bool = True):
        super().__init__(cfg, init=init)
        self.threshold = nn.Parameter(
            torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold, dtype=cfg.torch_dtype)
        )

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if cfg.jumprelu_bandwidth <= 0:
            raise ValueError(f"jumprelu_bandwidth must be > 0, got {cfg.jumprelu_bandwidth}")
        if cfg.jumprelu_init_threshold < 0 or cfg.l0_coefficient < 0:
            raise ValueError("jumprelu_init_threshold and l0_coefficient must be >= 0")

    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        return JumpReLUFunction.apply(pre.relu(), self.threshold, self.cfg.jumprelu_bandwidth)

    def aux_losses(self, pre, acts, recon_n, target_n, dead_mask) -> dict[str, Tensor]:
        fired = StepFunction.apply(pre.relu(), self.threshold, self.cfg.jumprelu_bandwidth)
        return {"l0": fired.sum(-1).mean()}

    @torch.no_grad()
    def apply_constraints_(self) -> None:
        super().apply_constraints_()
        self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def fold_decoder_norm_(self) -> None:
        n = self.decoder_norms().clamp_min(1e-12)
        super().fold_decoder_norm_()
        self.threshold.mul_(n)  # pre-activations were scaled by n: the same latents must still pass
