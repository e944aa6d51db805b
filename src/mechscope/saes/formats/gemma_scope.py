"""Gemma Scope's format (Lieberum et al. 2024): one ``params.npz`` per SAE, a JumpReLU SAE.

The archive holds float32 arrays ``W_enc [d_in d_sae]``, ``W_dec [d_sae d_in]``, ``b_enc [d_sae]``,
``b_dec [d_in]`` and ``threshold [d_sae]`` (some copies spell the matrices ``w_enc``/``w_dec``, which
SAELens' loader also accepts). The SAEs take raw activations (their training normalisation is already
folded in) and encode ``ReLU(x @ W_enc + b_enc) * (x @ W_enc + b_enc > threshold)`` with no ``b_dec``
subtracted from the input (the Gemma Scope tutorial's ``JumpReLUSAE``).

The file does not say where it reads: pass ``hook_name``, or keep the release's directory layout
(``gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz``) and it is inferred as
SAELens does: ``-res`` -> ``blocks.L.hook_resid_post``, ``-mlp`` -> ``blocks.L.hook_mlp_out``,
``-att`` -> ``blocks.L.attn.hook_z``. Embedding SAEs and transcoders need explicit hook names
(``out_hook_name`` for a transcoder). Arrays are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mechscope.saes.arch import make_sae
from mechscope.saes.formats.native import load_state
from mechscope.saes.sae import SAE, SAEConfig, SAEFormatError
from mechscope.saes.splice import check_fits

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel

PARAMS_FILE = "params.npz"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_SITES = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}


def infer_hook_name(path: Path) -> str | None:
    """The hook point a file in a Gemma Scope release's layout was trained on, or None."""
    text = path.as_posix()
    layer = re.search(r"(?:^|/)layer_(\d+)(?:/|$)", text)
    site = re.search(r"gemma-scope-[^/]*-(res|mlp|att)(?:-[^/]*)?(?:/|$)", text)
    if not layer or not site:
        return None
    return f"blocks.{layer.group(1)}.{_SITES[site.group(1)]}"


def _config(arrays, hook: str, out_hook_name: str | None, model_name: str, dtype: str) -> SAEConfig:
    d_in, d_sae = arrays["W_enc"].shape
    return SAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        kind="jumprelu",
        hook_name=hook,
        out_hook_name=out_hook_name,
        d_out=int(arrays["W_dec"].shape[-1]),
        model_name=model_name,
        apply_b_dec_to_input=False,
        normalisation="none",
        dtype=dtype,
    )


def load(
    path: str | Path,
    *,
    hook_name: str | None = None,
    out_hook_name: str | None = None,
    model: HookedModel | None = None,
    model_name: str = "",
    device: torch.device | str | None = None,
    dtype: str = "float32",
) -> SAE:
    """Import a Gemma Scope ``params.npz`` (the file, or its directory) as a JumpReLU SAE.

    Args:
        hook_name: the hook point it reads (inferred from a release's layout when None).
        out_hook_name: for a transcoder, the hook point it reconstructs.
        model: if given, refuse an SAE whose hook point is missing or of another width.
    """
    file = Path(path)
    file = file / PARAMS_FILE if file.is_dir() else file
    if not file.is_file():
        raise SAEFormatError(f"{file} does not exist; point at a Gemma Scope params.npz or its directory")
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise SAEFormatError(f"{file} is not a readable .npz archive: {e}") from e
    arrays = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in arrays.items()}
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        raise SAEFormatError(
            f"{file} lacks {missing} (has {sorted(arrays)}); a Gemma Scope SAE has {list(KEYS)}"
        )
    extra = sorted(set(arrays) - set(KEYS))
    if extra:
        raise SAEFormatError(f"{file} has arrays {extra} that a JumpReLU SAE cannot represent")
    if arrays["W_enc"].ndim != 2 or arrays["W_dec"].ndim != 2:
        raise SAEFormatError(f"{file}: W_enc and W_dec must be matrices")
    hook = hook_name or infer_hook_name(file.resolve())
    if hook is None:
        raise SAEFormatError(
            f"cannot tell which hook point {file} reads; pass hook_name= (e.g. 'blocks.12.hook_resid_post')"
        )
    try:
        cfg = _config(arrays, hook, out_hook_name, model_name, dtype)
    except ValueError as e:
        raise SAEFormatError(f"{file}: {e}") from e
    sae = make_sae(cfg, init=False)
    state = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in KEYS}
    state["input_scale"] = state["output_scale"] = torch.tensor(1.0)
    load_state(sae, state, str(file))
    sae = sae.to(device or "cpu")
    if model is not None:
        check_fits(sae, model)
    return sae.eval()
