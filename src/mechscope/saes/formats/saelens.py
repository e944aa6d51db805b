"""The SAELens format: a directory with ``cfg.json`` and ``sae_weights.safetensors``; import and export.

Read from SAELens' own code (``saes/sae.py``, ``saes/*_sae.py``, ``saes/transcoder.py`` and
``loading/pretrained_sae_loaders.py`` of sae-lens 6.x, whose ``handle_pre_6_0_config`` documents
the 4.x/5.x layout):

* weights ``W_enc [d_in d_sae]``, ``W_dec [d_sae d_out]``, ``b_enc [d_sae]``, ``b_dec [d_out]``, plus
  ``threshold [d_sae]`` for JumpReLU (older checkpoints: ``log_threshold``), ``topk_threshold`` (a
  scalar) for a BatchTopK training checkpoint, and in 4.x/5.x an optional per-latent
  ``scaling_factor`` multiplying the latents before the decoder (folded into ``W_dec`` here);
* 6.x ``cfg.json``: ``architecture``, ``d_in``, ``d_sae``, ``dtype``, ``apply_b_dec_to_input``,
  ``normalize_activations``, ``reshape_activations``, ``k`` and ``rescale_acts_by_decoder_norm``
  (topk), ``d_out`` (transcoders) and a ``metadata`` dict with ``hook_name``, ``hook_name_out``,
  ``model_name``, ``sae_lens_version``; 4.x/5.x put ``hook_name`` (or 3.x ``hook_point``) at the top
  level and mark TopK with ``activation_fn_str: "topk"`` and ``activation_fn_kwargs: {"k": ..}``.

SAELens' encoders compute ``(x - b_dec) @ W_enc + b_enc`` when ``apply_b_dec_to_input``; TopK keeps
the k largest then ReLU; JumpReLU is ``ReLU(pre) * (pre > threshold)``: all as mechscope's kinds.
``rescale_acts_by_decoder_norm`` (TopK) is folded into the weights on import, as SAELens does when
saving. ``normalize_activations="expected_average_only_in"`` means the SAE expects inputs multiplied
by a constant that SAELens keeps outside the SAE (a release's ``norm_scaling_factor``): pass it as
``norm_scaling_factor``. Export folds mechscope's stored normalisation into the weights and writes
6.x files; a BatchTopK SAE is written as JumpReLU with its global threshold, as SAELens does.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from packaging.version import InvalidVersion, Version
from safetensors import SafetensorError
from safetensors.torch import load_file

from mechscope.saes.arch import make_sae
from mechscope.saes.formats.native import load_state, write_json_atomic, write_safetensors_atomic
from mechscope.saes.sae import DTYPES, SAE, SAEConfig, SAEFormatError
from mechscope.saes.splice import check_fits

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
# SAELens architecture -> (mechscope kind, is a transcoder)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "standard": ("relu", False),
    "topk": ("topk", False),
    "batchtopk": ("batchtopk", False),
    "jumprelu": ("jumprelu", False),
    "transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", True),
}
EXPORT_VERSION = "6.0.0"  # the cfg layout written; SAELens reads files without it as pre-6.0


def _before_6(version: Any) -> bool:
    try:
        return not version or Version(str(version)) < Version("6.0.0rc0")
    except InvalidVersion:
        return True


def flat_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A SAELens ``cfg.json`` of any version as one flat dict with 6.x field names."""
    meta = raw.get("metadata") or {}
    version = raw.get("sae_lens_version") or meta.get("sae_lens_version")
    cfg = {**meta, **{k: v for k, v in raw.items() if k != "metadata"}}
    if _before_6(version):
        for old, new in (("hook_point", "hook_name"), ("hook_point_head_index", "hook_head_index")):
            if old in cfg and new not in cfg:
                cfg[new] = cfg.pop(old)
        fn = cfg.get("activation_fn_str", cfg.get("activation_fn"))
        cfg.setdefault("architecture", "topk" if fn == "topk" else "standard")
        cfg.setdefault("apply_b_dec_to_input", True)
        if isinstance(cfg.get("normalize_activations"), bool):
            cfg["normalize_activations"] = (
                "expected_average_only_in" if cfg["normalize_activations"] else "none"
            )
    if cfg.get("architecture") == "standard" and cfg.get("activation_fn_str") == "topk":
        cfg["architecture"] = "topk"
    if cfg.get("architecture") in ("topk", "batchtopk") and cfg.get("k") is None:
        cfg["k"] = (cfg.get("activation_fn_kwargs") or {}).get("k")
    cfg["normalize_activations"] = cfg.get("normalize_activations") or "none"
    return cfg


