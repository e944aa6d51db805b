"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").

In training, the ``k * n_tokens`` largest ReLU'd pre-activations of the *whole batch* survive, so
L0 is ``k`` on average while easy tokens use fewer latents and hard ones more. That makes a token's
code depend on its batch, so inference instead uses one global threshold, JumpReLU-style:
``acts = ReLU(pre) * (pre > threshold)``, with the threshold the running mean of the smallest
selected activation per batch (an EMA updated by every training-mode forward, like BatchNorm's
statistics; the paper averages it over batches). AuxK is inherited from TopK.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.saes.arch.topk import TopKSAE
from mechscope.saes.sae import SAEConfig, SAEOutput


def batch_topk_acts(pre: Float[Tensor, "... d_sae"], k: int) -> Float[Tensor, "... d_sae"]:
    """Keep the ``k * n_rows`` largest ReLU'd entries of the whole tensor, zero the rest."""
    flat = pre.relu().flatten()
    n = min(k * pre[..., 0].numel(), flat.numel())
    values, index = flat.topk(n, sorted=False)
    return torch.zeros_like(flat).scatter(0, index, values).view_as(pre)


class BatchTopKSAE(TopKSAE):
    """k latents per token on average over a training batch; a learned global threshold at inference."""

    KIND = "batchtopk"
    DEFAULTS: ClassVar = {**TopKSAE.DEFAULTS, "threshold_momentum": 0.01}

    def __init__(self, cfg: SAEConfig, *, init: bool = True):
        super().__init__(cfg, init=init)
        # NaN until the first training forward: inference before that would silently be a plain ReLU.
        self.register_buffer("threshold", torch.full((), float("nan"), dtype=cfg.torch_dtype))

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        super().check_config(cfg)
        if not 0 < cfg.threshold_momentum <= 1:
            raise ValueError(f"threshold_momentum must be in (0, 1], got {cfg.threshold_momentum}")

    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        if self.training:
            return batch_topk_acts(pre, self.cfg.k)
        if torch.isnan(self.threshold):
            raise RuntimeError(
                "this BatchTopK SAE has no inference threshold yet: run training-mode forwards "
                "(sae.train()) or set sae.threshold"
            )
        return pre.relu() * (pre > self.threshold)

    def forward(self, x, target=None, *, dead_mask=None) -> SAEOutput:
        out = super().forward(x, target, dead_mask=dead_mask)
        if self.training:
            self.update_threshold_(out.acts)
        return out

    @torch.no_grad()
    def update_threshold_(self, acts: Float[Tensor, "... d_sae"]) -> None:
        """Move the threshold towards this batch's smallest selected (positive) activation."""
        positive = acts[acts > 0]
        if positive.numel() == 0:
            return
        low = positive.min().to(self.threshold.dtype)
        m = self.cfg.threshold_momentum
        self.threshold.copy_(low if torch.isnan(self.threshold) else (1 - m) * self.threshold + m * low)
