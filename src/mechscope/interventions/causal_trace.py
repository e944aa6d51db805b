"""ROME's causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1).

Corrupt the subject: add Gaussian noise to the token embeddings (``hook_embed``) of the subject's
tokens, ``samples`` fixed draws of it, so the model loses the fact. Then restore one clean activation
at one (layer, position) and see how much of the answer's probability comes back — the *indirect
effect* of that state. Three kinds, as in the paper's Figure 1:

* ``state``: the hidden state after layer L (``hook_resid_post``), one layer;
* ``mlp`` / ``attn``: the MLP / attention output (``hook_mlp_out`` / ``hook_attn_out``) of the
  ``window`` layers around L — ROME's convention, layers ``max(0, L - w//2) .. min(n, L - (-w//2)) - 1``
  (for w = 10: L-5 .. L+4), because one sublayer alone hardly matters in a large model.

The noise is ``k`` times a standard deviation of embeddings (ROME: 3 x the std over its subjects'
embeddings; :func:`noise_scale` computes it over texts you give, by default over the prompt itself).
Variants share forwards on the batch axis (``variants x samples`` rows), chunked to a memory
budget. A variant equals the corrupted run below its lowest restored layer, so its forward starts
there from the corrupted run's cached residual stream; positions before the subject are not run at
all (the corrupted run equals the clean one there). Results equal one full forward per variant
(tested). :func:`average_indirect_effect` pools
traces of many prompts by ROME's token categories (first / middle / last subject token, first
subsequent token, further tokens, last token) the way ROME's ``average_causal_effects`` notebook
does: :func:`category_positions`, :func:`category_samples`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.interventions.patching import _row_bytes
from mechscope.models import HookedModel
from mechscope.models.hook_points import HookPoint

KINDS = {"state": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
CATEGORIES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """ROME's window around ``layer``: ``max(0, L - w//2) .. min(n, L - (-w//2)) - 1``."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


@torch.no_grad()
def noise_scale(model: HookedModel, texts: str | Sequence[str], k: float = 3.0) -> float:
    """``k`` x the standard deviation of the token embeddings (``hook_embed``) over ``texts``' tokens."""
    toks = model.prepare([texts] if isinstance(texts, str) else list(texts), None, None, "right")
    _, cache = model.run_with_cache(toks.ids, ["hook_embed"], stop_at_layer=0, attention_mask=toks.mask)
    real = torch.ones_like(toks.ids, dtype=torch.bool) if toks.mask is None else toks.mask.bool()
    return k * float(cache["hook_embed"][real].float().std())


@dataclass(frozen=True)
class CausalTrace:
    """One prompt's trace: the answer's probability with each (layer, position) restored, per kind."""

    scores: dict[str, Float[Tensor, "layer pos"]]
    """Probability of the answer with that state restored (mean over noise samples)."""
    clean: float
    corrupted: float
    str_tokens: list[str]
    subject: list[int]
    """Token positions of the subject."""
    answer: str
    window: int

    def indirect_effect(self, kind: str) -> Float[Tensor, "layer pos"]:
        """Restored minus corrupted probability."""
        return self.scores[kind] - self.corrupted

    def to_json(self) -> dict:
        return {
            "answer": self.answer,
            "clean": self.clean,
            "corrupted": self.corrupted,
            "tokens": self.str_tokens,
            "subject_positions": self.subject,
            "window": self.window,
            **{kind: s.tolist() for kind, s in self.scores.items()},
        }

    def to_html(self, full_page: bool = True) -> str:
        """The paper's heatmaps side by side: rows = tokens (subject marked ``*``), columns = layers."""
        from mechscope.viz.heatmap import render_heatmap_html

        rows = [f"{t}*" if i in self.subject else t for i, t in enumerate(self.str_tokens)]
        label = {
            "state": "hidden state",
            "mlp": f"MLP (window {self.window})",
            "attn": f"attention (window {self.window})",
        }
        parts = [
            render_heatmap_html(
                s.T,
                rows,
                [str(i) for i in range(s.shape[0])],
                f"p({self.answer!r}) restoring the {label[kind]} (clean {self.clean:.3f}, corrupted {self.corrupted:.3f})",
                full_page=False,
            )
            for kind, s in self.scores.items()
        ]
        body = "<div style='display:flex;flex-wrap:wrap;gap:24px'>" + "".join(parts) + "</div>"
        if not full_page:
            return body
        return f"<!doctype html><html><head><meta charset='utf-8'><title>causal trace</title></head><body>{body}</body></html>"

    def _repr_html_(self) -> str:
        return self.to_html(full_page=False)


