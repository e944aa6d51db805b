"""Activation patching sweeps (Meng et al. 2022; Wang et al. 2022; Heimersheim & Nanda 2024).

Run a *base* input, replace one activation with its value from a *source* input, and measure how
much of the metric moves. Denoising puts clean activations into the corrupted run (what is
sufficient to restore the behaviour); noising puts corrupted activations into the clean run (what
is necessary). A sweep does this for every cell of a grid: ``layer x pos`` for residual and
sublayer outputs, ``layer x head`` (all positions) or ``layer x head x pos`` for per-head points.

Speed: the batch axis carries the variants: one forward per layer holds that layer's cells
(``cells x n_prompts`` rows, each patched at its own cell; split further to fit
``memory_budget``). A patch at layer L leaves every layer below L as in the base run, so each
forward starts at L from the cached base residual stream (:meth:`HookedModel.start_at`), and a
metric that reads only the last positions (``reads_last``) gets only those unembedded. Results
equal patching one cell per full forward (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.interventions.metrics import Metric, normalise
from mechscope.models import HookedModel
from mechscope.models.hook_points import HookPoint
from mechscope.models.tokens import Tokens

RESID_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_POINTS = ("z", "q", "k", "v", "pattern")


@dataclass(frozen=True)
class PatchResult:
    """A patching sweep: metric values over a grid of cells."""

    values: Float[Tensor, "layer ..."]
    """The metric after patching each cell (mean over prompts)."""
    axes: tuple[str, ...]
    """Names of the grid axes, e.g. ``("layer", "pos")``."""
    point: str
    direction: str
    clean: float
    """The metric on the clean run."""
    corrupted: float
    """The metric on the corrupted run."""
    str_tokens: list[str]
    """Tokens of the base input (labels of a ``pos`` axis)."""

    @property
    def normalised(self) -> Tensor:
        """``(patched - corrupted) / (clean - corrupted)``: 1 = the clean behaviour, 0 = the corrupted one."""
        return normalise(self.values, self.clean, self.corrupted)

    def to_html(self, full_page: bool = True) -> str:
        """Heatmap(s) of the normalised values: one grid, or one per head for ``layer x head x pos``."""
        from mechscope.viz.heatmap import render_heatmap_html

        title = f"{self.direction} patching of {self.point} (normalised)"
        layers = [f"L{i}" for i in range(self.values.shape[0])]
        grid = self.normalised
        if self.axes == ("layer", "pos"):
            return render_heatmap_html(grid, layers, self.str_tokens, title, full_page=full_page)
        if self.axes == ("layer", "head"):
            return render_heatmap_html(
                grid, layers, [f"H{h}" for h in range(grid.shape[1])], title, full_page=full_page
            )
        parts = [
            render_heatmap_html(grid[:, h], layers, self.str_tokens, f"{title}, head {h}", full_page=False)
            for h in range(grid.shape[1])
        ]
        return (
            "".join(parts) if not full_page else f"<!doctype html><html><body>{''.join(parts)}</body></html>"
        )

    def _repr_html_(self) -> str:
        return self.to_html(full_page=False)


def prepare_pair(
    model: HookedModel,
    clean,
    corrupted,
    metric: Metric | None = None,
    names: tuple[str, str] = ("clean", "corrupted"),
) -> tuple[Tokens, Tokens]:
    """Tokenise two inputs that are patched into each other, checking that they align token by token.

    Prompts of different lengths are padded on the right, so both batches must pad alike (or a patch
    copies padding into real tokens), and ``metric`` must not read from the end (``pos < 0``), which
    for the shorter prompts is padding.
    """
    a, b = model.prepare(clean, None, None, "right"), model.prepare(corrupted, None, None, "right")
    if a.ids.shape != b.ids.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} inputs must have the same token shape, got {tuple(a.ids.shape)} and "
            f"{tuple(b.ids.shape)}; rephrase so they align token by token"
        )
    if (a.mask is None) != (b.mask is None) or (a.mask is not None and not torch.equal(a.mask, b.mask)):
        raise ValueError(
            f"{names[0]} and {names[1]} prompts pad differently (prompt i of each has a different token length), "
            "so a patch would copy padding into real tokens; pair prompts of equal token length"
        )
    if a.mask is not None and getattr(metric, "reads_last", 0):
        raise ValueError(
            "the prompts have different token lengths, so they are padded on the right, and the metric reads "
            "from the end (pos < 0): padding for the shorter prompts. Use prompts of one token length, or "
            "a metric of each prompt's own position"
        )
    return a, b


def _names(model: HookedModel, point: str) -> list[str]:
    if point in RESID_POINTS:
        names = [f"blocks.{i}.hook_{point}" for i in range(model.cfg.n_layers)]
    elif point in HEAD_POINTS:
        hook = "attn.hook_pattern" if point == "pattern" else f"attn.hook_{point}"
        names = [f"blocks.{i}.{hook}" for i in range(model.cfg.n_layers)]
    else:
        raise ValueError(f"point must be one of {RESID_POINTS + HEAD_POINTS}, got {point!r}")
    missing = [n for n in names if n not in model.hook_names]
    if missing:
        raise ValueError(
            f"this model has no {missing[0]!r} (e.g. no resid_mid in parallel blocks, no MLP in attention-only)"
        )
    return names


def _cells(model: HookedModel, point: str, per: str, n_pos: int) -> tuple[list[tuple], tuple[str, ...]]:
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if point in RESID_POINTS:
        if per != "pos":
            raise ValueError(f"{point} is patched per position: use per='pos'")
        return [(layer, p) for layer in range(L) for p in range(n_pos)], ("layer", "pos")
    if per == "head":
        return [(layer, h) for layer in range(L) for h in range(H)], ("layer", "head")
    if per == "head_pos":
        return [(layer, (h, p)) for layer in range(L) for h in range(H) for p in range(n_pos)], (
            "layer",
            "head",
            "pos",
        )
    raise ValueError(f"per must be 'head' or 'head_pos' for per-head points, got {per!r}")


def _index(point: str, per: str, where) -> tuple:
    """Index of one cell inside one prompt's activation (batch axis excluded)."""
    pattern = point == "pattern"  # [head q_pos k_pos]; the others are [pos head d_head] or [pos d_model]
    if per == "pos":
        return (where,)
    if per == "head":
        return (where,) if pattern else (slice(None), where)
    head, pos = where
    return (head, pos) if pattern else (pos, head)


