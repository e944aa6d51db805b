"""Attribution patching: every cell of a patching sweep from one gradient (Nanda 2023).

Activation patching replaces one activation ``a`` of a *base* run with its value ``a'`` from a
*source* run and reruns the model: one forward per cell. Attribution patching takes the first-order
Taylor expansion of the metric around the base run instead,

    metric(patched) ~= metric(base) + (a' - a) . d metric / d a |_base,

so one forward on the source, one forward and one backward on the base give every cell of every
hook point at once. The estimate is exact for a metric linear in ``a`` and good while the patch
stays in the region where the model is near-linear (small residual-stream changes, heads whose
attention does not flip); it is worst where real patching matters most, at large saturating
effects (e.g. a full ``resid_pre`` patch at the tokens that differ), so :func:`compare` measures
its agreement with real patching on the case at hand.

Conventions: the results are :class:`~mechscope.interventions.patching.PatchResult` s with the same
points, grids and axes as :func:`~mechscope.interventions.patching.patch_sweep`, and ``values`` hold
``metric(base) + estimate``, so ``normalised`` reads like real patching (1 = clean, 0 = corrupted).
The backward runs on ``metric(logits).mean()`` over the prompts; a cell's estimate sums
``(a' - a) * grad`` over the prompts (and over its positions / features), which is therefore the
estimated change of the *mean* metric, as ``patch_sweep`` reports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Literal

import torch
from torch import Tensor

from mechscope.interventions.metrics import Metric
from mechscope.interventions.patching import HEAD_POINTS, RESID_POINTS, PatchResult, _names, prepare_pair
from mechscope.models import HookedModel


def _cell_sums(prod: Tensor, point: str, per: str) -> Tensor:
    """Sum ``delta * grad`` of one layer over everything but the grid's cell axes (prompts included)."""
    if point in RESID_POINTS:  # [batch pos d_model] -> [pos]
        return prod.sum((0, 2))
    if point == "pattern":  # [batch head q_pos k_pos]; a head_pos cell is one query row
        return prod.sum((0, 2, 3)) if per == "head" else prod.sum((0, 3))
    # [batch pos head d_head]
    return prod.sum((0, 1, 3)) if per == "head" else prod.sum((0, 3)).T


def _check_points(points: Sequence[str], per: str) -> None:
    for p in points:
        if p not in RESID_POINTS + HEAD_POINTS:
            raise ValueError(f"point must be one of {RESID_POINTS + HEAD_POINTS}, got {p!r}")
    if per not in ("head", "head_pos"):
        raise ValueError(f"per must be 'head' or 'head_pos' for per-head points, got {per!r}")


