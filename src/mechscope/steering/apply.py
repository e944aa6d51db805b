"""Adding steering vectors during a forward or a generation: which positions get them, and when.

A vector's positions are absolute token positions (see :class:`SteeringVector`). A hook function only
sees the activation, and during cached generation that is one token wide after the prompt, so it cannot
tell where it is. :class:`PositionTracker` answers that: a forward pre-hook on the HF model records the
``position_ids`` HF passes (``generate`` always passes them, computed from the attention mask, so
left-padded rows count from their first real token) and the attention mask, and the hook functions read
them. Consequences, step by step, for an ActAdd block of ``n`` rows at the front of the prompt:

* prompt pass: positions ``0 .. n-1`` of every row get the block (padding never does);
* each cached decode step: the new token is at position ``>= prompt length``, so nothing is added; the
  steered prompt still acts through the keys and values it left in the cache;
* uncached generation (``use_cache=False``) re-runs the whole sequence and adds at the same positions
  again, so it produces the same tokens as cached generation.

A ``[width]`` vector with ``positions=None`` is added at every position, the prompt and each new token.
Per-row coefficients (a ``[batch]`` tensor) put several steering strengths on the batch axis of one
forward, which is how :mod:`mechscope.steering.evaluate` sweeps coefficients and layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.models.hook_points import HookFn, HookPoint
from mechscope.steering.vectors import SteeringError, SteeringVector


class PositionTracker:
    """The position id and realness (not padding) of every token in the forward that is running.

    Use as a context manager on a model; :attr:`positions` and :attr:`real` are ``[batch pos]`` for the
    current forward. Nested trackers on the same model are fine (each records for itself).
    """

    def __init__(self, model) -> None:
        self.model = model
        self.positions: Tensor | None = None
        self.real: Tensor | None = None
        self._bounds: tuple[int, int] | None = None
        self._handle = None

    def _record(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        batch, width = ids.shape[0], ids.shape[1]
        pos = kwargs.get("position_ids")
        if pos is None:
            past = kwargs.get("past_key_values")
            offset = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
            pos = torch.arange(offset, offset + width, device=ids.device).expand(batch, width)
        mask = kwargs.get("attention_mask")
        real = None if mask is None or mask.ndim != 2 else mask[:, -width:].bool()
        self.positions, self.real, self._bounds = pos, real, None

    def bounds(self) -> tuple[int, int]:
        """``(min, max)`` position of the current forward (one host sync per forward, shared by all hooks)."""
        if self.positions is None:
            raise SteeringError("no forward is running under this PositionTracker")
        if self._bounds is None:
            self._bounds = (int(self.positions.min()), int(self.positions.max()))
        return self._bounds

    def __enter__(self) -> PositionTracker:
        self._handle = self.model.hf_model.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self.positions = self.real = self._bounds = None


def _where(vector: SteeringVector, tracker: PositionTracker | None, x: Tensor) -> Tensor | None:
    """``[batch pos]`` weights of the selected positions (for a block: its row index + 1, 0 = none)."""
    if tracker is None:
        raise SteeringError(
            f"the vector at {vector.hook_name!r} adds at chosen positions, which a hook alone cannot see "
            "during cached generation; apply it with `with mechscope.steering.steer(model, vector):`"
        )
    pos, (lo, hi) = tracker.positions, tracker.bounds()
    if pos.shape != x.shape[:2]:
        raise SteeringError(
            f"{vector.hook_name!r} has shape {tuple(x.shape)}, not [batch pos width] for the "
            f"{tuple(pos.shape)} tokens of this forward; steer a residual, attn_out or mlp point"
        )
    if vector.per_position:
        first, n = vector.start, vector.direction.shape[0]
        if hi < first or lo >= first + n:
            return None  # e.g. a cached decode step after an ActAdd prompt block
        sel = (pos >= first) & (pos < first + n)
    else:
        p = vector.positions
        if isinstance(p, slice):
            sel = (pos >= (p.start or 0)) & (pos < (p.stop if p.stop is not None else hi + 1))
        else:
            wanted = torch.as_tensor([p] if isinstance(p, int) else list(p), device=pos.device)
            sel = torch.isin(pos, wanted)
    if tracker.real is not None:
        sel = sel & tracker.real
    return sel


def hook_fn(
    vector: SteeringVector,
    tracker: PositionTracker | None = None,
    coeff: float | Float[Tensor, " batch"] | None = None,
) -> HookFn:
    """``fn(activation, hook)`` adding ``coeff * direction`` at the vector's positions.

    Args:
        vector: what to add.
        tracker: needed unless the vector is a ``[width]`` direction at every position.
        coeff: overrides ``vector.coeff``; a ``[batch]`` tensor gives each row its own coefficient.
    """
    c = vector.coeff if coeff is None else coeff
    per_row = isinstance(c, Tensor)
    everywhere = not vector.per_position and vector.positions is None
    cast: dict[tuple, tuple[Tensor, Tensor | float]] = {}  # direction/coeff moved once per device+dtype

    def fn(x: Tensor, hook: HookPoint) -> Tensor | None:
        if x.shape[-1] != vector.width:
            raise SteeringError(
                f"the steering direction is {vector.width} wide but {hook.name!r} is {x.shape[-1]} wide "
                f"(shape {tuple(x.shape)}); build the vector at this hook point"
            )
        key = (x.device, x.dtype)
        if key not in cast:
            d = vector.direction.to(device=x.device, dtype=x.dtype)
            cast[key] = (d, c.to(device=x.device, dtype=x.dtype).view(-1, 1, 1) if per_row else c)
        d, k = cast[key]
        if per_row and k.shape[0] != x.shape[0]:
            raise SteeringError(f"{k.shape[0]} per-row coefficients for a batch of {x.shape[0]}")
        if everywhere:
            return x + k * d
        sel = _where(vector, tracker, x)
        if sel is None:
            return None
        if vector.per_position:
            rows = (tracker.positions - vector.start).clamp(0, d.shape[0] - 1)
            add = d[rows]  # [batch pos width]
        else:
            add = d
        return x + k * add * sel.unsqueeze(-1).to(x.dtype)

    return fn


@contextmanager
def steer(model, *vectors: SteeringVector, coeffs: Sequence[float | Tensor] | None = None) -> Iterator[Any]:
    """Every forward and generation inside the block runs with ``vectors`` added.

    Args:
        vectors: the steering vectors (any number, any hook points).
        coeffs: one override per vector (a float, or a ``[batch]`` tensor of per-row coefficients).

    Example:
        >>> v = actadd(model, "Love", "Hate", 6, coeff=5)
        >>> with steer(model, v):
        ...     model.generate("I hate you because", max_new_tokens=20)
    """
    if coeffs is not None and len(coeffs) != len(vectors):
        raise SteeringError(f"{len(coeffs)} coefficients for {len(vectors)} vectors; give one per vector")
    with PositionTracker(model) as tracker:
        spec = [
            (v.hook_name, hook_fn(v, tracker, None if coeffs is None else coeffs[i]))
            for i, v in enumerate(vectors)
        ]
        with model.hooks(spec):
            yield model


class SteeredGeneration(NamedTuple):
    """Steered and unsteered continuations of the same prompt(s)."""

    prompt: str | list[str]
    steered: str | list[str] | Tensor
    """Prompt plus continuation with the vectors added (token ids with ``return_tokens=True``)."""
    unsteered: str | list[str] | Tensor
    """The same generation (same seed) without them."""
    settings: Mapping[str, Any]
    """The generation arguments used."""


def generate(
    model,
    prompt: str | list[str],
    vectors: SteeringVector | Sequence[SteeringVector],
    *,
    compare: bool = True,
    seed: int | None = 0,
    **generate_kwargs: Any,
) -> SteeredGeneration:
    """Generate with the vectors added, and (``compare=True``) without them, from the same seed.

    ``generate_kwargs`` go to :func:`mechscope.models.generate.generate` (``max_new_tokens``,
    ``do_sample``, ``temperature``, ``top_p``, ...).
    """
    from mechscope.models.generate import generate as plain_generate

    vecs = [vectors] if isinstance(vectors, SteeringVector) else list(vectors)
    with steer(model, *vecs):
        steered = plain_generate(model, prompt, seed=seed, **generate_kwargs)
    plain = plain_generate(model, prompt, seed=seed, **generate_kwargs) if compare else ""
    return SteeredGeneration(prompt, steered, plain, {"seed": seed, **generate_kwargs})
