"""Geometry of representations: projections, circular features, and the angles between concepts.

Three questions the seeds ask of a set of activations:

* **What does it look like?** :func:`project` maps ``[example width]`` activations to 2-D with PCA
  (default; exact, deterministic) or UMAP (optional ``umap-learn``), to be scattered and coloured by a
  label (``mechscope.viz.probes``).
* **Is a cyclic concept represented as a circle?** Engels et al. 2024 ("Not All Language Model
  Features Are Linear", arXiv:2405.14860) find days of the week and months of the year on circles in
  a 2-D subspace of GPT-2's residual stream. :func:`fit_circle` tests that claim on any model: take the
  mean activation of each of the ``K`` values, and regress them on ``(cos 2πk/K, sin 2πk/K)``. The
  least-squares answer is the first discrete-Fourier mode of the class means, so the share of their
  variance it explains (``circle_r2``) is 1 for a perfect (possibly elliptic) ordered circle in some
  plane. A random arrangement explains ``2 / (K - 1)`` on average; the fit reports the same statistic
  for random orderings of the labels, and the share that beat the true order (a permutation p-value),
  so "circular" is judged against chance, not by eye.
* **How do concepts relate?** Park et al. 2024 ("The Geometry of Categorical and Hierarchical Concepts
  in Large Language Models", arXiv:2406.01506) find hierarchically related concepts orthogonal
  (``animal`` ⟂ ``mammal - animal``) and categories forming simplices. :func:`concept_directions`
  gives one direction per label (its mean minus the grand mean), :func:`cosine_matrix` their cosines,
  and :func:`hierarchy_cosines` the parent-vs-child-minus-parent test. Park et al. measure in a
  "causal inner product" that whitens by the unembedding covariance; :func:`whitening` builds that
  transform from ``W_U`` so the same cosines can be taken in either geometry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.probes.activations import ProbeError, one_thread


@dataclass(frozen=True)
class Projection:
    """Activations projected to a few dimensions."""

    coords: Float[Tensor, "example k"]
    method: str
    explained_variance_ratio: Tensor | None = None
    """PCA only: the share of total variance along each component."""
    components: Tensor | None = None
    """PCA only: ``[k width]`` orthonormal directions."""
    mean: Tensor | None = None
    """PCA only: the mean subtracted before projecting."""


def pca(x: Float[Tensor, "example width"], k: int = 2) -> Projection:
    """Principal components by SVD of the centred data (signs fixed: each component's largest-magnitude
    loading is positive, so results are reproducible)."""
    if x.ndim != 2 or len(x) < 2:
        raise ProbeError(f"PCA needs [example width] with at least 2 examples, got shape {tuple(x.shape)}")
    xd = x.double()
    mean = xd.mean(0)
    _, s, vh = torch.linalg.svd(xd - mean, full_matrices=False)
    k = min(k, vh.shape[0])
    comps = vh[:k]
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * sign
    var = s.pow(2)
    if float(var.sum()) == 0:
        raise ProbeError("the activations have no variance: every example is the same vector")
    return Projection(
        ((xd - mean) @ comps.T).float(), "pca", (var[:k] / var.sum()).float(), comps.float(), mean.float()
    )


def umap_project(
    x: Float[Tensor, "example width"], k: int = 2, *, seed: int = 0, n_neighbors: int = 15
) -> Projection:
    """UMAP (McInnes et al. 2018) via ``umap-learn``, imported only here: it is an optional dependency."""
    try:
        import umap  # noqa: PLC0415
    except ImportError:
        raise ProbeError(
            "UMAP needs the optional package umap-learn: pip install umap-learn "
            "(or pip install 'mechscope[umap]'); PCA (method='pca') needs nothing extra"
        ) from None
    reducer = umap.UMAP(n_components=k, n_neighbors=min(n_neighbors, len(x) - 1), random_state=seed)
    return Projection(torch.as_tensor(reducer.fit_transform(x.float().numpy())).float(), "umap")


def project(x: Float[Tensor, "example width"], method: str = "pca", k: int = 2) -> Projection:
    """2-D (or ``k``-D) coordinates of the activations for plotting: ``method`` is "pca" or "umap"."""
    if method == "pca":
        return pca(x, k)
    if method == "umap":
        return umap_project(x, k)
    raise ProbeError(f"unknown projection {method!r}; use 'pca' or 'umap'")


@dataclass(frozen=True)
class CircleFit:
    """How well a circle in a 2-D subspace explains the class means of a cyclic concept."""

    circle_r2: float
    """Share of the class means' variance explained by ``c + B (cos θ_k, sin θ_k)``, ``θ_k = 2πk/K``."""
    chance_r2: float
    """The same share for random orderings of the classes (mean over ``n_permutations``)."""
    p_value: float
    """Share of random orderings that explain at least as much as the true order (with +1 smoothing)."""
    aspect: float
    """Minor / major axis of the fitted ellipse: 1 is a circle, near 0 a line."""
    in_order: bool
    """Whether the class means, read by angle in the plane, go round in the true cyclic order."""
    plane: Float[Tensor, "2 width"]
    """Orthonormal basis of the fitted plane."""
    means_2d: Float[Tensor, "n_classes 2"]
    """Class means projected into the plane (centred)."""
    coords: Float[Tensor, "example 2"]
    """Every example projected into the plane (centred on the class means' centre)."""
    variance_in_plane: float
    """Share of the *examples'* total variance that lies in the plane."""
    classes: tuple


