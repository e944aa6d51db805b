"""``load_model``: a registry alias, a ``tiny-<family>`` test model, a local HF directory, a ``.gguf``
file, or a HF hub id (the only case that may use the network).

GGUF files are dequantised by ``transformers`` (slow: ~20 s for 135M parameters), so the result is
saved once as safetensors under :func:`~mechscope.models.sources.cache_root` and later loads read
that. The save goes to a temporary directory renamed into place, so an interrupted conversion is
never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mechscope.models.adapters import adapter_for, adapters
from mechscope.models.errors import ModelNotAvailableError
from mechscope.models.hooked import HookedModel
from mechscope.models.host_memory import keep_freed_memory
from mechscope.models.sources import SOURCES, cache_root
from mechscope.models.tiny import byte_tokenizer

logger = logging.getLogger(__name__)


def load_model(
    name: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    requires_grad: bool = False,
) -> HookedModel:
    """Load a causal LM and wrap it as a :class:`HookedModel`.

    Args:
        name: an alias (``mechscope models`` lists them), ``tiny-<family>``, a local directory,
            a ``.gguf`` file, or a HF hub id.
        device: where to put the model (default CPU).
        dtype: parameter dtype (default: as stored; GGUF dequantises to float32).
        requires_grad: keep parameter gradients on. Off by default: interpretability needs
            gradients with respect to activations (``run_with_grads``), not weights.

    Raises:
        ModelNotAvailableError: the alias' package is missing (the message has the install
            command), or a hub id could not be fetched.
        UnsupportedArchitectureError: the model's family has no adapter.

    Also tells glibc to keep freed memory for reuse (:mod:`mechscope.models.host_memory`; a plain
    CPU forward ~10% faster, caching activations no longer paying page faults for what it holds);
    ``MECHSCOPE_KEEP_FREED_MEMORY=0`` turns that off.
    """
    keep_freed_memory()
    hf_model, tokenizer = _load_hf(name)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None or device is not None:
        hf_model = hf_model.to(device=device, dtype=dtype)
    hf_model.requires_grad_(requires_grad)
    adapter = adapter_for(hf_model.config)
    return HookedModel(hf_model, tokenizer, adapter, name=name)


def _load_hf(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name.startswith("tiny-"):
        return _tiny(name.removeprefix("tiny-"))
    if name in SOURCES:
        return _load_gguf(SOURCES[name].locate())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return _load_gguf(path)
    if path.is_dir():
        return _from_pretrained(path, local_files_only=True)
    if path.exists() or name.count("/") != 1:
        known = sorted(SOURCES) + [f"tiny-{f}" for f in adapters()]
        raise ModelNotAvailableError(
            f"{name!r} is not an alias ({', '.join(known)}), a local HF directory, a .gguf file or a hub id 'org/name'"
        )
    try:
        return _from_pretrained(name, local_files_only=False)
    except OSError as e:
        raise ModelNotAvailableError(
            f"could not fetch {name!r} from the HF hub ({e.__class__.__name__}). Offline? Download it on a "
            "connected machine and pass its local directory, or use an alias (`mechscope models`)."
        ) from e


def _from_pretrained(where: str | Path, **kw) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    _import_hf_classes(where)
    model = AutoModelForCausalLM.from_pretrained(where, **kw)
    return model, AutoTokenizer.from_pretrained(where, **kw)


def _import_hf_classes(where: str | Path) -> None:
    """Import the module that registers a family's HF classes (e.g. mechscope's own toy models)."""
    config = Path(where) / "config.json"
    if not config.is_file():
        return
    model_type = json.loads(config.read_text()).get("model_type")
    for adapter in adapters().values():
        if model_type in adapter.model_types and adapter.hf_module:
            importlib.import_module(adapter.hf_module)


def _tiny(family: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    registry = adapters()
    if family not in registry:
        raise ModelNotAvailableError(
            f"no tiny model 'tiny-{family}'; there are: {', '.join('tiny-' + f for f in sorted(registry))}"
        )
    tokenizer = byte_tokenizer()
    config = registry[family].tiny_config(vocab_size=len(tokenizer))
    with torch.random.fork_rng():  # the same random model every time, without touching the caller's RNG
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    return model, tokenizer


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "converted" / f"{path.stem}-{key}"


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    cached = _gguf_cache_dir(path)
    if (cached / "config.json").exists():
        return _from_pretrained(cached, local_files_only=True)
    logger.info("dequantising %s once; later loads read %s", path.name, cached)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    # GGUF metadata would make from_pretrained re-dequantise; the cached copy is plain safetensors.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError as e:  # another process finished first (keep theirs), or the cache is read-only or full
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cached / "config.json").exists():
            logger.warning(
                "could not cache the dequantised %s in %s (%s); loading it again will convert it again. "
                "Set $MECHSCOPE_CACHE to a writable directory to keep it.",
                path.name,
                cached,
                e,
            )
    return model, tokenizer
