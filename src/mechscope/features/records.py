"""What the database returns: records and rows, plain named tuples and one frozen dataclass.

:class:`FeatureRecord` is everything one dashboard shows; it renders itself
(:meth:`FeatureRecord.to_html`, and as a dashboard in notebooks through ``_repr_html_``) with
:mod:`mechscope.viz.dashboard`, imported only then.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple


class Example(NamedTuple):
    """One stored context of a feature: a token window around its max-activating token."""

    kind: str
    """``top`` (the k strongest contexts) or ``quantile`` (sampled from an activation interval)."""
    interval: int | None
    """Quantile samples: the interval ``j`` of ``[j, j+1) * max / n_quantiles``; None for top."""
    rank: int
    """Position within its kind (and interval), strongest first."""
    value: float
    """The context's activation: its maximum over tokens."""
    context: int
    """Ordinal of the context in the build's context stream."""
    position: int
    """Position of the max-activating token in the context."""
    window_start: int
    """Position in the context of ``tokens[0]``."""
    tokens: list[int]
    strs: list[str]
    """Each token decoded on its own."""
    activations: list[float]
    """This feature's activation at each token of the window."""
    document: int
    """The corpus document of the max-activating token (-1: a BOS / separator token)."""
    source: str | None
    """That document's source label (file name, ``data.jsonl:17``, ...)."""
    token_offset: int
    """The max token's position among its document's tokens."""
    char_offset: int
    """The character where the max token starts in its document's text."""

    @property
    def max_index(self) -> int:
        """Index in ``tokens`` of the max-activating token."""
        return self.position - self.window_start


class TokenEffect(NamedTuple):
    token: int
    str: str
    value: float


class Neighbour(NamedTuple):
    id: int
    cosine: float
    explanation: str | None


class FeatureSummary(NamedTuple):
    """One row of :meth:`FeatureDB.features` / :meth:`FeatureDB.search_explanations`."""

    id: int
    density: float
    mean: float
    max: float
    explanation: str | None
    score: float | None


@dataclass(frozen=True)
class FeatureRecord:
    """Everything one dashboard shows about a feature (:meth:`FeatureDB.feature`)."""

    id: int
    density: float
    """Fraction of tokens with activation > 0."""
    n_firing: int
    mean: float
    """Mean activation over all tokens."""
    mean_firing: float | None
    """Mean activation over the tokens where it is > 0."""
    max: float
    histogram: list[int]
    """Counts of positive activations: ``[underflow, bins..., overflow]`` over ``hist_edges``."""
    hist_edges: list[float]
    explanation: str | None
    score: float | None
    top: list[Example]
    quantiles: list[list[Example]]
    """Per interval, lowest first (``len == n_quantiles``); an interval may be empty."""
    promoted: list[TokenEffect]
    suppressed: list[TokenEffect]
    neighbours: list[Neighbour]
    title: str
    """What the feature is: model, hook and kind (for headings)."""

    @property
    def n_quantiles(self) -> int:
        return len(self.quantiles)

    def interval_edges(self, j: int) -> tuple[float, float]:
        """The activation interval of quantile ``j``."""
        w = self.max / self.n_quantiles if self.n_quantiles else 0.0
        return j * w, (j + 1) * w

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("top",):
            d[key] = [e._asdict() for e in self.top]
        d["quantiles"] = [[e._asdict() for e in q] for q in self.quantiles]
        for key in ("promoted", "suppressed", "neighbours"):
            d[key] = [x._asdict() for x in getattr(self, key)]
        return d

    def to_html(self, *, full_page: bool = True) -> str:
        from mechscope.viz.dashboard import render_feature_html

        return render_feature_html(self, full_page=full_page)

    def _repr_html_(self) -> str:
        return self.to_html(full_page=False)


def _none_if_nan(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