def _dtype(name: Any) -> str:
    name = str(name or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"


def _legacy_weights(state: dict[str, torch.Tensor], cfg: dict[str, Any], source: str) -> None:
    """Turn older or training-time tensors into the inference ones, in place."""
    if "log_threshold" in state:
        state["threshold"] = state.pop("log_threshold").exp()
    if "topk_threshold" in state:
        state["threshold"] = state.pop("topk_threshold").reshape(())
    for key in ("scaling_factor", "finetuning_scaling_factor"):
        if key in state:  # decode multiplied the latents by it: fold into W_dec's rows
            factor = state.pop(key)
            state["W_dec"] = state["W_dec"] * factor.to(state["W_dec"].dtype)[:, None]
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens scaled pre-activations by ||W_dec_i|| and latents by 1/||W_dec_i||: fold (its own save does)
        norms = state["W_dec"].norm(dim=-1)
        state["W_dec"] = state["W_dec"] / norms[:, None]
        state["W_enc"] = state["W_enc"] * norms
        state["b_enc"] = state["b_enc"] * norms
    required = ["W_enc", "W_dec", "b_enc", "b_dec"]
    if cfg["architecture"] in ("jumprelu", "jumprelu_transcoder", "batchtopk"):
        required.append("threshold")
    missing = [k for k in required if k not in state]
    if missing:
        raise SAEFormatError(
            f"{source} lacks {missing} (has {sorted(state)}); it is not a complete SAELens SAE"
        )


def _config(
    cfg: dict[str, Any],
    kind: str,
    transcoder: bool,
    d_in: int,
    d_sae: int,
    d_out: int,
    norm: str,
    dtype: str | None,
) -> SAEConfig:
    return SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        kind=kind,
        hook_name=cfg.get("hook_name") or "",
        out_hook_name=(cfg.get("hook_name_out") or None) if transcoder else None,
        d_out=d_out,
        model_name=cfg.get("model_name") or "",
        k=int(cfg["k"]) if kind in ("topk", "batchtopk") else None,
        apply_b_dec_to_input=False if transcoder else bool(cfg.get("apply_b_dec_to_input", True)),
        normalisation="expected_average_only_in" if norm != "none" else "none",
        dtype=dtype or _dtype(cfg.get("dtype")),
    )


