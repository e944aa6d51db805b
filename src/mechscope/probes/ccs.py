"""Contrast-Consistent Search (CCS): find a truth direction without labels.

Burns, Ye, Klein & Steinhardt 2022, "Discovering Latent Knowledge in Language Models Without
Supervision" (arXiv:2212.03827). Each question ``q_i`` is asked twice, once answered "yes" (``x⁺``)
and once "no" (``x⁻``) — a *contrast pair*. Whatever the model believes, exactly one of the two is
true, so a probe ``p(x) = σ(θᵀφ(x) + b)`` that reads truth must satisfy ``p(x⁺) ≈ 1 - p(x⁻)``. CCS
fits θ to exactly that, with no labels:

    L = mean_i [ (p(x⁺_i) - (1 - p(x⁻_i)))²   +   min(p(x⁺_i), p(x⁻_i))² ]
              consistency                       confidence (rules out p = 0.5 everywhere)

Two details from the paper matter in practice:

* **Normalisation per class** (§2.2): ``φ(x⁺)`` and ``φ(x⁻)`` are centred (and scaled) *separately*.
  Otherwise the easiest "consistent" direction is the one that separates the answer tokens "yes"
  and "no" themselves, which says nothing about truth.
* **Random restarts**: the loss is non-convex; the paper keeps the lowest-loss of several
  initialisations. Here all restarts (and all hook points) are trained at once as one batched tensor.

The direction's sign is not identified (``θ`` and ``-θ`` give the same loss, swapping "true" and
"false"), so accuracy against labels is reported as ``max(acc, 1 - acc)``, as the paper does. The
supervised reference is a logistic-regression probe on ``φ(x⁺) - φ(x⁻)`` (same normalisation, same
split): an upper bound on what a linear direction can read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.probes.activations import ProbeError, one_thread


@dataclass(frozen=True, kw_only=True)
class CCSConfig:
    """Training settings (defaults from the paper's code: 10 tries, 1000 epochs, lr 1e-3, wd 0.01)."""

    n_restarts: int = 10
    """Random initialisations; the lowest-loss one is kept."""
    epochs: int = 1000
    """Full-batch AdamW steps."""
    lr: float = 1e-3
    weight_decay: float = 0.01
    normalise_std: bool = True
    """Also divide each class by its per-feature std (the paper's ``var_normalize``), not only centre it."""
    val_fraction: float = 0.25
    """Share of pairs held out to measure accuracy."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_restarts < 1 or self.epochs < 1:
            raise ValueError(f"n_restarts and epochs must be >= 1, got {self.n_restarts}, {self.epochs}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def normalise_pairs(
    pos: Float[Tensor, "... pair width"], neg: Float[Tensor, "... pair width"], *, std: bool = True
) -> tuple[Tensor, Tensor]:
    """Centre (and scale) ``φ(x⁺)`` and ``φ(x⁻)`` separately over the pairs (Burns et al. §2.2)."""

    def norm(x: Tensor) -> Tensor:
        x = x - x.mean(-2, keepdim=True)
        if std:
            s = x.std(-2, keepdim=True)
            x = x / torch.where(s > 0, s, torch.ones_like(s))
        return x

    return norm(pos), norm(neg)


def ccs_loss(p_pos: Tensor, p_neg: Tensor) -> Tensor:
    """Consistency + confidence, averaged over pairs (last dimension)."""
    consistency = (p_pos - (1 - p_neg)).pow(2)
    confidence = torch.minimum(p_pos, p_neg).pow(2)
    return (consistency + confidence).mean(-1)


@dataclass(frozen=True, kw_only=True)
class CCSProbe:
    """The kept restart at one hook point; ``p(x) = σ(x @ direction + bias)`` on normalised activations."""

    hook_name: str
    direction: Float[Tensor, " width"]
    bias: float
    loss: float
    """CCS loss of the kept restart on the training pairs."""
    restart_losses: list[float]
    accuracy: float | None
    """Held-out accuracy vs labels, sign-free: ``max(acc, 1 - acc)``; None without labels."""
    lr_accuracy: float | None
    """Held-out accuracy of a supervised logistic probe on ``φ(x⁺) - φ(x⁻)``: the upper bound."""
    flipped: bool
    """Whether the labels say the learnt direction points to "false" (its accuracy was below 0.5)."""

    def credence(self, pos: Float[Tensor, "pair width"], neg: Float[Tensor, "pair width"]) -> Tensor:
        """``½ (p(x⁺) + 1 - p(x⁻))`` per pair, for pairs normalised like the training ones."""
        pp = torch.sigmoid(pos.double() @ self.direction.double() + self.bias)
        pn = torch.sigmoid(neg.double() @ self.direction.double() + self.bias)
        return 0.5 * (pp + 1 - pn)


def _train(x_pos: Tensor, x_neg: Tensor, cfg: CCSConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Train ``[probe restart]`` CCS probes at once; returns directions, biases and final losses."""
    p, _, d = x_pos.shape
    g = torch.Generator().manual_seed(cfg.seed)
    # The paper's init: uniform in ±1/sqrt(d) (nn.Linear's default), a different draw per restart.
    bound = d**-0.5
    W = (
        (torch.rand(p, cfg.n_restarts, d, generator=g, dtype=torch.float64) * 2 - 1) * bound
    ).requires_grad_()
    b = ((torch.rand(p, cfg.n_restarts, generator=g, dtype=torch.float64) * 2 - 1) * bound).requires_grad_()
    opt = torch.optim.AdamW([W, b], lr=cfg.lr, weight_decay=cfg.weight_decay)

    def losses() -> Tensor:
        pp = torch.sigmoid(torch.einsum("pnd,prd->prn", x_pos, W) + b[..., None])
        pn = torch.sigmoid(torch.einsum("pnd,prd->prn", x_neg, W) + b[..., None])
        return ccs_loss(pp, pn)  # [probe restart]

    for _ in range(cfg.epochs):
        opt.zero_grad()
        losses().sum().backward()  # restarts and probes are independent: the sum's gradient is each one's
        opt.step()
    with torch.no_grad():
        return W.detach(), b.detach(), losses()


def train_ccs(
    pos: dict[str, Float[Tensor, "_pair _width"]],
    neg: dict[str, Float[Tensor, "_pair _width"]],
    labels: Sequence[bool | int] | None = None,
    cfg: CCSConfig = CCSConfig(),
) -> dict[str, CCSProbe]:
    """CCS at each hook point from contrast-pair activations (``pos[h][i]``: pair ``i`` answered "yes").

    With ``labels`` (1 = the "yes" statement is true), a held-out split measures accuracy and a
    supervised logistic probe gives the upper bound; without them all pairs train and accuracy is None.

    Raises:
        ProbeError: mismatched hook points or pair counts, labels of the wrong length or not binary.
    """
    with one_thread():
        return _train_ccs(pos, neg, labels, cfg)


def _train_ccs(
    pos: dict[str, Tensor], neg: dict[str, Tensor], labels: Sequence[bool | int] | None, cfg: CCSConfig
) -> dict[str, CCSProbe]:
    if set(pos) != set(neg) or not pos:
        raise ProbeError(f"pos and neg must name the same hook points, got {sorted(pos)} and {sorted(neg)}")
    names = list(pos)
    n = len(pos[names[0]])
    for h in names:
        if pos[h].shape != neg[h].shape or len(pos[h]) != n:
            raise ProbeError(
                f"{h}: pos {tuple(pos[h].shape)} and neg {tuple(neg[h].shape)} must be the same [pair width]"
            )
    if n < 4:
        raise ProbeError(f"CCS needs at least 4 contrast pairs, got {n}")
    y = None
    if labels is not None:
        if len(labels) != n:
            raise ProbeError(f"{len(labels)} labels for {n} contrast pairs; give one label per pair")
        y = torch.tensor([int(v) for v in labels])
        if not set(y.tolist()) <= {0, 1}:
            raise ProbeError(f"CCS labels must be 0/1 or bools, got values {sorted(set(y.tolist()))}")
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=g)
    k = max(1, round(n * cfg.val_fraction)) if y is not None else 0
    if k >= n:
        raise ProbeError(
            f"val_fraction {cfg.val_fraction} holds out all {n} contrast pairs; lower it or give more pairs"
        )
    va, tr = perm[:k].sort().values, perm[k:].sort().values
    out: dict[str, CCSProbe] = {}
    by_width: dict[int, list[str]] = {}
    for h in names:
        by_width.setdefault(pos[h].shape[-1], []).append(h)
    for group in by_width.values():
        xp, xn = normalise_pairs(
            torch.stack([pos[h] for h in group]).double(),
            torch.stack([neg[h] for h in group]).double(),
            std=cfg.normalise_std,
        )
        W, b, loss = _train(xp[:, tr], xn[:, tr], cfg)
        best = loss.argmin(1)
        lr_acc = _supervised(xp - xn, y, tr, va, group) if y is not None else {}
        for i, h in enumerate(group):
            w, bias = W[i, best[i]], float(b[i, best[i]])
            acc, flipped = None, False
            if y is not None:
                cred = 0.5 * (torch.sigmoid(xp[i, va] @ w + bias) + 1 - torch.sigmoid(xn[i, va] @ w + bias))
                raw = float(((cred > 0.5).long() == y[va]).double().mean())
                acc, flipped = max(raw, 1 - raw), raw < 0.5
            out[h] = CCSProbe(
                hook_name=h,
                direction=w.float(),
                bias=bias,
                loss=float(loss[i, best[i]]),
                restart_losses=loss[i].tolist(),
                accuracy=acc,
                lr_accuracy=lr_acc.get(h),
                flipped=flipped,
            )
    return {h: out[h] for h in names}