def _row_bytes(model: HookedModel, n_pos: int, eager: bool, n_logits: int) -> int:
    """Rough activation memory of one row of the forward (the peak is a few layers' worth plus logits)."""
    c = model.cfg
    per_layer = n_pos * (4 * c.d_model + 2 * max(c.d_mlp, c.d_model)) + (
        2 * c.n_heads * n_pos * n_pos if eager else 0
    )
    return 4 * (per_layer * 4 + n_logits * c.d_vocab * 2)


@torch.no_grad()
def patch_sweep(
    model: HookedModel,
    clean: str | list[str] | Tensor,
    corrupted: str | list[str] | Tensor,
    metric: Metric,
    point: str = "resid_pre",
    *,
    per: Literal["pos", "head", "head_pos"] | None = None,
    direction: Literal["denoise", "noise"] = "denoise",
    memory_budget: int = 2 << 30,
) -> PatchResult:
    """Patch every cell of ``point``'s grid and score each patched run.

    Args:
        clean, corrupted: prompts (or token ids) of the same token length, one or many each.
        metric: logits ``[batch pos d_vocab]`` -> ``[batch]`` (see :mod:`~mechscope.interventions.metrics`).
        point: ``resid_pre``/``resid_mid``/``resid_post``/``attn_out``/``mlp_out`` (per position) or
            ``z``/``q``/``k``/``v``/``pattern`` (per head, or per head and position).
        per: ``pos`` for residual points (default), ``head`` (default for heads) or ``head_pos``.
        direction: ``denoise`` patches clean into corrupted; ``noise`` corrupted into clean.
        memory_budget: bytes of activations one forward may hold; sets how many variants share it.

    Raises:
        ValueError: inputs that do not align token by token (see :func:`prepare_pair`), an unknown
            point, or a budget below one variant.
    """
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    per = per or ("pos" if point in RESID_POINTS else "head")
    names = _names(model, point)
    clean_t, corrupt_t = prepare_pair(model, clean, corrupted, metric)
    base, source = (corrupt_t, clean_t) if direction == "denoise" else (clean_t, corrupt_t)
    n_prompts, n_pos = base.ids.shape
    starts = [f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)]
    base_logits, base_cache = model.run_with_cache(base.ids, starts, attention_mask=base.mask)
    source_logits, src = model.run_with_cache(source.ids, names, attention_mask=source.mask)
    base_value, source_value = float(metric(base_logits).mean()), float(metric(source_logits).mean())
    clean_value, corrupt_value = (
        (source_value, base_value) if direction == "denoise" else (base_value, source_value)
    )
    cells, axes = _cells(model, point, per, n_pos)

    keep = getattr(metric, "reads_last", 0)
    row_bytes = _row_bytes(model, n_pos, point in ("q", "k", "v", "pattern"), keep or n_pos)
    if memory_budget < row_bytes * n_prompts:
        raise ValueError(
            f"memory_budget {memory_budget} is below one variant ({row_bytes * n_prompts} bytes); raise it"
        )
    chunk = max(1, memory_budget // (row_bytes * n_prompts))
    values = torch.empty(len(cells))
    starts = [i for i, c in enumerate(cells) if i == 0 or c[0] != cells[i - 1][0]] + [len(cells)]
    for lo, hi in zip(starts, starts[1:], strict=False):  # one layer's cells (cells are layer-major)
        for start in range(lo, hi, chunk):
            stop = min(start + chunk, hi)
            values[start:stop] = _run_chunk(
                model, base, base_cache, src, names, point, per, cells[start:stop], metric, n_prompts, keep
            )
    shape = (
        model.cfg.n_layers,
        *([model.cfg.n_heads] if per != "pos" else []),
        *([n_pos] if per != "head" else []),
    )
    return PatchResult(
        values.view(shape),
        axes,
        point,
        direction,
        clean_value,
        corrupt_value,
        model.to_str_tokens(base.ids[0]),
    )


def _run_chunk(model, base, base_cache, src, names, point, per, cells, metric, n_prompts, keep) -> Tensor:
    """One forward with ``len(cells)`` variants of one layer: rows ``[c * n_prompts, (c + 1) * n_prompts)``
    patch cell ``c``; it starts at that layer."""
    layer = cells[0][0]
    where = [_index(point, per, w) for _, w in cells]

    def patch(x: Tensor, hook: HookPoint) -> Tensor:
        out = x.clone()
        value = src[hook.name]
        for c, idx in enumerate(where):
            rows = slice(c * n_prompts, (c + 1) * n_prompts)
            out[(rows, *idx)] = value[(slice(None), *idx)]
        return out

    ids = base.ids.repeat(len(cells), 1)
    mask = None if base.mask is None else base.mask.repeat(len(cells), 1)
    resid = base_cache[f"blocks.{layer}.hook_resid_pre"].repeat(len(cells), 1, 1)
    with model.start_at(layer, resid), model.hooks({names[layer]: patch}):
        scores = metric(model(ids, attention_mask=mask, logits_to_keep=keep))
    return scores.float().view(len(cells), n_prompts).mean(1).cpu()