def _read(root: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The flattened config and the raw tensors of a SAELens directory."""
    for f in (root / CFG_FILE, root / WEIGHTS_FILE):
        if not f.is_file():
            raise SAEFormatError(
                f"{f} is missing: a SAELens SAE directory holds {CFG_FILE} and {WEIGHTS_FILE}"
            )
    try:
        return flat_config(json.loads((root / CFG_FILE).read_text())), dict(load_file(root / WEIGHTS_FILE))
    except (json.JSONDecodeError, SafetensorError, AttributeError) as e:
        raise SAEFormatError(f"{root} is not a readable SAELens SAE: {e}") from e


def _check_supported(cfg: dict[str, Any]) -> tuple[str, bool]:
    """(mechscope kind, is a transcoder), or an error naming what cannot be imported."""
    arch = cfg.get("architecture")
    if arch not in ARCHITECTURES:
        raise SAEFormatError(
            f"SAELens architecture {arch!r} has no mechscope kind; importable: {sorted(ARCHITECTURES)}"
        )
    if cfg.get("hook_head_index") is not None:
        raise SAEFormatError("per-head SAEs (hook_head_index set) are not supported; use one on attn.hook_z")
    if cfg["normalize_activations"] not in ("none", "expected_average_only_in"):
        raise SAEFormatError(
            f"normalize_activations={cfg['normalize_activations']!r} is a per-token normalisation mechscope "
            "does not implement; importable: 'none', 'expected_average_only_in'"
        )
    return ARCHITECTURES[arch]


def _input_scale(cfg: dict[str, Any], transcoder: bool, factor: float | None, root: Path) -> float:
    if cfg["normalize_activations"] == "none":
        return 1.0
    if transcoder and factor is not None:
        raise SAEFormatError("a transcoder with an input-only scaling factor is not supported")
    if factor is None:
        warnings.warn(
            f"{root}: normalize_activations='expected_average_only_in' but the scaling factor is not "
            "stored with the SAE; it now expects inputs scaled as SAELens would. Pass norm_scaling_factor=",
            stacklevel=3,
        )
    return float(factor or 1.0)


def load(
    path: str | Path,
    *,
    model: HookedModel | None = None,
    device: torch.device | str | None = None,
    dtype: str | None = None,
    norm_scaling_factor: float | None = None,
) -> SAE:
    """Import a SAELens SAE directory (4.x, 5.x or 6.x; standard, topk, batchtopk, jumprelu, transcoders).

    Args:
        model: if given, refuse an SAE whose hook point is missing or of another width.
        dtype: parameter dtype (default: the file's ``dtype``).
        norm_scaling_factor: the constant an ``expected_average_only_in`` SAE expects its inputs scaled by.
    """
    root = Path(path)
    cfg, state = _read(root)
    kind, transcoder = _check_supported(cfg)
    source = str(root / WEIGHTS_FILE)
    _legacy_weights(state, cfg, source)
    extra = sorted(set(state) - {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"})
    if extra:
        raise SAEFormatError(f"{source} has tensors {extra} that a {kind} SAE cannot represent")
    d_in, d_sae = state["W_enc"].shape
    d_out = state["W_dec"].shape[1]
    for name, value in (("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)):
        if cfg.get(name) is not None and cfg[name] != value:
            raise SAEFormatError(f"{root / CFG_FILE} says {name}={cfg[name]} but {source} implies {value}")
    scale = _input_scale(cfg, transcoder, norm_scaling_factor, root)
    try:
        sae_cfg = _config(cfg, kind, transcoder, d_in, d_sae, d_out, cfg["normalize_activations"], dtype)
    except (ValueError, TypeError, KeyError) as e:
        raise SAEFormatError(f"{root / CFG_FILE}: {e}") from e
    if transcoder and sae_cfg.out_hook_name is None:
        raise SAEFormatError(f"{root / CFG_FILE} is a transcoder without metadata.hook_name_out")
    sae = make_sae(sae_cfg, init=False)
    state["input_scale"] = state["output_scale"] = torch.tensor(scale)
    load_state(sae, state, source)
    sae = sae.to(device or "cpu")
    if model is not None:
        check_fits(sae, model)
    return sae.eval()


def _export_architecture(sae: SAE) -> str:
    transcoder = sae.cfg.is_transcoder
    names = {("relu", False): "standard", ("topk", False): "topk", ("batchtopk", False): "jumprelu"}
    names |= {
        ("jumprelu", False): "jumprelu",
        ("relu", True): "transcoder",
        ("jumprelu", True): "jumprelu_transcoder",
    }
    if (sae.cfg.kind, transcoder) not in names:
        raise SAEFormatError(
            f"SAELens has no inference format for a {sae.cfg.kind} {'transcoder' if transcoder else 'SAE'}"
        )
    return names[sae.cfg.kind, transcoder]


@torch.no_grad()
def save(sae: SAE, path: str | Path) -> Path:
    """Export ``sae`` as a SAELens 6.x SAE directory (normalisation folded into the weights)."""
    arch = _export_architecture(sae)
    c = sae.cfg
    s_in, s_out = sae.input_scale.double(), sae.output_scale.double()
    # pre = (x s_in - b_dec) W_enc + b_enc = (x - b_dec / s_in) (s_in W_enc) + b_enc, with s_in = s_out
    # for SAEs (transcoders never subtract b_dec)
    tensors = {
        "W_enc": (sae.W_enc.double() * s_in).to(sae.dtype),
        "W_dec": (sae.W_dec.double() / s_out).to(sae.dtype),
        "b_enc": sae.b_enc,
        "b_dec": (sae.b_dec.double() / s_out).to(sae.dtype),
    }
    if c.kind == "jumprelu":
        tensors["threshold"] = sae.threshold
    elif c.kind == "batchtopk":
        if torch.isnan(sae.threshold):
            raise SAEFormatError(
                "this BatchTopK SAE has no inference threshold yet; train it before exporting"
            )
        tensors["threshold"] = sae.threshold.expand(c.d_sae).clone()
    from mechscope import __version__

    metadata: dict[str, Any] = {
        "sae_lens_version": EXPORT_VERSION,
        "sae_lens_training_version": EXPORT_VERSION,
        "model_name": c.model_name or None,
        "hook_name": c.hook_name or None,
        "hook_head_index": None,
        "exported_by": f"mechscope {__version__}",
    }
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": c.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": bool(c.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if c.hook_name.endswith("hook_z") else "none",
        "metadata": metadata,
    }
    if arch == "topk":
        cfg |= {"k": c.k, "rescale_acts_by_decoder_norm": False}
    if c.is_transcoder:
        cfg["d_out"] = c.d_out
        metadata["hook_name_out"] = c.out_hook_name
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomic(root / WEIGHTS_FILE, tensors, {"format": "pt"})
    write_json_atomic(root / CFG_FILE, cfg)
    return root
