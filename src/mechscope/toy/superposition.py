"""Toy models of superposition (Elhage et al. 2022, "Toy Models of Superposition").

``n_features`` sparse features are squeezed into ``n_hidden < n_features`` dimensions and read
back: ``h = W x``, ``x' = ReLU(W^T h + b)``. Feature ``i`` is zero with probability ``sparsity``
(the paper's ``S``) and otherwise uniform on [0, 1]; its reconstruction error is weighted by an
importance ``I_i`` (geometric decay in the paper). Dense features: the model keeps the
``n_hidden`` most important features orthogonally and drops the rest. Sparse features: it
stores more features than dimensions, in superposition (antipodal pairs, pentagons, ...), and
the ReLU filters the interference.

Many instances (one per sparsity / importance setting) train at once: every weight has a
leading ``instance`` axis and the loss sums over instances. Training runs a hand-written
backward pass (checked against autograd in the tests) over buffers allocated once, in a
feature-major ``[instance feature batch]`` layout whose batched matmuls run along the long batch
axis: at 100 instances a step is about ten passes over one batch-sized tensor, with no autograd
graph and no fresh memory, and one uniform draw shared by every instance (see
:func:`_sample_into`); ``benchmarks/README.md`` has the timing against single runs.
Read top to bottom: config, model, data, training, then the paper's measurements.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    """One vectorised sweep of toy models."""

    n_features: int = 5
    n_hidden: int = 2
    sparsities: tuple[float, ...] = (0.0, 0.7, 0.9, 0.97, 0.99)
    """The paper's S per instance: probability that a feature is zero."""
    importance_decay: float = 0.9
    """Feature i has importance decay**i (the paper's Figure 2 setting)."""
    importances: tuple[tuple[float, ...], ...] | None = None
    """Per-instance importances (overrides ``importance_decay``), e.g. for the phase diagram."""
    steps: int = 5000
    batch_size: int = 1024
    lr: float = 1e-2
    """Higher than the paper's 1e-3 so the dense instances settle within 5k steps on a CPU."""
    seed: int = 0

    def __post_init__(self):
        if self.n_hidden < 1 or self.n_features < 1:
            raise ValueError(f"n_features and n_hidden must be >= 1, got {self.n_features}, {self.n_hidden}")
        if not self.sparsities or not all(0.0 <= s < 1.0 for s in self.sparsities):
            raise ValueError(f"sparsities must be non-empty values in [0, 1), got {self.sparsities}")
        if not 0 < self.importance_decay <= 1:
            raise ValueError(f"importance_decay must be in (0, 1], got {self.importance_decay}")
        if self.importances is not None and (
            len(self.importances) != len(self.sparsities)
            or any(len(i) != self.n_features for i in self.importances)
        ):
            raise ValueError("importances needs one tuple of n_features values per entry of sparsities")

    @property
    def n_instances(self) -> int:
        return len(self.sparsities)


