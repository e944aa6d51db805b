"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

``acts = ReLU(TopK_k(pre))``: the ``k`` largest pre-activations of each token survive, so L0 is set
directly (at most ``k``; fewer only when fewer than ``k`` are positive) and there is no sparsity
penalty. AuxK keeps latents from dying: the ``k_aux`` largest pre-activations among
the *dead* latents (a mask the trainer passes) reconstruct the main reconstruction's error
``e = x - recon`` with the decoder alone, ``L_aux = ||e - W_dec^T z_aux||^2``, scaled by
``min(n_dead / k_aux, 1)`` so that few dead latents do not get an outsized push (as in SAELens and
sparsify). Only dead latents receive gradient from it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.saes.arch.sparse import (
    SPARSE_DTYPES,
    gathered_pre_acts,
    sparse_code,
    sparse_decode,
    use_sparse,
)
from mechscope.saes.sae import SAE, SAEConfig, SAEOutput


def topk_acts(pre: Float[Tensor, "... d_sae"], k: int) -> Float[Tensor, "... d_sae"]:
    """Keep the ``k`` largest entries of each row (then ReLU), zero the rest."""
    values, index = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, index, values.relu())


class TopKSAE(SAE):
    """Exactly-k latents per token; loss ``mse + aux_coefficient * aux``."""

    KIND = "topk"
    DEFAULTS: ClassVar = {"k": 32, "k_aux": lambda cfg: max(1, cfg.d_out // 2), "aux_coefficient": 1 / 32}
    COEFFICIENTS: ClassVar = {"aux": "aux_coefficient"}

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        for name in ("k", "k_aux"):
            if not 1 <= getattr(cfg, name) <= cfg.d_sae:
                raise ValueError(f"{name} must be in [1, d_sae={cfg.d_sae}], got {getattr(cfg, name)}")
        if cfg.aux_coefficient < 0:
            raise ValueError(f"aux_coefficient must be >= 0, got {cfg.aux_coefficient}")

    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        return topk_acts(pre, self.cfg.k)

    sparse_kernels: bool | None = None
    """Training steps on the sparse kernels: None decides by device and width (:func:`use_sparse`)."""

    def forward(self, x, target=None, *, dead_mask=None) -> SAEOutput:
        # Training steps take the sparse kernels (same maths, a fraction of the work); inference and kinds
        # that select latents differently (BatchTopK overrides ``activation``) take the dense path.
        wanted = self.sparse_kernels
        sparse = (
            self.training
            and torch.is_grad_enabled()
            and x.ndim == 2
            and self.dtype in SPARSE_DTYPES
            and type(self).activation is TopKSAE.activation
            and (use_sparse(x.device, self.cfg.d_sae) if wanted is None else wanted)
        )
        if not sparse:
            return super().forward(x, target, dead_mask=dead_mask)
        if target is None:
            if self.cfg.is_transcoder:
                raise ValueError("a transcoder reconstructs another hook point: pass target=")
            target = x
        x_in = x.to(self.dtype) * self.input_scale
        if self.cfg.apply_b_dec_to_input:
            x_in = x_in - self.b_dec
        with torch.no_grad():
            pre = x_in @ self.W_enc + self.b_enc
        idx = pre.topk(self.cfg.k, dim=-1, sorted=False).indices
        values = gathered_pre_acts(x_in, self.W_enc, self.b_enc, pre, idx).relu()
        recon_n = sparse_decode(values, idx, self.W_dec) + self.b_dec
        target_n = target.to(self.dtype) * self.output_scale
        losses = {"mse": (recon_n - target_n).pow(2).sum(-1).mean()}
        losses["aux"] = self._sparse_aux(x_in, pre, recon_n, target_n, dead_mask)
        return SAEOutput(recon_n / self.output_scale, sparse_code(values, idx, self.cfg.d_sae), pre, losses)

    def _sparse_aux(self, x_in, pre, recon_n, target_n, dead_mask) -> Tensor:
        """AuxK as in :meth:`aux_losses`, on the sparse kernels."""
        if dead_mask is None:
            return recon_n.new_zeros(())
        self._check_dead_mask(dead_mask)
        if not dead_mask.any():
            return recon_n.new_zeros(())
        n_dead = int(dead_mask.sum())
        k_aux = min(self.cfg.k_aux, n_dead)
        idx = (
            pre.masked_fill(~dead_mask.to(pre.device), float("-inf"))
            .topk(k_aux, dim=-1, sorted=False)
            .indices
        )
        z = gathered_pre_acts(x_in, self.W_enc, self.b_enc, pre, idx).relu()
        residual = (target_n - recon_n).detach()
        loss = (sparse_decode(z, idx, self.W_dec) - residual).pow(2).sum(-1).mean()
        return loss * min(n_dead / self.cfg.k_aux, 1.0)

    def _check_dead_mask(self, dead_mask: Tensor) -> None:
        if dead_mask.shape != (self.cfg.d_sae,) or dead_mask.dtype != torch.bool:
            raise ValueError(
                f"dead_mask must be a bool [{self.cfg.d_sae}] tensor, "
                f"got {dead_mask.dtype} {tuple(dead_mask.shape)}"
            )

    def aux_losses(self, pre, acts, recon_n, target_n, dead_mask) -> dict[str, Tensor]:
        zero = {"aux": recon_n.new_zeros(())}
        if dead_mask is None:
            return zero
        self._check_dead_mask(dead_mask)
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return zero
        k_aux = min(self.cfg.k_aux, n_dead)
        # -inf keeps live latents out of the selection (k_aux <= n_dead), so they get no gradient.
        z_aux = topk_acts(pre.masked_fill(~dead_mask.to(pre.device), float("-inf")), k_aux)
        residual = (target_n - recon_n).detach()
        loss = (z_aux @ self.W_dec - residual).pow(2).sum(-1).mean()
        return {"aux": loss * min(n_dead / self.cfg.k_aux, 1.0)}

    @torch.no_grad()
    def fold_decoder_norm_(self) -> None:
        raise ValueError(
            f"{self.KIND}: rescaling latents changes which are the top k, so decoder norms cannot be folded; "
            "use normalise_decoder_() (training keeps them at 1 anyway)"
        )
