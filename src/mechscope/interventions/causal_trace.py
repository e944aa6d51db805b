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
budget; results equal one forward per variant (tested). :func:`average_indirect_effect` pools
traces of many prompts by ROME's token categories (first / middle / last subject token, first
subsequent token, further tokens, last token).
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
        raise ValueError(f"cannot map the tokens {tokens!r} back onto the prompt's characters")
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

    def run(variants: list[list[tuple[str, int]]]) -> Tensor:
        """Mean answer probability of each variant (a list of (hook name, position) restored)."""
        rows = len(variants) * samples

        def corrupt(x: Tensor, hook: HookPoint) -> Tensor:
            x = x.clone()
            x[:, subj] += draws.to(x.device, x.dtype).repeat(len(variants), 1, 1)
            return x

        where: dict[str, list[tuple[int, int]]] = {}
        for v, restores in enumerate(variants):
            for name, p in restores:
                where.setdefault(name, []).append((v, p))

        def restore(x: Tensor, hook: HookPoint) -> Tensor:
            x = x.clone()
            for v, p in where[hook.name]:
                x[v * samples : (v + 1) * samples, p] = clean[hook.name][0, p]
            return x

        with model.hooks({"hook_embed": corrupt, **{n: restore for n in where}}):
            out = model(ids.repeat(rows, 1), logits_to_keep=1)
        return out[:, -1].float().softmax(-1)[:, target].view(len(variants), samples).mean(1).cpu()

    corrupted_p = float(run([[]])[0])
    per_variant = _row_bytes(model, n_pos, False, 1) * samples
    if memory_budget < per_variant:
        raise ValueError(
            f"memory_budget {memory_budget} is below one variant ({per_variant} bytes); raise it"
        )
    chunk = max(1, memory_budget // per_variant)
    scores = {}
    for kind in kinds:
        hook = KINDS[kind]
        span = (
            (lambda layer: [layer])
            if kind == "state"
            else (lambda layer: window_layers(layer, window, n_layers))
        )
        variants = [
            [(f"blocks.{j}.{hook}", p) for j in span(layer)]
            for layer in range(n_layers)
            for p in range(n_pos)
        ]
        values = torch.cat([run(variants[i : i + chunk]) for i in range(0, len(variants), chunk)])
        scores[kind] = values.view(n_layers, n_pos)
    return CausalTrace(
        scores,
        clean_p,
        corrupted_p,
        model.to_str_tokens(prompt),
        subj,
        model.tokenizer.decode([target]),
        window,
    )


def average_indirect_effect(traces: Sequence[CausalTrace]) -> dict[str, Float[Tensor, "category layer"]]:
    """Mean indirect effect per ROME token category (:data:`CATEGORIES`) and layer, over prompts.

    A category a prompt lacks (e.g. middle tokens of a one-token subject) is averaged over the
    prompts that have it; NaN where none has.
    """
    if not traces:
        raise ValueError("give at least one trace")
    out = {}
    for kind in traces[0].scores:
        total = torch.zeros(len(CATEGORIES), traces[0].scores[kind].shape[0])
        count = torch.zeros(len(CATEGORIES), 1)
        for t in traces:
            ie, s, n = t.indirect_effect(kind), t.subject, len(t.str_tokens)
            groups = [
                [s[0]],
                s[1:-1],
                [s[-1]],
                [s[-1] + 1] if s[-1] + 1 < n - 1 else [],
                list(range(s[-1] + 2, n - 1)),
                [n - 1],
            ]
            for c, pos in enumerate(groups):
                if pos:
                    total[c] += ie[:, pos].mean(1)
                    count[c] += 1
        out[kind] = total / count
    return out