def _first_harmonic_r2(means: Tensor, order: Tensor) -> tuple[float, Tensor]:
    """R² of regressing centred class means on (cos, sin) of their angles in ``order``; and ``B``."""
    k = len(means)
    theta = 2 * math.pi * order.double() / k
    basis = torch.stack([theta.cos(), theta.sin()], 1)  # [K 2], orthogonal columns of norm² K/2
    centred = means - means.mean(0)
    B = centred.T @ basis / (k / 2)  # least squares, using the basis' orthogonality
    fitted = basis @ B.T
    return float(fitted.pow(2).sum() / centred.pow(2).sum().clamp_min(1e-300)), B


def fit_circle(
    acts: Float[Tensor, "example width"],
    labels: Sequence[Any],
    order: Sequence[Any],
    *,
    n_permutations: int = 1000,
    seed: int = 0,
) -> CircleFit:
    """Test whether a cyclic concept (``order``: e.g. Monday..Sunday) lies on a circle in some plane.

    Args:
        acts: activations, one row per example.
        labels: each example's value, one of ``order``.
        order: the values in their cyclic order.
        n_permutations: random orderings for the chance level and p-value.
    """
    with one_thread():
        return _fit_circle(acts, labels, list(order), n_permutations, seed)


def _fit_circle(
    acts: Tensor, labels: Sequence[Any], order: list, n_permutations: int, seed: int
) -> CircleFit:
    if len(labels) != len(acts):
        raise ProbeError(f"{len(labels)} labels for {len(acts)} examples; give one label per example")
    if len(order) < 3 or len(set(order)) != len(order):
        raise ProbeError(f"order must list at least 3 distinct values, got {order}")
    missing = [v for v in order if v not in set(labels)]
    unknown = sorted({str(v) for v in labels} - {str(v) for v in order})
    if missing or unknown:
        raise ProbeError(
            f"every value in order needs examples and every label must be in order; "
            f"missing {missing}, unknown {unknown}"
        )
    x = acts.double()
    idx = torch.tensor([order.index(v) for v in labels])
    means = torch.stack([x[idx == c].mean(0) for c in range(len(order))])
    k = len(order)
    r2, B = _first_harmonic_r2(means, torch.arange(k))
    if float(B.norm()) == 0:
        raise ProbeError("the class means are all equal: the activations do not depend on the label")
    g = torch.Generator().manual_seed(seed)
    null = torch.tensor(
        [_first_harmonic_r2(means, torch.randperm(k, generator=g))[0] for _ in range(n_permutations)]
    )
    q, _ = torch.linalg.qr(B)  # [width 2]
    plane = q.T
    sv = torch.linalg.svdvals(B)
    centre = means.mean(0)
    means_2d = (means - centre) @ q
    angles = torch.atan2(means_2d[:, 1], means_2d[:, 0])
    ranks = torch.argsort(torch.argsort(angles))
    steps = (ranks.roll(-1) - ranks) % k  # +1 everywhere (or -1: the other way round) iff in cyclic order
    in_order = bool((steps == 1).all() or (steps == k - 1).all())
    xc = x - x.mean(0)
    in_plane = float((xc @ q).pow(2).sum() / xc.pow(2).sum().clamp_min(1e-300))
    return CircleFit(
        circle_r2=r2,
        chance_r2=float(null.mean()),
        p_value=float(((null >= r2 - 1e-12).sum() + 1) / (n_permutations + 1)),
        aspect=float(sv[1] / sv[0]),
        in_order=in_order,
        plane=plane.float(),
        means_2d=means_2d.float(),
        coords=((x - centre) @ q).float(),
        variance_in_plane=in_plane,
        classes=tuple(order),
    )


def concept_directions(
    acts: Float[Tensor, "example width"], labels: Sequence[Any], *, whiten: Tensor | None = None
) -> dict[Any, Float[Tensor, " width"]]:
    """One direction per label: its examples' mean minus the mean over all labels' means.

    ``whiten`` (a ``[width width]`` matrix from :func:`whitening`) maps activations first.
    """
    if len(labels) != len(acts):
        raise ProbeError(f"{len(labels)} labels for {len(acts)} examples; give one label per example")
    x = acts.double() if whiten is None else acts.double() @ whiten.double().T
    values = list(dict.fromkeys(labels))
    means = {v: x[[i for i, lab in enumerate(labels) if lab == v]].mean(0) for v in values}
    grand = torch.stack(list(means.values())).mean(0)
    return {v: (m - grand).float() for v, m in means.items()}


def cosine_matrix(directions: dict[Any, Float[Tensor, " width"]]) -> Float[Tensor, "n n"]:
    """Pairwise cosine similarities, in the order of ``directions``."""
    d = torch.stack([v.double() for v in directions.values()])
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (d @ d.T).float()


def hierarchy_cosines(
    parent: Float[Tensor, " width"], children: dict[Any, Float[Tensor, " width"]]
) -> dict[Any, float]:
    """``cos(parent, child - parent)`` per child: near 0 is Park et al.'s orthogonality of hierarchy."""
    p = parent.double()
    return {
        k: float(torch.nn.functional.cosine_similarity(p, c.double() - p, dim=0)) for k, c in children.items()
    }


def whitening(
    unembed: Float[Tensor, "d_model d_vocab"], *, inverse: bool = False
) -> Float[Tensor, "d_model d_model"]:
    """Park et al.'s causal inner product from the unembedding vectors γ (columns of ``W_U``).

    ``A = Cov(γ)^{-1/2}`` whitens unembedding vectors (``g = A (γ - E γ)``), under which causally
    separable concepts are orthogonal. Residual-stream activations transform the other way
    (``A^{-T}``, because ``λᵀγ`` must stay the logit), so pass ``inverse=True`` for them.
    Apply either as ``x @ M.T`` (as :func:`concept_directions` does with ``whiten=M``).
    """
    cov = torch.cov(unembed.double())
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(evals.max() * 1e-10)
    scale = evals.sqrt() if inverse else evals.rsqrt()
    return ((evecs * scale) @ evecs.T).float()
