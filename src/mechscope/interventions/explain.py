"""``explain``: one prompt in, the standard first look at a behaviour out.

What the model predicts; what each layer's residual stream predicts (logit lens); which
components write the answer directly (direct logit attribution by layer and head) and where the
top heads attend; and, given a corrupted prompt, which activations carry the difference
(activation patching of the residual stream, attention and MLP outputs and every head, with
attribution patching beside the real thing). With a subject, ROME's causal traces too.

The metric is the logit difference ``answer - wrong`` at the last position (log-probability of
``answer`` without ``wrong``). Every part is the library's own analysis; this module only runs them
in order and keeps the results together, so the report's numbers are the API's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mechscope.circuits.dla import DLA, direct_logit_attribution
from mechscope.circuits.logit_lens import LogitLens, logit_lens
from mechscope.interventions import metrics
from mechscope.interventions.attribution import Comparison, attribution_patch_all, compare
from mechscope.interventions.patching import PatchResult, patch_sweep
from mechscope.models import HookedModel
from mechscope.viz.attention import AttentionView, attention_view

if TYPE_CHECKING:
    from mechscope.interventions.causal_trace import CausalTrace


@dataclass(frozen=True)
class ExplainConfig:
    """What to explain: the answer, its rival, an optional corrupted prompt and subject."""

    answer: str
    """The expected next token (one token, usually with its leading space, e.g. ``" Mary"``)."""
    wrong: str | None = None
    """The rival token; the metric is then ``logit(answer) - logit(wrong)``."""
    corrupt: str | None = None
    """A prompt of the same token length whose answer differs: enables the patching sections."""
    subject: str | None = None
    """A substring of the prompt naming the subject of a fact: enables ROME's causal traces."""
    points: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "z")
    """The patching sweeps (``z`` per head, the others per layer and position)."""
    top_heads: int = 4
    """How many heads (by absolute DLA) get their attention pattern drawn."""
    trace_samples: int = 10
    """Noise samples of the causal trace."""
    seed: int = 0


@dataclass(frozen=True)
class Explanation:
    """Every result of :func:`explain`; ``to_json`` gives the numbers, ``to_html`` the report."""

    model: str
    prompt: str
    config: ExplainConfig
    str_tokens: list[str]
    predictions: list[tuple[str, float]]
    metric: float
    lens: LogitLens
    dla: DLA
    attention: AttentionView
    heads: list[tuple[int, int]]
    patching: dict[str, PatchResult] = field(default_factory=dict)
    attribution: dict[str, PatchResult] = field(default_factory=dict)
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    trace: CausalTrace | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain numbers: each sweep as nested lists keyed by its hook point (``resid_pre``: layer x pos)."""

        def sweep(r: PatchResult) -> dict[str, Any]:
            return {"axes": list(r.axes), "values": r.values.tolist(), "normalised": r.normalised.tolist()}

        out: dict[str, Any] = {
            "model": self.model,
            "prompt": self.prompt,
            "config": asdict(self.config),
            "tokens": self.str_tokens,
            "metric": self.metric,
            "predictions": [{"token": t, "prob": p} for t, p in self.predictions],
            "logit_lens": self.lens.to_records(),
            "dla": self.dla.to_json(),
            "top_heads": [f"L{layer}H{h}" for layer, h in self.heads],
        }
        if self.patching:
            first = next(iter(self.patching.values()))
            out["metric_clean"], out["metric_corrupted"] = first.clean, first.corrupted
            out["patching"] = {k: sweep(v) for k, v in self.patching.items()}
            out["attribution"] = {k: sweep(v) for k, v in self.attribution.items()}
            out["attribution_vs_patching"] = {
                k: {"correlation": c.correlation, "max_abs_error": c.max_abs_error}
                for k, c in self.comparisons.items()
            }
        if self.trace is not None:
            out["causal_trace"] = self.trace.to_json()
        return out

    def to_html(self) -> str:
        from mechscope.viz.report import render_explanation_html

        return render_explanation_html(self)


def explain(
    model: HookedModel,
    prompt: str,
    config: ExplainConfig,
    *,
    name: str = "",
    progress: Callable[[str], None] = lambda step: None,
) -> Explanation:
    """Run every analysis of the report on ``prompt`` (``progress(step)`` is called before each part).

    Raises:
        TokenizationError: ``answer`` or ``wrong`` is not a single token.
        ValueError: ``corrupt`` has another token length than ``prompt``; ``subject`` is not in it.
    """
    answer = model.to_single_token(config.answer)
    wrong = None if config.wrong is None else model.to_single_token(config.wrong)
    metric = metrics.logit_diff(answer, wrong) if wrong is not None else metrics.log_prob(answer)
    if config.corrupt is not None:
        a, b = model.to_tokens(prompt), model.to_tokens(config.corrupt)
        if a.shape != b.shape:
            raise ValueError(
                f"the corrupted prompt has {b.shape[1]} tokens and the prompt {a.shape[1]}; "
                f"they must align token by token: {model.to_str_tokens(prompt)} vs "
                f"{model.to_str_tokens(config.corrupt)}"
            )

    progress("predictions and logit lens")
    with torch.no_grad():
        logits = model(prompt)
    probs = logits[0, -1].float().softmax(-1)
    top = probs.topk(5)
    predictions = [
        (model.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices, strict=True)
    ]
    lens = logit_lens(model, prompt)

    progress("direct logit attribution")
    dla = direct_logit_attribution(model, prompt, config.answer, config.wrong)
    heads = [(layer, h) for layer, h, _ in dla.top_heads(config.top_heads)]
    attention = attention_view(model, prompt, heads)

    patching: dict[str, PatchResult] = {}
    attribution: dict[str, PatchResult] = {}
    comparisons: dict[str, Comparison] = {}
    if config.corrupt is not None:
        for point in config.points:
            progress(f"activation patching: {point}")
            patching[point] = patch_sweep(model, prompt, config.corrupt, metric, point)
        progress("attribution patching")
        attribution = attribution_patch_all(model, prompt, config.corrupt, metric, points=list(config.points))
        comparisons = {p: compare(attribution[p], patching[p]) for p in config.points}

    trace = None
    if config.subject is not None:
        from mechscope.interventions.causal_trace import causal_trace

        progress("causal tracing")
        kinds = ("state", "mlp", "attn") if model.cfg.has_mlp else ("state", "attn")
        trace = causal_trace(
            model,
            prompt,
            config.subject,
            config.answer,
            kinds=kinds,
            samples=config.trace_samples,
            seed=config.seed,
        )
    return Explanation(
        name or model.hf_model.config.name_or_path,
        prompt,
        config,
        model.to_str_tokens(prompt),
        predictions,
        float(metric(logits).mean()),
        lens,
        dla,
        attention,
        heads,
        patching,
        attribution,
        comparisons,
        trace,
    )
