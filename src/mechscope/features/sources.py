"""What a feature is: an SAE latent, or an MLP neuron (Neuroscope), behind one small interface.

A :class:`FeatureSource` names the hook point its features read (``hook``), turns that hook's
per-token activations into feature activations (``encode``), and gives each feature's *output
direction*: the vector it adds where it writes (``decoder``) and that vector carried into the
residual stream (``residual_directions``), which is what logit effects and neighbours are made of.

* SAE latent ``i``: activation ``sae.encode(x)[i]``; decoder direction ``W_dec[i]`` (in the
  SAE's output space, i.e. the hook it reconstructs).
* Neuron ``i`` of layer ``L``: activation ``blocks.L.mlp.hook_post[i]`` (after the nonlinearity,
  and after the gate of gated MLPs); decoder direction the ``i``-th row of ``W_out``.

**Into the residual stream.** A direction written at ``hook_resid_*``, ``hook_attn_out``,
``hook_mlp_out`` or ``hook_embed`` already lives there. One written at ``mlp.hook_post`` (a neuron,
or an SAE / transcoder on the neurons) goes through ``W_out``, and one at ``attn.hook_z`` through
``W_O`` (heads flattened). Where the family has post-sublayer norms (Gemma 2/3), the sublayer's
output then passes through that norm, which is taken as its elementwise weight only (the linear
approximation used for the final norm, see :mod:`mechscope.features.effects`). Other hook points
(queries, keys, ``mlp.hook_pre``) write nothing to the residual stream directly: their
``residual_directions`` is None, and the database has no logit effects for them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.models.adapters.base import get_module
from mechscope.models.hook_names import parse
from mechscope.models.hooked import HookedModel
from mechscope.saes.sae import SAE
from mechscope.saes.splice import check_fits


@dataclass(frozen=True)
class Neurons:
    """The MLP neurons of one layer as features (Neuroscope): ``build_features(model, Neurons(3), ...)``."""

    layer: int

    @property
    def hook(self) -> str:
        return f"blocks.{self.layer}.mlp.hook_post"


def sae_sha256(sae: SAE) -> str:
    """SHA-256 of an SAE's config and every weight's bytes: a DB is tied to exactly these weights."""
    h = hashlib.sha256(json.dumps(sae.cfg.to_dict(), sort_keys=True).encode())
    for name, t in sorted(sae.state_dict().items()):
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


class FeatureSource:
    """Features read at one hook point. Build with :func:`feature_source`."""

    kind: str
    """``"sae"`` or ``"neurons"``."""
    hook: str
    """The hook point whose activations are encoded."""
    n_features: int

    def encode(self, acts: Float[Tensor, "rows d_in"]) -> Float[Tensor, "rows n_features"]:
        raise NotImplementedError

    def decoder(self) -> Float[Tensor, "n_features d_dec"]:
        """Each feature's output direction where it writes (float32, on the CPU)."""
        raise NotImplementedError

    @property
    def write_hook(self) -> str:
        """The hook point the decoder directions are added at."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """JSON that identifies the features exactly (stored in ``meta.json``, compared on open)."""
        raise NotImplementedError

    def residual_directions(self, model: HookedModel) -> Float[Tensor, "n_features d_model"] | None:
        """The decoder directions carried into the residual stream (see the module docstring), or None."""
        return to_residual(model, self.write_hook, self.decoder())


class SAESource(FeatureSource):
    kind = "sae"

    def __init__(self, model: HookedModel, sae: SAE):
        check_fits(sae, model)  # hook exists, widths match: refuse before any forward
        self.sae = sae.to(model.device).eval()
        self.hook = sae.cfg.hook_name
        self.n_features = sae.cfg.d_sae
        self._sha = sae_sha256(sae)

    @torch.no_grad()
    def encode(self, acts: Float[Tensor, "rows d_in"]) -> Float[Tensor, "rows n_features"]:
        return self.sae.encode(acts.to(self.sae.device)).float()

    @torch.no_grad()
    def decoder(self) -> Float[Tensor, "n_features d_dec"]:
        # W_dec rows live in the normalised space; decode() divides by output_scale, a positive
        # constant, so directions (and cosines, and logit rankings) are those of W_dec itself.
        return (self.sae.W_dec / self.sae.output_scale).detach().float().cpu()

    @property
    def write_hook(self) -> str:
        return self.sae.cfg.out_hook_name or self.sae.cfg.hook_name

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "sae",
            "hook": self.hook,
            "n_features": self.n_features,
            "sae_kind": self.sae.cfg.kind,
            "sae_config": self.sae.cfg.to_dict(),
            "sae_sha256": self._sha,
        }


class NeuronSource(FeatureSource):
    kind = "neurons"

    def __init__(self, model: HookedModel, neurons: Neurons):
        if not model.cfg.has_mlp:
            raise ValueError(f"{model.name or 'this model'} has no MLPs, so no neurons: use an SAE")
        if not 0 <= neurons.layer < model.cfg.n_layers:
            raise ValueError(
                f"neuron layer {neurons.layer} is out of range: the model has layers 0..{model.cfg.n_layers - 1}"
            )
        self.model = model
        self.layer = neurons.layer
        self.hook = neurons.hook
        self.n_features = model.cfg.d_mlp
        self._W_out: Tensor | None = None

    def encode(self, acts: Float[Tensor, "rows d_in"]) -> Float[Tensor, "rows n_features"]:
        return acts.float()

    @torch.no_grad()
    def decoder(self) -> Float[Tensor, "n_features d_dec"]:
        if self._W_out is None:  # model.weights builds every layer's views: once is enough
            self._W_out = self.model.weights.blocks[self.layer].W_out.detach().float().cpu()
        return self._W_out

    @property
    def write_hook(self) -> str:
        return f"blocks.{self.layer}.hook_mlp_out"  # W_out rows already live in the MLP's output space

    def residual_directions(self, model: HookedModel) -> Float[Tensor, "n_features d_model"] | None:
        a = model.adapter
        return self.decoder() * _post_norm(model, self.layer, a.mlp_out, a.mlp)

    def identity(self) -> dict[str, Any]:
        return {"kind": "neurons", "hook": self.hook, "n_features": self.n_features, "layer": self.layer}


def feature_source(model: HookedModel, source: SAE | Neurons | FeatureSource) -> FeatureSource:
    """Wrap an SAE or :class:`Neurons` (a :class:`FeatureSource` is passed through)."""
    if isinstance(source, FeatureSource):
        return source
    if isinstance(source, SAE):
        return SAESource(model, source)
    if isinstance(source, Neurons):
        return NeuronSource(model, source)
    raise TypeError(f"source must be an SAE or Neurons(layer), got {type(source).__name__}")


@torch.no_grad()
def to_residual(
    model: HookedModel, hook: str, directions: Float[Tensor, "n d_dec"]
) -> Float[Tensor, "n d_model"] | None:
    """``directions`` written at ``hook``, as residual-stream vectors (None where ``hook`` writes none)."""
    a = model.adapter
    if hook not in model.hook_names:
        return None  # a raw HF module path: where it writes is unknown
    layer, name = parse(hook)
    d = directions.float().cpu()
    if name in (
        "hook_embed",
        "hook_resid_pre",
        "hook_resid_mid",
        "hook_resid_post",
        "hook_attn_out",
        "hook_mlp_out",
    ):
        return d
    if name == "mlp.hook_post":
        out = d @ model.weights.blocks[layer].W_out.detach().float().cpu()
        return out * _post_norm(model, layer, a.mlp_out, a.mlp)
    if name == "attn.hook_z":
        W_O = model.weights.blocks[layer].W_O.detach().float().cpu().flatten(0, 1)  # [(head d_head) d_model]
        return (d @ W_O) * _post_norm(model, layer, a.attn_out, a.attn)
    return None


def _post_norm(model: HookedModel, layer: int, norm_path: str, sublayer_path: str | None) -> Tensor | float:
    """The elementwise weight of a post-sublayer norm (adapters name it where the family has one), else 1."""
    if norm_path == sublayer_path:
        return 1.0
    module = get_module(model.layer(layer), norm_path)
    return model.adapter.norm_weight(module).detach().float().cpu()
