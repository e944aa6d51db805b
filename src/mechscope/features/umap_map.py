"""A 2-D map of a feature database: UMAP of the features' decoder directions (Neuronpedia's map view).

Features that write similar directions land near each other. The directions are the ones a database's
neighbours come from (:meth:`FeatureSource.decoder`: ``W_dec / output_scale`` of an SAE, ``W_out``
rows of neurons), unit-normalised, embedded with umap-learn under the cosine metric and a fixed seed.
UMAP costs seconds to minutes (its first call in a process also compiles numba kernels, ~15 s), so
the map is computed once and cached beside the tables as ``map.parquet`` (``id int32, x float32,
y float32``, sorted by id). The file's metadata names the SAE weights or model it was made from and the
UMAP settings; :func:`load_map` refuses a map that does not belong to the database it sits in.
No PCA fallback: umap-learn is a dependency of the ``web`` extra, and its absence is an error saying
how to install it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from jaxtyping import Float

from mechscope.features.db import FeatureDB
from mechscope.features.sources import FeatureSource, Neurons, SAESource, feature_source
from mechscope.features.tables import FeatureDBError, IncompatibleFeatureDBError
from mechscope.models.hooked import HookedModel
from mechscope.saes.sae import SAE

MAP_FILE = "map.parquet"
MAP_SCHEMA = pa.schema([("id", pa.int32()), ("x", pa.float32()), ("y", pa.float32())])
_KEY = b"mechscope.map"


def _identity(db: FeatureDB) -> str:
    """What the map must have been made from: the SAE's weights hash, or the model + neuron layer."""
    src = db.meta.get("source", {})
    if src.get("kind") == "sae":
        return f"sae:{src.get('sae_sha256')}"
    return f"neurons:{db.meta.get('model_fingerprint')}:{src.get('hook')}"


def umap_2d(
    directions: Float[np.ndarray, "n d"], *, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0
) -> Float[np.ndarray, "n 2"]:
    """UMAP of unit-normalised ``directions`` under the cosine metric (deterministic for a seed)."""
    try:
        import umap
    except ImportError as e:
        raise ImportError(
            "the feature map needs umap-learn: pip install 'mechscope[web]' (or pip install umap-learn)"
        ) from e
    n = directions.shape[0]
    if n < 4:
        raise ValueError(f"a map needs at least 4 features, the database has {n}")
    x = np.asarray(directions, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(n_neighbors, n - 1),
        min_dist=min_dist,
        metric="cosine",
        random_state=seed,
        init="spectral" if n > 16 else "random",  # spectral init needs more points than a tiny DB has
    )
    with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": determinism is the point
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        return reducer.fit_transform(x).astype(np.float32)


def _write(path: Path, xy: np.ndarray, info: dict[str, Any]) -> None:
    table = pa.table(
        {"id": np.arange(len(xy), dtype=np.int32), "x": xy[:, 0], "y": xy[:, 1]}, schema=MAP_SCHEMA
    ).replace_schema_metadata({_KEY: json.dumps(info).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=65536, compression="zstd")
    os.replace(tmp, path)


def load_map(db: FeatureDB) -> pa.Table | None:
    """The cached map of ``db`` (columns id, x, y), or None when none has been computed.

    Raises:
        FeatureDBError: a ``map.parquet`` that was made for another database (copied in by hand).
    """
    path = Path(db.path) / MAP_FILE
    if not path.is_file():
        return None
    table = pq.read_table(path)
    info = json.loads((table.schema.metadata or {}).get(_KEY, b"{}"))
    if info.get("identity") != _identity(db) or table.num_rows != db.n_features:
        raise FeatureDBError(
            f"{path} was made for other features ({table.num_rows} rows, {info.get('identity')!r}); "
            f"delete it and recompute it with `mechscope features map {db.path} ...`"
        )
    return table


def feature_map(
    db: FeatureDB,
    model: HookedModel,
    source: SAE | Neurons | FeatureSource | None = None,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    seed: int = 0,
    recompute: bool = False,
) -> pa.Table:
    """The 2-D map of ``db``'s features, computed from ``source`` once and cached in the DB directory.

    Args:
        db: an open feature database.
        model: the model it was built with.
        source: its SAE (or ``Neurons(layer)``); None for a neuron database (the layer comes from it).
        recompute: ignore (and replace) a cached map.

    Raises:
        IncompatibleFeatureDBError: ``source`` is not what the database was built from.
    """
    cached = None if recompute else load_map(db)
    if cached is not None:
        return cached
    src_meta = db.meta.get("source", {})
    if source is None:
        if src_meta.get("kind") != "neurons":
            raise ValueError("this database holds SAE latents: pass the SAE it was built from")
        source = Neurons(int(src_meta["layer"]))
    src = feature_source(model, source)
    if isinstance(src, SAESource):
        same = src.identity()["sae_sha256"] == src_meta.get("sae_sha256")
    else:
        same = src.hook == src_meta.get("hook")
    if not same:
        raise IncompatibleFeatureDBError(
            f"{db.path} was not built from this {src.kind} source ({src_meta.get('hook')}); "
            "pass the SAE / layer it was built from"
        )
    with torch.no_grad():
        xy = umap_2d(src.decoder().numpy(), n_neighbors=n_neighbors, min_dist=min_dist, seed=seed)
    info = {
        "identity": _identity(db),
        "method": "umap",
        "metric": "cosine",
        "n_neighbors": n_neighbors,
        "min_dist": min_dist,
        "seed": seed,
    }
    _write(Path(db.path) / MAP_FILE, xy, info)
    return load_map(db)
