"""Rank-one model editing (ROME; Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

ROME reads an MLP's output projection ``W`` (TransformerLens ``W_out`` ``[d_mlp d_model]``: from the
neuron activations ``mlp.hook_post`` to what the MLP writes) as a linear key-value memory: the key
``k`` at the subject's last token is mapped to a value ``k W`` that later layers turn into facts
about the subject. To make "The Eiffel Tower is located in the city of" end in " Rome":

1. **Locate** (§2): causal-trace the fact and take the layer whose MLP outputs (a window of layers,
   as in :mod:`mechscope.interventions.causal_trace`) restore most of the answer when restored at
   the subject's last token (:func:`locate_layer`); or name the layer.
2. **Key k\\*** (§3.1, Eq. 3): the key at the subject's last token, averaged over the prompt alone
   and short prefixes the model writes itself (seeded top-5 sampling of 5 and 10 tokens from "The",
   "Therefore", "Because", "I", "You", as ROME's code does), so the edit fires whatever precedes
   the subject (:func:`context_prefixes`).
3. **Value v\\*** (§3.1, Eq. 4): a vector ``δ`` added to the MLP's output at the subject's last token
   of every such prompt is optimised (Adam) so that the new object follows, plus a KL term keeping
   the prediction after "{subject} is a" (what the subject *is*) and ROME's weight decay
   ``wd ‖δ‖ / ‖v₀‖²``; ``δ`` is clamped to ``4 ‖v₀‖`` (``v₀``: the MLP output on the bare prompt).
   ``v* = k* W + δ``: by linearity the mean over the prompts of their optimised MLP outputs.
4. **Update** (§3.1, Eq. 2): ``Ŵ = W + C⁻¹k* (v* − k*W)ᵀ / (k*ᵀ C⁻¹ k*)``, the ``Ŵ`` closest to ``W``
   on the keys it has seen (least ``‖(Ŵ − W) K‖``, ``C = K Kᵀ / n``) that maps ``k*`` to ``v*``
   exactly (:func:`rank_one_update`). ``C = E[k kᵀ]`` is the uncentred second moment of keys over a
   corpus (:func:`key_covariance`, cached on disk). Its scale cancels in Eq. 2, which is why ROME
   has no ``λ``; MEMIT's ``mom2_update_weight`` (15000 for GPT-2 XL) weighs ``C`` against the new
   keys and has no counterpart here.

Defaults are ROME's GPT-2 XL hyper-parameters (``hparams/ROME/gpt2-xl.json``: 20 steps, lr 0.5,
KL factor 0.0625, weight decay 0.5, clamp 4) except the corpus (mechscope's embedded one, 100k
tokens instead of 100k Wikipedia articles). Two choices differ from ROME's code and are stated:
the KL term reads the *last* position of "{subject} is a" (the paper's wording; the code reads the
subject's last token), and ``k*`` is used on both sides of Eq. 2 (the code divides by the bare
prompt's key). The update is written into the HF parameter through its ``[d_mlp d_model]`` view
(:func:`mechscope.models.adapters.base.in_out`), so the HF layout (Linear ``[out, in]``, GPT-2's
Conv1D ``[in, out]``) never matters; post-norm MLPs (Gemma) are edited before their norm, where
``δ`` was optimised. :class:`Edit` applies and undoes it; undo restores the weights bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.data.corpus import Corpus
from mechscope.models import HookedModel
from mechscope.models.adapters.base import in_out
from mechscope.models.hook_points import HookPoint
from mechscope.models.tokens import encode
from mechscope.probes.rome_keys import (
    LayerTrace,
    Progress,
    context_prefixes,
    key_covariance,
    locate_layer,
)
from mechscope.probes.rome_request import (
    EditError,
    EditRequest,
    check_layer,
    mlp_out_path,
    subject_tokens,
    target_ids,
)

log = logging.getLogger(__name__)
WEAK_TRACE = 0.1
"""A located layer whose MLP effect is below this share of the total effect (clean - corrupted) is warned about."""
_APPLIED = "_mechscope_rome_edits"
"""The attribute of an edited module holding its applied edits in order: undo must go last-in first-out,
or it would erase later ones. On the module itself, so the model can be freed with edits applied
(a weak map keyed by the module never let go: its values, the edits, reach the module)."""


@dataclass(frozen=True, kw_only=True)
class RomeConfig:
    """How one ROME edit is computed (defaults: ROME's GPT-2 XL hyper-parameters)."""

    layer: int | None = None
    """MLP layer to edit; None: the causal trace picks it (:func:`locate_layer`)."""
    trace_samples: int = 10
    """Noise draws of the causal trace."""
    trace_window: int = 10
    """MLP layers restored together around each layer in the trace (ROME: 10)."""
    prefix_lengths: tuple[int, ...] = (5, 10)
    """Lengths in tokens of the generated context prefixes (ROME: 5 and 10)."""
    prefixes_per_length: int = 10
    """Prefixes of each length (ROME: 10); the bare prompt is always used too."""
    seed: int = 0
    """Seeds the prefixes, the trace's noise and the covariance's contexts."""
    cov_tokens: int = 100_000
    """Corpus tokens over which ``C = E[k kᵀ]`` is estimated (must exceed ``d_mlp``)."""
    cov_context_length: int = 128
    """Tokens per corpus context for the covariance."""
    cov_batch_size: int = 8
    """Contexts per forward for the covariance."""
    steps: int = 20
    """Adam steps optimising ``δ`` (ROME: 20)."""
    lr: float = 0.5
    """Adam learning rate (ROME: 0.5)."""
    kl_factor: float = 0.0625
    """Weight of KL(edited ‖ original) after "{subject} is a" (ROME: 0.0625)."""
    weight_decay: float = 0.5
    """Weight of ``‖δ‖ / ‖v₀‖²`` (ROME's code: 0.5)."""
    clamp_norm_factor: float = 4.0
    """``‖δ‖`` is projected back to at most this times ``‖v₀‖`` after each step (ROME: 4)."""
    stop_loss: float = 0.05
    """Stop early once the total loss is below this (ROME: 0.05)."""

    def __post_init__(self):
        for name in ("trace_samples", "trace_window", "prefixes_per_length", "cov_tokens", "cov_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cov_context_length < 2:
            raise ValueError(f"cov_context_length must be >= 2, got {self.cov_context_length}")
        if any(n < 1 for n in self.prefix_lengths):
            raise ValueError(f"prefix_lengths must be >= 1 each, got {self.prefix_lengths}")
        if self.steps < 0 or self.lr <= 0 or self.clamp_norm_factor <= 0:
            raise ValueError(
                f"steps must be >= 0, lr and clamp_norm_factor > 0; got {self.steps}, {self.lr}, "
                f"{self.clamp_norm_factor}"
            )
        if self.kl_factor < 0 or self.weight_decay < 0:
            raise ValueError(
                f"kl_factor and weight_decay must be >= 0, got {self.kl_factor}, {self.weight_decay}"
            )


# ---------------------------------------------------------------------------- value
class _Batch(NamedTuple):
    ids: Tensor
    mask: Tensor
    lookup: Tensor
    """Per row: the position of the subject's last token."""


def _batch(model: HookedModel, request: EditRequest, prefixes: Sequence[str], target: list[int]) -> _Batch:
    """Rows ``prefix + prompt + target[:-1]`` (ids joined, never re-tokenised), then "{subject} is a".

    Left-padded, so every row ends at the last position: the target's tokens are predicted at the
    last ``len(target)`` positions of every rewriting row, and only those need unembedding.
    """
    rows, lookup = [], []
    start, end = request.span
    for p in prefixes:
        text = p + request.prompt
        lookup.append(subject_tokens(model, text, len(p) + start, len(p) + end)[1])
        rows.append(encode(model.tokenizer, text, prepend_bos=model.prepend_bos) + target[:-1])
    kl_text = request.subject + " is a"
    rows.append(encode(model.tokenizer, kl_text, prepend_bos=model.prepend_bos))
    lookup.append(subject_tokens(model, kl_text, 0, len(request.subject))[1])
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
        lookup[i] += width - len(r)
    return _Batch(ids.to(model.device), mask.to(model.device), torch.tensor(lookup))


@contextmanager
def _frozen(model: HookedModel) -> Iterator[None]:
    """Parameters need no gradient while only ``δ`` is optimised (saves the weight-gradient matmuls)."""
    flags = [(p, p.requires_grad) for p in model.hf_model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class Value(NamedTuple):
    """The result of :func:`compute_value`."""

    key: Float[Tensor, " d_mlp"]
    """k*: the mean key at the subject's last token over the prompts."""
    value: Float[Tensor, " d_model"]
    """v* = k* W + δ (the output projection's bias, if any, is not part of it)."""
    delta: Float[Tensor, " d_model"]
    history: list[dict[str, float]]
    """Per evaluated step: total loss, its three terms and the mean probability of the target tokens."""


def compute_value(
    model: HookedModel,
    request: EditRequest,
    layer: int,
    prefixes: Sequence[str],
    cfg: RomeConfig,
    progress: Progress | None = None,
) -> Value:
    """k* and v*: average the keys, then optimise ``δ`` (see the module docstring, step 3)."""
    check_layer(model, layer)
    target = target_ids(model, request.target)
    b = _batch(model, request, prefixes, target)
    n_rw, rows = len(prefixes), torch.arange(len(b.lookup))
    out_path, resid, post = (
        mlp_out_path(model, layer),
        f"blocks.{layer}.hook_resid_pre",
        f"blocks.{layer}.mlp.hook_post",
    )
    with torch.no_grad():
        _, cache = model.run_with_cache(
            b.ids, [resid, post, out_path], stop_at_layer=layer + 1, attention_mask=b.mask
        )
    key = cache[post][rows[:n_rw], b.lookup[:n_rw]].float().mean(0)
    v0_norm = cache[out_path][0, b.lookup[0]].float().norm()  # ROME's target_init: the bare prompt
    W = in_out(model.module(out_path)).detach().float()
    rw_tok = torch.tensor(target, device=model.device).expand(n_rw, -1)
    delta = torch.zeros(model.cfg.d_model, device=model.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)

    def add_delta(x: Tensor, hook: HookPoint) -> Tensor:
        return x.index_put((rows, b.lookup), delta.to(x.dtype).expand(len(rows), -1), accumulate=True)

    history, kl_init = [], None
    for step in range(cfg.steps + 1):
        with torch.enable_grad(), _frozen(model), model.start_at(layer, cache[resid]):
            with model.hooks({out_path: add_delta}):
                logits = model(b.ids, attention_mask=b.mask, logits_to_keep=len(target)).float()
            nll = -logits[:n_rw].log_softmax(-1).gather(2, rw_tok[..., None]).squeeze(2)  # [n_rw target]
            kl_logp = logits[-1, -1].log_softmax(-1)
            kl_init = kl_logp.detach() if kl_init is None else kl_init
            kl = (kl_logp.exp() * (kl_logp - kl_init)).sum()  # KL(edited || original), as ROME
            decay = cfg.weight_decay * delta.norm() / v0_norm**2
            loss = nll.mean() + cfg.kl_factor * kl + decay
            history.append(
                dict(
                    step=step,
                    loss=loss.item(),
                    nll=nll.mean().item(),
                    kl=kl.item(),
                    weight_decay=decay.item(),
                    p_target=(-nll).exp().mean().item(),
                )
            )
            if loss.item() < cfg.stop_loss or step == cfg.steps:
                break
            (delta.grad,) = torch.autograd.grad(loss, [delta])
        opt.step()
        with torch.no_grad():
            max_norm = cfg.clamp_norm_factor * v0_norm
            if delta.norm() > max_norm:
                delta *= max_norm / delta.norm()
        if progress:
            progress("optimisation", step + 1, cfg.steps)
    delta = delta.detach().cpu()
    key = key.cpu()
    return Value(key, key @ W.cpu() + delta, delta, history)


# ---------------------------------------------------------------------------- update
class RankOne(NamedTuple):
    """``ΔW = outer(left, right)`` in TransformerLens orientation ``[d_mlp d_model]``."""

    left: Float[Tensor, " d_mlp"]
    """``C⁻¹k* / (k*ᵀ C⁻¹ k*)``."""
    right: Float[Tensor, " d_model"]
    """``v* − k* W``."""


def rank_one_update(
    W_out: Float[Tensor, "d_mlp d_model"],
    C: Float[Tensor, "d_mlp d_mlp"],
    key: Float[Tensor, " d_mlp"],
    value: Float[Tensor, " d_model"],
) -> RankOne:
    """ROME's Eq. 2: the ``ΔW`` of least ``‖ΔWᵀ K‖`` (``K Kᵀ ∝ C``) with ``key @ (W_out + ΔW) = value``.

    Solved in float64. ``(W_out + ΔW)`` changes the output of any key ``k`` by
    ``(kᵀ C⁻¹ k*) / (k*ᵀ C⁻¹ k*) · (v* − k* W)``: nothing for keys orthogonal to ``k*`` under ``C⁻¹``.
    """
    k = key.double()
    try:
        u = torch.linalg.solve(C.double(), k)
    except torch.linalg.LinAlgError:
        raise EditError(
            "the key covariance C is singular; estimate it over more tokens (cov_tokens)"
        ) from None
    left = u / (u @ k)
    right = value.double() - k @ W_out.double()
    return RankOne(left.float(), right.float())


class Edit:
    """A computed ROME edit of block ``layer``'s MLP output weights.

    ``apply()`` adds ``ΔW`` to the HF parameter in place (keeping a copy of the original), ``undo()``
    copies the original back (bit for bit); ``with edit: ...`` does both. Edits of one layer stack;
    undoing one that a later, still-applied edit of the same weights sits on raises
    :class:`EditError` (its copy would erase the later edit): undo in reverse order.
    """

    def __init__(
        self,
        model: HookedModel,
        request: EditRequest,
        layer: int,
        update: RankOne,
        value: Value,
        *,
        trace: LayerTrace | None = None,
        prefixes: Sequence[str] = (),
        config: RomeConfig | None = None,
    ):
        self.model, self.request, self.layer, self.update = model, request, layer, update
        self.value, self.trace, self.prefixes, self.config = value, trace, list(prefixes), config
        self._original: Tensor | None = None

    def __repr__(self) -> str:
        state = "applied" if self.applied else "not applied"
        return f"Edit({self.request.prompt!r} -> {self.request.target!r}, layer {self.layer}, {state})"

    @property
    def applied(self) -> bool:
        return self._original is not None

    @property
    def delta_w(self) -> Float[Tensor, "d_mlp d_model"]:
        return torch.outer(self.update.left, self.update.right)

    def _module(self):
        return self.model.module(mlp_out_path(self.model, self.layer))

    @torch.no_grad()
    def apply(self) -> Edit:
        if self.applied:
            raise EditError(f"{self!r} is already applied")
        module = self._module()
        self._original = module.weight.detach().clone()
        view = in_out(module)  # [d_mlp d_model] whatever the HF layout
        view.add_(self.delta_w.to(device=view.device, dtype=view.dtype))
        module.__dict__.setdefault(_APPLIED, []).append(self)
        return self

    @torch.no_grad()
    def undo(self) -> None:
        if self._original is None:
            raise EditError(f"{self!r} is not applied; nothing to undo")
        module = self._module()
        stack = module.__dict__.get(_APPLIED, [])
        if stack and stack[-1] is not self:
            raise EditError(f"{stack[-1]!r} was applied after {self!r} to the same weights; undo it first")
        module.weight.copy_(self._original)
        self._original = None
        if stack:
            stack.pop()

    def __enter__(self) -> Edit:
        return self.apply()

    def __exit__(self, *exc: Any) -> None:
        self.undo()

    def to_json(self) -> dict:
        return {
            "prompt": self.request.prompt,
            "template": self.request.template,
            "subject": self.request.subject,
            "target": self.request.target,
            "layer": self.layer,
            "trace": None
            if self.trace is None
            else {**self.trace._asdict(), "effect": self.trace.effect.tolist()},
            "delta_norm": float(self.value.delta.norm()),
            "delta_w_norm": float(self.update.left.norm() * self.update.right.norm()),
            "optimisation": self.value.history,
            "prefixes": self.prefixes,
            "config": None if self.config is None else asdict(self.config),
        }


def rome(
    model: HookedModel,
    prompt: str,
    subject: str,
    target: str,
    cfg: RomeConfig | None = None,
    *,
    corpus: Corpus | None = None,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> Edit:
    """Compute the ROME edit that makes ``prompt`` (about ``subject``) continue with ``target``.

    Args:
        prompt: a template with ``{}`` for the subject, or the full prompt containing ``subject``.
        subject: the words naming the subject (e.g. ``"The Eiffel Tower"``).
        target: the new object (e.g. ``" Rome"``); several tokens are fine.
        cfg: hyper-parameters, including the layer (None: located by the causal trace).
        corpus: text for the key covariance (default: the embedded corpus).
        cache_dir: where the covariance is cached (default ``$MECHSCOPE_CACHE/rome``).
        progress: ``progress(stage, done, total)`` for the trace, covariance and optimisation.

    Returns:
        An :class:`Edit`, not yet applied.

    Raises:
        EditError: subject not in the prompt, empty target, a model without MLPs, a bad layer.
    """
    cfg = cfg or RomeConfig()
    request = EditRequest.make(prompt, subject, target)
    target_ids(model, request.target)
    trace = None
    if cfg.layer is None:
        trace = locate_layer(
            model,
            request,
            window=cfg.trace_window,
            samples=cfg.trace_samples,
            seed=cfg.seed,
            progress=progress,
        )
    layer = trace.layer if trace is not None else cfg.layer
    check_layer(model, layer)
    if trace is not None and float(trace.effect.max()) < WEAK_TRACE * (trace.clean - trace.corrupted):
        # Then the argmax is noise (SmolLM2's Eiffel Tower: +0.007 of 0.68), and the layer arbitrary.
        log.warning(
            "the causal trace finds little MLP effect at the subject's last token (at most %+.3f of a "
            "total effect %.3f); layer %d is a weak choice: consider passing the layer",
            float(trace.effect.max()),
            trace.clean - trace.corrupted,
            layer,
        )
    C = key_covariance(
        model,
        layer,
        corpus=corpus,
        n_tokens=cfg.cov_tokens,
        context_length=cfg.cov_context_length,
        batch_size=cfg.cov_batch_size,
        seed=cfg.seed,
        cache_dir=cache_dir,
        progress=progress,
    )
    prefixes = context_prefixes(model, cfg.prefix_lengths, cfg.prefixes_per_length, seed=cfg.seed)
    value = compute_value(model, request, layer, prefixes, cfg, progress)
    W = in_out(model.module(mlp_out_path(model, layer))).detach().float().cpu()
    update = rank_one_update(W, C, value.key.cpu(), value.value.cpu())  # solved on the CPU in float64
    log.info("ROME edit at layer %d: |delta| %.3f", layer, float(value.delta.norm()))
    return Edit(model, request, layer, update, value, trace=trace, prefixes=prefixes, config=cfg)