def _supervised(diff: Tensor, y: Tensor, tr: Tensor, va: Tensor, group: list[str]) -> dict[str, float]:
    """Held-out accuracy of logistic probes on the pair differences (the paper's supervised baseline)."""
    from mechscope.probes.linear import _standardise, fit_logistic, score

    if len(set(y[tr].tolist())) < 2:
        return {}
    mean, std = _standardise(diff[:, tr], group)
    z = (diff - mean) / std
    W, b = fit_logistic(z[:, tr], y[tr].expand(len(group), -1), 2)
    logits = torch.bmm(z[:, va], W) + b[:, None]
    return {h: score(logits[i], y[va], "classification") for i, h in enumerate(group)}


def ccs_layers(
    model,
    pos_texts: Sequence[str],
    neg_texts: Sequence[str],
    labels: Sequence[bool | int] | None = None,
    *,
    names: Sequence[str] | None = None,
    cfg: CCSConfig = CCSConfig(),
    batch_size: int = 32,
    progress=None,
) -> dict[str, CCSProbe]:
    """CCS at every layer from contrast-pair texts, read at each text's last token.

    ``names`` defaults to every block's ``resid_post``. The embeddings are left out: at the last token
    they are the answer token's embedding, the same within each class, so per-class normalisation
    leaves nothing to fit.
    """
    from mechscope.probes.activations import default_probe_hooks, gather_activations

    names = list(names) if names is not None else default_probe_hooks(model)[1:]

    if len(pos_texts) != len(neg_texts):
        raise ProbeError(f"{len(pos_texts)} 'yes' texts but {len(neg_texts)} 'no' texts; give them in pairs")
    acts = gather_activations(
        model, list(pos_texts) + list(neg_texts), names, batch_size=batch_size, progress=progress
    )
    n = len(pos_texts)
    return train_ccs({h: a[:n] for h, a in acts.items()}, {h: a[n:] for h, a in acts.items()}, labels, cfg)
