"""What a steering vector does, against what it costs, swept over coefficients and hook points.

The seed warns that ActAdd "will always find *some* vector": any difference of activations is a
direction, and adding a large enough vector changes the output. So a steering claim needs two numbers
and a control, all measured here:

* **effect**: the shift of a target metric on the steering prompts, by default the log of the
  next-token probability mass on a set of concept words (``log sum_w p(w)`` at each prompt's last
  token), relative to the unsteered model: +1 means the concept words became e times more likely;
* **cost**: on neutral text, the mean KL divergence ``KL(p_unsteered || p_steered)`` per token and the
  rise in next-token loss (``delta_nll``; ``exp(delta_nll)`` is the perplexity ratio);
* **control**: the same sweep with a random direction of the same per-position norm
  (:func:`~mechscope.steering.vectors.random_like`). A real steering direction buys more effect per
  unit of cost than a random one; if it does not, the vector is not about the concept.

Speed: every (vector, coefficient, text) variant is a row of one batch: the rows of a chunk share
their token ids, and each vector's hook adds with per-row coefficients (zero on rows of other
vectors), so a whole coefficient x layer sweep takes ``ceil(rows / batch_size)`` forwards per text set
instead of one forward per variant. A chunk whose hooks all sit at or above block L starts at L from the
cached unsteered residual (steering cannot change the blocks below). Steering prompts are left-padded
and only their last position is unembedded. :func:`sweep_generations` does the same for generation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.models.hook_names import parse
from mechscope.steering.apply import PositionTracker, hook_fn
from mechscope.steering.vectors import SteeringError, SteeringVector, random_like

# Plain, topic-free sentences for the cost: what steering should leave alone.
NEUTRAL_TEXTS = (
    "The train leaves the station at eight in the morning and arrives before noon.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The report lists the number of visitors to the museum in each month of the year.",
    "To install the package, open a terminal and run the command shown below.",
    "The river flows north through the valley before it reaches the sea.",
    "She put the books on the shelf and closed the door behind her.",
    "The meeting was moved from Tuesday to Thursday afternoon.",
    "Most of the houses on this street were built about a hundred years ago.",
)

Metric = Callable[[Float[Tensor, "batch d_vocab"]], Float[Tensor, " batch"]]


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """How to sweep steering vectors."""

    coeffs: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    """Coefficients to try; the unsteered model (coefficient 0) is the reference, computed once."""
    random_baseline: bool = True
    """Also sweep a random direction of the same norm for every vector."""
    random_seed: int = 0
    """Seed of the random directions (draw ``k`` of vector ``j`` uses ``random_seed + k * n_vectors + j``)."""
    random_draws: int = 1
    """Random directions per vector; the control is their mean (one draw is noisy: its effect at a given
    coefficient can land on either side of zero)."""
    batch_size: int = 16
    """Rows (variant x text) per forward; memory grows with ``batch_size * pos * d_vocab``."""
    neutral: tuple[str, ...] = NEUTRAL_TEXTS
    """Texts on which the cost is measured."""

    def __post_init__(self) -> None:
        if not self.coeffs:
            raise ValueError("coeffs is empty; give at least one coefficient")
        if self.random_draws < 1:
            raise ValueError(f"random_draws must be >= 1, got {self.random_draws}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.neutral:
            raise ValueError("neutral is empty; give at least one neutral text for the cost")


@dataclass(frozen=True)
class SweepResult:
    """Effect and cost of each vector at each coefficient (rows: vectors, columns: coefficients)."""

    labels: tuple[str, ...]
    """One per vector: its hook name."""
    coeffs: tuple[float, ...]
    effect: Float[Tensor, "vector coeff"]
    """Mean shift of the target metric on the steering prompts versus the unsteered model."""
    kl: Float[Tensor, "vector coeff"]
    """Mean per-token ``KL(unsteered || steered)`` on the neutral texts (nats)."""
    delta_nll: Float[Tensor, "vector coeff"]
    """Mean rise of the next-token loss on the neutral texts (nats)."""
    random_effect: Float[Tensor, "vector coeff"] | None
    """The same for random directions of the same per-position norms (mean over ``random_draws``)."""
    random_kl: Float[Tensor, "vector coeff"] | None
    random_delta_nll: Float[Tensor, "vector coeff"] | None
    baseline: float
    """The target metric of the unsteered model (mean over prompts)."""
    metric: str
    """What the target metric is."""
    forwards: int = 0
    """Forward passes the sweep took (both text sets, the reference included)."""
    norms: tuple[float, ...] = field(default=())
    """Norm of each vector's direction (at coefficient 1)."""

    def rows(self) -> list[dict]:
        """One dict per (vector, coefficient), for tables and JSON."""
        out = []
        for i, label in enumerate(self.labels):
            for j, c in enumerate(self.coeffs):
                row = {
                    "hook": label,
                    "coeff": c,
                    "effect": float(self.effect[i, j]),
                    "kl": float(self.kl[i, j]),
                    "delta_nll": float(self.delta_nll[i, j]),
                }
                if self.random_effect is not None:
                    row |= {
                        "random_effect": float(self.random_effect[i, j]),
                        "random_kl": float(self.random_kl[i, j]),
                        "random_delta_nll": float(self.random_delta_nll[i, j]),
                    }
                out.append(row)
        return out

    def to_html(self, title: str = "Steering: effect against cost") -> str:
        """A self-contained HTML page with the plots (see :mod:`mechscope.viz.steering`)."""
        from mechscope.viz.steering import render_steering_html

        return render_steering_html(self, title)


