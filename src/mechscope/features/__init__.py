"""Feature databases: what each SAE latent or MLP neuron responds to and what it does.

``build_features`` runs a model over a corpus (or reads an activation store) once and writes a
DuckDB-over-Parquet database of every feature's density, activation statistics, top and
quantile-sampled contexts with per-token activations, logit effects and nearest neighbours;
``FeatureDB`` queries it; dashboards render it (:mod:`mechscope.viz.dashboard`);
``feature_report`` does all of it for a trained SAE. The schema is in ``docs/features.md``.

    db = build_features(model, Neurons(3), "default", FeatureConfig(n_tokens=100_000), "feats/")
    db.feature(42)            # a FeatureRecord; shows itself as a dashboard in a notebook
    db.sql("SELECT id, max FROM features ORDER BY max DESC LIMIT 5")
"""

from mechscope.features.build import FeatureConfig, build_features
from mechscope.features.db import (
    ORDERABLE,
    Example,
    FeatureDB,
    FeatureRecord,
    FeatureSummary,
    Neighbour,
    TokenEffect,
)
from mechscope.features.effects import LogitEffects, Neighbours, logit_effects, nearest_neighbours
from mechscope.features.report import FeatureReport, feature_report, load_trained_sae, top_features
from mechscope.features.sources import FeatureSource, Neurons, feature_source
from mechscope.features.tables import (
    SCHEMAS,
    FeatureDBError,
    IncompatibleFeatureDBError,
    UnknownFeatureError,
    write_database,
)

__all__ = [
    "ORDERABLE",
    "SCHEMAS",
    "Example",
    "FeatureConfig",
    "FeatureDB",
    "FeatureDBError",
    "FeatureRecord",
    "FeatureReport",
    "FeatureSource",
    "FeatureSummary",
    "IncompatibleFeatureDBError",
    "LogitEffects",
    "Neighbour",
    "Neighbours",
    "Neurons",
    "TokenEffect",
    "UnknownFeatureError",
    "build_features",
    "feature_report",
    "feature_source",
    "load_trained_sae",
    "logit_effects",
    "nearest_neighbours",
    "top_features",
    "write_database",
]