@torch.no_grad()
def attribution_patch_all(
    model: HookedModel,
    clean: str | list[str] | Tensor,
    corrupted: str | list[str] | Tensor,
    metric: Metric,
    points: Sequence[str] | None = None,
    *,
    per: Literal["head", "head_pos"] = "head",
    direction: Literal["denoise", "noise"] = "denoise",
) -> dict[str, PatchResult]:
    """Attribution-patching sweeps of several points from the same three passes.

    Args:
        clean, corrupted: prompts (or token ids) of the same token length, one or many each.
        metric: logits ``[batch pos d_vocab]`` -> ``[batch]`` (see :mod:`~mechscope.interventions.metrics`).
        points: any of ``resid_pre/resid_mid/resid_post/attn_out/mlp_out`` (per position) and
            ``z/q/k/v/pattern`` (per head); None: every one of them this model has.
        per: grid of the per-head points, ``head`` or ``head_pos`` (residual points are per position).
        direction: ``denoise`` estimates patching clean into corrupted; ``noise`` corrupted into clean.

    Returns:
        ``{point: PatchResult}`` laid out as :func:`~mechscope.interventions.patching.patch_sweep`'s.

    Raises:
        ValueError: inputs that do not align token by token (:func:`prepare_pair`), an unknown point
            or direction, or a point this model lacks.
    """
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    if points is None:
        points = [p for p in RESID_POINTS + HEAD_POINTS if f"blocks.0.{_hook(p)}" in model.hook_names]
    points = list(dict.fromkeys(points))
    _check_points(points, per)
    names = {p: _names(model, p) for p in points}
    every = [n for p in points for n in names[p]]
    clean_t, corrupt_t = prepare_pair(model, clean, corrupted, metric)
    base, source = (corrupt_t, clean_t) if direction == "denoise" else (clean_t, corrupt_t)
    keep = getattr(metric, "reads_last", 0)

    # The three passes: source forward; base forward + backward.
    source_logits, src = model.run_with_cache(
        source.ids, every, attention_mask=source.mask, logits_to_keep=keep
    )
    source_value = float(metric(source_logits).float().mean())
    run = model.run_with_grads(
        base.ids, lambda logits: metric(logits).mean(), every, attention_mask=base.mask, logits_to_keep=keep
    )
    base_value = float(run.metric)
    clean_value, corrupt_value = (
        (source_value, base_value) if direction == "denoise" else (base_value, source_value)
    )
    # float64 models keep float64 estimates (finite-difference tests); others sum in float32.
    acc = torch.float64 if model.dtype == torch.float64 else torch.float32
    str_tokens = model.to_str_tokens(base.ids[0])
    results = {}
    for p in points:
        p_per = "pos" if p in RESID_POINTS else per
        est = torch.stack(
            [
                _cell_sums((src[n].to(acc) - run.cache[n].to(acc)) * run.grads[n].to(acc), p, p_per)
                for n in names[p]
            ]
        )
        results[p] = PatchResult(
            (base_value + est).cpu(), _axes(p_per), p, direction, clean_value, corrupt_value, str_tokens
        )
    return results


def _hook(point: str) -> str:
    return f"hook_{point}" if point in RESID_POINTS else f"attn.hook_{point}"


def _axes(per: str) -> tuple[str, ...]:
    return {"pos": ("layer", "pos"), "head": ("layer", "head"), "head_pos": ("layer", "head", "pos")}[per]


def attribution_patch(
    model: HookedModel,
    clean: str | list[str] | Tensor,
    corrupted: str | list[str] | Tensor,
    metric: Metric,
    point: str = "resid_pre",
    *,
    per: Literal["pos", "head", "head_pos"] | None = None,
    direction: Literal["denoise", "noise"] = "denoise",
) -> PatchResult:
    """The linear estimate of :func:`~mechscope.interventions.patching.patch_sweep` (same arguments).

    Two forwards and one backward, whatever the grid's size; see the module docstring.
    """
    if point in RESID_POINTS and per not in (None, "pos"):
        raise ValueError(f"{point} is patched per position: use per='pos'")
    if point in HEAD_POINTS and per == "pos":
        raise ValueError(f"per must be 'head' or 'head_pos' for per-head points, got {per!r}")
    head_per = "head" if per in (None, "pos") else per
    return attribution_patch_all(model, clean, corrupted, metric, [point], per=head_per, direction=direction)[
        point
    ]


