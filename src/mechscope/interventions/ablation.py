"""Ablations: zero, mean, resample and Gaussian-noise replacement of any hook point.

Each function returns a hook function for ``model.hooks`` that replaces the selected entries
(``pos``, ``head``, ``index`` as in :mod:`mechscope.models.edits`). Mean ablation uses means over
a reference dataset computed once by :func:`mean_activations` and reusable across experiments.
Noise follows ROME's "corrupt with noise" (Meng et al. 2022, section 2.1): add Gaussian noise
with standard deviation ``k`` times the activation's own standard deviation (ROME uses 3x the
embedding std on the subject tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mechscope.models import HookedModel, edits
from mechscope.models.hook_points import HookFn, HookPoint


def zero_ablation(*, pos=None, head=None, index=None) -> HookFn:
    """Replace the selection with zeros."""
    return edits.zero(pos=pos, head=head, index=index)


@torch.no_grad()
def mean_activations(
    model: HookedModel, dataset: str | Sequence[str] | Tensor, names: Sequence[str], *, batch_size: int = 8
) -> dict[str, Tensor]:
    """Mean of each hook point over every real token of ``dataset`` (shape: the activation minus batch and pos)."""
    sums: dict[str, Tensor] = {}
    count = 0
    if isinstance(dataset, str):  # one text, not its characters
        dataset = [dataset]
    items = list(dataset) if not isinstance(dataset, Tensor) else dataset
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        toks = model.prepare(chunk, None, None, "right")
        _, cache = model.run_with_cache(toks.ids, list(names), attention_mask=toks.mask)
        real = torch.ones_like(toks.ids, dtype=torch.bool) if toks.mask is None else toks.mask.bool()
        for n in names:
            x = cache[n]
            if n.endswith(("hook_pattern", "hook_attn_scores")):
                raise ValueError(
                    f"mean ablation of {n!r} is ill-defined across lengths; ablate hook_z instead"
                )
            sums[n] = sums.get(n, 0) + x[real].double().sum(0)
        count += int(real.sum())
    return {n: (s / count).float() for n, s in sums.items()}


def mean_ablation(mean: Tensor, *, pos=None, head=None, index=None) -> HookFn:
    """Replace the selection with a dataset mean from :func:`mean_activations`."""
    return edits.replace(mean, pos=pos, head=head, index=index)


def resample_ablation(source: Tensor, *, pos=None, head=None, index=None, seed: int = 0) -> HookFn:
    """Replace the selection with the activation of *other* inputs: rows of ``source`` drawn at random.

    ``source`` is the same hook point cached on other prompts (``[n batch pos ...]``-like: its first
    axis is sampled). Positions must match the ablated input's.
    """
    g = torch.Generator().manual_seed(seed)

    def fn(x: Tensor, hook: HookPoint) -> Tensor:
        rows = torch.randint(source.shape[0], (x.shape[0],), generator=g)
        return edits.replace(source[rows].to(x.device), pos=pos, head=head, index=index)(x, hook)

    return fn


def noise_ablation(
    k: float = 3.0, *, std: float | None = None, pos=None, head=None, index=None, seed: int = 0
) -> HookFn:
    """Add Gaussian noise of ``k`` x std (the activation's own std unless ``std`` is given) to the selection."""
    g = torch.Generator().manual_seed(seed)

    def fn(x: Tensor, hook: HookPoint) -> Tensor:
        scale = k * (float(x.float().std()) if std is None else std)
        noise = (torch.randn(x.shape, generator=g) * scale).to(device=x.device, dtype=x.dtype)
        return edits.add(noise, pos=pos, head=head, index=index)(x, hook)

    return fn