def concept_metric(model, words: Sequence[str]) -> tuple[Metric, str]:
    """``log sum_w p(w)`` over the first token of each word (give words with their leading space)."""
    if not words:
        raise SteeringError("no concept words; pass words such as ' love', ' wonderful' or a metric")
    ids = sorted({model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words})

    def metric(logits: Tensor) -> Tensor:
        return torch.logsumexp(logits.float().log_softmax(-1)[:, ids], dim=-1)

    return metric, f"log p(concept words: {', '.join(repr(w) for w in words)})"


def _chunks(n_variants: int, n_texts: int, size: int):
    """(variant index, text index) rows of ``n_variants x n_texts``, in chunks of ``size``."""
    rows = [(v, t) for v in range(n_variants) for t in range(n_texts)]
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        yield torch.tensor([v for v, _ in chunk]), torch.tensor([t for _, t in chunk])


def _row_hooks(vectors, tracker, vec_of_row: Tensor, coeff: Tensor) -> list:
    """One hook per vector present in the batch, adding ``coeff[r]`` on its rows and 0 on the others."""
    return [
        (v.hook_name, hook_fn(v, tracker, torch.where(vec_of_row == j, coeff, 0.0)))
        for j, v in enumerate(vectors)
        if bool((vec_of_row == j).any())
    ]


class _Texts(NamedTuple):
    """A tokenized text set and its unsteered residual at the ``resid_pre`` of each layer a chunk may start at."""

    ids: Tensor
    mask: Tensor | None
    starts: dict[int, Tensor]


def _layer(model, name: str | None) -> int | None:
    """The block a canonical hook point belongs to (None: model-level points and raw HF paths)."""
    if name is None or name not in model.hook_names:
        return None
    return parse(name)[0]


def _texts(model, texts: Sequence[str], padding_side: str, layers: set[int]) -> _Texts:
    """Tokenize, and cache the unsteered ``resid_pre`` at ``layers``: a chunk whose hooks all sit at or
    above layer L starts its forward there (:meth:`HookedModel.start_at`), skipping the blocks below,
    which steering cannot change."""
    toks = model.tokenize(list(texts), padding_side=padding_side)
    names = [f"blocks.{layer}.hook_resid_pre" for layer in sorted(layers) if layer > 0]
    if not names:
        return _Texts(toks.ids, toks.mask, {})
    with torch.no_grad():
        stop = max(layers) + 1 if max(layers) + 1 < model.cfg.n_layers else None
        _, cache = model.run_with_cache(toks.ids, names, stop_at_layer=stop, attention_mask=toks.mask)
    return _Texts(toks.ids, toks.mask, {parse(n)[0]: cache[n] for n in names})


