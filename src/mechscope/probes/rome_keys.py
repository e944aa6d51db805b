"""The inputs of a ROME edit that do not depend on the target: the layer, the prefixes, the key statistics.

See :mod:`mechscope.probes.rome` for the method. :func:`locate_layer` is the causal trace at one
position, :func:`context_prefixes` ROME's model-written context templates, :func:`key_covariance`
the second moment ``C = E[k kᵀ]`` of an MLP's keys over a corpus, cached on disk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechscope.data.contexts import ContextConfig, context_stream
from mechscope.data.corpus import Corpus, default_corpus
from mechscope.interventions.causal_trace import noise_scale, window_layers
from mechscope.models import HookedModel
from mechscope.models.hook_points import HookPoint
from mechscope.models.sources import cache_root
from mechscope.probes.rome_request import EditError, EditRequest, check_layer, subject_tokens

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages ``trace``, ``covariance`` (tokens), ``optimisation`` (steps)."""
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")
"""The words ROME's code starts its generated context prefixes with."""


# ---------------------------------------------------------------------------- 1. locate
class LayerTrace(NamedTuple):
    """The causal trace of the MLP outputs at the subject's last token."""

    effect: Float[Tensor, " n_layers"]
    """Indirect effect (restored minus corrupted answer probability) of the window around each layer."""
    clean: float
    corrupted: float
    answer: str

    @property
    def layer(self) -> int:
        """The layer with the largest effect: where ROME edits."""
        return int(self.effect.argmax())


def _corrupt(positions: list[int], noise: Tensor) -> Callable[[Tensor, HookPoint], Tensor]:
    def corrupt(x: Tensor, hook: HookPoint) -> Tensor:
        x = x.clone()
        x[:, positions] += noise.to(x.device, x.dtype)
        return x

    return corrupt


def _restore(
    variants: list[int], samples: int, pos: int, value: Tensor
) -> Callable[[Tensor, HookPoint], Tensor]:
    def restore(x: Tensor, hook: HookPoint) -> Tensor:
        x = x.clone()
        for v in variants:
            x[v * samples : (v + 1) * samples, pos] = value
        return x

    return restore


@torch.no_grad()
def locate_layer(
    model: HookedModel,
    request: EditRequest,
    *,
    window: int = 10,
    samples: int = 10,
    seed: int = 0,
    progress: Progress | None = None,
) -> LayerTrace:
    """Causal-trace the request's prompt, restoring only the MLP outputs at the subject's last token.

    Equal to ``causal_trace(model, prompt, subject, kinds=("mlp",)).indirect_effect("mlp")[:, last]``
    (same noise: ``samples`` draws of 3 x the prompt's embedding std on the subject's tokens, same
    seed, same window), computed for that one position instead of all of them. The answer is the
    model's top prediction.
    """
    check_layer(model, 0)
    text, n = request.prompt, model.cfg.n_layers
    first, last = subject_tokens(model, text, *request.span)
    subj = list(range(first, last + 1))
    ids = model.to_tokens(text)
    names = [f"blocks.{i}.hook_mlp_out" for i in range(n)]
    logits, clean = model.run_with_cache(ids, names)
    answer = int(logits[0, -1].argmax())
    draws = torch.randn(samples, len(subj), model.cfg.d_model, generator=torch.Generator().manual_seed(seed))
    draws = draws * noise_scale(model, text)
    variants = [[]] + [[f"blocks.{j}.hook_mlp_out" for j in window_layers(i, window, n)] for i in range(n)]
    probs, chunk = [], 8
    for c in range(0, len(variants), chunk):
        part = variants[c : c + chunk]
        hooks = {"hook_embed": _corrupt(subj, draws.repeat(len(part), 1, 1))}
        for name in {name for v in part for name in v}:
            rows = [v for v, restored in enumerate(part) if name in restored]
            hooks[name] = _restore(rows, samples, last, clean[name][0, last])
        with model.hooks(hooks):
            out = model(ids.repeat(len(part) * samples, 1), logits_to_keep=1)
        probs.append(out[:, -1].float().softmax(-1)[:, answer].view(len(part), samples).mean(1).cpu())
        if progress:
            progress("trace", min(c + chunk, len(variants)), len(variants))
    p = torch.cat(probs)
    clean_p = float(logits[0, -1].float().softmax(-1)[answer])
    return LayerTrace(p[1:] - p[0], clean_p, float(p[0]), model.tokenizer.decode([answer]))


