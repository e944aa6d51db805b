"""The seeds' calendar example, ready to run: are days of the week and months circular in this model?

For each hook point, from one cached forward over the prompts of :func:`mechscope.probes.datasets.calendar`
(read at the day or month name):

* a **linear probe** for which day/month it is (accuracy vs the control task) — trivially high from
  the embeddings on, since the name is the token read; reported so the other numbers have a frame;
* a **circular regression probe** (seed 002's "linear regression" onto calendar features): ridge from
  the activation to ``(cos 2πk/K, sin 2πk/K)``. A random split would be meaningless here — any ``K``
  linearly independent class means can be mapped onto any ``K`` targets — so each name is held out
  in turn: fitted on the other ``K - 1`` names, does the probe put the unseen name at its angle?
  Reported as the share of examples whose predicted angle is nearest the true one (chance ``1/K``)
  and the mean angular error;
* the **circle fit** of :func:`mechscope.probes.geometry.fit_circle` on the class means, with its
  permutation chance level;
* the **hierarchy check** of Park et al.: with both days and months in the pool, the cosine between
  the parent direction ("a day", "a month") and each child's offset from it ("Monday" - "a day").

Engels et al. (arXiv:2405.14860) report such circles in GPT-2 small (layer 7) and Mistral 7B; what
the default model shows is recorded in docs/probes.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mechscope.probes import datasets
from mechscope.probes.activations import gather_activations, one_thread
from mechscope.probes.geometry import CircleFit, concept_directions, fit_circle, hierarchy_cosines
from mechscope.probes.linear import ProbeConfig, ProbeResult, _constant, _standardise, fit_ridge, train_probes


@dataclass(frozen=True)
class CalendarResult:
    """Per-hook results for one cyclic concept."""

    kind: str
    classes: tuple
    labels: list
    probe: ProbeResult
    """Which-name classification probes."""
    angle_accuracy: dict[str, float]
    """Per hook: share of held-out-name examples placed nearest their true angle (chance 1/K)."""
    angle_error: dict[str, float]
    """Per hook: mean absolute angular error on held-out names, in degrees (chance ~90 for K=7+)."""
    circles: dict[str, CircleFit]
    hierarchy: dict[str, dict[str, float]]
    """Per hook: ``{child: cos(parent, child - parent)}`` for this kind's names. The offsets
    ``child - parent`` sum to zero over the children (equal-sized classes), so their *signed* cosines
    average to about zero by construction; the records report the mean *absolute* cosine, to be read
    against a random direction's ``sqrt(2 / (pi * width))``."""

    def to_records(self) -> list[dict]:
        rows = []
        for h, fit in self.circles.items():
            p = self.probe.probes.get(h)
            hier = list(self.hierarchy[h].values())
            rows.append(
                dict(
                    hook=h,
                    probe_acc=p.val_score if p else None,
                    control_acc=p.control_score if p else None,
                    angle_acc=self.angle_accuracy[h],
                    angle_err_deg=self.angle_error[h],
                    circle_r2=fit.circle_r2,
                    chance_r2=fit.chance_r2,
                    p_value=fit.p_value,
                    aspect=fit.aspect,
                    in_order=fit.in_order,
                    variance_in_plane=fit.variance_in_plane,
                    hierarchy_abs_cos=sum(abs(c) for c in hier) / len(hier),
                )
            )
        return rows

    def best(self) -> str:
        """The hook point whose class means are best explained by a circle."""
        return max(self.circles, key=lambda h: self.circles[h].circle_r2)


def _held_out_angles(
    acts: dict[str, Tensor], labels: list, classes: tuple, l2: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Leave-one-name-out ridge regression onto (cos, sin): all hook points batched per held-out name."""
    names = [h for h, a in acts.items() if not _constant(a)]
    k = len(classes)
    idx = torch.tensor([classes.index(v) for v in labels])
    theta = 2 * math.pi * idx.double() / k
    x = torch.stack([acts[h] for h in names]).double()
    y = torch.stack([theta.cos(), theta.sin()], 1).expand(len(names), -1, -1)
    pred = torch.zeros(len(names), len(labels))
    for c in range(k):
        tr, te = idx != c, idx == c
        mean, std = _standardise(x[:, tr], names)
        z = (x - mean) / std
        W, b = fit_ridge(z[:, tr], y[:, tr], l2=l2)
        out = torch.bmm(z[:, te], W) + b[:, None]
        pred[:, te] = torch.atan2(out[..., 1], out[..., 0]).float()
    diff = torch.remainder(pred - theta.float() + math.pi, 2 * math.pi) - math.pi  # wrapped to [-pi, pi)
    nearest = torch.remainder(torch.round(pred / (2 * math.pi / k)), k).long()
    acc = {h: float((nearest[i] == idx).float().mean()) for i, h in enumerate(names)}
    err = {h: float(diff[i].abs().mean().rad2deg()) for i, h in enumerate(names)}
    return acc, err


def analyse_calendar(
    model,
    kind: str = "days",
    names: Sequence[str] | None = None,
    *,
    cfg: ProbeConfig | None = None,
    n_permutations: int = 1000,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> CalendarResult:
    """Probe, circle-fit and hierarchy-check days (``kind="days"``) or months at each hook point.

    ``cfg`` defaults to ``ProbeConfig(skip_constant=True)``: the embeddings of a name are constant
    across templates only if templates do not matter, which is fine to skip rather than fail on.
    """
    cfg = cfg or ProbeConfig(skip_constant=True)
    data = datasets.calendar(kind)
    other = datasets.calendar("months" if kind == "days" else "days")
    texts = data.texts + other.texts
    acts = gather_activations(model, texts, names, batch_size=batch_size, progress=progress)
    n = len(data.texts)
    own = {h: a[:n] for h, a in acts.items()}
    probe = train_probes(own, data.labels, cfg)
    with one_thread():
        acc, err = _held_out_angles(own, data.labels, data.classes, cfg.l2)
    own = {h: a for h, a in own.items() if h not in probe.skipped}  # constant: nothing to fit
    circles = {
        h: fit_circle(a, data.labels, data.classes, n_permutations=n_permutations) for h, a in own.items()
    }
    hierarchy = {}
    for h in own:
        a = acts[h]
        # One origin for parent and children (the pool's mean), so child - parent is the child's own
        # offset within its category: Park et al. predict it orthogonal to the parent direction.
        origin = a.double().mean(0)
        parent = a[:n].double().mean(0) - origin
        children = {
            c: v.double() + (a[:n].double().mean(0) - origin)
            for c, v in concept_directions(a[:n], data.labels).items()
        }
        hierarchy[h] = hierarchy_cosines(parent, children)
    return CalendarResult(kind, data.classes, data.labels, probe, acc, err, circles, hierarchy)
