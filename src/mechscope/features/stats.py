"""The running per-feature state of one streaming pass: all tensors, updated a batch at a time.

For ``F`` features, one batch of ``B`` contexts of ``L`` tokens gives activations ``[B L F]``.
Everything kept is a fixed-size tensor, so memory is bounded whatever the number of tokens:

* **Counts and moments**: tokens firing (activation > 0), the sum of all activations and of the
  positive ones (float64), and the maximum.
* **Histogram**: counts of the positive activations in fixed log-spaced bins (:func:`hist_edges`),
  plus an underflow bin (below the first edge) and an overflow bin (at or above the last).
* **Top-k contexts**: a context's activation is its maximum over tokens, at its argmax token. The
  ``k`` best contexts per feature are kept as ``[F k]`` tensors and merged with each batch's
  ``[F B]`` candidates by one stable sort of their concatenation: the result is exactly what a
  heap per feature would hold, with ties broken by context order (earlier first), and on a
  ``[F k+B]`` tensor it costs one vectorised sort instead of ``F`` Python heaps.
* **Quantile samples** (Anthropic's "subsample intervals"): ``[0, max]`` is cut into
  ``n_quantiles`` equal intervals and each keeps up to ``quantile_samples`` contexts drawn
  uniformly from those whose activation falls in it: every candidate gets a seeded uniform key
  and each interval keeps the smallest keys, which is a uniform sample without replacement
  (reservoir sampling by random priorities). Intervals follow the *running* maximum; when it
  grows, the kept samples are re-assigned to the new intervals. Each sample is then uniform
  within its final interval, but an interval may hold fewer samples than it could have (contexts
  dropped before the maximum grew are gone) — exact when the maximum is reached early, which is
  the usual case, and an approximation otherwise.
* **Windows**: each kept context stores the tokens and this feature's activations from
  ``tokens_before`` tokens before its argmax token to ``tokens_after`` after (cut at the
  context's edges; padding is token -1), captured when it enters, as sae-dashboard does. No
  second pass over the corpus is needed. Memory: about ``F * (top_k + n_quantiles *
  quantile_samples) * (window * 8 + 40)`` bytes (1.7 GB for 100k features at the defaults), plus
  temporaries bounded by merging :data:`ROW_CHUNK` features at a time.

Only rows (features) that a batch changes are re-sorted, so late in a pass an update is cheap.
Every step is deterministic, so a pass resumed from :meth:`RunningStats.state_dict` ends exactly
as an unbroken one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.data.contexts import SPECIAL

NEG = float("-inf")
ROW_CHUNK = 8192
"""Features merged at a time: bounds the temporary copies of their kept examples (~140 MB each at the defaults)."""


@dataclass(frozen=True, kw_only=True)
class StatsShape:
    """The sizes of the kept state (the relevant fields of :class:`~mechscope.features.build.FeatureConfig`)."""

    n_features: int
    top_k: int
    n_quantiles: int
    quantile_samples: int
    tokens_before: int
    tokens_after: int
    edges: tuple[float, ...]
    seed: int

    @property
    def window(self) -> int:
        return self.tokens_before + 1 + self.tokens_after


def hist_edges(lo: float, hi: float, per_decade: int) -> tuple[float, ...]:
    """Log-spaced bin edges from ``lo`` to ``hi``, ``per_decade`` bins per factor of ten."""
    n = round(np.log10(hi / lo) * per_decade)
    return tuple(float(x) for x in np.logspace(np.log10(lo), np.log10(hi), n + 1))


_WINDOWED = ("ctx", "pos", "prov", "tok", "act")
"""The fields of a kept example besides its value (and key): where it is, and its token window."""


def _empty(shape: StatsShape, device: torch.device, n_rows: int | None = None) -> dict[str, Tensor]:
    """Fresh state; with ``n_rows``, only the quantile tensors for that many features."""
    F = shape.n_features if n_rows is None else n_rows
    k, q, r, W = shape.top_k, shape.n_quantiles, shape.quantile_samples, shape.window
    i32, i64, f32, f64 = torch.int32, torch.int64, torch.float32, torch.float64
    z = lambda *s, dtype, fill=0: torch.full(s, fill, dtype=dtype, device=device)  # noqa: E731
    quantile = {
        "q_key": z(F, q, r, dtype=f64, fill=float("inf")),
        "q_val": z(F, q, r, dtype=f32),
        "q_ctx": z(F, q, r, dtype=i64, fill=-1),
        "q_pos": z(F, q, r, dtype=i32),
        "q_prov": z(F, q, r, 3, dtype=i32),
        "q_tok": z(F, q, r, W, dtype=i32, fill=-1),
        "q_act": z(F, q, r, W, dtype=f32),
    }
    if n_rows is not None:
        return quantile
    return {
        "n_firing": z(F, dtype=i64),
        "sum_all": z(F, dtype=f64),
        "sum_firing": z(F, dtype=f64),
        "max": z(F, dtype=f32, fill=NEG),
        "hist": z(F, len(shape.edges) + 1, dtype=i64),
        "top_val": z(F, k, dtype=f32, fill=NEG),
        "top_ctx": z(F, k, dtype=i64, fill=-1),
        "top_pos": z(F, k, dtype=i32),
        "top_prov": z(F, k, 3, dtype=i32),
        "top_tok": z(F, k, W, dtype=i32, fill=-1),
        "top_act": z(F, k, W, dtype=f32),
        **quantile,
    }


class RunningStats:
    """The state of one pass (see the module docstring); ``update`` it with each batch."""

    def __init__(self, shape: StatsShape, device: torch.device | str = "cpu"):
        self.shape = shape
        self.device = torch.device(device)
        self.t = _empty(shape, self.device)
        self.n_tokens = 0
        self._edges = torch.tensor(shape.edges, dtype=torch.float32, device=self.device)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.cpu() for k, v in self.t.items()}

    def load_state_dict(self, state: dict[str, Tensor], n_tokens: int) -> None:
        want = _empty(self.shape, torch.device("meta"))
        for k, v in want.items():
            if k not in state or tuple(state[k].shape) != tuple(v.shape) or state[k].dtype != v.dtype:
                raise ValueError(f"checkpoint tensor {k!r} is missing or has the wrong shape or dtype")
        self.t = {k: state[k].to(self.device) for k in want}
        self.n_tokens = n_tokens

    @torch.no_grad()
    def update(
        self,
        acts: Float[Tensor, "batch pos n_features"],
        index: Int[Tensor, "batch pos 4"],
        first_context: int,
        batch_number: int,
    ) -> None:
        """Fold one batch in. ``index`` holds each token's (token, document, token_offset, char_offset)
        rows; ``first_context`` is the stream ordinal of ``acts[0]``; ``batch_number`` seeds the keys.

        BOS and separator tokens (document ``SPECIAL``) are not text: they never fire and are not
        counted, so an attention sink's outsized activations cannot fill every feature's top contexts.
        Their rows of ``acts`` are zeroed in place (only those rows are written): pass a tensor you own.
        """
        acts = acts.to(self.device, torch.float32)
        index = index.to(self.device)
        text = index[..., 1] != SPECIAL  # [batch pos]
        if not bool(text.all()):
            acts[~text] = 0.0
        old_max = self.t["max"].clone()
        self._moments(acts)
        # Each context's activation; its argmax token is found only for the features that keep it
        # (_candidates): amax over positions is ~10x cheaper than max-with-indices on the CPU.
        ctx_val = acts.amax(dim=1)  # [batch F]
        ctx_val = torch.where(ctx_val > 0, ctx_val, NEG).T.contiguous()  # [F batch]; not firing: -inf
        self._merge_top(acts, index, ctx_val, first_context)
        self._merge_quantiles(acts, index, ctx_val, first_context, batch_number, old_max)
        self.n_tokens += int(text.sum())

    def _moments(self, acts: Tensor) -> None:
        t, F = self.t, acts.shape[-1]
        flat = acts.reshape(-1, F)
        # A batch's sum in float32 (one batch: rounding ~1e-7 relative), accumulated in float64 over
        # the pass; a float64 reduction over [rows F] costs ~10x more on the CPU.
        t["sum_all"] += flat.sum(0).double()
        t["max"] = torch.maximum(t["max"], flat.amax(0))
        rows, cols = torch.nonzero(flat > 0, as_tuple=True)  # the firing entries: few, for SAE latents
        vals = flat[rows, cols]
        t["n_firing"] += torch.bincount(cols, minlength=F)
        t["sum_firing"] += torch.bincount(cols, weights=vals.double(), minlength=F)
        bins = torch.bucketize(vals, self._edges, right=True)  # 0: underflow, n: overflow
        n_bins = t["hist"].shape[1]
        t["hist"] += torch.bincount(cols * n_bins + bins, minlength=F * n_bins).view(F, n_bins)

    def _select(
        self, kept: dict[str, Tensor], src: Tensor, acts: Tensor, index: Tensor, rows: Tensor, first: int
    ) -> dict[str, Tensor]:
        """The example fields of slots chosen from a pool, for each feature in ``rows``.

        ``src[r, j]`` picks slot ``j``'s entry: ``0 .. S-1`` a kept example (``kept[name][r]``),
        ``S .. S+B-1`` context ``src - S`` of the batch, anything larger an empty slot. A batch
        context's max token and window are computed only here, for the (few) chosen ones: building
        them for every candidate costs far more than the merge itself late in a pass.
        """
        S, B = kept["ctx"].shape[1], acts.shape[0]
        R, J = src.shape
        from_kept, from_batch = src < S, (src >= S) & (src < S + B)
        ks = src.clamp(0, S - 1)
        fill = {"ctx": -1, "pos": 0, "prov": 0, "tok": -1, "act": 0.0}  # as in _empty
        out = {}
        for name, v in kept.items():
            empty = ~from_kept.view(R, J, *[1] * (v.ndim - 2))
            out[name] = _take(v, ks).masked_fill_(empty, fill[name])  # batch slots are overwritten below
        ri, si = from_batch.nonzero(as_tuple=True)
        if len(ri):
            b = src[ri, si] - S
            col = acts[b, :, rows[ri]]  # [n pos]: the feature's activations over the chosen context
            pos = col.argmax(1)  # its max token (the first, on ties)
            L = acts.shape[1]
            w = pos[:, None] - self.shape.tokens_before + torch.arange(self.shape.window, device=self.device)
            inside, wc = (w >= 0) & (w < L), w.clamp(0, L - 1)
            out["ctx"][ri, si] = first + b
            out["pos"][ri, si] = pos.to(torch.int32)
            out["prov"][ri, si] = index[b, pos, 1:].to(torch.int32)
            out["tok"][ri, si] = torch.where(inside, index[b[:, None], wc, 0], -1).to(torch.int32)
            out["act"][ri, si] = torch.where(inside, col.gather(1, wc), 0.0)
        return out

    def _merge_top(self, acts: Tensor, index: Tensor, ctx_val: Tensor, first: int) -> None:
        t, k = self.t, self.shape.top_k
        changed = (ctx_val > t["top_val"][:, -1:]).any(1).nonzero().squeeze(1)
        for rows in changed.split(ROW_CHUNK):
            # Stable: among equal values the kept (earlier) contexts come first, then the batch in order.
            vals = torch.cat([t["top_val"][rows], ctx_val[rows]], 1)  # [R k+batch]
            order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
            t["top_val"][rows] = vals.gather(1, order)
            kept = {n: t[f"top_{n}"][rows] for n in _WINDOWED}
            for n, v in self._select(kept, order, acts, index, rows, first).items():
                t[f"top_{n}"][rows] = v

    def _merge_quantiles(
        self,
        acts: Tensor,
        index: Tensor,
        ctx_val: Tensor,
        first: int,
        batch_number: int,
        old_max: Tensor,
    ) -> None:
        t, q = self.t, self.shape.n_quantiles
        F, B = ctx_val.shape
        gen = torch.Generator(device=self.device).manual_seed(
            (self.shape.seed * 0x9E3779B97F4A7C15 + batch_number) % (1 << 63)
        )
        keys = torch.rand(B, F, generator=gen, device=self.device, dtype=torch.float64).T
        top = t["max"].clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        bucket = ((ctx_val / top) * q).floor().clamp(0, q - 1).long()
        thresh = t["q_key"].amax(-1)  # [F q]; inf while a slot is empty
        enters = (ctx_val > 0) & (keys < thresh.gather(1, bucket))
        kept_any = (t["q_ctx"] >= 0).flatten(1).any(1)
        rows = (enters.any(1) | ((t["max"] > old_max) & kept_any)).nonzero().squeeze(1)
        for chunk in rows.split(ROW_CHUNK):
            self._rebuild_quantile_rows(acts, index, chunk, ctx_val[chunk], keys[chunk], first)

    def _rebuild_quantile_rows(
        self, acts: Tensor, index: Tensor, rows: Tensor, val: Tensor, key: Tensor, first: int
    ) -> None:
        """For each of ``rows``: per interval, the smallest keys among the kept samples and the batch's."""
        t, q, r = self.t, self.shape.n_quantiles, self.shape.quantile_samples
        R, B = val.shape
        S = q * r
        P = S + B  # the pool: kept samples, the batch's contexts, and one empty entry (index P)
        inf = torch.full((R, 1), float("inf"), dtype=torch.float64, device=self.device)
        pool_key = torch.cat([t["q_key"][rows].flatten(1), key, inf], 1)
        pool_val = torch.cat([t["q_val"][rows].flatten(1), val, torch.zeros_like(val[:, :1])], 1)
        valid = torch.cat(
            [t["q_ctx"][rows].flatten(1) >= 0, val > 0, torch.zeros_like(val[:, :1], dtype=torch.bool)], 1
        )
        top = t["max"][rows].clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        bucket = ((pool_val / top) * q).floor().clamp(0, q - 1).long()
        bucket = torch.where(valid, bucket, q)  # invalid entries sort after every interval
        order = torch.argsort(bucket.double() + torch.where(valid, pool_key, 0.5), dim=1, stable=True)
        b_sorted = bucket.gather(1, order).contiguous()
        j = torch.arange(q, device=self.device).expand(R, q).contiguous()
        start = torch.searchsorted(b_sorted, j)
        end = torch.searchsorted(b_sorted, j, right=True)
        at = start[..., None] + torch.arange(r, device=self.device)  # [R q r] sorted positions
        src = torch.where(at < end[..., None], order.gather(1, at.clamp(max=P).flatten(1)).view(R, q, r), P)
        src = src.flatten(1)  # [R q*r]
        t["q_key"][rows] = pool_key.gather(1, src).view(R, q, r)
        t["q_val"][rows] = pool_val.gather(1, src).view(R, q, r)
        kept = {n: t[f"q_{n}"][rows].flatten(1, 2) for n in _WINDOWED}
        for n, v in self._select(kept, src, acts, index, rows, first).items():
            t[f"q_{n}"][rows] = v.view(R, q, r, *v.shape[2:])


def _take(pool: Tensor, idx: Tensor) -> Tensor:
    """``pool[r, idx[r, j], ...]`` for every row ``r``: a gather along dim 1 with trailing dims kept."""
    return pool.gather(1, idx.view(*idx.shape, *[1] * (pool.ndim - 2)).expand(*idx.shape, *pool.shape[2:]))
