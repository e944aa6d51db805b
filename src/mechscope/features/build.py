"""Build a feature database: one streaming pass over a corpus (or a store), then the weight-based views.

``build_features(model, source, data, cfg, out_dir)`` reads the source's hook point on fixed-length
contexts (:mod:`mechscope.data.contexts`: packed, shuffled by seed, every token traced to its
document) in batches of ``cfg.batch_size`` contexts: computed by the model on a corpus, or read from
a harvested activation store (:mod:`mechscope.features.inputs`). Each batch is encoded into feature
activations and folded into :class:`~mechscope.features.stats.RunningStats` (density, moments,
histogram, top-k contexts, quantile samples, token windows: all fixed-size tensors, so memory does
not grow with the corpus). At the end come the logit effects and nearest neighbours
(:mod:`mechscope.features.effects`) and the tables are written (:mod:`mechscope.features.tables`).

**Resuming.** Every ``cfg.checkpoint_every`` batches (and ``cfg.checkpoint_seconds``) the running
state is written to ``out_dir/checkpoint/`` (:mod:`mechscope.features.checkpoint`; a crash leaves the
previous checkpoint valid). Re-running the same call skips the contexts already counted (without
running the model on them) and continues; since the contexts, the batches and every update are
deterministic, the database is identical to an unbroken run's. The tables are written before ``meta.json``, so a
directory without it is never opened as a database. A checkpoint or a database made with another
model, source, corpus or config is refused, naming what differs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechscope.data.contexts import ContextConfig
from mechscope.data.corpus import Corpus, CorpusError
from mechscope.features.assemble import assemble_tables
from mechscope.features.checkpoint import Checkpoint, refuse
from mechscope.features.inputs import open_input
from mechscope.features.sources import FeatureSource, Neurons, feature_source
from mechscope.features.stats import RunningStats, StatsShape, hist_edges
from mechscope.features.tables import META_FILE, write_database
from mechscope.models.hooked import HookedModel
from mechscope.saes.harvest import HarvestProgress, model_fingerprint
from mechscope.saes.sae import SAE
from mechscope.saes.store import ActivationStore

log = logging.getLogger(__name__)
Progress = Callable[[HarvestProgress], None]
CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    """One feature-database build; saved in ``meta.json``."""

    n_tokens: int = 1 << 18
    """Tokens to read (rounded down to whole contexts; fewer if the corpus ends)."""
    contexts: ContextConfig = field(default_factory=ContextConfig)
    """Context length, shuffle seed and buffers."""
    batch_size: int = 8
    """Contexts per forward pass."""
    top_k: int = 20
    """Top-activating contexts kept per feature (sae-dashboard's default group size)."""
    n_quantiles: int = 10
    """Equal intervals of ``[0, max]`` to sample contexts from."""
    quantile_samples: int = 5
    """Contexts sampled per interval."""
    tokens_before: int = 20
    """Tokens kept before each example's max-activating token."""
    tokens_after: int = 4
    """Tokens kept after it."""
    n_logits: int = 10
    """Promoted and suppressed tokens kept per feature (each)."""
    n_neighbours: int = 10
    """Nearest features by decoder cosine kept per feature."""
    hist_min: float = 1e-4
    """Lowest histogram edge; smaller positive activations count in the underflow bin."""
    hist_max: float = 1e4
    """Highest histogram edge; larger activations count in the overflow bin."""
    hist_bins_per_decade: int = 8
    """Log-spaced histogram bins per factor of ten (default: 64 bins from 1e-4 to 1e4)."""
    seed: int = 0
    """Seed of the quantile sampling (the context shuffle has its own, ``contexts.seed``)."""
    checkpoint_every: int = 64
    """Batches between checkpoints, at least (not part of the build's identity)."""
    checkpoint_seconds: float = 120.0
    """And at least this many seconds since the last one: the state of a wide SAE is gigabytes, which
    a GPU would otherwise spend more time writing than computing (0: every ``checkpoint_every``)."""

    def __post_init__(self):
        for name in (
            "n_tokens",
            "batch_size",
            "top_k",
            "n_quantiles",
            "quantile_samples",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("tokens_before", "tokens_after", "n_logits", "n_neighbours"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.checkpoint_seconds < 0:
            raise ValueError(f"checkpoint_seconds must be >= 0, got {self.checkpoint_seconds}")
        if not 0 < self.hist_min < self.hist_max or self.hist_bins_per_decade < 1:
            raise ValueError(
                f"need 0 < hist_min < hist_max and hist_bins_per_decade >= 1, got {self.hist_min}, "
                f"{self.hist_max}, {self.hist_bins_per_decade}"
            )
        if self.n_tokens < self.contexts.context_length:
            raise ValueError(
                f"n_tokens ({self.n_tokens}) is less than one context ({self.contexts.context_length} tokens)"
            )

    @property
    def hist_edges(self) -> tuple[float, ...]:
        return hist_edges(self.hist_min, self.hist_max, self.hist_bins_per_decade)

    def identity(self) -> dict[str, Any]:
        """The fields that change the result (all but the checkpoint cadence)."""
        d = dataclasses.asdict(self)
        d.pop("checkpoint_every")
        d.pop("checkpoint_seconds")
        return d


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _referenced(stats: RunningStats, documents: dict[int, str]) -> dict[int, str]:
    """Only the documents that some kept example points at (bounds the table over a long pass)."""
    ids = torch.cat([stats.t["top_prov"][..., 0].flatten(), stats.t["q_prov"][..., 0].flatten()])
    keep = set(torch.unique(ids).tolist())
    return {d: s for d, s in documents.items() if d in keep}


def _stats_shape(src: FeatureSource, cfg: FeatureConfig) -> StatsShape:
    return StatsShape(
        n_features=src.n_features,
        top_k=cfg.top_k,
        n_quantiles=cfg.n_quantiles,
        quantile_samples=cfg.quantile_samples,
        tokens_before=cfg.tokens_before,
        tokens_after=cfg.tokens_after,
        edges=cfg.hist_edges,
        seed=cfg.seed,
    )


@torch.no_grad()
def build_features(
    model: HookedModel,
    source: SAE | Neurons | FeatureSource,
    corpus: Corpus | str | Path | ActivationStore,
    cfg: FeatureConfig,
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    progress: Progress | None = None,
):
    """Build (or resume, or reopen) the feature database of ``source`` over ``corpus`` in ``out_dir``.

    Args:
        model: the model; its forward stops after the source's layer (with a store it only supplies
            the weights for logit effects and the vocabulary).
        source: an SAE (its latents at ``sae.cfg.hook_name``) or ``Neurons(layer)`` (``blocks.L.mlp.hook_post``).
        corpus: a :class:`~mechscope.data.corpus.Corpus` or a spec for ``load_corpus`` (``"default"``);
            or an opened :class:`~mechscope.saes.store.ActivationStore` holding the source's hook,
            whose contexts are read instead of running the model (its context settings then
            replace ``cfg.contexts``).
        cfg: token budget, contexts, how much to keep per feature.
        out_dir: the database directory; an interrupted build there is resumed, a finished one reopened.
        model_name: recorded in ``meta.json`` (default ``model.name``).
        progress: called with a :class:`~mechscope.saes.harvest.HarvestProgress` after every batch
            (``skipped=True`` once for the part restored from a checkpoint).

    Returns:
        The database, opened: a :class:`~mechscope.features.db.FeatureDB`.

    Raises:
        IncompatibleFeatureDBError: ``out_dir`` holds a build of another model / source / corpus / config.
        IncompatibleStoreError: the store comes from another model or lacks the source's hook.
        CorpusError: the corpus (or store) yields no context.
    """
    from mechscope.features.db import FeatureDB

    src = feature_source(model, source)
    inp = open_input(model, src, corpus, cfg.contexts)
    if inp.contexts != cfg.contexts:  # a store fixed them at harvest time
        cfg = dataclasses.replace(cfg, contexts=inp.contexts)
    identity = _jsonable(
        {"model_fingerprint": model_fingerprint(model), "source": src.identity(), **inp.identity()}
        | {"config": cfg.identity()}
    )
    out = Path(out_dir)
    if (out / META_FILE).is_file():
        have = json.loads((out / META_FILE).read_text()).get("identity", {})
        if have != identity:
            raise refuse(out, "feature database", identity, have)
        return FeatureDB.open(out)
    stats = RunningStats(_stats_shape(src, cfg), device=model.device)
    done, documents = _pass(inp, src, stats, cfg, Checkpoint(out / CHECKPOINT_DIR, identity), progress)
    tables = assemble_tables(model, src, stats, cfg, documents)
    meta = {
        "model": model_name or model.name,
        "model_fingerprint": identity["model_fingerprint"],
        "source": identity["source"],
        "corpus": identity["corpus"],
        "config": identity["config"],
        "identity": identity,
        "n_features": src.n_features,
        "n_tokens": stats.n_tokens,
        "n_contexts": done,
        "hist_edges": list(cfg.hist_edges),
        "logits": "computed"
        if tables["logits"].num_rows
        else "none: the source's hook writes no residual direction",
        "mechscope_version": _version(),
    }
    write_database(out, tables, meta)  # meta.json last: only now is the directory a database
    Checkpoint(out / CHECKPOINT_DIR, identity).remove()
    return FeatureDB.open(out)


def _pass(inp, src: FeatureSource, stats: RunningStats, cfg: FeatureConfig, ckpt: Checkpoint, progress):
    """The streaming pass (resumed from ``ckpt``): contexts counted and the documents examples point at."""
    done, batches, documents = ckpt.load(stats)
    saved = time.monotonic()
    L = cfg.contexts.context_length
    target = cfg.n_tokens // L
    if done and progress is not None:
        progress(HarvestProgress(done * L, target * L, True))
    for index, acts, sources in inp.batches(done, target, cfg.batch_size):
        n = index.shape[0]
        stats.update(
            src.encode(acts).view(n, L, src.n_features), index, first_context=done, batch_number=batches
        )
        documents.update(sources)
        done, batches = done + n, batches + 1
        if progress is not None:
            progress(HarvestProgress(done * L, target * L, False))
        if batches % cfg.checkpoint_every == 0 and time.monotonic() - saved >= cfg.checkpoint_seconds:
            documents = _referenced(stats, documents)
            ckpt.save(stats, done, batches, documents)
            saved = time.monotonic()
    if done == 0:
        raise CorpusError(f"{inp.name} yields no context of {L} tokens: it is empty or too short")
    if done < target:
        log.warning("%s ran out after %d of %d tokens", inp.name, done * L, target * L)
    return done, _referenced(stats, documents)


def _version() -> str:
    from mechscope import __version__

    return __version__