# ---------------------------------------------------------------------------- 2. keys
def context_prefixes(
    model: HookedModel, lengths: Sequence[int] = (5, 10), per_length: int = 10, *, seed: int = 0
) -> list[str]:
    """The bare prompt's empty prefix, then model-written prefixes ending in ". " (ROME's templates).

    For each of ``lengths`` (new tokens), ``per_length`` samples (top-5, seeded) continue the words
    of :data:`PREFIX_STARTS` in turn. Line breaks become spaces, so a prefix reads as one sentence.
    """
    out = [""]
    for i, length in enumerate(lengths):
        starts = [PREFIX_STARTS[j % len(PREFIX_STARTS)] for j in range(per_length)]
        texts = model.generate(starts, max_new_tokens=length, do_sample=True, top_k=5, seed=seed + i)
        out += [t.replace("\n", " ").strip() + ". " for t in texts]
    return out


def _cache_key(model: HookedModel, layer: int, corpus: Corpus, n_tokens: int, ctx: ContextConfig) -> dict:
    from mechscope.saes.harvest import model_fingerprint  # one definition of a model's identity

    return {
        "format_version": 1,
        "model_fingerprint": model_fingerprint(model),
        "hook": f"blocks.{layer}.mlp.hook_post",
        "n_tokens": n_tokens,
        "context_length": ctx.context_length,
        "seed": ctx.seed,
        "corpus": corpus.description,
    }


@torch.no_grad()
def key_covariance(
    model: HookedModel,
    layer: int,
    *,
    corpus: Corpus | None = None,
    n_tokens: int = 100_000,
    context_length: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> Float[Tensor, "d_mlp d_mlp"]:
    """``C = E[k kᵀ]`` of block ``layer``'s keys (``mlp.hook_post``) over ``n_tokens`` corpus tokens.

    Contexts come from :func:`mechscope.data.contexts.context_stream` (seeded shuffle of
    ``corpus``, default: the embedded one). The result (float64) is cached as safetensors in
    ``cache_dir`` (default ``$MECHSCOPE_CACHE/rome``) under a hash of the model's weight
    fingerprint, the hook, ``n_tokens``, the contexts and the corpus's description.
    """
    check_layer(model, layer)
    corpus = default_corpus() if corpus is None else corpus
    ctx = ContextConfig(context_length=context_length, seed=seed)
    key = _cache_key(model, layer, corpus, n_tokens, ctx)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir or cache_root() / "rome") / f"cov-L{layer}-{n_tokens}-{digest}.safetensors"
    if path.exists():
        return load_file(path)["C"]
    hook, d = key["hook"], model.cfg.d_mlp
    total, seen, batch = torch.zeros(d, d, dtype=torch.float64), 0, []

    def flush() -> None:
        nonlocal total, seen
        ids = torch.from_numpy(np.stack([c.index[:, 0] for c in batch])).long()
        _, cache = model.run_with_cache(ids, [hook], stop_at_layer=layer + 1)
        k = cache[hook].reshape(-1, d)[: n_tokens - seen].float()
        total += (k.T @ k).double().cpu()  # float32 products on the model's device, float64 sum here
        seen += k.shape[0]
        batch.clear()
        if progress:
            progress("covariance", seen, n_tokens)

    for context in context_stream(model, corpus, ctx):
        batch.append(context)
        if len(batch) == batch_size:
            flush()
        if seen >= n_tokens:
            break
    if batch and seen < n_tokens:
        flush()
    if seen <= d:
        raise EditError(
            f"the corpus gave {seen} tokens but estimating C needs more than d_mlp = {d}; use a longer corpus"
        )
    C = total / seen
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"identity": json.dumps(key, sort_keys=True), "tokens_seen": str(seen)}
    tmp = path.with_suffix(".tmp")
    save_file({"C": C.contiguous()}, tmp, metadata=meta)
    tmp.replace(path)  # atomic: an interrupted run never leaves a half-written cache entry
    return C
