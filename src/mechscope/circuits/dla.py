"""Direct logit attribution: how much each component writes the answer straight into the logits.

The residual stream at the read position is a sum of component outputs (embeddings, each
attention and MLP output), and the logits are ``norm(resid) @ W_U + b_U``. Freeze the final norm's
scale at its value in the actual run (TransformerLens' ``apply_ln_to_stack``; LayerNorm also
centres, which is linear) and the logit difference ``(W_U[:, answer] - W_U[:, wrong]) . norm(resid)``
splits exactly into one term per component, plus the norm's and the unembedding's biases
(Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"; Wang et al. 2022 used
it to find IOI's name movers). Finer splits are exact too: an attention output is
``sum_h z_h @ W_O[h] + b_O``, and each head's ``z_h`` at the read position is ``sum_k A[q, k] v_h[k]``,
so a head's term splits over the key (source) positions it reads from; an MLP output is
``sum_n post_n W_out[n] + b_out``, one term per neuron.

What is frozen, and so what "direct" means here: only the path from a component straight to the
logits is measured; what the component does to later layers is not (that is patching's job).
Post-norm families (Gemma 2/3) normalise each sublayer's output before adding it: the same
freezing is applied to those norms, so head and neuron terms still sum to their layer's term.
Gemma 2 soft-caps the final logits (``c * tanh(logit / c)``), which is not linear: the terms sum to
the *pre-cap* logit difference (:attr:`DLA.logit_diff`); the model's capped one is
:attr:`DLA.output_logit_diff`. The HTML view is in :mod:`mechscope.viz.dla`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.models import HookedModel, TokenizationError
from mechscope.models.adapters.base import get_module, norm_eps

GRANULARITIES = ("layer", "head", "pos", "neuron")


@dataclass(frozen=True, eq=False)
class DLA:
    """Direct logit attributions of one or more prompts; per-prompt terms, means by ``by_*``.

    Every term is in logit units. For each prompt: ``layer_terms.sum(-1) + bias == logit_diff``;
    ``head_terms[:, L].sum(-1) + attn_bias[:, L]`` is layer ``L``'s attention term;
    ``pos_terms.sum(-1) == head_terms``; ``neuron_terms[:, L].sum(-1) + mlp_bias[:, L]`` is its MLP term.
    """

    labels: list[str]
    """Component names, as :meth:`ActivationCache.decompose_resid` gives them (``embed``, ``3_attn_out``...)."""
    layer_terms: Float[Tensor, "batch component"]
    head_terms: Float[Tensor, "batch n_layers n_heads"]
    """Each head's ``z_h @ W_O[h]`` term (always computed: they are cheap)."""
    pos_terms: Float[Tensor, "batch n_layers n_heads k_pos"] | None
    """Each head's term split by the key position it reads; absolute positions, zero past a prompt's end."""
    neuron_terms: Float[Tensor, "batch n_layers d_mlp"] | None
    attn_bias: Float[Tensor, "batch n_layers"]
    """The attention output bias ``b_O`` (and any post-norm bias): the part of an attention term no head owns."""
    mlp_bias: Float[Tensor, "batch n_layers"] | None
    bias: Float[Tensor, " batch"]
    """The final norm's bias and the unembedding bias: the part of the logit difference no component owns."""
    logit_diff: Float[Tensor, " batch"]
    """The model's logit difference before any soft-cap, from its real final norm: what the terms sum to."""
    output_logit_diff: Float[Tensor, " batch"]
    """The logit difference in the model's returned logits (after Gemma 2's soft-cap where it has one)."""
    scale: Float[Tensor, " batch"]
    """The frozen final-norm scale (``sqrt(var + eps)``, or the RMS) of each prompt's read position."""
    str_tokens: list[list[str]]
    """Each prompt's tokens (without padding)."""
    pos: list[int]
    """The read position of each prompt (non-negative)."""
    answers: list[str]
    wrongs: list[str] | None
    """The rival tokens; None when the direction is the answer's unembedding alone."""

    # ---------------------------------------------------------------- means over prompts
    @property
    def by_layer(self) -> Float[Tensor, " component"]:
        return self.layer_terms.mean(0)

    @property
    def by_head(self) -> Float[Tensor, "n_layers n_heads"]:
        return self.head_terms.mean(0)

    @property
    def by_pos(self) -> Float[Tensor, "n_layers n_heads k_pos"]:
        return self._need(self.pos_terms, "pos").mean(0)

    @property
    def by_neuron(self) -> Float[Tensor, "n_layers d_mlp"]:
        return self._need(self.neuron_terms, "neuron").mean(0)

    @staticmethod
    def _need(t: Tensor | None, by: str) -> Tensor:
        if t is None:
            raise ValueError(f"these attributions were computed without {by!r}; pass by=(..., {by!r})")
        return t

    @property
    def metric(self) -> str:
        """The attributed quantity in words."""
        a = _quote(self.answers)
        return f"logit({a})" if self.wrongs is None else f"logit({a}) − logit({_quote(self.wrongs)})"

    # ---------------------------------------------------------------- rankings
    def top(self, k: int = 10, by: str = "head") -> list[tuple[str, float]]:
        """The ``k`` components with the largest ``|mean attribution|``, labelled (``L17H3``, ``5_mlp_out``,
        ``L17H3@4`` for a head reading position 4, ``L17N123`` for a neuron), signed values."""
        if by not in GRANULARITIES:
            raise ValueError(f"by must be one of {GRANULARITIES}, got {by!r}")
        values = getattr(self, f"by_{by}")
        flat = values.flatten()
        order = flat.abs().argsort(descending=True)[:k].tolist()
        shape = values.shape
        return [
            (
                self._label(by, tuple(int(j) for j in torch.unravel_index(torch.tensor(i), shape))),
                float(flat[i]),
            )
            for i in order
        ]

    def _label(self, by: str, index: tuple[int, ...]) -> str:
        if by == "layer":
            return self.labels[index[0]]
        if by == "head":
            return f"L{index[0]}H{index[1]}"
        if by == "pos":
            return f"L{index[0]}H{index[1]}@{index[2]}"
        return f"L{index[0]}N{index[1]}"

    def top_heads(self, k: int = 5) -> list[tuple[int, int, float]]:
        """``(layer, head, value)`` of the ``k`` heads with the largest ``|mean attribution|``."""
        by_head = self.by_head
        order = by_head.flatten().abs().argsort(descending=True)[:k].tolist()
        return [(i // by_head.shape[1], i % by_head.shape[1], float(by_head.flatten()[i])) for i in order]

    def to_json(self) -> dict:
        """Plain numbers (means over prompts, plus the per-prompt totals)."""
        out = {
            "metric": self.metric,
            "answers": self.answers,
            "wrongs": self.wrongs,
            "pos": self.pos,
            "logit_diff": self.logit_diff.tolist(),
            "output_logit_diff": self.output_logit_diff.tolist(),
            "bias": self.bias.tolist(),
            "final_norm_scale": self.scale.tolist(),
            "by_layer": dict(zip(self.labels, self.by_layer.tolist(), strict=True)),
        }
        out["by_head"] = self.by_head.tolist()
        out["top_heads"] = [{"head": f"L{la}H{h}", "value": v} for la, h, v in self.top_heads(10)]
        if self.pos_terms is not None:
            out["by_pos"] = self.by_pos.tolist()
        if self.neuron_terms is not None:
            out["top_neurons"] = [{"neuron": n, "value": v} for n, v in self.top(20, "neuron")]
        return out

    def to_html(self, full_page: bool = True) -> str:
        """A bar chart of the layer terms (inline SVG) and a ``[layer head]`` heatmap; no scripts, no network."""
        from mechscope.viz.dla import render_dla_html

        return render_dla_html(self, full_page)

    def _repr_html_(self) -> str:
        return self.to_html(full_page=False)


@torch.no_grad()
def direct_logit_attribution(
    model: HookedModel,
    prompt: str | list[str],
    answer: str | list[str],
    wrong: str | list[str] | None = None,
    *,
    pos: int = -1,
    by: str | Collection[str] = ("layer", "head"),
) -> DLA:
    """Attribute the logit difference ``answer - wrong`` (or ``answer``'s logit) at ``pos`` to components.

    Args:
        model: the model.
        prompt: one prompt, or several (run as one right-padded batch; results per prompt and mean).
        answer: the answer token's text (one token, e.g. ``" Mary"``), or one per prompt.
        wrong: the rival token (or one per prompt); None attributes the answer's logit alone.
        pos: the read position in each prompt; negative counts from each prompt's own end.
        by: granularities to compute besides ``"layer"`` and ``"head"`` (always computed):
            ``"pos"`` (each head split by source position) and ``"neuron"`` (each MLP neuron).

    Returns:
        A :class:`DLA` whose terms sum to the model's (pre-soft-cap) logit difference.

    Raises:
        TokenizationError: an answer or rival is not exactly one token.
        ValueError: the numbers of prompts and answers differ; an unknown or impossible ``by``.
        IndexError: ``pos`` is outside a prompt.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    want = _check_by(model, by)
    answer_ids = _token_ids(model, answer, len(prompts), "answer")
    wrong_ids = None if wrong is None else _token_ids(model, wrong, len(prompts), "wrong")
    toks = model.prepare(prompts, None, None, "right")
    lengths = [toks.ids.shape[1]] * len(prompts) if toks.mask is None else toks.mask.sum(-1).tolist()
    str_tokens = [model.to_str_tokens(toks.ids[b, :n]) for b, n in enumerate(lengths)]
    read = _read_positions(pos, str_tokens)

    logits, cache = model.run_with_cache(toks.ids, _names(model, want), attention_mask=toks.mask)
    rows = torch.arange(len(prompts), device=toks.ids.device)
    idx = torch.tensor(read, device=toks.ids.device)

    def at(name: str) -> Tensor:
        return cache[name][rows, idx].float()  # [batch d_*] at each prompt's read position

    W_U, b_U = model.weights.W_U, model.weights.b_U  # columns picked before casting: vocabularies are big
    direction = W_U[:, answer_ids].T.float()  # [batch d_model]
    logit_bias = b_U[answer_ids].float()
    output = logits[rows, idx, answer_ids].float()
    if wrong_ids is not None:
        direction = direction - W_U[:, wrong_ids].T.float()
        logit_bias = logit_bias - b_U[wrong_ids].float()
        output = output - logits[rows, idx, wrong_ids].float()

    n = model.cfg.n_layers
    final_norm = model.module(model.adapter.final_norm)
    g, scale, norm_bias = _frozen_norm(model, final_norm, at(f"blocks.{n - 1}.hook_resid_post"), direction)
    labels, layer_terms = _layer_terms(model, cache, at, rows, idx, g)
    heads, positions, attn_bias = _head_terms(model, cache, at, rows, idx, g, "pos" in want)
    neurons = _neuron_terms(model, at, g) if "neuron" in want else None
    return DLA(
        labels=labels,
        layer_terms=layer_terms,
        head_terms=heads,
        pos_terms=positions,
        neuron_terms=neurons[0] if neurons else None,
        attn_bias=attn_bias,
        mlp_bias=neurons[1] if neurons else None,
        bias=norm_bias + logit_bias,
        logit_diff=(at("ln_final.hook_normalized") * direction).sum(-1) + logit_bias,
        output_logit_diff=output,
        scale=scale,
        str_tokens=str_tokens,
        pos=read,
        answers=_texts(answer, len(prompts)),
        wrongs=None if wrong is None else _texts(wrong, len(prompts)),
    )


# -------------------------------------------------------------------- checks


def _check_by(model: HookedModel, by: str | Collection[str]) -> set[str]:
    want = {by} if isinstance(by, str) else set(by)
    if unknown := want - set(GRANULARITIES):
        raise ValueError(f"by must be among {GRANULARITIES}, got {sorted(unknown)}")
    if "neuron" in want and not model.cfg.has_mlp:
        raise ValueError("by='neuron' needs MLPs, and this model is attention-only")
    return want | {"layer"}


def _texts(value: str | list[str], n: int) -> list[str]:
    return [value] * n if isinstance(value, str) else list(value)


def _token_ids(model: HookedModel, value: str | list[str], n: int, what: str) -> Tensor:
    texts = _texts(value, n)
    if len(texts) != n:
        raise ValueError(f"{len(texts)} {what} strings for {n} prompts; give one per prompt, or one string")
    try:
        ids = [model.to_single_token(t) for t in texts]
    except TokenizationError as e:
        raise TokenizationError(f"{what}: {e}") from None
    return torch.tensor(ids, device=model.device)


def _read_positions(pos: int, str_tokens: list[list[str]]) -> list[int]:
    read = []
    for toks in str_tokens:
        n = len(toks)
        if not -n <= pos < n:
            raise IndexError(f"pos {pos} is outside the prompt's {n} tokens {toks!r}; use -{n} .. {n - 1}")
        read.append(pos % n)
    return read


def _names(model: HookedModel, want: set[str]) -> list[str]:
    n = model.cfg.n_layers
    names = [p for p in ("hook_embed", "hook_pos_embed") if p in model.hook_names]
    names += [f"blocks.{n - 1}.hook_resid_post", "ln_final.hook_normalized"]
    kinds = ["attn_out", "mlp_out"] if model.cfg.has_mlp else ["attn_out"]
    names += [f"blocks.{i}.hook_{k}" for i in range(n) for k in kinds]
    names += [f"blocks.{i}.attn.hook_z" for i in range(n)]  # heads are cheap and own b_O's remainder
    if "pos" in want:
        names += [f"blocks.{i}.attn.hook_{k}" for i in range(n) for k in ("v", "pattern")]
    if "neuron" in want:
        names += [f"blocks.{i}.mlp.hook_post" for i in range(n)]
    return names


# -------------------------------------------------------------------- the maths


def _frozen_norm(
    model: HookedModel, norm: nn.Module, full: Tensor, direction: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Read ``direction`` (``[batch d_model]``) back through ``norm`` with its scale frozen at ``full``'s.

    Returns ``(g, scale, bias)``: ``x . g`` is ``x``'s share of ``norm(full) . direction`` for any part
    ``x`` of ``full`` (centring moves onto ``g``, being a symmetric projection), and
    ``bias = norm.bias . direction`` is the share no part owns.
    """
    layernorm = model.cfg.norm == "layernorm"
    x = full - full.mean(-1, keepdim=True) if layernorm else full
    scale = (x.pow(2).mean(-1) + norm_eps(norm)).sqrt()
    u = model.adapter.norm_weight(norm).float() * direction
    if layernorm:
        u = u - u.mean(-1, keepdim=True)
    b = getattr(norm, "bias", None)
    bias = torch.zeros_like(scale) if b is None else direction @ b.float()
    return u / scale[:, None], scale, bias


def _post_norm(model: HookedModel, layer: int, path: str) -> nn.Module:
    return get_module(model.layer(layer), path)


def _layer_terms(model, cache, at, rows, idx, g) -> tuple[list[str], Tensor]:
    labels, terms = ["embed"], [(at("hook_embed") * g).sum(-1)]
    if "hook_pos_embed" in model.hook_names:
        pe = cache["hook_pos_embed"]  # [1 pos d_model] in HF: one row for the whole batch
        labels.append("pos_embed")
        terms.append((pe.expand(len(rows), -1, -1)[rows, idx].float() * g).sum(-1))
    for i in range(model.cfg.n_layers):
        for kind in ("attn", "mlp") if model.cfg.has_mlp else ("attn",):
            labels.append(f"{i}_{kind}_out")
            terms.append((at(f"blocks.{i}.hook_{kind}_out") * g).sum(-1))
    return labels, torch.stack(terms, -1)


def _head_terms(model, cache, at, rows, idx, g, by_pos: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per head (from ``hook_z``), per head and source position (pattern x values), and ``b_O``'s share."""
    heads, positions, biases = [], [], []
    for i, w in enumerate(model.weights.blocks):
        z = at(f"blocks.{i}.attn.hook_z")  # [batch n_heads d_head]
        W_O, b_O = w.W_O.float(), w.b_O.float()
        g_i, bias = g, torch.zeros(len(rows), device=g.device)
        if model.cfg.post_norms:
            o = torch.einsum("bhd,hdm->bm", z, W_O) + b_O  # what the post-norm normalised
            g_i, _, bias = _frozen_norm(model, _post_norm(model, i, model.adapter.attn_out), o, g)
        u = torch.einsum("hdm,bm->bhd", W_O, g_i)  # each head's read-out direction in its own space
        heads.append((z * u).sum(-1))
        biases.append(b_O @ g_i.T + bias)
        if by_pos:
            A = cache[f"blocks.{i}.attn.hook_pattern"][rows, :, idx].float()  # [batch n_heads k_pos]
            v = cache[f"blocks.{i}.attn.hook_v"].float()  # [batch k_pos n_heads d_head]
            positions.append(A * torch.einsum("bkhd,bhd->bhk", v, u))
    stacked_pos = torch.stack(positions, 1) if positions else None
    return torch.stack(heads, 1), stacked_pos, torch.stack(biases, 1)


def _neuron_terms(model, at, g) -> tuple[Tensor, Tensor]:
    neurons, biases = [], []
    for i, w in enumerate(model.weights.blocks):
        post = at(f"blocks.{i}.mlp.hook_post")  # [batch d_mlp]
        W_out, b_out = w.W_out.float(), w.b_out.float()
        g_i, bias = g, torch.zeros(len(post), device=g.device)
        if model.cfg.post_norms:
            full = post @ W_out + b_out
            g_i, _, bias = _frozen_norm(model, _post_norm(model, i, model.adapter.mlp_out), full, g)
        neurons.append(post * (g_i @ W_out.T))
        biases.append(g_i @ b_out + bias)
    return torch.stack(neurons, 1), torch.stack(biases, 1)


def _quote(texts: list[str]) -> str:
    distinct = list(dict.fromkeys(texts))
    return repr(distinct[0]) if len(distinct) == 1 else "per-prompt answers"
