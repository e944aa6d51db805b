"""Activation harvesting: run a model over a corpus's contexts and fill an activation store.

Several hook points are harvested in one pass, and the forward stops after the deepest of them
(``run_with_cache(..., stop_at_layer=L + 1)``): harvesting block 5 of a 30-block model runs 6
blocks and no unembedding. Contexts come from :mod:`mechscope.data.contexts` (fixed length,
packed, shuffled by seed), are cut into shards of ``shard_tokens``, and each shard is computed in
batches and written atomically by :class:`~mechscope.saes.store.StoreWriter`.

Resuming is re-running: the context stream is a deterministic function of the store's identity,
so shards already listed in the manifest are skipped and the rest are computed exactly as an
uninterrupted run would (same contexts, same batches from the start of each shard). Everything
that can be wrong with the request (unknown hook, a hook without a per-token vector, context
longer than the model's window, an empty corpus, a store built differently) is an error before
the first forward.

**Data parallel.** Under ``torchrun`` every process walks the same (cheap) context stream and computes
the shards ``i`` with ``i % world_size == rank``; shard directories are written by their process and
listed in the manifest by process 0 after each round of ``world_size`` shards, so the store is the one
a single process writes, byte for byte, and a kill at any moment resumes like a single-process run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.data.contexts import INDEX_FIELDS, Context, ContextConfig, context_stream
from mechscope.data.corpus import Corpus, CorpusError, load_corpus
from mechscope.models import HookedModel
from mechscope.models.hook_names import parse
from mechscope.saes.distributed import rank_and_world
from mechscope.saes.store import DTYPES, MANIFEST, ActivationStore, CorruptStoreError, StoreWriter

log = logging.getLogger(__name__)


class HarvestProgress(NamedTuple):
    """What a progress callback receives after every batch and every shard found already done."""

    tokens_done: int
    tokens_total: int
    """The target; the corpus may end sooner."""
    skipped: bool
    """This step found a shard already in the store (resuming): no forward ran, so no speed to show."""


Progress = Callable[[HarvestProgress], None]
_NOT_PER_TOKEN = ("hook_pattern", "hook_attn_scores")


@dataclass(frozen=True, kw_only=True)
class HarvestConfig:
    """One harvest job; saved in the store's manifest."""

    hooks: tuple[str, ...]
    """Hook points to store, e.g. ``("blocks.5.hook_resid_post",)``."""
    n_tokens: int = 1 << 20
    """Tokens to harvest (rounded down to whole contexts; fewer if the corpus runs out)."""
    contexts: ContextConfig = field(default_factory=ContextConfig)
    """Context length, seed and shuffle buffers."""
    batch_size: int = 16
    """Contexts per forward pass."""
    dtype: str = "float32"
    """Stored dtype: ``float32``, ``float16`` or ``bfloat16``."""
    shard_tokens: int = 1 << 14
    """Tokens per shard (rounded down to whole contexts)."""

    def __post_init__(self):
        if not self.hooks:
            raise ValueError("hooks is empty: name at least one hook point, e.g. blocks.0.hook_resid_post")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("n_tokens", "batch_size", "shard_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_tokens < self.contexts.context_length:
            raise ValueError(
                f"n_tokens ({self.n_tokens}) is less than one context ({self.contexts.context_length} tokens)"
            )

    @property
    def shard_contexts(self) -> int:
        return max(1, self.shard_tokens // self.contexts.context_length)


class HookPlan(NamedTuple):
    """What the forward must record and where it may stop."""

    widths: dict[str, int]
    """Hook name -> width of its per-token vector (heads flattened)."""
    stop_at_layer: int | None
    """Passed to ``run_with_cache``; None runs the whole model."""


def plan_hooks(model: HookedModel, hooks: tuple[str, ...] | list[str]) -> HookPlan:
    """Check the hooks on a 2 x 5-token probe and find the earliest layer the forward can stop at."""
    for h in hooks:
        model.hook_point(h)  # an unknown name raises UnknownHookError listing the closest valid ones
        if h.endswith(_NOT_PER_TOKEN):
            raise ValueError(
                f"{h} is [batch head q_pos k_pos], not one vector per token; harvest attn.hook_z instead"
            )
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"hooks {list(hooks)} name a hook twice")
    stops = []
    for h in hooks:
        layer = parse(h)[0] if h in model.hook_names else None
        if h not in model.hook_names or not h.startswith(("blocks.", "hook_")):
            stops.append(None)  # raw HF paths and the final norm / unembedding need the whole model
        else:
            stops.append(0 if layer is None else layer + 1)
    stop = None if None in stops else max(stops)
    acts = _capture(model, torch.zeros(2, 5, dtype=torch.long, device=model.device), list(hooks), stop)
    widths = {}
    for h, x in ((h, acts.get(h)) for h in hooks):
        if x is None:
            raise ValueError(
                f"{h} gives no tensor (a module that returns a tuple?); name a hook point instead"
            )
        if x.ndim < 3 or tuple(x.shape[:2]) != (2, 5):
            raise ValueError(
                f"{h} has shape {tuple(x.shape)} for 2 x 5 tokens, not [batch pos ...]; it cannot be stored per token"
            )
        widths[h] = math.prod(x.shape[2:])
    return HookPlan(widths, stop)


def _capture(
    model: HookedModel, tokens: Tensor, hooks: list[str], stop: int | None, to: torch.dtype | None = None
) -> dict[str, Tensor]:
    acts: dict[str, Tensor] = {}

    def keep(x: Tensor, hook) -> None:
        # Copied at once, on the CPU, in the stored dtype: the model may reuse its buffer later.
        if isinstance(x, Tensor):
            acts[hook.name] = x.detach().to(device="cpu", dtype=to or x.dtype, copy=True)

    with torch.no_grad(), model.hooks([(h, keep) for h in hooks]):
        model.run_with_cache(tokens, [], stop_at_layer=stop)
    return acts


def harvest_batch(
    model: HookedModel, tokens: Int[Tensor, "batch pos"], plan: HookPlan, dtype: torch.dtype = torch.float32
) -> dict[str, Float[Tensor, "rows d_in"]]:
    """One forward (stopping early) -> ``{hook: [batch * pos, d_in]}`` on the CPU in ``dtype``."""
    acts = _capture(model, tokens.to(model.device), list(plan.widths), plan.stop_at_layer, dtype)
    return {h: acts[h].reshape(tokens.shape[0] * tokens.shape[1], -1) for h in plan.widths}


def model_fingerprint(model: HookedModel) -> str:
    """SHA-256 of every parameter's name, shape, dtype and 4096 evenly spaced values.

    Cheap (no full pass over the weights) and still different for any retrained or fine-tuned
    model, which is what keeps a store from mixing two models that share a name.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.hf_model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().numpy()
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(sample.tobytes())
    return h.hexdigest()


def _identity(
    model: HookedModel, model_name: str, corpus: Corpus, cfg: HarvestConfig, plan: HookPlan, packing
) -> dict:
    return {
        "model": model_name,
        "model_fingerprint": model_fingerprint(model),
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "hooks": plan.widths,
        "dtype": cfg.dtype,
        "context_length": cfg.contexts.context_length,
        "bos": packing.bos,
        "separator": packing.separator,
        "corpus": corpus.description,
        "seed": cfg.contexts.seed,
        "document_buffer": cfg.contexts.document_buffer,
        "context_buffer": cfg.contexts.context_buffer,
        "shard_contexts": cfg.shard_contexts,
    }


def _to_numpy(t: Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _compute_shard(
    model: HookedModel,
    contexts: list[Context],
    cfg: HarvestConfig,
    plan: HookPlan,
    tick: Callable[[int], None],
) -> tuple[np.ndarray, dict[int, Any], dict[str, np.ndarray]]:
    index = np.concatenate([c.index for c in contexts])  # [rows, 4]
    L = cfg.contexts.context_length
    tokens = torch.from_numpy(index[:, 0].astype(np.int64)).reshape(len(contexts), L)
    storage = DTYPES[cfg.dtype]
    acts = {h: np.empty((len(index), w), dtype=storage[1]) for h, w in plan.widths.items()}
    for start in range(0, len(contexts), cfg.batch_size):
        ids = tokens[start : start + cfg.batch_size]
        out = harvest_batch(model, ids, plan, storage[0])
        for h, x in out.items():
            acts[h][start * L : start * L + len(x)] = _to_numpy(x)
        tick(ids.numel())
    documents = {d: info for c in contexts for d, info in c.documents.items()}
    return index, documents, acts


def _drop_corrupt(writer: StoreWriter) -> None:
    reader = ActivationStore(writer.root, writer.manifest)
    for i, record in list(writer.shards.items()):
        try:
            for name in record["files"]:
                reader._verify_file(i, name)
        except (CorruptStoreError, OSError) as e:
            log.warning("recomputing shard %d: %s", i, e)
            writer.drop(i)


def _shards(contexts: Iterator[Context], target: int, per_shard: int) -> Iterator[list[Context]]:
    done = 0
    while done < target:
        batch = list(islice(contexts, min(per_shard, target - done)))
        if not batch:
            return
        yield batch
        done += len(batch)


@torch.no_grad()
def harvest(
    model: HookedModel,
    corpus: Corpus | str | Path,
    out: str | Path,
    cfg: HarvestConfig,
    *,
    model_name: str | None = None,
    progress: Progress | None = None,
    verify_existing: bool = False,
) -> ActivationStore:
    """Harvest ``cfg.hooks`` over ``corpus`` into the store at ``out``; resume it if it exists.

    Args:
        model: the model; the forward stops after the deepest requested layer.
        corpus: a :class:`Corpus` or a spec for :func:`~mechscope.data.corpus.load_corpus`.
        out: the store directory (created; an existing store of the same identity is resumed).
        cfg: hooks, token budget, contexts, dtype, shard size.
        model_name: recorded as the model (default ``model.name``).
        progress: called with a :class:`HarvestProgress` after every batch.
        verify_existing: check the SHA-256 of every shard already written and recompute corrupt ones.

    Returns:
        The finished store, opened for reading.
    """
    plan = plan_hooks(model, cfg.hooks)
    corpus = load_corpus(corpus)
    stream = context_stream(model, corpus, cfg.contexts)
    L = cfg.contexts.context_length
    target = cfg.n_tokens // L
    shards = _shards(iter(stream), target, cfg.shard_contexts)
    first = next(shards, None)
    if first is None:
        raise CorpusError(f"corpus {corpus.name!r} yields no context of {L} tokens: it is empty or too short")
    info = {
        "shard_tokens": cfg.shard_contexts * L,
        "target_tokens": target * L,
        "batch_size": cfg.batch_size,
        "index_fields": list(INDEX_FIELDS),
        "config": asdict(cfg),
    }
    identity = _identity(model, model_name or model.name, corpus, cfg, plan, stream.packing)
    rank, world = rank_and_world()
    if rank == 0:  # only one process creates, cleans and lists; the others write shard directories
        writer = StoreWriter.open(out, identity, info, tokenizer=model.tokenizer)
        if verify_existing:
            _drop_corrupt(writer)
    if world > 1:
        dist.barrier()
        if rank != 0:
            writer = StoreWriter(Path(out), json.loads((Path(out) / MANIFEST).read_text()))
    done = [0]

    def tick(n: int, skipped: bool = False) -> None:
        done[0] += n
        if progress is not None:
            progress(HarvestProgress(done[0] * world, target * L, skipped))  # this process' share, scaled

    n_shards = 0
    mine: list[dict] = []  # records this process wrote in the current round of `world` shards
    for i, contexts in enumerate(_chain(first, shards)):
        n_shards = i + 1
        if i % world == rank:
            record = writer.shards.get(i)
            if record is not None and record["rows"] == len(contexts) * L:
                tick(record["rows"], skipped=True)
            else:
                index, documents, acts = _compute_shard(model, contexts, cfg, plan, tick)
                mine.append(
                    writer.write_files(
                        i,
                        index,
                        documents,
                        acts,
                        contexts=len(contexts),
                        first_context=i * cfg.shard_contexts,
                    )
                )
        if i % world == world - 1:
            _list(writer, mine, world)
            mine = []
    _list(writer, mine, world)  # the last, partial round
    if rank == 0:
        for i in [i for i in writer.shards if i >= n_shards]:  # a smaller n_tokens than last time
            writer.drop(i)
        if writer.manifest["n_tokens"] < target * L:
            log.warning(
                "corpus %r ran out after %d of %d tokens",
                corpus.name,
                writer.manifest["n_tokens"],
                target * L,
            )
        writer.finish()
    if world > 1:
        dist.barrier()
    return ActivationStore.open(out)


def _list(writer: StoreWriter, records: list[dict], world: int) -> None:
    """List the shards every process wrote this round, from process 0 (the manifest's only writer)."""
    if world == 1:
        writer.add(records)
        return
    gathered: list[list[dict]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, records)
    if dist.get_rank() == 0:
        writer.add([r for part in gathered for r in part])


def _chain(first: list[Context], rest: Iterator[list[Context]]) -> Iterator[list[Context]]:
    yield first
    yield from rest
