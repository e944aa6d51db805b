"""Steering vectors: a direction, the hook point it is added at, where in the sequence, and how strongly.

Three ways to find one, all returning a :class:`SteeringVector`:

* :func:`actadd` — Activation Addition (Turner et al. 2023, "Activation Addition: Steering Language
  Models Without Optimization", arXiv:2308.10248): run a prompt pair such as ``"Love"`` and
  ``"Hate"``, take the difference of their activations at one hook point, *position by position*,
  and add ``coeff`` times that ``[pos d_model]`` block to the first positions of another prompt.
  The two prompts must give the same number of tokens; as in the paper's code
  (``pad_method="tokens_right"`` with a space), the shorter one is padded on the right with a pad
  token (``pad=" "``), and ``pad=None`` makes a length mismatch an error instead.
* :func:`mean_difference` — contrastive activation addition (CAA; Rimsky et al. 2024,
  arXiv:2312.06681): the mean activation over many positive prompts minus the mean over as many
  negative ones, read at each prompt's last token (or averaged over its tokens). One ``[d_model]``
  direction, added at every position by default. Averaging over many pairs cancels what the pairs do
  not share, which a single ActAdd pair cannot.
* :func:`sae_direction` — an SAE latent's decoder row (in the model's units), from :mod:`mechscope.saes`.

:func:`random_like` gives the control the seed asks for ("we will always find *some* vector"): a
random direction with the same per-position norms, to show what adding *any* vector that large does.
Vectors are applied with :mod:`mechscope.steering.apply`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.models.errors import MechscopeError

Positions = int | Sequence[int] | slice | None


class SteeringError(MechscopeError, ValueError):
    """A steering vector that cannot be built or applied as asked (prompt pair, pair lists, positions)."""


@dataclass(frozen=True, kw_only=True)
class SteeringVector:
    """A direction added to one hook point's activation, ``coeff`` times, at chosen token positions.

    Positions are *absolute token positions* of each sequence (0 = its first real token, BOS included
    when the model prepends one), whatever the padding and whether a KV cache is in use, so a vector
    acts identically in a plain forward, in cached generation and in uncached generation.
    """

    hook_name: str
    """The hook point, e.g. ``"blocks.6.hook_resid_pre"`` (any point whose activation is ``[batch pos width]``)."""
    direction: Float[Tensor, "*pos width"]
    """``[width]``: one direction, added at every selected position. ``[pos width]`` (ActAdd): row
    ``i`` is added at position ``positions + i``."""
    positions: Positions = None
    """For a ``[width]`` direction: None for every position (the prompt and each generated token), or an
    int, list of ints or slice (``slice(5, None)``: position 5 on). For a ``[pos width]`` direction: the
    int position of its first row (None: 0, the front of the prompt as in ActAdd)."""
    coeff: float = 1.0
    """The multiplier (ActAdd's "injection coefficient")."""
    source: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    """How the vector was made (method, prompts, layer), for reports; not used when applying it."""

    def __post_init__(self) -> None:
        d = self.direction
        if not isinstance(d, Tensor) or d.ndim not in (1, 2) or d.numel() == 0:
            shape = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise SteeringError(f"direction must be a non-empty [width] or [pos width] tensor, got {shape}")
        if d.ndim == 2 and not (self.positions is None or isinstance(self.positions, int)):
            raise SteeringError(
                f"a [pos width] direction (ActAdd) takes positions=None or the int position of its first "
                f"row, got {self.positions!r}"
            )
        if isinstance(self.positions, slice) and self.positions.step not in (None, 1):
            raise SteeringError(f"positions slices must have step 1, got {self.positions!r}")
        p = self.positions
        bounds = [p.start, p.stop] if isinstance(p, slice) else [p] if isinstance(p, int) else list(p or [])
        if any(b is not None and b < 0 for b in bounds):
            # A hook sees absolute positions (and one new token per cached decode step), so "from the
            # end" has no fixed meaning: a negative index would silently match nothing or everything.
            raise SteeringError(
                f"positions are absolute token positions (0 = the first token), got {p!r}; negative "
                "indices are not supported: count from the front, e.g. len(model.to_str_tokens(prompt)) - 1 "
                "for a prompt's last token"
            )
        if not self.hook_name:
            raise SteeringError("hook_name is empty; name the hook point, e.g. 'blocks.6.hook_resid_pre'")

    @property
    def width(self) -> int:
        return self.direction.shape[-1]

    @property
    def per_position(self) -> bool:
        """True for an ActAdd-style ``[pos width]`` block."""
        return self.direction.ndim == 2

    @property
    def start(self) -> int:
        """First position of a ``[pos width]`` block."""
        return self.positions if isinstance(self.positions, int) else 0

    def norm(self) -> float:
        """Frobenius norm of ``coeff * direction`` (what is added, summed over its positions)."""
        return float(self.coeff * self.direction.float().norm())

    def with_coeff(self, coeff: float) -> SteeringVector:
        return dataclasses.replace(self, coeff=float(coeff))


def _layer_hook(model, at: int | str) -> str:
    """An int layer means its ``hook_resid_pre`` (the point ActAdd and CAA use); a string is a hook name."""
    name = f"blocks.{at}.hook_resid_pre" if isinstance(at, int) else at
    model.hook_point(name)  # an unknown name raises with the closest valid ones
    return name


def _stop_layer(model, name: str) -> int | None:
    """Stop the forward after the block that computes ``name`` (nothing later is needed)."""
    from mechscope.models.hook_names import parse

    layer, _ = parse(name)  # raw HF paths and model-level points give None: run the whole model
    return None if layer is None or layer + 1 >= model.cfg.n_layers else layer + 1


def _pad_pair(model, pos_ids: list[int], neg_ids: list[int], pad: str | None) -> tuple[list[int], list[int]]:
    if len(pos_ids) == len(neg_ids):
        return pos_ids, neg_ids
    if pad is None:
        raise SteeringError(
            f"the ActAdd prompts have different token lengths ({len(pos_ids)} vs {len(neg_ids)}: "
            f"{model.to_str_tokens(torch.tensor(pos_ids))} vs {model.to_str_tokens(torch.tensor(neg_ids))}); "
            "pass pad=' ' (CLI: --pad ' ') to pad the shorter on the right as the ActAdd paper does, or "
            "reword one prompt"
        )
    pad_id = model.to_single_token(pad)
    n = max(len(pos_ids), len(neg_ids))
    return pos_ids + [pad_id] * (n - len(pos_ids)), neg_ids + [pad_id] * (n - len(neg_ids))


def actadd(
    model,
    pos: str,
    neg: str,
    at: int | str,
    *,
    coeff: float = 1.0,
    pad: str | None = " ",
    start: int = 0,
) -> SteeringVector:
    """The ActAdd vector ``act(pos) - act(neg)`` at hook point ``at``, one row per token position.

    Args:
        model: a :class:`~mechscope.models.hooked.HookedModel`.
        pos, neg: the prompt pair (``"Love"``, ``"Hate"``), tokenized with the model's BOS policy.
        at: a layer (its ``hook_resid_pre``) or a hook name.
        coeff: the injection coefficient stored with the vector.
        pad: alignment rule for pairs of different token lengths: the shorter prompt is padded on the
            right with this single-token string (the paper pads with a space); None raises instead.
        start: the position where the block's first row is added (0: the front of the prompt).

    Raises:
        SteeringError: different token lengths and ``pad=None``.
        TokenizationError: ``pad`` is not a single token.
    """
    name = _layer_hook(model, at)
    bos = model.prepend_bos
    from mechscope.models.tokens import encode

    p, n = _pad_pair(
        model,
        encode(model.tokenizer, pos, prepend_bos=bos),
        encode(model.tokenizer, neg, prepend_bos=bos),
        pad,
    )
    if not p:
        raise SteeringError("the ActAdd prompts are empty; pass non-empty text")
    ids = torch.tensor([p, n], device=model.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, [name], stop_at_layer=_stop_layer(model, name))
    act = cache[name]
    if act.ndim != 3:
        raise SteeringError(f"{name!r} has shape {tuple(act.shape)}; steer a [batch pos width] point")
    return SteeringVector(
        hook_name=name,
        direction=(act[0] - act[1]).float(),
        positions=start,
        coeff=coeff,
        source={"method": "actadd", "pos": pos, "neg": neg, "pad": pad},
    )


def _read(
    model, prompts: Sequence[str], name: str, read: str, batch_size: int
) -> Float[Tensor, "batch width"]:
    """Each prompt's activation at ``name``: its last real token, or the mean over its real tokens."""
    out = []
    stop = _stop_layer(model, name)
    for i in range(0, len(prompts), batch_size):
        toks = model.tokenize(list(prompts[i : i + batch_size]))  # right-padded: positions stay put
        mask = torch.ones_like(toks.ids) if toks.mask is None else toks.mask
        with torch.no_grad():
            _, cache = model.run_with_cache(toks.ids, [name], stop_at_layer=stop, attention_mask=toks.mask)
        act = cache[name].float()
        if read == "last":
            out.append(act[torch.arange(act.shape[0]), mask.sum(1) - 1])
        else:
            m = mask.unsqueeze(-1).to(act.dtype)
            out.append((act * m).sum(1) / m.sum(1))
    return torch.cat(out)


def mean_difference(
    model,
    pos: Sequence[str],
    neg: Sequence[str],
    at: int | str,
    *,
    read: Literal["last", "mean"] = "last",
    coeff: float = 1.0,
    positions: Positions = None,
    batch_size: int = 32,
) -> SteeringVector:
    """Contrastive activation addition: ``mean(act(pos_i)) - mean(act(neg_i))`` over paired prompts.

    Args:
        pos, neg: equally many prompts with and without the behaviour (pair ``i`` differs in it).
        at: a layer (its ``hook_resid_pre``) or a hook name.
        read: ``"last"`` reads each prompt's last token (CAA's answer token); ``"mean"`` averages its tokens.
        positions: where the ``[width]`` direction is added (None: every position).

    Raises:
        SteeringError: the lists differ in length or are empty.
    """
    if isinstance(pos, str) or isinstance(neg, str):
        raise SteeringError("mean_difference takes lists of prompts; for one pair use actadd")
    if len(pos) != len(neg):
        raise SteeringError(
            f"{len(pos)} positive prompts but {len(neg)} negative ones; contrastive pairs need equal "
            "counts (pair i of each list differs only in the behaviour)"
        )
    if not pos:
        raise SteeringError("no prompt pairs given; pass at least one positive and one negative prompt")
    if read not in ("last", "mean"):
        raise SteeringError(f"read must be 'last' or 'mean', got {read!r}")
    name = _layer_hook(model, at)
    diff = _read(model, pos, name, read, batch_size).mean(0) - _read(model, neg, name, read, batch_size).mean(
        0
    )
    return SteeringVector(
        hook_name=name,
        direction=diff,
        positions=positions,
        coeff=coeff,
        source={"method": "mean_difference", "n_pairs": len(pos), "read": read},
    )


def sae_direction(sae, latent: int, *, coeff: float = 1.0, positions: Positions = None) -> SteeringVector:
    """The decoder row of SAE latent ``latent``, in the model's units, at the point the SAE writes.

    ``decode`` maps one unit of the latent to ``W_dec[latent] / output_scale`` (plus the bias), so that is
    the direction one unit of the feature adds; ``coeff`` is then in units of the latent's activation.
    """
    d_sae = sae.W_dec.shape[0]
    if not 0 <= latent < d_sae:
        raise SteeringError(f"latent {latent} is out of range; this SAE has {d_sae} latents (0..{d_sae - 1})")
    cfg = sae.cfg
    name = cfg.out_hook_name or cfg.hook_name
    if not name:
        raise SteeringError("the SAE has no hook_name; set cfg.hook_name to the point it was trained on")
    with torch.no_grad():
        direction = (sae.W_dec[latent] / sae.output_scale).float().detach().clone()
    return SteeringVector(
        hook_name=name,
        direction=direction,
        positions=positions,
        coeff=coeff,
        source={"method": "sae", "latent": latent},
    )


def random_like(vector: SteeringVector, *, seed: int = 0) -> SteeringVector:
    """A random direction with the same norm at every position (rows of zero norm stay zero)."""
    g = torch.Generator().manual_seed(seed)
    d = vector.direction.float().cpu()
    r = torch.randn(d.shape, generator=g)
    r = r / r.norm(dim=-1, keepdim=True) * d.norm(dim=-1, keepdim=True)
    return dataclasses.replace(
        vector,
        direction=r.to(vector.direction.device),
        source={
            **vector.source,
            "random_seed": seed,
            "method": f"random ({vector.source.get('method', '?')})",
        },
    )