@dataclass(frozen=True)
class Comparison:
    """How well attribution patching predicts real patching, cell by cell (normalised values)."""

    attribution: PatchResult
    real: PatchResult
    correlation: float
    """Pearson correlation of the normalised values (nan when either grid is constant)."""
    max_abs_error: float
    """Largest ``|attribution - real|`` of the normalised values."""

    def labels(self) -> list[str]:
        """One name per cell, in ``values.flatten()`` order."""
        r = self.real
        toks = r.str_tokens
        idx = torch.cartesian_prod(*(torch.arange(n) for n in r.values.shape)).view(-1, r.values.ndim)
        out = []
        for cell in idx.tolist():
            parts = {"layer": f"L{cell[0]}"}
            for name, i in zip(r.axes[1:], cell[1:], strict=True):
                parts[name] = f"H{i}" if name == "head" else f"pos {i} {toks[i]!r}"
            out.append(" ".join(parts.values()))
        return out

    def to_html(self, full_page: bool = True) -> str:
        """An inline SVG scatter: x = real patching, y = attribution, with the y = x line."""
        title = (
            f"attribution vs real {self.real.direction} patching of {self.real.point}: "
            f"r = {self.correlation:.3f}, max |error| = {self.max_abs_error:.3f}"
        )
        svg = _scatter_svg(
            self.real.normalised.flatten().tolist(),
            self.attribution.normalised.flatten().tolist(),
            self.labels(),
        )
        body = f"<h3>{escape(title)}</h3>{svg}"
        if not full_page:
            return body
        return f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title></head><body style='font:13px system-ui,sans-serif'>{body}</body></html>"

    def _repr_html_(self) -> str:
        return self.to_html(full_page=False)


def compare(attribution: PatchResult, real: PatchResult) -> Comparison:
    """Correlation and largest error between an attribution sweep and the real sweep of the same grid."""
    for field in ("point", "axes", "direction"):
        a, r = getattr(attribution, field), getattr(real, field)
        if a != r:
            raise ValueError(f"the two results differ in {field}: {a!r} vs {r!r}; compare the same sweep")
    if attribution.values.shape != real.values.shape:
        raise ValueError(
            f"grid shapes differ: {tuple(attribution.values.shape)} vs {tuple(real.values.shape)}; "
            "run both on the same inputs"
        )
    a = attribution.normalised.double().flatten()
    r = real.normalised.double().flatten()
    ac, rc = a - a.mean(), r - r.mean()
    denom = float(ac.norm() * rc.norm())
    corr = float(ac @ rc) / denom if denom > 0 else math.nan
    return Comparison(attribution, real, corr, float((a - r).abs().max()))


def _scatter_svg(xs: list[float], ys: list[float], labels: list[str], size: int = 420) -> str:
    pad = 48
    finite = [v for v in xs + ys if math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(finite + [0.0]), max(finite + [1.0])
    span = (hi - lo) or 1.0
    lo, hi = lo - 0.05 * span, hi + 0.05 * span

    def sx(v: float) -> float:
        return pad + (v - lo) / (hi - lo) * (size - 2 * pad)

    def sy(v: float) -> float:
        return size - pad - (v - lo) / (hi - lo) * (size - 2 * pad)

    ticks = "".join(
        f'<text x="{sx(t):.1f}" y="{size - pad + 14}" text-anchor="middle">{t:g}</text>'
        f'<text x="{pad - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>'
        for t in (0.0, 1.0)
    )
    dots = "".join(
        f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="#1f77b4" fill-opacity="0.7">'
        f"<title>{escape(lab)}: real {x:.3f}, attribution {y:.3f}</title></circle>"
        for x, y, lab in zip(xs, ys, labels, strict=True)
        if math.isfinite(x) and math.isfinite(y)
    )
    return (
        f'<svg width="{size}" height="{size}" font-size="11" '
        f'font-family="system-ui,sans-serif">'
        f'<rect x="{pad}" y="{pad}" width="{size - 2 * pad}" height="{size - 2 * pad}" fill="none" stroke="#999"/>'
        f'<line x1="{sx(lo):.1f}" y1="{sy(lo):.1f}" x2="{sx(hi):.1f}" y2="{sy(hi):.1f}" stroke="#d62728" '
        f'stroke-dasharray="4 3"><title>y = x</title></line>{ticks}{dots}'
        f'<text x="{size / 2}" y="{size - 8}" text-anchor="middle">real patching (normalised)</text>'
        f'<text x="14" y="{size / 2}" text-anchor="middle" transform="rotate(-90 14 {size / 2})">'
        f"attribution (normalised)</text></svg>"
    )
