"""Evaluating an SAE: reconstruction (L0, MSE, FVU), latent health (dead, dense, density) and downstream loss.

Definitions (every sum in float64, over all evaluated tokens):

* ``l0``: mean number of non-zero latents per token.
* ``mse``: mean over tokens of the squared error summed over the reconstructed dimensions, in the model's
  units (:attr:`SAEOutput.losses` holds the same in the *normalised* space).
* ``fvu``: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` with the mean
  over the evaluated tokens; ``explained_variance = 1 - fvu``.
* ``density[i]``: fraction of tokens on which latent ``i`` is non-zero; ``dead_fraction``: latents with
  density 0; ``dense_fraction``: latents with density above ``dense_threshold`` (default 0.1).
* ``ce_loss_*``: mean next-token cross-entropy over every predicted position of the contexts, for the
  clean model, with the SAE's reconstruction spliced in (no error term), and with the hook point zeroed;
  special tokens (BOS, separators) keep their clean activation in both (``exclude_special``);
  ``ce_loss_recovered = (zero - sae) / (zero - clean)`` (1: as good as the model, 0: as bad as zero
  ablation). ``kl`` is the mean over positions of ``KL(clean || spliced)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from mechscope.models import HookedModel, edits
from mechscope.saes.sae import SAE, eval_mode
from mechscope.saes.sources import Batch


@dataclass
class ReconstructionMetrics:
    n_tokens: int
    l0: float
    mse: float
    fvu: float
    explained_variance: float
    dead_fraction: float
    dense_fraction: float
    density: Tensor = field(repr=False)
    """``[d_sae]`` fraction of tokens on which each latent fires."""


@dataclass
class DownstreamMetrics:
    n_tokens: int
    ce_loss_clean: float
    ce_loss_sae: float
    ce_loss_zero: float
    ce_loss_recovered: float
    kl: float


@dataclass
class SAEEvaluation:
    reconstruction: ReconstructionMetrics
    downstream: DownstreamMetrics | None = None

    def to_dict(self) -> dict:
        rec = {k: v for k, v in asdict(self.reconstruction).items() if k != "density"}
        return {"reconstruction": rec, "downstream": self.downstream and asdict(self.downstream)}

    def density_histogram(self, bins: int = 40) -> str:
        """An SVG histogram of ``log10(density)`` over live latents, dead latents counted beside it."""
        from mechscope.viz.sae import density_histogram

        return density_histogram(self.reconstruction.density, bins=bins)


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, batches: Iterable[Batch], *, dense_threshold: float = 0.1
) -> ReconstructionMetrics:
    """L0, MSE, FVU and latent densities of ``sae`` over ``batches`` (``x`` or ``(x, target)``), one pass."""
    n, err, l0 = 0, 0.0, 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    s1 = torch.zeros(sae.cfg.d_out, dtype=torch.float64)
    s2 = 0.0
    with eval_mode(sae):
        for batch in batches:
            x, y = batch if isinstance(batch, tuple) else (batch, batch)
            x, y = x.to(sae.device), y.to(sae.device, torch.float64)
            acts = sae.encode(x)
            recon = sae.decode(acts).double()
            n += len(x)
            err += float((recon - y).pow(2).sum())
            active = acts > 0
            l0 += float(active.sum())
            fired += active.sum(0).double().cpu()
            s1 += y.sum(0).cpu()
            s2 += float(y.pow(2).sum())
    if n == 0:
        raise ValueError("no rows to evaluate: the batches are empty")
    variance = s2 - float(s1.pow(2).sum()) / n  # sum ||y - mean||^2
    fvu = err / variance if variance > 0 else float("nan")
    density = fired / n
    return ReconstructionMetrics(
        n_tokens=n,
        l0=l0 / n,
        mse=err / n,
        fvu=fvu,
        explained_variance=1 - fvu,
        dead_fraction=float((density == 0).double().mean()),
        dense_fraction=float((density > dense_threshold).double().mean()),
        density=density.float(),
    )


def _next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-position cross-entropy ``[batch pos-1]`` in float64."""
    return F.cross_entropy(logits[:, :-1].double().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")


@torch.no_grad()
def downstream_metrics(
    model: HookedModel,
    sae: SAE,
    contexts: Iterable[Int[Tensor, "n_ctx pos"]],
    *,
    exclude_special: bool = True,
) -> DownstreamMetrics:
    """CE loss with the SAE spliced in vs clean and zero-ablated, and KL to clean (see module docstring).

    ``exclude_special``: positions holding a special token (BOS, separators) keep their clean activation
    in both the splice and the zero-ablation, as SAELens' ``exclude_special_tokens_from_reconstruction``:
    an SAE trained without them (the default of every source) is not asked to rebuild an attention sink.
    """
    written = sae.cfg.out_hook_name or sae.cfg.hook_name
    special_ids = torch.tensor(sorted(model.tokenizer.all_special_ids), device=model.device)
    n, clean_sum, sae_sum, zero_sum, kl_sum = 0, 0.0, 0.0, 0.0, 0.0
    with eval_mode(sae):
        for tokens in contexts:
            tokens = tokens.to(model.device)
            clean, cache = model.run_with_cache(tokens, names=[written])
            keep = torch.isin(tokens, special_ids)

            # after the splice / ablation
            def restore(x: Tensor, hook, keep=keep, act=cache[written]) -> Tensor:
                return torch.where(keep[..., None], act.to(x.dtype), x)

            restoring = {written: restore} if exclude_special and bool(keep.any()) else {}
            with model.saes(sae), model.hooks(restoring):
                spliced = model(tokens)
            with model.hooks({written: edits.zero()}), model.hooks(restoring):
                zeroed = model(tokens)
            n += tokens.shape[0] * (tokens.shape[1] - 1)
            clean_sum += float(_next_token_loss(clean, tokens).sum())
            sae_sum += float(_next_token_loss(spliced, tokens).sum())
            zero_sum += float(_next_token_loss(zeroed, tokens).sum())
            lp, lq = clean[:, :-1].double().log_softmax(-1), spliced[:, :-1].double().log_softmax(-1)
            kl_sum += float((lp.exp() * (lp - lq)).sum())
    if n == 0:
        raise ValueError("no contexts to evaluate (each needs at least 2 tokens)")
    clean_l, sae_l, zero_l = clean_sum / n, sae_sum / n, zero_sum / n
    gap = zero_l - clean_l
    return DownstreamMetrics(
        n_tokens=n,
        ce_loss_clean=clean_l,
        ce_loss_sae=sae_l,
        ce_loss_zero=zero_l,
        ce_loss_recovered=(zero_l - sae_l) / gap if gap != 0 else float("nan"),
        kl=kl_sum / n,
    )


def store_contexts(store, n_contexts: int, batch_size: int = 8) -> Iterable[Int[Tensor, "n_ctx pos"]]:
    """The first ``n_contexts`` token contexts of an activation store, in batches."""
    total = min(n_contexts, store.n_tokens // store.context_length)
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        yield torch.stack([store.context_tokens(c) for c in range(start, stop)])


def evaluate_sae(
    sae: SAE,
    batches: Iterable[Batch],
    *,
    model: HookedModel | None = None,
    contexts: Iterable[Int[Tensor, "n_ctx pos"]] | None = None,
    dense_threshold: float = 0.1,
) -> SAEEvaluation:
    """Reconstruction metrics over ``batches``; with ``model`` and ``contexts`` also the downstream loss."""
    rec = reconstruction_metrics(sae, batches, dense_threshold=dense_threshold)
    down = None
    if model is not None and contexts is not None:
        down = downstream_metrics(model, sae, contexts)
    return SAEEvaluation(rec, down)