class ToyModel(nn.Module):
    """``n_instances`` independent ReLU output models trained in one batch."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        self.W = nn.Parameter(
            nn.init.xavier_normal_(torch.empty(cfg.n_instances, cfg.n_hidden, cfg.n_features), generator=g)
        )
        self.b = nn.Parameter(torch.zeros(cfg.n_instances, cfg.n_features))
        decay = cfg.importance_decay ** torch.arange(cfg.n_features, dtype=torch.float32)
        importance = (
            decay.expand(cfg.n_instances, -1) if cfg.importances is None else torch.tensor(cfg.importances)
        )
        self.register_buffer("importance", importance.float().contiguous())  # [instance n_features]
        self.register_buffer("feature_prob", 1 - torch.tensor(cfg.sparsities, dtype=torch.float32))

    def forward(
        self, x: Float[Tensor, "instance batch n_features"]
    ) -> Float[Tensor, "instance batch n_features"]:
        # Instance-major layout: two batched matmuls, no permutes.
        h = torch.bmm(x, self.W.transpose(1, 2))  # [instance batch n_hidden]
        return torch.relu(torch.baddbmm(self.b[:, None], h, self.W))

    def sample(self, batch: int, generator: torch.Generator) -> Float[Tensor, "instance batch n_features"]:
        x = torch.empty(self.cfg.n_instances, self.cfg.n_features, batch)
        _sample_into(x, torch.empty(x.shape[1:]), self.feature_prob, torch.empty_like(x), generator)
        return x.transpose(1, 2)

    def _repr_html_(self) -> str:
        from mechscope.viz.superposition import render_superposition_html

        return render_superposition_html(self, full_page=False)

    def loss(self, x: Tensor, out: Tensor) -> Tensor:
        """Importance-weighted squared error, mean over batch, summed over instances."""
        return (self.importance[:, None] * (x - out) ** 2).mean(1).sum()


def _sample_into(
    x: Float[Tensor, "instance n_features batch"],
    u: Float[Tensor, "n_features batch"],
    feature_prob: Float[Tensor, " instance"],
    mask: Float[Tensor, "instance n_features batch"],
    g: torch.Generator,
) -> None:
    """Fill ``x`` with a batch of features, in place, from one uniform draw ``u`` shared by all instances.

    With ``u ~ U[0, 1)`` and ``p`` the feature's probability of being present, ``u < p`` is
    "present" and, given that, ``u / p`` is again uniform on [0, 1): each instance gets exactly the
    paper's distribution (presence and value independent), from one number per entry. Sharing
    ``u`` across instances (common random numbers) correlates their inputs, which no instance can
    see: instances share no parameters and the loss is their sum, so each one's training is
    distributed exactly as if it ran alone. It saves drawing ``n_instances`` times as many random
    numbers, the costliest part of a step. (``mask`` is float: bool masks cost a conversion pass.)
    """
    u.uniform_(generator=g)
    torch.div(u, feature_prob[:, None, None], out=x)
    torch.lt(x, 1.0, out=mask)
    x.mul_(mask)


@torch.no_grad()
def _set_grads(
    model: ToyModel,
    x: Float[Tensor, "instance n_features batch"],
    out: Float[Tensor, "instance n_features batch"],
    mask: Float[Tensor, "instance n_features batch"],
    log: bool = False,
) -> float | None:
    """``model.loss``'s gradients by hand into ``W.grad`` / ``b.grad`` (``out``/``mask`` are scratch).

    ``h = W x``, ``z = W^T h + b``, ``L = sum_i mean_batch sum_f I (ReLU(z) - x)^2``, so with
    ``s = 2 I / batch`` and ``e = (ReLU(z) - x) [z > 0]``: ``dL/dz = s e``,
    ``dL/dW = (h e^T) s + ((W s) e) x^T``, ``dL/db = s sum_batch e``. The per-feature ``s`` is
    applied to the small results, not to the batch-sized ``e``. Returns the loss when ``log``.
    """
    W, b = model.W, model.b
    scale = model.importance * (2.0 / x.shape[2])  # [instance n_features]
    h = torch.bmm(W, x)  # [instance n_hidden batch]
    torch.baddbmm(b[:, :, None], W.transpose(1, 2), h, out=out).relu_()
    loss = float((model.importance[:, :, None] * (out - x) ** 2).mean(2).sum()) if log else None
    torch.gt(out, 0.0, out=mask)
    e = out.sub_(x).mul_(mask)
    W.grad = (
        torch.bmm(h, e.transpose(1, 2))
        .mul_(scale[:, None])
        .baddbmm_(torch.bmm(W * scale[:, None], e), x.transpose(1, 2))
    )
    b.grad = e.sum(2).mul_(scale)
    return loss


def train(cfg: ToyConfig, log_every: int = 1000) -> ToyModel:
    """Train every instance of the sweep together (Adam, constant LR, fresh batches each step)."""
    model = ToyModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    threads = torch.get_num_threads()
    # The tensors are tiny: intra-op threads only add sync cost (and spin badly on a busy machine).
    torch.set_num_threads(1)
    try:
        _fit(model, opt, g, log_every)
    finally:
        torch.set_num_threads(threads)
    return model


def _fit(model: ToyModel, opt: torch.optim.Optimizer, g: torch.Generator, log_every: int) -> None:
    cfg = model.cfg
    x = torch.empty(cfg.n_instances, cfg.n_features, cfg.batch_size)
    u, out, mask = torch.empty(x.shape[1:]), torch.empty_like(x), torch.empty_like(x)
    for step in range(cfg.steps):
        _sample_into(x, u, model.feature_prob, mask, g)
        log = bool(log_every) and step % log_every == 0
        loss = _set_grads(model, x, out, mask, log)
        opt.step()
        if log:
            logger.info("step %d loss %.5f", step, loss)


# ---------------------------------------------------------------------- the paper's views
@torch.no_grad()
def gram(model: ToyModel) -> Float[Tensor, "instance n_features n_features"]:
    """``W^T W`` per instance: diagonal = how strongly each feature is represented, off-diagonal = interference."""
    return torch.einsum("ihf,ihg->ifg", model.W, model.W)


@torch.no_grad()
def feature_norms(model: ToyModel) -> Float[Tensor, "instance n_features"]:
    """``||W_i||``: about 1 for a represented feature, about 0 for a dropped one."""
    return model.W.norm(dim=1)


@torch.no_grad()
def superposition(model: ToyModel) -> Float[Tensor, "instance n_features"]:
    """``sum_{j != i} (W_i_hat . W_j)^2``: how much other features share feature i's direction."""
    W = model.W
    unit = W / W.norm(dim=1, keepdim=True).clamp(min=1e-8)
    overlap = torch.einsum("ihf,ihg->ifg", unit, W) ** 2
    return overlap.sum(-1) - overlap.diagonal(dim1=-2, dim2=-1)


