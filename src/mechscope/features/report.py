"""From a trained SAE to a folder of dashboards in one call: build the database, write the top pages.

:func:`feature_report` is the last step of the SAE workflow (harvest -> train -> look at the
features)::

    report = feature_report(model, "runs/l6-topk", "default", "runs/l6-topk/features", top_n=50)
    report.index          # runs/l6-topk/features/dashboards/index.html, opens offline

It writes ``out_dir/db/`` (the database: resumable, reopened if already finished) and
``out_dir/dashboards/`` (``index.html`` listing the chosen features, and one self-contained
``feature-<id>.html`` each). The rendering lives in :mod:`mechscope.viz.dashboard`, imported only here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from mechscope.data.corpus import Corpus
from mechscope.features.build import FeatureConfig, Progress, build_features
from mechscope.features.db import ORDERABLE, FeatureDB
from mechscope.features.sources import FeatureSource, Neurons
from mechscope.models.hooked import HookedModel
from mechscope.saes.sae import SAE
from mechscope.saes.store import ActivationStore


class FeatureReport(NamedTuple):
    """What :func:`feature_report` wrote."""

    db: FeatureDB
    """The database, open (``out_dir/db``)."""
    index: Path
    """``out_dir/dashboards/index.html``."""
    features: list[int]
    """The features given pages, in index order."""


def load_trained_sae(path: str | Path, model: HookedModel) -> SAE:
    """An SAE from a directory in any registered format, or a ``train_sae`` run directory (its ``sae/``)."""
    from mechscope.saes.formats import load_sae

    root = Path(path)
    if (root / "run.json").is_file() and (root / "sae").is_dir():  # mechscope train-sae RUN
        root = root / "sae"
    return load_sae(root, model=model)


def top_features(db: FeatureDB, n: int, order_by: str = "density") -> list[int]:
    """The ``n`` firing features (``n_firing > 0``) with the largest ``order_by`` (ties: lower id first)."""
    if order_by not in ORDERABLE:
        raise ValueError(f"order_by must be one of {ORDERABLE}, got {order_by!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # order_by is one of ORDERABLE (checked above), never user text spliced into SQL.
    query = f"SELECT id FROM features WHERE n_firing > 0 ORDER BY {order_by} DESC NULLS LAST, id LIMIT ?"
    return db.sql(query, [n]).column("id").to_pylist()


def feature_report(
    model: HookedModel,
    sae: SAE | Neurons | FeatureSource | str | Path,
    data: Corpus | str | Path | ActivationStore,
    out_dir: str | Path,
    *,
    cfg: FeatureConfig | None = None,
    top_n: int = 50,
    order_by: str = "density",
    progress: Progress | None = None,
    page_progress: Callable[[int, int], None] | None = None,
) -> FeatureReport:
    """Build (or resume, or reopen) the feature database of ``sae`` and write dashboards for its top features.

    Args:
        model: the model the SAE reads.
        sae: an SAE, its directory (native, SAELens or Gemma Scope format) or a ``train_sae`` run
            directory; or ``Neurons(layer)``.
        data: the corpus (a :class:`~mechscope.data.corpus.Corpus` or a ``load_corpus`` spec) or an
            opened :class:`~mechscope.saes.store.ActivationStore` holding the SAE's hook.
        out_dir: receives ``db/`` and ``dashboards/``.
        cfg: the build's settings (default :class:`FeatureConfig()`).
        top_n: pages to write: the ``top_n`` features by ``order_by``, largest first, never-firing
            features excluded.
        order_by: a column of :data:`~mechscope.features.db.ORDERABLE` (``density``, ``max``, ...).
        progress: the build's progress callback (see :func:`build_features`).
        page_progress: called as ``page_progress(done, total)`` after each page.
    """
    if order_by not in ORDERABLE or top_n < 0:  # checked before the build, not after it
        raise ValueError(f"order_by must be one of {ORDERABLE} and top_n >= 0, got {order_by!r}, {top_n}")
    from mechscope.viz.dashboard import write_dashboards

    if isinstance(sae, str | Path):
        sae = load_trained_sae(sae, model)
    out = Path(out_dir)
    db = build_features(model, sae, data, cfg or FeatureConfig(), out / "db", progress=progress)
    ids = top_features(db, top_n, order_by)
    index = write_dashboards(db, out / "dashboards", ids, progress=page_progress)
    return FeatureReport(db, index, ids)
