"""Labels for probes: checked against the examples, encoded, and split into training and validation.

Kept apart from the fitting (:mod:`mechscope.probes.linear`) because every probe-like analysis needs
the same checks: the number of labels must equal the number of examples, a classifier needs two
classes, and a stratified split needs two examples of each.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mechscope.probes.activations import ProbeError

Task = Literal["auto", "classification", "regression"]


@dataclass(frozen=True)
class Labels:
    """Labels encoded for fitting: class indices or float targets."""

    task: Literal["classification", "regression"]
    values: Tensor
    """``[example]`` class indices (long) or ``[example target]`` floats."""
    classes: tuple = ()
    """Class names in index order (classification)."""


def encode_labels(labels: Sequence | Tensor, n_examples: int, task: Task = "auto") -> Labels:
    """Check the labels against the examples and encode them (strings, bools, ints, floats or a tensor)."""
    n = len(labels)
    if n != n_examples:
        raise ProbeError(
            f"{n} labels for {n_examples} examples; give exactly one label per example "
            "(with read='all', one per real token: see flatten_token_labels)"
        )
    t = labels if isinstance(labels, Tensor) else None
    if task == "auto":
        is_float = (t is not None and t.is_floating_point()) or (
            # numbers.Real, not float: numpy's float32 values are no Python floats
            t is None
            and any(isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) for v in labels)
        )
        task = "regression" if is_float else "classification"
    if task == "regression":
        try:
            y = torch.as_tensor(labels if t is None else t, dtype=torch.float64)
        except (TypeError, ValueError) as e:
            raise ProbeError(f"regression labels must be numbers: {e}") from None
        y = y.reshape(n, -1)
        if not torch.isfinite(y).all():
            raise ProbeError("regression labels contain NaN or inf")
        return Labels("regression", y)
    raw = t.tolist() if t is not None else list(labels)
    classes = tuple(sorted(set(raw), key=lambda v: (str(type(v)), v)))
    if len(classes) < 2:
        raise ProbeError(f"all {n} labels are {classes[0]!r}: a classifier needs at least two classes")
    index = {c: i for i, c in enumerate(classes)}
    return Labels("classification", torch.tensor([index[v] for v in raw]), classes)


def split_indices(y: Labels, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded train/validation split, stratified by class so that every class is in both halves."""
    g = torch.Generator().manual_seed(seed)
    n = len(y.values)
    groups = [torch.nonzero(y.values == c).flatten() for c in range(len(y.classes))] or [torch.arange(n)]
    train, val = [], []
    for idx in groups:
        if y.task == "classification" and len(idx) < 2:
            raise ProbeError(
                f"class {y.classes[int(y.values[idx[0]])]!r} has one example; each class needs two "
                "(one to train on, one to validate)"
            )
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def fixed_split(val_indices: Sequence[int], n: int) -> tuple[Tensor, Tensor]:
    """Training and validation indices when the validation examples are chosen by hand."""
    va = torch.tensor(sorted(set(int(i) for i in val_indices)), dtype=torch.long)
    if len(va) == 0 or len(va) >= n or int(va.min()) < 0 or int(va.max()) >= n:
        raise ProbeError(f"val_indices must name some but not all of the {n} examples, each in [0, {n})")
    keep = torch.ones(n, dtype=torch.bool)
    keep[va] = False
    return torch.nonzero(keep).flatten(), va
