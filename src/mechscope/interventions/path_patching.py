"""Path patching (Wang et al. 2022, "Interpretability in the Wild", appendix B; Goldowsky-Dill et al. 2023).

Activation patching asks how much one component matters through *all* its downstream effects.
Path patching isolates one set of paths: the effect of *senders* on the metric that goes only
through the inputs of chosen *receivers*. With a *base* input and a *source* input of the same
token length, :func:`path_patch` does exactly this:

1. Run base and source once, caching every head's ``hook_z`` (and each ``hook_mlp_out``).
2. Run base again with each sender's output set to its source value (a head's ``hook_z`` slice, an
   MLP's ``hook_mlp_out``) and every *other* head's ``hook_z`` frozen to its base value, so no path
   through a non-receiver head carries the change. MLPs recompute from the patched residual (the
   paper's choice) unless ``freeze_mlps``, which freezes them to base too. Record the receivers'
   inputs: ``hook_q``/``hook_k``/``hook_v`` of each receiver head (per *query* head, so a GQA head
   is patched alone), or the residual stream entering block ``L`` for ``resid``.
3. Run base once more, patching *only* the receivers' inputs (at ``positions``) to the values
   recorded in 2; everything else computes normally. The metric of this run is the result.

With ``receivers="logits"`` the receiver is the final residual stream (what the final norm and the
unembedding read), so step 3 is the logits of step 2 and is skipped: the result is the senders'
direct effect plus the effect through MLPs (none with ``freeze_mlps``).

Direction follows the paper: the base is the clean prompt (``"ABB"``: "When Mary and John ..., John
gave a drink to") and the source the corrupted one (``"ABC"``: different names); a path that
matters *drops* the metric. ``normalised`` is ``(value - source) / (base - source)``: 1 = no
effect, 0 = the path alone gives the source's metric (with base = clean this is
:attr:`PatchResult.normalised`).

Speed: the batch axis carries the variants (senders x prompts rows; a sweep has one sender per
variant), split to fit ``memory_budget``. Each forward starts at its lowest sender layer from the
cached base residual stream, step 2 stops after the last receiver layer, and step 3 starts at the
first receiver layer, so a whole ``[layer head]`` sweep takes a handful of forwards. Results equal
two plain hooked forwards per sender (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.interventions.metrics import Metric, normalise
from mechscope.interventions.patching import PatchResult, prepare_pair
from mechscope.models import HookedModel
from mechscope.models.hook_points import HookPoint
from mechscope.models.tokens import Tokens

ModelInput = str | list[str] | Tensor
Sender = tuple[int, int] | tuple[str, int]
"""``(layer, head)``, ``("attn", layer)`` (all heads of a layer) or ``("mlp", layer)``."""
Receivers = Literal["logits"] | int | tuple[int, int] | Sequence[tuple[int, int]]
Positions = int | Sequence[int] | slice | None
RECEIVER_INPUTS = ("q", "k", "v", "resid")
_Unit = tuple[str, int, int]  # ("head", layer, head) or ("mlp", layer, -1)


@dataclass(frozen=True)
class PathPatchValue:
    """The result of :func:`path_patch`."""

    value: float
    """The metric after patching the path (mean over prompts)."""
    per_prompt: Float[Tensor, " batch"]
    base: float
    """The metric on the base run."""
    source: float
    """The metric on the source run."""

    @property
    def normalised(self) -> float:
        """``(value - source) / (base - source)``: 1 = the path has no effect, 0 = it carries the whole change."""
        return float(normalise(torch.tensor(self.value), self.base, self.source))


@dataclass(frozen=True)
class PathPatchResult(PatchResult):
    """A path-patching sweep: one sender per cell; cells not upstream of every receiver are NaN."""

    def to_html(self, full_page: bool = True) -> str:
        """Heatmap of the normalised values over the layers that hold senders."""
        from mechscope.viz.heatmap import render_heatmap_html

        grid = self.normalised
        rows = [i for i in range(grid.shape[0]) if not grid[i].isnan().all()]
        cols = [f"H{h}" for h in range(grid.shape[1])] if self.axes[1] == "head" else ["attn", "mlp"]
        title = f"path patching {self.point} ({self.direction}, normalised: 1 = no effect)"
        return render_heatmap_html(
            grid[rows], [f"L{i}" for i in rows], cols[: grid.shape[1]], title, full_page=full_page
        )


@dataclass(frozen=True)
class _Receivers:
    heads: tuple[tuple[int, int], ...]
    """Receiver heads (empty for a residual receiver)."""
    inputs: tuple[str, ...]
    resid_layer: int | None
    """The residual stream entering this block; ``n_layers`` is the final residual (logits)."""
    positions: Tensor | None

    @property
    def first(self) -> int:
        return self.resid_layer if self.resid_layer is not None else min(h[0] for h in self.heads)

    @property
    def names(self) -> list[str]:
        """Hook names recorded in step 2 (``resid_post`` of ``L - 1`` is the stream entering block ``L``)."""
        if self.resid_layer is not None:
            return [f"blocks.{self.resid_layer - 1}.hook_resid_post"]
        layers = sorted({layer for layer, _ in self.heads})
        return [f"blocks.{layer}.attn.hook_{i}" for layer in layers for i in self.inputs]

    @property
    def stop(self) -> int:
        """The first block that step 2 need not run."""
        return self.resid_layer if self.resid_layer is not None else max(h[0] for h in self.heads) + 1


@dataclass(frozen=True)
class _Runs:
    base: Tokens
    base_cache: dict[str, Tensor]
    source_cache: dict[str, Tensor]
    base_value: Tensor
    source_value: Tensor


def _pair(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and not isinstance(x[0], tuple)


def _senders(model: HookedModel, senders: Sender | Sequence[Sender]) -> list[_Unit]:
    L, H, mlp = model.cfg.n_layers, model.cfg.n_heads, model.cfg.has_mlp
    out: list[_Unit] = []
    for s in [senders] if _pair(senders) else list(senders):
        if _pair(s) and s[0] in ("attn", "mlp") and isinstance(s[1], int) and 0 <= s[1] < L:
            if s[0] == "attn" or mlp:
                out += [("head", s[1], h) for h in range(H)] if s[0] == "attn" else [("mlp", s[1], -1)]
                continue
        elif _pair(s) and all(isinstance(i, int) for i in s) and 0 <= s[0] < L and 0 <= s[1] < H:
            out.append(("head", *s))
            continue
        raise ValueError(
            f"bad sender {s!r}: use (layer, head) with layer < {L} and head < {H}, ('attn', layer)"
            + (" or ('mlp', layer)" if mlp else " (this model has no MLPs)")
        )
    return out


def _receivers(
    model: HookedModel, receivers: Receivers, receiver_input, positions: Positions, n_pos: int
) -> _Receivers:
    L, H = model.cfg.n_layers, model.cfg.n_heads
    inputs = (
        (receiver_input,) if isinstance(receiver_input, str) or receiver_input is None else receiver_input
    )
    inputs = tuple(dict.fromkeys(inputs))
    if any(i not in (*RECEIVER_INPUTS, None) for i in inputs):
        raise ValueError(f"receiver_input must be one of {RECEIVER_INPUTS} (or q/k/v together), got {inputs}")
    pos = _positions(positions, n_pos)
    if receivers == "logits" or isinstance(receivers, int):
        layer = L if receivers == "logits" else receivers
        if inputs not in ((None,), ("resid",)):
            raise ValueError(f"receivers={receivers!r} is a residual stream: use receiver_input='resid'")
        if not 1 <= layer <= L:
            raise ValueError(
                f"a residual receiver is a block in [1, {L}] (the stream entering it), got {layer}"
            )
        return _Receivers((), ("resid",), layer, pos)
    heads = [receivers] if _pair(receivers) else list(receivers)
    if not heads or not all(_pair(h) and 0 <= h[0] < L and 0 <= h[1] < H for h in heads):
        raise ValueError(
            f"receivers must be 'logits', a block index, or (layer, head) pairs with layer < {L}, head < {H}"
        )
    if None in inputs or "resid" in inputs:
        raise ValueError("head receivers need receiver_input 'q', 'k' or 'v' (or several of them)")
    return _Receivers(tuple(dict.fromkeys(heads)), inputs, None, pos)


def _positions(positions: Positions, n_pos: int) -> Tensor | None:
    if positions is None:
        return None
    index = torch.arange(n_pos)
    try:
        picked = index[positions] if isinstance(positions, (int, slice)) else index[list(positions)]
    except IndexError as e:
        raise ValueError(f"positions {positions!r} out of range for {n_pos} tokens") from e
    return picked.reshape(-1)


def _check_upstream(units: list[_Unit], recv: _Receivers) -> None:
    late = [u for u in units if u[1] >= recv.first]
    if late:
        kind, layer, head = late[0]
        what = f"head ({layer}, {head})" if kind == "head" else f"mlp {layer}"
        raise ValueError(
            f"sender {what} is not upstream of the receivers (first receiver block {recv.first}): "
            "senders must sit in earlier layers than every receiver"
        )


def _runs(model: HookedModel, base: Tokens, source: Tokens, metric: Metric, freeze_mlps: bool) -> _Runs:
    """Step 1: cache the base and source runs (every head's z, MLP outputs, base residual stream)."""
    n, keep = model.cfg.n_layers, getattr(metric, "reads_last", 0)
    z = [f"blocks.{i}.attn.hook_z" for i in range(n)]
    mlp = [f"blocks.{i}.hook_mlp_out" for i in range(n)] if model.cfg.has_mlp else []
    resid = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    base_logits, base_cache = model.run_with_cache(
        base.ids, z + resid + (mlp if freeze_mlps else []), attention_mask=base.mask, logits_to_keep=keep
    )
    source_logits, source_cache = model.run_with_cache(
        source.ids, z + mlp, attention_mask=source.mask, logits_to_keep=keep
    )
    return _Runs(
        base, dict(base_cache.items()), dict(source_cache.items()), metric(base_logits), metric(source_logits)
    )


def _row_bytes(model: HookedModel, n_pos: int, eager: bool, n_logits: int) -> int:
    """Rough activation memory of one batch row (a few layers' worth, frozen copies, logits)."""
    c = model.cfg
    per_layer = n_pos * (6 * c.d_model + 2 * max(c.d_mlp, c.d_model)) + (
        2 * c.n_heads * n_pos * n_pos if eager else 0
    )
    return model.dtype.itemsize * (per_layer * 4 + n_logits * c.d_vocab * 2)


def _rows(toks: Tokens, k: int) -> tuple[Tensor, Tensor | None]:
    return toks.ids.repeat(k, 1), None if toks.mask is None else toks.mask.repeat(k, 1)


def _setter(base: Tensor | None, source: Tensor, cells: list[tuple[int, int | None]], n: int):
    """Hook: start from ``base`` repeated over the variants (or the live activation when None), then
    give variant ``c`` the source value of head ``h`` (the whole activation when ``h`` is None)."""

    def fn(x: Tensor, hook: HookPoint) -> Tensor:
        out = x.clone() if base is None else base.repeat(x.shape[0] // n, *[1] * (x.ndim - 1))
        for c, h in cells:
            rows = slice(c * n, (c + 1) * n)
            if h is None:
                out[rows] = source
            else:
                out[rows, :, h] = source[:, :, h]
        return out

    return fn


def _freeze_hooks(model, runs: _Runs, chunk: list[list[_Unit]], start: int, stop: int, freeze_mlps: bool):
    """Step 2's hooks on blocks ``start .. stop - 1``: senders from source, other heads (and MLPs) frozen."""
    n = runs.base.ids.shape[0]
    hooks = {}
    for layer in range(start, stop):
        z = f"blocks.{layer}.attn.hook_z"
        heads = [(c, u[2]) for c, units in enumerate(chunk) for u in units if u[:2] == ("head", layer)]
        hooks[z] = _setter(runs.base_cache[z], runs.source_cache[z], heads, n)
        if not model.cfg.has_mlp:
            continue
        mlp = f"blocks.{layer}.hook_mlp_out"
        mlps: list[tuple[int, int | None]] = [
            (c, None) for c, us in enumerate(chunk) if ("mlp", layer, -1) in us
        ]
        if freeze_mlps or mlps:
            hooks[mlp] = _setter(
                runs.base_cache[mlp] if freeze_mlps else None, runs.source_cache[mlp], mlps, n
            )
    return hooks


def _step2(model, runs: _Runs, chunk, recv: _Receivers, metric: Metric, freeze_mlps: bool):
    """Senders patched, everything else frozen: the receivers' inputs, or the metric when the receiver
    is the whole final residual (then step 3 would reproduce these logits)."""
    k = len(chunk)
    start = min((u[1] for units in chunk for u in units), default=0)
    stop = recv.stop
    ids, mask = _rows(runs.base, k)
    resid = runs.base_cache[f"blocks.{start}.hook_resid_pre"].repeat(k, 1, 1)
    hooks = _freeze_hooks(model, runs, chunk, start, stop, freeze_mlps)
    with model.start_at(start, resid), model.hooks(hooks):
        if recv.resid_layer == model.cfg.n_layers and recv.positions is None:
            keep = getattr(metric, "reads_last", 0)
            return metric(model(ids, attention_mask=mask, logits_to_keep=keep)), None
        _, cache = model.run_with_cache(ids, recv.names, stop_at_layer=stop, attention_mask=mask)
    return None, cache


def _patch_at(recorded: Tensor, *index: Tensor):
    """Hook: the live activation with ``[:, *index]`` taken from ``recorded`` (same rows)."""

    def fn(x: Tensor, hook: HookPoint) -> Tensor:
        out = x.clone()
        out[(slice(None), *index)] = recorded[(slice(None), *index)]
        return out

    return fn


def _step3(model, runs: _Runs, k: int, recv: _Receivers, recorded, metric: Metric) -> Tensor:
    """The base run with only the receivers' inputs (at ``positions``) set to their step-2 values."""
    n_pos, device = runs.base.ids.shape[1], runs.base.ids.device
    pos = (torch.arange(n_pos) if recv.positions is None else recv.positions).to(device)
    hooks = {}
    if recv.resid_layer is None:
        start = recv.first
        for layer in sorted({layer for layer, _ in recv.heads}):
            heads = torch.tensor([h for lay, h in recv.heads if lay == layer], device=device)
            for i in recv.inputs:
                name = f"blocks.{layer}.attn.hook_{i}"
                hooks[name] = _patch_at(recorded[name], pos[:, None], heads[None, :])
    else:
        # Rerun block L - 1 and patch its output: the final residual has no block of its own to start at.
        start = recv.resid_layer - 1
        (name,) = recv.names
        hooks[name] = _patch_at(recorded[name], pos)
    resid = runs.base_cache[f"blocks.{start}.hook_resid_pre"].repeat(k, 1, 1)
    ids, mask = _rows(runs.base, k)
    with model.start_at(start, resid), model.hooks(hooks):
        return metric(model(ids, attention_mask=mask, logits_to_keep=getattr(metric, "reads_last", 0)))


def _chunks(starts: list[int], stop: int, capacity: int, slack: float = 0.25) -> list[tuple[int, int]]:
    """Split variants (sorted by start layer) into ``[lo, hi)`` forwards of at most ``capacity`` variants.

    A forward runs every row from its lowest sender layer, so merging variants that start later
    wastes compute; a chunk grows only while its cost stays within ``1 + slack`` of what its
    variants need from their own starts. That keeps a sweep to a handful of forwards on any device
    (about six for 30 layers) at most 25% above the per-layer minimum.
    """
    chunks, lo, need = [], 0, 0
    for i, start in enumerate(starts):
        cost = (i - lo + 1) * (stop - starts[lo])
        if i > lo and (i - lo >= capacity or cost > (1 + slack) * (need + stop - start)):
            chunks.append((lo, i))
            lo, need = i, 0
        need += stop - start
    return chunks + [(lo, len(starts))]


def _run_variants(
    model, runs: _Runs, variants: list[list[_Unit]], recv: _Receivers, metric, freeze_mlps, memory_budget
) -> Tensor:
    """Steps 2 and 3 for every variant (a list of senders), batched: ``[variant prompt]`` metric values."""
    n_prompts, n_pos = runs.base.ids.shape
    keep = getattr(metric, "reads_last", 0)
    row = _row_bytes(model, n_pos, recv.resid_layer is None, keep or n_pos) * n_prompts
    if memory_budget < row:
        raise ValueError(f"memory_budget {memory_budget} is below one variant ({row} bytes); raise it")
    starts = [min((u[1] for u in units), default=0) for units in variants]
    out = []
    for lo, hi in _chunks(starts, recv.stop, memory_budget // row):
        chunk = variants[lo:hi]
        scores, recorded = _step2(model, runs, chunk, recv, metric, freeze_mlps)
        if scores is None:
            scores = _step3(model, runs, len(chunk), recv, recorded, metric)
        out.append(scores.float().view(len(chunk), n_prompts).cpu())
    return torch.cat(out)


def _describe(recv: _Receivers, n_layers: int) -> str:
    if recv.resid_layer == n_layers:
        return "logits"
    if recv.resid_layer is not None:
        return f"resid entering block {recv.resid_layer}"
    return ", ".join(f"L{layer}H{h}" for layer, h in recv.heads) + f" ({'/'.join(recv.inputs)})"


@torch.no_grad()
def path_patch(
    model: HookedModel,
    base: ModelInput,
    source: ModelInput,
    metric: Metric,
    senders: Sender | Sequence[Sender],
    receivers: Receivers = "logits",
    *,
    receiver_input: str | Sequence[str] | None = None,
    positions: Positions = None,
    freeze_mlps: bool = False,
    memory_budget: int = 2 << 30,
) -> PathPatchValue:
    """The metric when only the paths ``senders -> receivers`` carry the source input (module docstring).

    Args:
        base, source: prompts (or token ids) of the same token length; the paper's base is the clean
            prompt and its source the corrupted one.
        metric: logits ``[batch pos d_vocab]`` -> ``[batch]`` (see :mod:`~mechscope.interventions.metrics`).
        senders: ``(layer, head)``, ``("attn", layer)`` or ``("mlp", layer)``, or a list of them (an
            empty list leaves the base run unchanged).
        receivers: ``"logits"`` (the final residual), a block index ``L`` (the residual stream
            entering block ``L``), or ``(layer, head)`` pairs; every sender must sit in an earlier layer.
        receiver_input: ``"q"``, ``"k"``, ``"v"`` (or several) for head receivers; ``"resid"``
            (the default) for residual receivers.
        positions: where the receivers' inputs are patched in step 3 (None: every position; indices
            of the right-padded batch).
        freeze_mlps: freeze every MLP to its base output in step 2, so only head-to-head paths count.
        memory_budget: bytes of activations one forward may hold.

    Raises:
        ValueError: inputs that do not align (:func:`prepare_pair`), a sender not upstream of every
            receiver, an unknown receiver input, indices out of range, or a budget below one variant.
    """
    b, s = prepare_pair(model, base, source, metric, names=("base", "source"))
    units = _senders(model, senders)
    recv = _receivers(model, receivers, receiver_input, positions, b.ids.shape[1])
    _check_upstream(units, recv)
    runs = _runs(model, b, s, metric, freeze_mlps)
    per_prompt = _run_variants(model, runs, [units], recv, metric, freeze_mlps, memory_budget)[0]
    return PathPatchValue(
        float(per_prompt.mean()),
        per_prompt,
        float(runs.base_value.float().mean()),
        float(runs.source_value.float().mean()),
    )


@torch.no_grad()
def path_patch_sweep(
    model: HookedModel,
    clean: ModelInput,
    corrupted: ModelInput,
    metric: Metric,
    receivers: Receivers = "logits",
    receiver_input: str | Sequence[str] | None = None,
    *,
    senders: Literal["heads", "layers"] = "heads",
    positions: Positions = None,
    freeze_mlps: bool = False,
    direction: Literal["noise", "denoise"] = "noise",
    memory_budget: int = 2 << 30,
) -> PathPatchResult:
    """Path-patch every single sender upstream of the receivers, one variant per sender, batched.

    ``senders="heads"`` gives a ``[layer head]`` grid (each head alone; the paper's sweep for name
    movers with ``receivers="logits"``); ``"layers"`` a ``[layer component]`` grid with columns
    ``attn`` (all heads of the layer together) and ``mlp``. Cells at or after the first receiver
    layer are NaN. ``direction="noise"`` (the paper's) runs the clean prompt as base and sends the
    corrupted one along the path, so important paths drop the metric; ``"denoise"`` swaps them.
    Other arguments as in :func:`path_patch`.
    """
    if direction not in ("noise", "denoise"):
        raise ValueError(f"direction must be 'noise' or 'denoise', got {direction!r}")
    if senders not in ("heads", "layers"):
        raise ValueError(f"senders must be 'heads' or 'layers', got {senders!r}")
    clean_t, corrupt_t = prepare_pair(model, clean, corrupted, metric)
    base, source = (clean_t, corrupt_t) if direction == "noise" else (corrupt_t, clean_t)
    recv = _receivers(model, receivers, receiver_input, positions, base.ids.shape[1])
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if senders == "heads":
        cells = [[("head", layer, h)] for layer in range(recv.first) for h in range(H)]
        shape, axes = (L, H), ("layer", "head")
    else:
        mlp = model.cfg.has_mlp
        cells = [
            cell
            for layer in range(recv.first)
            for cell in ([("head", layer, h) for h in range(H)], [("mlp", layer, -1)])[: 1 + mlp]
        ]
        shape, axes = (L, 1 + mlp), ("layer", "component")
    if not cells:
        raise ValueError(f"no sender is upstream of receivers starting at block {recv.first}")
    runs = _runs(model, base, source, metric, freeze_mlps)
    values = _run_variants(model, runs, cells, recv, metric, freeze_mlps, memory_budget).mean(1)
    grid = torch.full(shape, float("nan"))
    grid.view(-1)[: len(cells)] = values  # cells are layer-major, so they fill the first rows
    base_value, source_value = float(runs.base_value.float().mean()), float(runs.source_value.float().mean())
    clean_value, corrupt_value = (
        (base_value, source_value) if direction == "noise" else (source_value, base_value)
    )
    return PathPatchResult(
        grid,
        axes,
        f"{senders} -> {_describe(recv, L)}",
        direction,
        clean_value,
        corrupt_value,
        model.to_str_tokens(base.ids[0]),
    )
