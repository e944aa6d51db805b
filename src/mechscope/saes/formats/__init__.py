"""SAE file formats, registered here and only here (named by format, never by author).

* ``native``: ``cfg.json`` (format ``mechscope.sae``) + ``sae.safetensors``; load and save.
* ``saelens``: ``cfg.json`` + ``sae_weights.safetensors`` (SAELens 4.x-6.x); load and save.
* ``gemma_scope``: ``params.npz`` (a JumpReLU SAE); load only.

:func:`load_sae` detects the format from the files; every loader takes ``model=`` to refuse an SAE
that does not fit it (missing hook point, other width) before any work is done with it, and returns
the SAE in eval mode (call ``.train()`` to fine-tune it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from mechscope.saes.formats import gemma_scope, native, saelens
from mechscope.saes.sae import SAE, SAEFormatError


class Loader(Protocol):
    def __call__(self, path: str | Path, **kwargs: Any) -> SAE: ...


class Format(NamedTuple):
    """One SAE file format."""

    load: Loader
    """``load(path, *, model=None, device=None, ...) -> SAE``."""
    save: Callable[[SAE, str | Path], Path] | None
    """``save(sae, directory) -> directory``, or None for import-only formats."""
    detect: Callable[[Path], bool]
    """Whether ``path`` (a file or directory) is in this format."""


def _is_native(path: Path) -> bool:
    cfg = path / native.CFG_FILE
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == native.FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def _is_saelens(path: Path) -> bool:
    return (path / saelens.WEIGHTS_FILE).is_file() and (path / saelens.CFG_FILE).is_file()


def _is_gemma_scope(path: Path) -> bool:
    return path.suffix == ".npz" or (path / gemma_scope.PARAMS_FILE).is_file()


FORMATS: dict[str, Format] = {
    "native": Format(native.load, native.save, _is_native),
    "saelens": Format(saelens.load, saelens.save, _is_saelens),
    "gemma_scope": Format(gemma_scope.load, None, _is_gemma_scope),
}


def detect_format(path: str | Path) -> str:
    """The name of the format ``path`` is in."""
    p = Path(path)
    if not p.exists():
        raise SAEFormatError(f"{p} does not exist")
    for name, fmt in FORMATS.items():
        if fmt.detect(p):
            return name
    raise SAEFormatError(
        f"{p} is in no known SAE format: expected {native.CFG_FILE} + {native.WEIGHTS_FILE} (native), "
        f"{saelens.CFG_FILE} + {saelens.WEIGHTS_FILE} (saelens) or {gemma_scope.PARAMS_FILE} (gemma_scope)"
    )


def load_sae(path: str | Path, format: str = "auto", **kwargs: Any) -> SAE:
    """Load an SAE in any registered format (``auto``: detected); ``kwargs`` go to the format's loader."""
    name = detect_format(path) if format == "auto" else format
    if name not in FORMATS:
        raise ValueError(f"unknown SAE format {name!r}; choose one of {sorted(FORMATS)} or 'auto'")
    return FORMATS[name].load(path, **kwargs)


def save_sae(sae: SAE, path: str | Path, format: str = "native") -> Path:
    """Save ``sae`` into directory ``path`` in a format that can be written."""
    writable = sorted(n for n, f in FORMATS.items() if f.save is not None)
    if format not in writable:
        raise ValueError(f"cannot write SAE format {format!r}; writable: {writable}")
    return FORMATS[format].save(sae, path)


__all__ = ["FORMATS", "Format", "Loader", "SAEFormatError", "detect_format", "load_sae", "save_sae"]