def _forward(model, vectors, coeffs, texts: _Texts, var, txt, last_only: bool, read: str | None = None):
    """Logits of one chunk (row r: text ``txt[r]`` steered by variant ``var[r]``, a vector x coeff), and
    the last position's activation at ``read`` (after the steering) when asked."""
    n_c = len(coeffs)
    coeff = torch.tensor(coeffs, dtype=torch.float32)[var % n_c]
    vec_of_row = var // n_c
    row_mask = None if texts.mask is None else texts.mask[txt]
    points = [v.hook_name for j, v in enumerate(vectors) if bool((vec_of_row == j).any())] + [read]
    layers = [_layer(model, n) for n in points if n is not None]
    first = min(layers) if layers and None not in layers else None
    start = model.start_at(first, texts.starts[first][txt]) if first in texts.starts else nullcontext()
    with PositionTracker(model) as tracker:
        spec = _row_hooks(vectors, tracker, vec_of_row, coeff)
        seen: list[Tensor] = []
        recorder = [(read, lambda x, hook: seen.append(x[:, -1]))] if read else []
        with model.hooks(spec), model.hooks(recorder), start, torch.no_grad():  # inner hooks run after outer
            logits = model(texts.ids[txt], attention_mask=row_mask, logits_to_keep=1 if last_only else 0)
    return logits, (seen[0] if seen else None)


def _target(model, words, metric, probe) -> tuple[Callable[[Tensor, Tensor | None], Tensor], str, str | None]:
    """The effect's reading as ``f(logits, activation) -> [batch]``, its description, and the point it reads."""
    if probe is not None:
        name, direction = probe
        model.hook_point(name)
        unit = direction.float() / direction.float().norm()
        return lambda logits, act: act.float() @ unit.to(act.device), f"probe reading at {name}", name
    if metric is None:
        metric, desc = concept_metric(model, words or ())
    else:
        desc = getattr(metric, "__name__", "metric")
    return lambda logits, act: metric(logits[:, -1]).float(), desc, None