@torch.no_grad()
def feature_dimensionality(model: ToyModel) -> Float[Tensor, "instance n_features"]:
    """``D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2``: the fraction of a dimension feature i gets."""
    W = model.W
    unit = W / W.norm(dim=1, keepdim=True).clamp(min=1e-8)
    return W.norm(dim=1) ** 2 / (torch.einsum("ihf,ihg->ifg", unit, W) ** 2).sum(-1).clamp(min=1e-8)


def n_represented(model: ToyModel, threshold: float = 0.5) -> list[int]:
    """Features with ``||W_i|| > threshold`` per instance."""
    return (feature_norms(model) > threshold).sum(-1).tolist()


def save(model: ToyModel, directory: str | Path) -> Path:
    """``cfg.json`` + ``model.safetensors`` (the layout every mechscope artifact uses)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cfg.json").write_text(json.dumps({"format_version": 1, **asdict(model.cfg)}, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / "model.safetensors")
    return d


def load(directory: str | Path) -> ToyModel:
    from safetensors.torch import load_file

    d = Path(directory)
    raw = json.loads((d / "cfg.json").read_text())
    raw.pop("format_version", None)
    raw["sparsities"] = tuple(raw["sparsities"])
    if raw.get("importances") is not None:
        raw["importances"] = tuple(tuple(i) for i in raw["importances"])
    model = ToyModel(ToyConfig(**raw))
    model.load_state_dict(load_file(d / "model.safetensors"))
    return model


PHASES = ("not represented", "dedicated dimension", "superposition")


def phase_diagram(
    densities: list[float], relative_importances: list[float], steps: int = 3000, seed: int = 0
) -> Tensor:
    """The paper's smallest phase change: 2 features in 1 dimension, feature 1 of importance 1.

    Every (relative importance of feature 2, density 1 - S) pair is one instance of a single
    vectorised run. Returns ``[importance, density]`` indices into :data:`PHASES` for feature 2:
    dropped, given the dimension alone, or sharing it with feature 1 (antipodal superposition).
    """
    pairs = [(r, d) for r in relative_importances for d in densities]
    cfg = ToyConfig(
        n_features=2,
        n_hidden=1,
        sparsities=tuple(1 - d for _, d in pairs),
        importances=tuple((1.0, r) for r, _ in pairs),
        steps=steps,
        seed=seed,
    )
    norms = feature_norms(train(cfg, log_every=0)) > 0.5  # [instance 2]
    phase = torch.where(norms[:, 1], torch.where(norms[:, 0], 2, 1), 0)
    return phase.view(len(relative_importances), len(densities))