def subject_positions(model: HookedModel, prompt: str, subject: str) -> list[int]:
    """Token positions whose text overlaps the first occurrence of ``subject`` in ``prompt``."""
    start = prompt.find(subject)
    if not subject or start < 0:
        raise ValueError(f"subject {subject!r} is not in the prompt {prompt!r}; give a substring of it")
    tokens = model.to_str_tokens(prompt)
    joined = "".join(tokens)
    if not joined.endswith(prompt):
        # Tokens that split a character (byte tokens of non-ASCII text) do not decode one by one:
        # find the subject's tokens by tokenising the prompt up to its ends, as ROME does.
        from mechscope.probes.rome_request import subject_tokens

        first, last = subject_tokens(model, prompt, start, start + len(subject))
        return list(range(first, last + 1))
    offset, pos, out = len(joined) - len(prompt), 0, []
    for i, t in enumerate(tokens):
        lo, hi = pos - offset, pos - offset + len(t)
        if hi > start and lo < start + len(subject) and hi > lo:
            out.append(i)
        pos += len(t)
    return out


@torch.no_grad()
def causal_trace(
    model: HookedModel,
    prompt: str,
    subject: str,
    answer: str | None = None,
    *,
    kinds: Sequence[str] = ("state", "mlp", "attn"),
    window: int = 10,
    samples: int = 10,
    noise: float | None = None,
    seed: int = 0,
    memory_budget: int = 2 << 30,
) -> CausalTrace:
    """Trace where the fact about ``subject`` lives: restore each (layer, position) after corrupting it.

    Args:
        prompt, subject: the factual prompt and the substring naming its subject.
        answer: the expected next token (default: the model's top clean prediction).
        kinds: any of ``state``, ``mlp``, ``attn``.
        window: layers restored together for ``mlp``/``attn`` (``state`` restores one).
        samples: noise draws, shared by every restoring variant; probabilities are averaged.
        noise: standard deviation of the noise (default: :func:`noise_scale` of the prompt, k = 3).
        seed: seeds the noise.

    Raises:
        ValueError: subject not in the prompt, an unknown kind, an MLP kind on a model without MLPs.
        TokenizationError: ``answer`` is not a single token.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be some of {tuple(KINDS)}, got {tuple(kinds)}")
    if "mlp" in kinds and not model.cfg.has_mlp:
        raise ValueError("this model has no MLPs: use kinds=('state', 'attn')")
    if window < 1 or samples < 1:
        raise ValueError(f"window and samples must be >= 1, got {window} and {samples}")
    subj = subject_positions(model, prompt, subject)
    ids = model.to_tokens(prompt)
    n_layers, n_pos = model.cfg.n_layers, ids.shape[1]
    names = [f"blocks.{layer}.{KINDS[k]}" for k in kinds for layer in range(n_layers)]
    logits, clean = model.run_with_cache(ids, names)
    target = int(logits[0, -1].argmax()) if answer is None else model.to_single_token(answer)
    clean_p = float(logits[0, -1].float().softmax(-1)[target])
    sd = noise_scale(model, prompt) if noise is None else noise
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, len(subj), model.cfg.d_model, generator=g) * sd

    def corrupt(x: Tensor, hook: HookPoint) -> Tensor:
        x = x.clone()
        x[:, subj] += draws.to(x.device, x.dtype)
        return x

    # The corrupted run once, its residual stream kept: a variant equals it below its lowest
    # restored layer, so that variant's forward starts there (HookedModel.start_at).
    starts = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
    with model.hooks({"hook_embed": corrupt}):
        logits_c, corrupted = model.run_with_cache(ids.repeat(samples, 1), starts)
    corrupted_p = float(logits_c[:, -1].float().softmax(-1)[:, target].mean())

    def run(start: int, variants: list[list[tuple[str, int]]]) -> Tensor:
        """Mean answer probability of each variant (a list of (hook name, position) restored)."""
        where: dict[str, list[tuple[int, int]]] = {}
        for v, restores in enumerate(variants):
            for name, p in restores:
                where.setdefault(name, []).append((v, p))

        def restore(x: Tensor, hook: HookPoint) -> Tensor:
            x = x.clone()
            for v, p in where[hook.name]:
                x[v * samples : (v + 1) * samples, p] = clean[hook.name][0, p]
            return x

        resid = corrupted[starts[start]].repeat(len(variants), 1, 1)
        with model.start_at(start, resid), model.hooks({n: restore for n in where}):
            out = model(ids.repeat(len(variants) * samples, 1), logits_to_keep=1)
        return out[:, -1].float().softmax(-1)[:, target].view(len(variants), samples).mean(1).cpu()

    per_variant = _row_bytes(model, n_pos, False, 1) * samples
    if memory_budget < per_variant:
        raise ValueError(
            f"memory_budget {memory_budget} is below one variant ({per_variant} bytes); raise it"
        )
    chunk = max(1, memory_budget // per_variant)
    scores = {}
    for kind in kinds:
        spans = [
            range(i, i + 1) if kind == "state" else window_layers(i, window, n_layers)
            for i in range(n_layers)
        ]
        # Before the subject the corrupted run equals the clean one (the noise is at the subject and
        # attention is causal), so restoring there changes nothing: those cells need no forward.
        grid = torch.full((n_layers, n_pos), corrupted_p)
        by_start: dict[int, list[tuple[int, int]]] = {}
        for layer, span in enumerate(spans):
            by_start.setdefault(span[0], []).extend((layer, p) for p in range(subj[0], n_pos))
        for start, cells in by_start.items():
            for i in range(0, len(cells), chunk):
                part = cells[i : i + chunk]
                values = run(
                    start, [[(f"blocks.{j}.{KINDS[kind]}", p) for j in spans[layer]] for layer, p in part]
                )
                for (layer, p), value in zip(part, values.tolist(), strict=True):
                    grid[layer, p] = value
        scores[kind] = grid
    return CausalTrace(
        scores,
        clean_p,
        corrupted_p,
        model.to_str_tokens(prompt),
        subj,
        model.tokenizer.decode([target]),
        window,
    )


def category_positions(subject: Sequence[int], n_tokens: int) -> list[list[int]]:
    """The token positions of each ROME token category (:data:`CATEGORIES`) in one prompt.

    As ROME's ``notebooks/average_causal_effects.ipynb`` reads a trace: first subject token, the
    subject tokens between first and last, last subject token, the token right after the subject
    (the *first subsequent token*, even when it is also the last token), the tokens between it and
    the last token (*further tokens*), and the last token. A one-token subject is both first and
    last subject token. Empty lists where a prompt has none (no middle tokens in a subject of one or
    two tokens; no subsequent token when the subject ends the prompt).
    """
    s, n = list(subject), n_tokens
    after = [s[-1] + 1] if s[-1] + 1 < n else []
    return [[s[0]], s[1:-1], [s[-1]], after, list(range(s[-1] + 2, n - 1)), [n - 1]]


def category_samples(traces: Sequence[CausalTrace], kind: str) -> list[Float[Tensor, "n layer"]]:
    """Per ROME token category, one row per (prompt, position) in it: that position's indirect effect.

    The rows pool over prompts *and* positions, as ROME's ``Avg.add_all`` does: a prompt with five
    middle subject tokens adds five rows to that category. Each row is relative to its own prompt's
    corrupted probability. A category no prompt has gets a ``0 x layer`` tensor.
    """
    if not traces:
        raise ValueError("give at least one trace")
    rows: list[list[Tensor]] = [[] for _ in CATEGORIES]
    for t in traces:
        ie = t.indirect_effect(kind)
        for c, pos in enumerate(category_positions(t.subject, len(t.str_tokens))):
            rows[c].extend(ie[:, p] for p in pos)
    n_layers = traces[0].scores[kind].shape[0]
    return [torch.stack(r) if r else torch.empty(0, n_layers) for r in rows]


def average_indirect_effect(traces: Sequence[CausalTrace]) -> dict[str, Float[Tensor, "category layer"]]:
    """Mean indirect effect per ROME token category (:data:`CATEGORIES`) and layer, over prompts —
    ROME's Figure 2, which averages the traces of 1,000 known facts this way.

    Each category is the mean of its rows in :func:`category_samples` (tokens pooled over prompts);
    NaN where no prompt has the category.
    """
    if not traces:
        raise ValueError("give at least one trace")
    return {
        kind: torch.stack([r.mean(0) for r in category_samples(traces, kind)]) for kind in traces[0].scores
    }
