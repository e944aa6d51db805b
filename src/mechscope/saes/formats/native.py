"""mechscope's own SAE format: a directory with ``cfg.json`` and ``sae.safetensors``.

``cfg.json`` holds the format name and version, the full :class:`SAEConfig` (kind, hooks, widths,
coefficients, seed: everything needed to rebuild or retrain it), the normalisation constants (also
stored as buffers in the weights; repeated here for readers) and the weights file's SHA-256.

Writes are atomic per file (temporary file, fsync, rename) and the weights go first: a crash
leaves either the old pair, or new weights whose checksum does not match the old ``cfg.json``,
which :func:`load` refuses. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mechscope.saes.arch import make_sae
from mechscope.saes.sae import SAE, SAEConfig, SAEFormatError
from mechscope.saes.splice import check_fits

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel

FORMAT = "mechscope.sae"
FORMAT_VERSION = 1
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae.safetensors"
# Old format versions -> a function turning their cfg.json dict into the next version's.
MIGRATIONS: dict[int, Any] = {}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so the file is either the old or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    _replace_atomically(tmp, path)


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write tensors atomically; returns the file's SHA-256."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    digest = sha256(tmp)
    _replace_atomically(tmp, path)
    return digest


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save(sae: SAE, path: str | Path) -> Path:
    """Save ``sae`` into directory ``path`` (created if needed); returns the directory."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    state = sae.state_dict()
    digest = write_safetensors_atomic(root / WEIGHTS_FILE, state, {"format": FORMAT})
    from mechscope import __version__

    write_json_atomic(
        root / CFG_FILE,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mechscope_version": __version__,
            "config": sae.cfg.to_dict(),
            "normalisation": {
                "method": sae.cfg.normalisation,
                "input_scale": float(sae.input_scale),
                "output_scale": float(sae.output_scale),
            },
            "weights": {
                "file": WEIGHTS_FILE,
                "sha256": digest,
                "shapes": {k: list(v.shape) for k, v in state.items()},
            },
        },
    )
    return root


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``cfg.json`` of a native SAE directory, migrated to the current format version."""
    file = Path(path) / CFG_FILE
    if not file.is_file():
        raise SAEFormatError(f"{file} does not exist: {path} is not a mechscope SAE directory")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise SAEFormatError(
            f"{file} is not valid JSON ({e}); the save was interrupted or the file edited"
        ) from e
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        raise SAEFormatError(
            f"{file} is not a mechscope SAE config (format {fmt!r}); "
            "for SAELens or Gemma Scope files use mechscope.saes.formats.load_sae(path)"
        )
    version = meta.get("format_version")
    while version in MIGRATIONS:
        meta = MIGRATIONS[version](meta)
        version = meta["format_version"]
    if version != FORMAT_VERSION:
        raise SAEFormatError(
            f"{file} has format_version {version!r}; this mechscope reads {FORMAT_VERSION}: upgrade mechscope"
        )
    return meta


def load(
    path: str | Path,
    *,
    model: HookedModel | None = None,
    device: torch.device | str | None = None,
    verify: bool = True,
) -> SAE:
    """Load a directory written by :func:`save`.

    Args:
        model: if given, refuse (``IncompatibleSAEError``) an SAE whose hook point is missing or of
            another width.
        device: where to put the weights (default CPU).
        verify: check the weights' SHA-256 against ``cfg.json`` (catches torn or corrupt saves).
    """
    root = Path(path)
    meta = read_config(root)
    try:
        cfg = SAEConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise SAEFormatError(f"{root / CFG_FILE} holds an invalid SAE config: {e}") from e
    weights = root / meta["weights"]["file"]
    if not weights.is_file():
        raise SAEFormatError(f"{weights} is missing; copy the whole SAE directory")
    if verify and sha256(weights) != meta["weights"]["sha256"]:
        raise SAEFormatError(
            f"{weights} does not match the checksum in {CFG_FILE}: "
            "a save was interrupted or the file is corrupt"
        )
    try:
        state = load_file(weights, device=str(device or "cpu"))
    except SafetensorError as e:
        raise SAEFormatError(f"{weights} is not a readable safetensors file: {e}") from e
    sae = make_sae(cfg, init=False).to(device or "cpu")
    load_state(sae, state, str(weights))
    norm = meta.get("normalisation", {})
    for key in ("input_scale", "output_scale"):
        if key in norm and float(getattr(sae, key)) != norm[key]:
            raise SAEFormatError(
                f"{key} is {float(getattr(sae, key))} in the weights but {norm[key]} in {CFG_FILE}"
            )
    if model is not None:
        check_fits(sae, model)
    return sae.eval()


def load_state(sae: SAE, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``sae``, naming missing, unexpected or mis-shaped tensors."""
    own = sae.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise SAEFormatError(
            f"{source} does not match a {sae.cfg.kind} SAE: missing {missing}, unexpected {unexpected}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise SAEFormatError(
                f"{source}: {k} has shape {tuple(v.shape)} but the config implies {tuple(own[k].shape)}"
            )
    sae.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
