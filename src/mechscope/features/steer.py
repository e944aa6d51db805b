"""Steering with features: add an SAE latent's (or neuron's) decoder direction, or clamp its activation.

Two modes, applied at every token position (the prompt and each generated token):

* ``add``: ``x + strength * d_i`` at the point the feature writes, where ``d_i`` is its decoder
  direction in the model's units (``W_dec[i] / output_scale`` for an SAE, ``W_out[i]`` for a
  neuron). ``strength`` is in units of the feature's activation; ``0`` adds exactly nothing, so the
  output is bit-for-bit the plain one.
* ``clamp``: the feature's activation is set to ``strength`` (Anthropic's "clamping"): the model's
  activation becomes ``x + (strength - a_i(x)) * d_i``, where ``a_i(x)`` is what the feature reads
  at its own hook point. For an SAE this equals splicing it with its error term and setting
  latent ``i`` to ``strength`` (the SAE's reconstruction error is kept, so only feature ``i``
  changes); ``clamp`` at ``0`` is zero-ablation, and a no-op wherever the feature does not fire.

The features come from a :class:`~mechscope.features.sources.FeatureSource` (an SAE or
``Neurons(layer)``), the same object a feature database was built from, so a feature id means the
same thing in the database, the web app and here::

    with steer_features(model, sae, [FeatureSteer(123, 8.0)]):
        model.generate("I think that", max_new_tokens=20)
    out = generate_steered(model, sae, "I think that", [FeatureSteer(123, 8.0, "clamp")])
    out.steered, out.unsteered
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.features.sources import FeatureSource, Neurons, feature_source
from mechscope.features.tables import UnknownFeatureError
from mechscope.models.errors import MechscopeError
from mechscope.models.hook_points import HookPoint
from mechscope.models.hooked import HookedModel
from mechscope.saes.sae import SAE

MODES = ("add", "clamp")


class FeatureSteerError(MechscopeError, ValueError):
    """A feature steer that cannot be applied: unknown mode, non-finite strength, nothing to steer."""


@dataclass(frozen=True)
class FeatureSteer:
    """One feature to steer: its id, the strength, and ``"add"`` or ``"clamp"`` (module docstring)."""

    feature: int
    strength: float
    mode: str = "add"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FeatureSteerError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.strength, int | float) or not math.isfinite(self.strength):
            raise FeatureSteerError(f"strength must be a finite number, got {self.strength!r}")


class FeatureSteering(NamedTuple):
    """Steered and plain greedy continuations of one prompt."""

    prompt: str
    steered: str
    unsteered: str
    steers: tuple[FeatureSteer, ...]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(*x.shape[:2], -1)  # attn.hook_z: [batch pos head d_head] -> [batch pos (head d_head)]


def _check(source: FeatureSource, steers: Sequence[FeatureSteer]) -> list[FeatureSteer]:
    steers = list(steers)
    if not steers:
        raise FeatureSteerError("nothing to steer: give at least one FeatureSteer(feature, strength)")
    for s in steers:
        if isinstance(s.feature, bool) or not 0 <= int(s.feature) < source.n_features:
            raise UnknownFeatureError(
                f"feature {s.feature} does not exist: the source has {source.n_features} features "
                f"(0..{source.n_features - 1})"
            )
    return steers


@contextmanager
def steer_features(
    model: HookedModel, source: SAE | Neurons | FeatureSource, steers: Sequence[FeatureSteer]
) -> Iterator[HookedModel]:
    """Every forward and generation inside the block runs with ``steers`` applied (module docstring).

    Clamps read every feature's activation from the unsteered activation at the read point (all
    clamps see the same ``x``), then one hook at the write point adds the sum of every steer's change.

    Raises:
        UnknownFeatureError: a feature id outside the source.
        FeatureSteerError: no steers.
    """
    src = feature_source(model, source)
    steers = _check(src, steers)
    decoder = src.decoder()  # [n_features d_dec], float32 on the CPU
    ids = torch.tensor([int(s.feature) for s in steers])
    directions = decoder[ids]  # [n_steers d_dec]
    strength = torch.tensor([float(s.strength) for s in steers])
    clamp = torch.tensor([s.mode == "clamp" for s in steers])
    state: dict[str, Tensor] = {}
    cast: dict[tuple, tuple[Tensor, Tensor]] = {}

    def read(x: Tensor, hook: HookPoint) -> None:
        flat = _flat(x)
        acts = src.encode(flat.reshape(-1, flat.shape[-1]))[:, ids[clamp].to(flat.device)]
        state["acts"] = acts.reshape(*flat.shape[:2], -1)  # [batch pos n_clamps]

    def write(x: Tensor, hook: HookPoint) -> Tensor:
        key = (x.device, x.dtype)
        if key not in cast:
            cast[key] = (directions.to(x.device, x.dtype), strength.to(x.device, x.dtype))
        d, s = cast[key]
        flat = _flat(x)
        if d.shape[-1] != flat.shape[-1]:
            raise FeatureSteerError(
                f"the decoder directions are {d.shape[-1]} wide but {hook.name!r} is {flat.shape[-1]}"
            )
        coeff = s.expand(*flat.shape[:2], -1).clone()  # [batch pos n_steers]
        if clamp.any():
            coeff[..., clamp.to(x.device)] -= state.pop("acts").to(x.dtype)
        return (flat + coeff @ d).reshape(x.shape)

    hooks: list[tuple[str, Any]] = [(src.hook, read)] if clamp.any() else []
    hooks.append((src.write_hook, write))
    with model.hooks(hooks):
        yield model


@torch.no_grad()
def steered_logits(
    model: HookedModel,
    source: SAE | Neurons | FeatureSource,
    prompt: str,
    steers: Sequence[FeatureSteer],
) -> Float[Tensor, "1 pos d_vocab"]:
    """The logits of one forward on ``prompt`` with ``steers`` applied."""
    with steer_features(model, source, steers):
        return model(prompt)


def generate_steered(
    model: HookedModel,
    source: SAE | Neurons | FeatureSource,
    prompt: str,
    steers: Sequence[FeatureSteer],
    *,
    max_new_tokens: int = 20,
    compare: bool = True,
) -> FeatureSteering:
    """Greedy continuations of ``prompt`` with ``steers`` applied and (``compare``) without them."""
    from mechscope.models.generate import generate

    src = feature_source(model, source)
    with steer_features(model, src, steers):
        steered = generate(model, prompt, max_new_tokens=max_new_tokens)
    plain = generate(model, prompt, max_new_tokens=max_new_tokens) if compare else ""
    return FeatureSteering(prompt, steered, plain, tuple(steers))