def _neutral_scores(logp: Tensor, base: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row mean KL(base || steered) over real positions, and mean next-token NLL."""
    kl = (base.exp() * (base - logp)).sum(-1)  # [rows pos]
    kl = (kl * mask).sum(1) / mask.sum(1)
    nxt = mask[:, 1:]
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return kl, (nll * nxt).sum(1) / nxt.sum(1)


def sweep(
    model,
    vectors: Sequence[SteeringVector],
    prompts: Sequence[str],
    concept_words: Sequence[str] | None = None,
    *,
    metric: Metric | None = None,
    probe: tuple[str, Float[Tensor, " width"]] | None = None,
    cfg: SweepConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """Effect and cost of each vector at each ``cfg.coeffs``, plus the random control, batched.

    Args:
        vectors: e.g. ``[actadd(model, "Love", "Hate", L) for L in layers]`` (their own coeff is ignored).
        prompts: steering prompts; the metric reads each one's last position.
        concept_words: words whose next-token probability is the target (leading spaces matter).
        metric: instead of ``concept_words``, any ``metric(last_logits) -> [batch]`` (e.g. a logit difference).
        probe: instead of either, ``(hook_name, direction)``: the target is the last position's activation
            at that point (steered) projected on the unit direction, e.g. a linear probe's weight vector.
        progress: called as ``progress(forwards_done, forwards_total)``.
    """
    cfg = cfg or SweepConfig()
    if not vectors:
        raise SteeringError("no vectors to sweep; pass at least one SteeringVector")
    if not prompts:
        raise SteeringError("no steering prompts; pass at least one prompt")
    metric, name, read = _target(model, concept_words, metric, probe)
    vecs = list(vectors)
    if cfg.random_baseline:
        n = len(vectors)
        vecs += [
            random_like(v, seed=cfg.random_seed + k * n + j)
            for k in range(cfg.random_draws)
            for j, v in enumerate(vectors)
        ]
    coeffs = [float(c) for c in cfg.coeffs]
    n_var = len(vecs) * len(coeffs)
    layers = {_layer(model, v.hook_name) for v in vectors} - {None}
    tgt = _texts(model, prompts, "left", layers)
    neu = _texts(model, cfg.neutral, "right", layers)
    neu_mask = (torch.ones_like(neu.ids) if neu.mask is None else neu.mask).float()
    n_tgt, n_neu = len(prompts), len(cfg.neutral)
    total = 2 + -(-n_var * n_tgt // cfg.batch_size) + -(-n_var * n_neu // cfg.batch_size)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    with torch.no_grad():  # the unsteered reference: coefficient 0
        every = torch.arange(n_tgt)
        ref = metric(*_forward(model, [], coeffs, tgt, every * 0, every, True, read)).cpu()
        tick()
        base = model(neu.ids, attention_mask=neu.mask).float().log_softmax(-1)
        _, base_nll = _neutral_scores(base, base, neu.ids, neu_mask)
        tick()
    effect = torch.empty(n_var, n_tgt)
    kl, nll = torch.empty(n_var, n_neu), torch.empty(n_var, n_neu)
    for var, txt in _chunks(n_var, n_tgt, cfg.batch_size):
        out = _forward(model, vecs, coeffs, tgt, var, txt, True, read)
        effect[var, txt] = metric(*out).cpu() - ref[txt]
        tick()
    for var, txt in _chunks(n_var, n_neu, cfg.batch_size):
        logp, _ = _forward(model, vecs, coeffs, neu, var, txt, False)
        k, n = _neutral_scores(logp.float().log_softmax(-1), base[txt], neu.ids[txt], neu_mask[txt])
        kl[var, txt], nll[var, txt] = k.cpu(), n.cpu() - base_nll[txt].cpu()
        tick()
    return _result(vectors, cfg, effect, kl, nll, float(ref.mean()), name, done)


def _result(vectors, cfg, effect, kl, nll, baseline, name, forwards) -> SweepResult:
    """Average over texts and split the real vectors' rows from the random ones'."""
    n, n_c = len(vectors), len(cfg.coeffs)
    eff, kl_m, nll_m = (t.mean(1).view(-1, n_c) for t in (effect, kl, nll))
    rnd = cfg.random_baseline

    def control(t: Tensor) -> Tensor:  # [draw * vector, coeff] -> mean over draws
        return t[n:].view(cfg.random_draws, n, n_c).mean(0)

    return SweepResult(
        labels=tuple(v.hook_name for v in vectors),
        coeffs=tuple(float(c) for c in cfg.coeffs),
        effect=eff[:n],
        kl=kl_m[:n],
        delta_nll=nll_m[:n],
        random_effect=control(eff) if rnd else None,
        random_kl=control(kl_m) if rnd else None,
        random_delta_nll=control(nll_m) if rnd else None,
        baseline=baseline,
        metric=name,
        forwards=forwards,
        norms=tuple(float(v.direction.float().norm()) for v in vectors),
    )


def sweep_generations(
    model,
    vectors: Sequence[SteeringVector],
    prompts: Sequence[str],
    coeffs: Sequence[float],
    *,
    batch_size: int = 64,
    **generate_kwargs,
) -> list[dict]:
    """Generate from every (vector, coefficient, prompt) at once: variants on the batch axis.

    Each vector's hook adds with a ``[batch]`` coefficient that is zero on the rows of other vectors, so
    one ``generate`` call (per ``batch_size`` rows) replaces ``len(vectors) * len(coeffs) * len(prompts)``
    calls. Prompts are left-padded; positions are tracked per row, so each row is steered exactly as
    it would be alone. ``generate_kwargs`` go to :func:`mechscope.models.generate.generate`.

    Returns:
        One dict per variant, vector-major: ``hook``, ``coeff``, ``prompt``, ``text`` (prompt + continuation).
    """
    from mechscope.models.generate import generate

    if not vectors or not prompts or not coeffs:
        raise SteeringError("sweep_generations needs at least one vector, one prompt and one coefficient")
    variants = [(j, float(c), p) for j in range(len(vectors)) for c in coeffs for p in prompts]
    out = []
    for i in range(0, len(variants), batch_size):
        chunk = variants[i : i + batch_size]
        vec_of_row = torch.tensor([j for j, _, _ in chunk])
        coeff = torch.tensor([c for _, c, _ in chunk])
        with PositionTracker(model) as tracker:
            with model.hooks(_row_hooks(vectors, tracker, vec_of_row, coeff)):
                texts = generate(model, [p for _, _, p in chunk], **generate_kwargs)
        out += [
            {"hook": vectors[j].hook_name, "coeff": c, "prompt": p, "text": t}
            for (j, c, p), t in zip(chunk, texts, strict=True)
        ]
    return out
