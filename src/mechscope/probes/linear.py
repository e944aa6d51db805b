"""Linear probes: which layer's activations linearly encode a label, and in which direction.

A probe is a linear map fitted from a hook point's activation to a label: logistic regression for
classes, ridge regression for numbers (Alain & Bengio 2016, "Understanding intermediate layers using
linear classifier probes", arXiv:1610.01644). Fitting one per layer and plotting held-out accuracy
(or R²) against depth gives the "which layer knows" curve.

A probe that decodes a label shows the information is *there*, not that the model *uses* it, and a
probe powerful enough decodes almost anything. So every fit is paired with a **control task**
(Hewitt & Liang 2019, "Designing and Interpreting Probes with Control Tasks", arXiv:1909.03368): the
same probe trained on the same activations with the labels randomly permuted. The gap between the
two ("selectivity") is what says the layer encodes the label rather than the probe memorising it.

Implementation: features are standardised on the training split (probe weights are then comparable
across layers whose norms differ a hundredfold); logistic regression is fitted full-batch with L-BFGS
in float64, every hook point and its control in *one* batched problem (the objective is a sum of
independent ones); ridge regression is closed form. Both minimise

    mean_loss + l2 / 2 * ||W||^2          (in standardised units)

which is scikit-learn's ``LogisticRegression(C=1 / (l2 * n_train))`` and ``Ridge(alpha=n_train * l2)``
after ``StandardScaler`` — the tests check that equality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.probes.activations import ProbeError, one_thread
from mechscope.probes.labels import Task, encode_labels, fixed_split, split_indices


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """How probes are fitted and validated."""

    task: Task = "auto"
    """``classification`` (logistic), ``regression`` (ridge), or ``auto``: float labels mean regression."""
    l2: float = 1e-2
    """L2 penalty on the weights (standardised units), added to the *mean* loss."""
    val_fraction: float = 0.25
    """Share of examples held out for validation (stratified by class for classification)."""
    seed: int = 0
    """Seed of the train/validation split and of the control task's permutation."""
    max_iter: int = 300
    """L-BFGS iterations for logistic probes."""
    control: bool = True
    """Also fit each probe on randomly permuted labels (the control task)."""
    skip_constant: bool = False
    """Leave out hook points whose activation is the same for every example (listed in
    ``ProbeResult.skipped``) instead of raising: useful for a sweep that includes the embeddings."""

    def __post_init__(self) -> None:
        if self.task not in ("auto", "classification", "regression"):
            raise ValueError(f"task must be auto, classification or regression, got {self.task!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.l2 < 0 or self.max_iter < 1:
            raise ValueError(f"l2 must be >= 0 and max_iter >= 1, got l2={self.l2}, max_iter={self.max_iter}")


def _constant(x: Tensor) -> bool:
    """Whether ``[example width]`` activations are the same vector for every example (up to rounding)."""
    x = x.double()
    return float(x.var(0, unbiased=False).sum()) <= 1e-10 * float(x.pow(2).mean(0).sum()) + 1e-30


def _no_variance(name: str) -> ProbeError:
    return ProbeError(
        f"hook point {name} has no variance across the training examples (every example gives the same "
        "activation, e.g. the same last token or a BOS position); probe another hook point or position, "
        "or set ProbeConfig(skip_constant=True) to leave such points out of a sweep"
    )


def _standardise(x: Tensor, names: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Per-probe feature mean and std of the training rows; a hook with no variance at all is an error."""
    for name, xi in zip(names, x, strict=True):
        if _constant(xi):
            raise _no_variance(name)
    mean = x.mean(1, keepdim=True)
    std = x.std(1, unbiased=False, keepdim=True)
    # A constant feature carries nothing; dividing by 1 keeps it finite instead of 0/0.
    tiny = 1e-12 * std.amax(2, keepdim=True).clamp_min(1e-30)
    return mean, torch.where(std > tiny, std, torch.ones_like(std))


def fit_logistic(
    x: Float[Tensor, "probe example width"],
    y: Int[Tensor, "probe example"],
    n_classes: int,
    *,
    l2: float = 1e-2,
    max_iter: int = 300,
) -> tuple[Float[Tensor, "probe width out"], Float[Tensor, "probe out"]]:
    """L2-regularised logistic regression, many independent probes in one L-BFGS problem.

    Binary problems use one logit (``out = 1``, sigmoid), as scikit-learn does; ``n_classes > 2`` use a
    softmax over ``out = n_classes`` logits (multinomial). Each probe's labels are its own row of ``y``.
    """
    p, _, d = x.shape
    out = 1 if n_classes == 2 else n_classes
    W = torch.zeros(p, d, out, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(p, out, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        logits = torch.bmm(x, W) + b[:, None]  # [probe example out]
        if out == 1:
            nll = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[..., 0], y.to(x.dtype), reduction="none"
            )
        else:
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        loss = nll.mean(1).sum() + l2 / 2 * W.pow(2).sum()  # sum over probes: independent problems
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def fit_ridge(
    x: Float[Tensor, "probe example width"], y: Float[Tensor, "probe example target"], *, l2: float = 1e-2
) -> tuple[Float[Tensor, "probe width target"], Float[Tensor, "probe target"]]:
    """Ridge regression with an unpenalised intercept, closed form, batched over probes.

    Solves ``(X^T X / n + l2 I) W = X^T y / n`` on centred data; with fewer examples than features it
    solves the equivalent ``n x n`` (dual) system instead, which is cheaper and as exact.
    """
    n, d = x.shape[1], x.shape[2]
    xm, ym = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
    xc, yc = x - xm, y - ym
    if n < d:
        gram = torch.bmm(xc, xc.transpose(1, 2)) + n * l2 * torch.eye(n, dtype=x.dtype)
        W = torch.bmm(xc.transpose(1, 2), torch.linalg.solve(gram, yc))
    else:
        cov = torch.bmm(xc.transpose(1, 2), xc) + n * l2 * torch.eye(d, dtype=x.dtype)
        W = torch.linalg.solve(cov, torch.bmm(xc.transpose(1, 2), yc))
    return W, (ym - torch.bmm(xm, W))[:, 0]


def score(logits: Float[Tensor, "example out"], target: Tensor, task: str) -> float:
    """Accuracy (classification) or R² averaged over targets, as scikit-learn's ``r2_score``."""
    if task == "classification":
        pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
        return float((pred == target).double().mean())
    ss_res = (target - logits).pow(2).sum(0)
    ss_tot = (target - target.mean(0)).pow(2).sum(0).clamp_min(1e-30)
    return float((1 - ss_res / ss_tot).mean())


@dataclass(frozen=True, kw_only=True)
class LinearProbe:
    """One fitted probe, in the hook point's raw units: ``logits = act @ weight + bias``."""

    hook_name: str
    weight: Float[Tensor, "width out"]
    bias: Float[Tensor, " out"]
    pattern: Float[Tensor, "width out"]
    """The activation *pattern* of each output (Haufe et al. 2014, "On the interpretation of weight
    vectors of linear models", NeuroImage 87): ``Cov(act) @ weight`` on the training rows — the
    direction along which activations actually move with the probe's logit. The weight itself is a
    *filter*: it also cancels correlated noise, so it can point well away from the feature."""
    task: str
    classes: tuple = ()
    train_score: float
    """Training accuracy or R²."""
    val_score: float
    """Held-out accuracy or R²."""
    control_score: float | None = None
    """Held-out score of the same probe trained on permuted labels (chance level, measured)."""

    @property
    def selectivity(self) -> float | None:
        """Validation score minus the control task's: how much is the label's, not the probe's."""
        return None if self.control_score is None else self.val_score - self.control_score

    def predict(self, acts: Float[Tensor, "example width"]) -> Tensor:
        """Class indices into :attr:`classes` (classification) or predicted targets (regression)."""
        logits = acts.double() @ self.weight + self.bias
        if self.task == "regression":
            return logits
        idx = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
        return idx

    def direction(
        self, cls: Any = None, *, kind: Literal["pattern", "weight"] = "pattern"
    ) -> Float[Tensor, " width"]:
        """The unit direction of ``cls`` (default: the positive class of a binary probe, the first target
        of a regression).

        ``kind="pattern"`` (default) is where activations move when the label does — what to add to
        steer; ``kind="weight"`` is the probe's weight vector — what to project on to read the label.
        """
        if kind not in ("pattern", "weight"):
            raise ProbeError(f"kind must be 'pattern' or 'weight', got {kind!r}")
        m = self.pattern if kind == "pattern" else self.weight
        if m.shape[1] == 1:
            w = m[:, 0]
            if cls is not None and self.classes and cls == self.classes[0]:
                w = -w
        elif not self.classes:  # multi-target regression: cls is the target's index
            if not isinstance(cls, int) or not 0 <= cls < m.shape[1]:
                raise ProbeError(f"this regression probe has {m.shape[1]} targets; pass cls=<target index>")
            w = m[:, cls]
        else:
            if cls is None:
                raise ProbeError(f"a {len(self.classes)}-class probe has one direction per class; pass cls=")
            if cls not in self.classes:
                raise ProbeError(f"unknown class {cls!r}; this probe's classes are {list(self.classes)}")
            w = m[:, self.classes.index(cls)]
        return (w / w.norm()).float()

    def to_steering_vector(self, coeff: float = 1.0, *, cls: Any = None, positions=None):
        """The probe direction as a :class:`mechscope.steering.SteeringVector` at this hook point.

        The direction is the unit-norm activation pattern (see :attr:`pattern`), so ``coeff`` is the
        added norm; typical residual norms at the hook point (``acts.norm(dim=-1).mean()``) are a
        useful scale.
        """
        from mechscope.steering import SteeringVector

        return SteeringVector(
            hook_name=self.hook_name,
            direction=self.direction(cls, kind="pattern"),
            coeff=coeff,
            positions=positions,
            source={"method": "linear_probe", "class": cls, "val_score": self.val_score},
        )


@dataclass(frozen=True)
class ProbeResult:
    """Probes at several hook points on the same examples and split."""

    probes: dict[str, LinearProbe]
    task: str
    metric: str
    """``accuracy`` or ``r2``."""
    n_train: int
    n_val: int
    config: ProbeConfig = field(default_factory=ProbeConfig)
    skipped: tuple[str, ...] = ()
    """Hook points left out for having no variance (``skip_constant=True``)."""

    def best(self) -> LinearProbe:
        """The probe with the highest validation score (earliest hook point on a tie)."""
        return max(self.probes.values(), key=lambda p: p.val_score)

    def to_records(self) -> list[dict[str, Any]]:
        return [
            dict(
                hook=name,
                train=p.train_score,
                val=p.val_score,
                control=p.control_score,
                selectivity=p.selectivity,
            )
            for name, p in self.probes.items()
        ]


def train_probes(
    acts: dict[str, Float[Tensor, "_example _width"]],
    labels: Sequence | Tensor,
    cfg: ProbeConfig = ProbeConfig(),
    *,
    val_indices: Sequence[int] | None = None,
) -> ProbeResult:
    """Fit one probe per hook point on the same train/validation split, plus its control task.

    Hook points of the same width are fitted together as one batched problem. ``val_indices`` fixes
    the validation examples (e.g. held-out words or templates, so memorising cannot pass); by default
    the split is random, stratified by class.

    Raises:
        ProbeError: labels that do not match the examples, a single class, a class with one example,
            or a hook point with no variance.
    """
    with one_thread():
        return _train_probes(acts, labels, cfg, val_indices)


def _train_probes(
    acts: dict[str, Tensor], labels: Sequence | Tensor, cfg: ProbeConfig, val_indices: Sequence[int] | None
) -> ProbeResult:
    if not acts:
        raise ProbeError("no activations: pass {hook name: [example width]} for at least one hook point")
    names = list(acts)
    n = {len(a) for a in acts.values()}
    if len(n) != 1:
        raise ProbeError(
            f"hook points hold different numbers of examples: { {k: len(a) for k, a in acts.items()} }"
        )
    y = encode_labels(labels, n.pop(), cfg.task)
    tr, va = (
        split_indices(y, cfg.val_fraction, cfg.seed)
        if val_indices is None
        else fixed_split(val_indices, len(y.values))
    )
    g = torch.Generator().manual_seed(cfg.seed + 1)
    shuffled = y.values[torch.randperm(len(y.values), generator=g)]
    probes: dict[str, LinearProbe] = {}
    skipped = tuple(name for name in names if _constant(acts[name][tr]))
    if skipped and not cfg.skip_constant:
        raise _no_variance(skipped[0])
    names = [name for name in names if name not in skipped]
    if not names:
        raise ProbeError(f"every hook point has no variance across the examples: {list(skipped)}")
    by_width: dict[int, list[str]] = {}
    for name in names:
        by_width.setdefault(acts[name].shape[-1], []).append(name)
    for group in by_width.values():
        x = torch.stack([acts[k] for k in group]).double()
        mean, std = _standardise(x[:, tr], group)
        z = (x - mean) / std
        targets = [y.values] + ([shuffled] if cfg.control else [])
        k = len(group)
        zz = torch.cat([z] * len(targets))  # the control probes ride in the same batched problem
        yy = torch.cat([t.expand(k, *t.shape) for t in targets])
        if y.task == "classification":
            W, b = fit_logistic(zz[:, tr], yy[:, tr], len(y.classes), l2=cfg.l2, max_iter=cfg.max_iter)
        else:
            W, b = fit_ridge(zz[:, tr], yy[:, tr], l2=cfg.l2)
        logits = torch.bmm(zz, W) + b[:, None]
        xc = x[:, tr] - mean
        patterns = torch.bmm(xc.transpose(1, 2), torch.bmm(xc, W[:k] / std.transpose(1, 2))) / len(tr)
        for i, name in enumerate(group):
            w_raw = W[i] / std[i, 0, :, None]  # back to the hook's own units
            control = score(logits[k + i, va], yy[k + i, va], y.task) if cfg.control else None
            probes[name] = LinearProbe(
                hook_name=name,
                weight=w_raw,
                bias=b[i] - mean[i, 0] @ w_raw,
                pattern=patterns[i],
                task=y.task,
                classes=y.classes,
                train_score=score(logits[i, tr], yy[i, tr], y.task),
                val_score=score(logits[i, va], yy[i, va], y.task),
                control_score=control,
            )
    probes = {name: probes[name] for name in names}
    metric = "accuracy" if y.task == "classification" else "r2"
    return ProbeResult(probes, y.task, metric, len(tr), len(va), cfg, skipped)


def probe_layers(
    model,
    texts: Sequence[str],
    labels: Sequence | Tensor,
    *,
    names: Sequence[str] | None = None,
    read: str | int = "last",
    cfg: ProbeConfig = ProbeConfig(),
    batch_size: int = 32,
    progress=None,
    val_indices: Sequence[int] | None = None,
) -> ProbeResult:
    """Probe every layer for a label: one cached forward per batch, then all probes fitted together.

    ``val_indices`` fixes the validation texts (see :func:`train_probes`).

    Example:
        >>> r = probe_layers(model, ["I loved it", "I hated it", ...], ["pos", "neg", ...])
        >>> r.best().hook_name, r.best().val_score
    """
    from mechscope.probes.activations import gather_activations

    if len(labels) != len(texts) and read != "all":
        raise ProbeError(f"{len(labels)} labels for {len(texts)} texts; give exactly one label per text")
    acts = gather_activations(model, texts, names, read=read, batch_size=batch_size, progress=progress)
    return train_probes(acts, labels, cfg, val_indices=val_indices)
