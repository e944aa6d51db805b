"""The sparse autoencoder: one config, one base module, and the initialisation helpers.

An SAE maps an activation ``x`` (``d_in`` wide) to ``d_sae`` sparse latents and back::

    x_n   = x * input_scale                                   # input normalisation (stored)
    pre   = (x_n - b_dec [if apply_b_dec_to_input]) @ W_enc + b_enc
    acts  = activation(pre)                                   # per kind: ReLU, TopK, BatchTopK, JumpReLU
    recon = (acts @ W_dec + b_dec) / output_scale             # back in the model's units

A *transcoder* reads one hook point and reconstructs another (``out_hook_name``, ``d_out``); it has
its own ``output_scale`` and never subtracts ``b_dec`` (an output-space bias) from its input.

Design: everything that differs between kinds (the activation, the sparsity or auxiliary loss, the
constraints) lives in one short file per kind under :mod:`mechscope.saes.arch`; this module holds
what they share. Losses are computed in the normalised space (so coefficients do not depend on the
model's activation scale) and returned *unweighted* in :attr:`SAEOutput.losses`; a trainer sums them
with :meth:`SAE.loss_weights`, scaling the kind's sparsity term during warm-up. Input normalisation
follows Anthropic's April 2024 update (SAELens ``expected_average_only_in``): one constant so that
``E ||x_n||^2 = d_in``, estimated by :func:`init_normalisation` and stored with the weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from mechscope.models.errors import MechscopeError

NORMALISATIONS = ("none", "expected_average_only_in")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class IncompatibleSAEError(MechscopeError, ValueError):
    """An SAE that does not fit a model: missing hook point or a width mismatch."""


class SAEFormatError(MechscopeError, ValueError):
    """An SAE file that is missing, corrupt, or in a form mechscope cannot represent."""


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """Everything that defines an SAE apart from its weights. Kind-specific fields left None take the kind's
    default; setting one that another kind owns is an error."""

    d_in: int
    """Width of the activation read (heads flattened for ``attn.hook_z``)."""
    d_sae: int
    """Number of latents."""
    kind: str = "topk"
    """Architecture: a key of ``mechscope.saes.arch.KINDS`` (relu, topk, batchtopk, jumprelu)."""
    hook_name: str = ""
    """Hook point read, e.g. ``blocks.3.hook_resid_post``; empty for an SAE not tied to a model."""
    out_hook_name: str | None = None
    """Transcoders only: the hook point reconstructed. None: an SAE, which reconstructs ``hook_name``."""
    d_out: int | None = None
    """Width reconstructed; None means ``d_in``. Differs from ``d_in`` only for transcoders."""
    model_name: str = ""
    """The model the SAE was trained on (provenance; not checked)."""
    k: int | None = None
    """topk, batchtopk: active latents per token (batchtopk: on average over the batch). Default 32."""
    k_aux: int | None = None
    """topk, batchtopk: dead latents used by AuxK. Default ``d_out // 2`` (the heuristic sparsify and SAELens
    take from Gao et al. 2024)."""
    aux_coefficient: float | None = None
    """topk, batchtopk: weight of the AuxK loss. Default 1/32 (Gao et al. 2024)."""
    threshold_momentum: float | None = None
    """batchtopk: EMA rate of the inference threshold (mean minimum selected activation). Default 0.01."""
    l1_coefficient: float | None = None
    """relu: weight of the L1 penalty. Default 5 (Anthropic, April 2024 update, with inputs normalised)."""
    l1_scale_by_decoder_norm: bool | None = None
    """relu: penalise ``sum_i f_i ||W_dec_i||`` (April 2024 update; decoder norms free) instead of
    ``sum_i f_i`` with unit-norm decoder rows (Towards Monosemanticity). Default True."""
    l0_coefficient: float | None = None
    """jumprelu: weight of the L0 penalty (Rajamanoharan et al. 2024). Default 1."""
    jumprelu_bandwidth: float | None = None
    """jumprelu: width epsilon of the rectangle kernel in the threshold's pseudo-derivative. Default 0.05
    (SAELens' default for inputs normalised to ``E||x||^2 = d_in``)."""
    jumprelu_init_threshold: float | None = None
    """jumprelu: initial threshold of every latent. Default 0.01 (SAELens)."""
    apply_b_dec_to_input: bool | None = None
    """Subtract ``b_dec`` from the (normalised) input before encoding (Gao et al.'s ``b_pre``). Default: True
    for SAEs, False (and required) for transcoders."""
    normalisation: str = "expected_average_only_in"
    """``expected_average_only_in``: one stored constant scales inputs so ``E||x||^2 = d_in`` (set by
    :func:`init_normalisation`); ``none``: the scale stays 1."""
    decoder_init_norm: float = 0.1
    """Initial norm of decoder rows where they are not constrained to 1 (Anthropic, April 2024 update)."""
    dtype: str = "float32"
    """Parameter dtype: float32, float64, bfloat16 or float16."""
    seed: int = 0
    """Seed of the weight initialisation."""

    def __post_init__(self) -> None:
        from mechscope.saes.arch import sae_class

        cls = sae_class(self.kind)
        if self.d_in < 1 or self.d_sae < 1 or (self.d_out is not None and self.d_out < 1):
            raise ValueError(
                f"d_in, d_sae and d_out must be positive, got {self.d_in}, {self.d_sae}, {self.d_out}"
            )
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.out_hook_name is not None and not self.hook_name:
            raise ValueError("a transcoder (out_hook_name set) also needs hook_name, the point it reads")
        if self.out_hook_name == self.hook_name and self.hook_name:
            raise ValueError("out_hook_name equals hook_name; leave it None for an SAE")
        if not self.is_transcoder and self.d_out not in (None, self.d_in):
            raise ValueError(
                f"d_out={self.d_out} differs from d_in={self.d_in}: only transcoders (out_hook_name) may"
            )
        if self.is_transcoder and self.apply_b_dec_to_input:
            raise ValueError(
                "apply_b_dec_to_input must be False for a transcoder: b_dec lives in the output space"
            )
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("d_out", self.d_out or self.d_in)
        if self.apply_b_dec_to_input is None:
            set_("apply_b_dec_to_input", not self.is_transcoder)
        self._resolve_kind_fields(cls)
        cls.check_config(self)

    def _resolve_kind_fields(self, cls: type[SAE]) -> None:
        """Fill the kind's own fields left None with its defaults; refuse fields another kind owns."""
        from mechscope.saes.arch import KINDS

        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        owned = {f for c in KINDS.values() for f in c.DEFAULTS}
        for name in sorted(owned):
            value = getattr(self, name)
            if name in cls.DEFAULTS and value is None:
                default = cls.DEFAULTS[name]
                set_(name, default(self) if callable(default) else default)
            elif name not in cls.DEFAULTS and value is not None:
                kinds = [k for k, c in KINDS.items() if name in c.DEFAULTS]
                raise ValueError(
                    f"{name} applies to kind {' / '.join(kinds)} only, not {self.kind!r}; leave it None"
                )

    @property
    def is_transcoder(self) -> bool:
        return self.out_hook_name is not None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """A config from :meth:`to_dict`'s output; unknown keys are an error (a newer or foreign file)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown SAE config field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**data)


class SAEOutput(NamedTuple):
    """What :meth:`SAE.forward` returns."""

    recon: Tensor
    """The reconstruction ``[... d_out]`` in the model's units (normalisation undone)."""
    acts: Tensor
    """Latent activations ``[... d_sae]``; a sparse COO tensor in TopK's training steps (see
    :func:`mechscope.saes.arch.sparse.active_latents`)."""
    pre_acts: Tensor
    """Pre-activations ``[... d_sae]`` (encoder output before the kind's nonlinearity)."""
    losses: dict[str, Tensor]
    """Unweighted scalar losses: ``mse`` (squared error summed over ``d_out``, mean over tokens, in the
    normalised space) plus the kind's terms (``l1``, ``l0`` or ``aux``); weights: :meth:`SAE.loss_weights`."""


class SAE(nn.Module):
    """Base of every SAE kind; build one with :func:`mechscope.saes.arch.make_sae` (``cfg.kind`` picks it).

    A training step is: ``out = sae(x, dead_mask=dead)``; ``sae.total_loss(out.losses, sparsity_scale=w)``
    ``.backward()``; ``sae.project_decoder_grad_()``; ``optimizer.step()``; ``sae.apply_constraints_()``.
    """

    KIND: ClassVar[str]
    """The registry key (the file name under ``saes/arch/``)."""
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    """Defaults of the config fields this kind owns (a callable gets the config)."""
    COEFFICIENTS: ClassVar[dict[str, str]] = {}
    """Loss name -> config field holding its weight."""
    SPARSITY_LOSS: ClassVar[str | None] = None
    """The loss whose weight a trainer warms up (``sparsity_scale``), if any."""

    def __init__(self, cfg: SAEConfig, *, init: bool = True):
        super().__init__()
        if cfg.kind != self.KIND:
            raise ValueError(
                f"{type(self).__name__} is kind {self.KIND!r} but cfg.kind is {cfg.kind!r}; use make_sae"
            )
        self.cfg = cfg
        dt = cfg.torch_dtype
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_out, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=dt))
        self.register_buffer("input_scale", torch.ones((), dtype=dt))
        self.register_buffer("output_scale", torch.ones((), dtype=dt))
        if init:
            self._init_weights()

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Kind-specific value checks (raise ``ValueError`` naming the field)."""

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether training keeps decoder rows at unit norm (the method's sparsity penalty needs it)."""
        return True

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        c = self.cfg
        where = f"{c.hook_name} -> {c.out_hook_name}" if c.is_transcoder else c.hook_name or "no hook"
        return f"{c.kind}, d_in={c.d_in}, d_sae={c.d_sae}, d_out={c.d_out}, {where}"

    @torch.no_grad()
    def _init_weights(self) -> None:
        # Random directions; the encoder starts as the decoder's transpose, which Gao et al. 2024 found
        # keeps latents from dying (also the Anthropic April 2024 update's initialisation).
        gen = torch.Generator().manual_seed(self.cfg.seed)
        w = torch.randn(self.cfg.d_sae, self.cfg.d_out, generator=gen, dtype=torch.float64)
        norm = 1.0 if self.unit_norm_decoder else self.cfg.decoder_init_norm
        w = w / w.norm(dim=-1, keepdim=True) * norm
        self.W_dec.copy_(w)
        if self.cfg.is_transcoder:  # no shared space: an independent encoder of the same scale
            w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=gen, dtype=torch.float64)
            w = w / w.norm(dim=-1, keepdim=True) * norm
        self.W_enc.copy_(w.T)

    # ------------------------------------------------------------------ maths
    def pre_acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """The encoder's affine map of the normalised input."""
        x = x.to(self.dtype) * self.input_scale
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """The kind's nonlinearity."""
        raise NotImplementedError

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Latent activations of ``x``."""
        return self.activation(self.pre_acts(x))

    def decode(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        """The reconstruction from latents, in the model's units."""
        return (acts @ self.W_dec + self.b_dec) / self.output_scale

    def forward(
        self,
        x: Float[Tensor, "... d_in"],
        target: Float[Tensor, "... d_out"] | None = None,
        *,
        dead_mask: Bool[Tensor, " d_sae"] | None = None,
    ) -> SAEOutput:
        """Reconstruct ``target`` (default ``x``; required for transcoders) with every loss term.

        ``dead_mask`` marks latents the trainer counts as dead; kinds with an auxiliary dead-latent
        loss (AuxK) use it, the others ignore it.
        """
        if target is None:
            if self.cfg.is_transcoder:
                raise ValueError("a transcoder reconstructs another hook point: pass target=")
            target = x
        pre = self.pre_acts(x)
        acts = self.activation(pre)
        recon_n = acts @ self.W_dec + self.b_dec
        target_n = target.to(self.dtype) * self.output_scale
        losses = {"mse": (recon_n - target_n).pow(2).sum(-1).mean()}
        losses |= self.aux_losses(pre, acts, recon_n, target_n, dead_mask)
        return SAEOutput(recon_n / self.output_scale, acts, pre, losses)

    def aux_losses(
        self, pre: Tensor, acts: Tensor, recon_n: Tensor, target_n: Tensor, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        """The kind's unweighted loss terms besides ``mse`` (normalised space)."""
        return {}

    def loss_weights(self, sparsity_scale: float = 1.0) -> dict[str, float]:
        """The weight of each entry of :attr:`SAEOutput.losses`; the sparsity term is multiplied by
        ``sparsity_scale`` (a trainer's warm-up factor in [0, 1])."""
        weights = {"mse": 1.0}
        for name, field in self.COEFFICIENTS.items():
            w = float(getattr(self.cfg, field))
            weights[name] = w * sparsity_scale if name == self.SPARSITY_LOSS else w
        return weights

    def total_loss(self, losses: dict[str, Tensor], sparsity_scale: float = 1.0) -> Tensor:
        """``sum_name weight * loss``: the scalar to back-propagate."""
        weights = self.loss_weights(sparsity_scale)
        if set(weights) != set(losses):
            raise ValueError(f"losses {sorted(losses)} do not match this SAE's terms {sorted(weights)}")
        return sum((weights[n] * v for n, v in losses.items()), start=torch.zeros((), device=self.device))

    # ------------------------------------------------------------------ constraints
    def decoder_norms(self) -> Float[Tensor, " d_sae"]:
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def normalise_decoder_(self) -> None:
        """Scale every decoder row to unit norm (projects onto the constraint; changes the function)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove the component of ``W_dec.grad`` along each decoder row, so a gradient step leaves the
        row norms unchanged to first order. A no-op where decoder norms are free."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad.sub_((self.W_dec.grad * unit).sum(-1, keepdim=True) * unit)

    @torch.no_grad()
    def apply_constraints_(self) -> None:
        """Restore what an optimiser step may break (after ``optimizer.step()``): unit decoder rows where
        the method needs them; kinds add their own (e.g. non-negative JumpReLU thresholds)."""
        if self.unit_norm_decoder:
            self.normalise_decoder_()

    @torch.no_grad()
    def fold_decoder_norm_(self) -> None:
        """Rescale so decoder rows have unit norm *without* changing encode/decode's composition: latent i
        is multiplied by ``||W_dec_i||``. Kinds whose activation is not positively homogeneous refuse."""
        n = self.decoder_norms().clamp_min(1e-12)
        self.W_dec.div_(n[:, None])
        self.W_enc.mul_(n)
        self.b_enc.mul_(n)

    def hook_names(self) -> list[str]:
        """The hook points this SAE reads and writes (see :func:`mechscope.saes.splice.check_fits`)."""
        c = self.cfg
        return [c.hook_name] + ([c.out_hook_name] if c.out_hook_name else [])


@contextmanager
def eval_mode(*saes: SAE) -> Iterator[None]:
    """Run in eval mode (a BatchTopK uses its threshold, never selects across the batch), then give
    each SAE back in the mode it had: evaluating or splicing mid-training must not end the training."""
    modes = [s.training for s in saes]
    try:
        for s in saes:
            s.eval()
        yield
    finally:
        for s, training in zip(saes, modes, strict=True):
            s.train(training)


def geometric_median(
    points: Float[Tensor, "n d"], *, max_iter: int = 500, tol: float = 1e-9
) -> Float[Tensor, " d"]:
    """The point minimising the summed Euclidean distance to ``points`` (Weiszfeld's algorithm, in float64).

    Iterates ``y <- sum_i w_i p_i / sum_i w_i`` with ``w_i = 1 / ||p_i - y||`` from the mean; a distance
    is floored at 1e-12 relative to the data's scale so an iterate landing on a data point stays finite
    (there it is already optimal or moves off). Stops when a step moves less than ``tol`` times that scale.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty [n d] matrix, got shape {tuple(points.shape)}")
    p = points.detach().to(torch.float64)
    y = p.mean(0)
    scale = float((p - y).norm(dim=-1).mean()) or 1.0
    for _ in range(max_iter):
        w = 1.0 / (p - y).norm(dim=-1).clamp_min(1e-12 * scale)
        y_next = (w[:, None] * p).sum(0) / w.sum()
        step = float((y_next - y).norm())
        y = y_next
        if step <= tol * scale:
            break
    return y.to(points.dtype)


@torch.no_grad()
def init_normalisation(
    sae: SAE, sample: Float[Tensor, "n d_in"], target_sample: Float[Tensor, "n d_out"] | None = None
) -> None:
    """Set the stored scales so normalised inputs (and a transcoder's targets) have ``E||x||^2 = d``.

    An SAE's output scale equals its input scale. A no-op for ``normalisation="none"``.
    """
    if sae.cfg.normalisation == "none":
        return

    def scale(x: Tensor, d: int) -> float:
        ms = float(x.detach().to(torch.float64).pow(2).sum(-1).mean())
        if not ms > 0:
            raise ValueError("the sample has zero (or non-finite) mean squared norm; cannot normalise")
        return math.sqrt(d / ms)

    s_in = scale(sample, sae.cfg.d_in)
    if sae.cfg.is_transcoder:
        if target_sample is None:
            raise ValueError(
                "a transcoder needs target_sample (activations of out_hook_name) to set its output scale"
            )
        s_out = scale(target_sample, sae.cfg.d_out)
    else:
        s_out = s_in
    sae.input_scale.fill_(s_in)
    sae.output_scale.fill_(s_out)


@torch.no_grad()
def init_b_dec(
    sae: SAE,
    sample: Float[Tensor, "n d_out"],
    method: Literal["geometric_median", "mean"] = "geometric_median",
) -> None:
    """Set ``b_dec`` to the geometric median (Towards Monosemanticity; Gao et al. 2024) or mean of ``sample``.

    ``sample`` holds the activations the SAE reconstructs (a transcoder's *targets*), in the model's units;
    call :func:`init_normalisation` first, since ``b_dec`` lives in the normalised space.
    """
    if sample.ndim != 2 or sample.shape[1] != sae.cfg.d_out:
        raise ValueError(f"sample must be [n {sae.cfg.d_out}] (d_out), got shape {tuple(sample.shape)}")
    x = sample.detach().to(device=sae.device, dtype=torch.float64) * sae.output_scale.double()
    methods: dict[str, Callable[[Tensor], Tensor]] = {
        "geometric_median": geometric_median,
        "mean": lambda t: t.mean(0),
    }
    if method not in methods:
        raise ValueError(f"method must be one of {sorted(methods)}, got {method!r}")
    sae.b_dec.copy_(methods[method](x))
