"""Toy models of superposition (Elhage et al. 2022, "Toy Models of Superposition").

``n_features`` sparse features are squeezed into ``n_hidden < n_features`` dimensions and read
back: ``h = W x``, ``x' = ReLU(W^T h + b)``. Feature ``i`` is zero with probability ``sparsity``
(the paper's ``S``) and otherwise uniform on [0, 1]; its reconstruction error is weighted by an
importance ``I_i`` (geometric decay in the paper). Dense features: the model keeps the
``n_hidden`` most important features orthogonally and drops the rest. Sparse features: it
stores more features than dimensions, in superposition (antipodal pairs, pentagons, ...), and
the ReLU filters the interference.

Many instances (one per sparsity / importance setting) train at once: every weight has a
leading ``instance`` axis and the loss sums over instances, so a sweep costs about one run.
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
        shape = (self.cfg.n_instances, batch, self.cfg.n_features)
        present = torch.rand(shape, generator=generator) < self.feature_prob[:, None, None]
        return torch.rand(shape, generator=generator) * present

    def _repr_html_(self) -> str:
        from mechscope.viz.superposition import render_superposition_html

        return render_superposition_html(self, full_page=False)

    def loss(self, x: Tensor, out: Tensor) -> Tensor:
        """Importance-weighted squared error, mean over batch, summed over instances."""
        return (self.importance[:, None] * (x - out) ** 2).mean(1).sum()


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
    for step in range(cfg.steps):
        x = model.sample(cfg.batch_size, g)
        loss = model.loss(x, model(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and step % log_every == 0:
            logger.info("step %d loss %.5f", step, loss.item())


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
