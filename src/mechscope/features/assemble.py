"""From the end state of a pass to the database tables (schema: :mod:`mechscope.features.tables`).

Vectorised with numpy and pyarrow list arrays (no Python loop per feature), so assembling a
database of 100k features takes seconds, not minutes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mechscope.features.effects import logit_effects, nearest_neighbours
from mechscope.features.sources import FeatureSource
from mechscope.features.stats import RunningStats
from mechscope.features.tables import SCHEMAS
from mechscope.models.hooked import HookedModel


def vocab_strings(model: HookedModel) -> list[str]:
    """Every token id of the unembedding decoded on its own (``model.to_str_tokens`` of each id)."""
    return model.tokenizer.batch_decode([[i] for i in range(model.cfg.d_vocab)])


def _lists(tok: np.ndarray, act: np.ndarray) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """Windows ``[n W]`` padded with token -1 -> list arrays of their valid part, and its first index."""
    valid = tok >= 0  # one contiguous run per row (the window cut at the context's edges)
    offsets = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tok[valid], pa.int32()))
    acts = pa.ListArray.from_arrays(pa.array(offsets), pa.array(act[valid], pa.float32()))
    return tokens, acts, valid.argmax(1)


def _examples(
    kind: str,
    f: np.ndarray,
    interval: np.ndarray | None,
    rank: np.ndarray,
    parts: dict[str, np.ndarray],
    tokens_before: int,
    documents: dict[int, str],
) -> pa.Table:
    tokens, acts, first = _lists(parts["tok"], parts["act"])
    prov = parts["prov"]
    return pa.table(
        {
            "feature": pa.array(f, pa.int32()),
            "kind": pa.array([kind] * len(f), pa.string()),
            "interval": pa.array(interval, pa.int32())
            if interval is not None
            else pa.nulls(len(f), pa.int32()),
            "rank": pa.array(rank, pa.int32()),
            "value": pa.array(parts["val"], pa.float32()),
            "context": pa.array(parts["ctx"], pa.int64()),
            "position": pa.array(parts["pos"], pa.int32()),
            "window_start": pa.array(parts["pos"] - tokens_before + first, pa.int32()),
            "tokens": tokens,
            "activations": acts,
            "document": pa.array(prov[:, 0], pa.int32()),
            "source": pa.array([documents.get(int(d)) for d in prov[:, 0]], pa.string()),
            "token_offset": pa.array(prov[:, 1], pa.int32()),
            "char_offset": pa.array(prov[:, 2], pa.int32()),
        }
    )


def _example_tables(stats: RunningStats, documents: dict[int, str]) -> pa.Table:
    t = {k: v.numpy() for k, v in stats.state_dict().items()}
    before = stats.shape.tokens_before
    f, j = np.nonzero(t["top_ctx"] >= 0)
    top = {n: t[f"top_{n}"][f, j] for n in ("val", "ctx", "pos", "prov", "tok", "act")}
    top_table = _examples("top", f, None, j, top, before, documents)
    qf, qi, qs = np.nonzero(t["q_ctx"] >= 0)
    q = {n: t[f"q_{n}"][qf, qi, qs] for n in ("val", "ctx", "pos", "prov", "tok", "act")}
    # Rank within each interval by value, strongest first (ties: earlier context first).
    order = np.lexsort((q["ctx"], -q["val"], qi, qf))
    qf, qi = qf[order], qi[order]
    q = {n: v[order] for n, v in q.items()}
    group = np.concatenate([[True], (qf[1:] != qf[:-1]) | (qi[1:] != qi[:-1])])
    starts = np.maximum.accumulate(np.where(group, np.arange(len(qf)), 0))
    rank = np.arange(len(qf)) - starts
    q_table = _examples("quantile", qf, qi, rank, q, before, documents)
    return pa.concat_tables([top_table, q_table])


def _feature_table(stats: RunningStats) -> pa.Table:
    t = {k: v.numpy() for k, v in stats.state_dict().items()}
    F, n = stats.shape.n_features, max(stats.n_tokens, 1)
    firing = t["n_firing"]
    hist = t["hist"]
    offsets = np.arange(0, hist.size + 1, hist.shape[1], dtype=np.int32)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_firing = np.where(firing > 0, t["sum_firing"] / firing, np.nan)
    return pa.table(
        {
            "id": pa.array(np.arange(F), pa.int32()),
            "density": pa.array(firing / n, pa.float64()),
            "n_firing": pa.array(firing, pa.int64()),
            "mean": pa.array(t["sum_all"] / n, pa.float64()),
            "mean_firing": pa.array(mean_firing, pa.float64(), from_pandas=True),  # NaN -> null
            "max": pa.array(t["max"], pa.float32()),
            "histogram": pa.ListArray.from_arrays(pa.array(offsets), pa.array(hist.reshape(-1), pa.int64())),
            "explanation": pa.nulls(F, pa.string()),
            "score": pa.nulls(F, pa.float64()),
        }
    )


def _logit_table(model: HookedModel, src: FeatureSource, n: int, vocab: list[str]) -> pa.Table:
    directions = src.residual_directions(model)
    if directions is None or n == 0:
        return SCHEMAS["logits"].empty_table()
    eff = logit_effects(model, directions, n)
    parts = []
    for kind, values, tokens in (
        ("promoted", eff.promoted_values, eff.promoted_tokens),
        ("suppressed", eff.suppressed_values, eff.suppressed_tokens),
    ):
        F, k = tokens.shape
        tok = tokens.numpy().reshape(-1)
        parts.append(
            pa.table(
                {
                    "feature": pa.array(np.repeat(np.arange(F), k), pa.int32()),
                    "kind": pa.array([kind] * (F * k), pa.string()),
                    "rank": pa.array(np.tile(np.arange(k), F), pa.int32()),
                    "token": pa.array(tok, pa.int32()),
                    "token_str": pa.array([vocab[i] for i in tok], pa.string()),
                    "value": pa.array(values.numpy().reshape(-1), pa.float32()),
                }
            )
        )
    return pa.concat_tables(parts)


def _neighbour_table(src: FeatureSource, n: int, device) -> pa.Table:
    if n == 0:  # skip the O(n_features^2 d) product (minutes on one CPU thread for 100k+ latents)
        return SCHEMAS["neighbours"].empty_table()
    nb = nearest_neighbours(src.decoder().to(device), n)  # O(n_features^2 d): on the GPU when there is one
    F, k = nb.ids.shape
    return pa.table(
        {
            "feature": pa.array(np.repeat(np.arange(F), k), pa.int32()),
            "rank": pa.array(np.tile(np.arange(k), F), pa.int32()),
            "neighbour": pa.array(nb.ids.numpy().reshape(-1), pa.int32()),
            "cosine": pa.array(nb.cosine.numpy().reshape(-1), pa.float32()),
        }
    )


def assemble_tables(
    model: HookedModel, src: FeatureSource, stats: RunningStats, cfg, documents: dict[int, str]
) -> dict[str, pa.Table]:
    """Every table of the database from the pass's end state and the weights."""
    vocab = vocab_strings(model)
    return {
        "features": _feature_table(stats),
        "examples": _example_tables(stats, documents),
        "logits": _logit_table(model, src, cfg.n_logits, vocab),
        "neighbours": _neighbour_table(src, cfg.n_neighbours, model.device),
        "vocab": pa.table({"token": pa.array(np.arange(len(vocab)), pa.int32()), "str": vocab}),
    }
