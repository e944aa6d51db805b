"""Where an SAE's training rows come from: an activation store on disk, or the model itself, streamed.

A source yields shuffled batches of activations (``x``, or ``(x, target)`` for a transcoder) as a
deterministic function of ``(seed, start_step)``: that is what makes a resumed training run identical
to an uninterrupted one, and lets every process of a data-parallel run read the same global batch.

**Streaming** (:class:`StreamSource`) runs the model on the corpus's contexts (stopping after the
hook's layer) and never touches the disk. Rows are shuffled within blocks of ``block_contexts``
contexts, each block by its own seeded permutation; the contexts themselves already come in a seeded
shuffled order (:mod:`mechscope.data.contexts`). A block's row count follows from its tokens alone, so
resuming at step ``s`` skips whole blocks *without running the model* and recomputes only the block in
which step ``s`` begins. When the corpus runs out the stream starts over (a new epoch: same contexts,
new permutations).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from itertools import count, islice
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.data.contexts import SPECIAL, ContextConfig, context_stream
from mechscope.data.corpus import Corpus, CorpusError, load_corpus
from mechscope.models import HookedModel
from mechscope.saes.store import ActivationStore

Batch = Float[Tensor, "batch d_in"] | tuple[Float[Tensor, "batch d_in"], Float[Tensor, "batch d_out"]]


@runtime_checkable
class ActivationSource(Protocol):
    """What :class:`~mechscope.saes.train.Trainer` reads from."""

    hook: str
    out_hook: str | None

    @property
    def widths(self) -> tuple[int, int]:
        """``(d_in, d_out)``."""

    def identity(self) -> dict[str, Any]:
        """What the rows are (recorded with the run; a resume from other rows is refused)."""

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[Batch]:
        """Endless shuffled batches; the same ``(seed, start_step)`` gives the same batches."""


def _split(rows: Tensor | tuple[Tensor, ...], out_hook: str | None) -> Batch:
    if isinstance(rows, Tensor):
        return rows
    return rows if out_hook else rows[0]


class StoreSource:
    """Rows of one hook point (and a transcoder's target hook) from an :class:`ActivationStore`."""

    def __init__(
        self,
        store: ActivationStore | str | Path,
        hook: str | None = None,
        out_hook: str | None = None,
        *,
        exclude_special: bool = True,
        device: torch.device | str | None = None,
    ):
        self.store = store if isinstance(store, ActivationStore) else ActivationStore.open(store)
        hooks = list(self.store.hooks)
        if hook is None:
            if len(hooks) != 1:
                raise ValueError(f"the store holds {hooks}: choose one with hook=")
            hook = hooks[0]
        for h in (hook, out_hook):
            if h is not None:
                self.store._hook(h)  # raises IncompatibleStoreError naming the hooks it has
        self.hook, self.out_hook = hook, out_hook
        self.exclude_special = exclude_special
        self.device = device

    @property
    def widths(self) -> tuple[int, int]:
        h = self.store.hooks
        return h[self.hook], h[self.out_hook or self.hook]

    def identity(self) -> dict[str, Any]:
        m = self.store.manifest["identity"]
        # What the store holds, not where it is: a moved store (and run directory) still resumes.
        digest = hashlib.sha256(json.dumps(m, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {
            "source": "store",
            "store": digest,
            "model": m["model"],
            "model_fingerprint": m["model_fingerprint"],
            "hook": self.hook,
            "out_hook": self.out_hook,
            "n_tokens": self.store.n_tokens,
            "exclude_special": self.exclude_special,
        }

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[Batch]:
        hooks = (self.hook, self.out_hook) if self.out_hook else self.hook
        it = self.store.batches(
            hooks,
            batch_size,
            seed=seed,
            start_step=start_step,
            epochs=None,
            exclude_special=self.exclude_special,
            device=self.device,
        )
        return (_split(b, self.out_hook) for b in it)


class StreamSource:
    """Rows computed on the fly from ``model`` over ``corpus`` (no disk); see the module docstring."""

    def __init__(
        self,
        model: HookedModel,
        corpus: Corpus | str,
        hook: str,
        out_hook: str | None = None,
        *,
        contexts: ContextConfig | None = None,
        block_contexts: int = 64,
        batch_contexts: int = 16,
        exclude_special: bool = True,
    ):
        from mechscope.saes.harvest import model_fingerprint, plan_hooks

        self.model, self.hook, self.out_hook = model, hook, out_hook
        self.corpus = load_corpus(corpus)
        self.contexts = contexts or ContextConfig()
        self.stream = context_stream(model, self.corpus, self.contexts)  # checks the context length
        self.plan = plan_hooks(model, [hook] + ([out_hook] if out_hook else []))
        if block_contexts < 1 or batch_contexts < 1:
            raise ValueError("block_contexts and batch_contexts must be positive")
        self.block_contexts, self.batch_contexts = block_contexts, batch_contexts
        self.exclude_special = exclude_special
        self._fingerprint = model_fingerprint(model)

    @property
    def widths(self) -> tuple[int, int]:
        w = self.plan.widths
        return w[self.hook], w[self.out_hook or self.hook]

    def identity(self) -> dict[str, Any]:
        return {
            "source": "stream",
            "model": self.model.name,
            "model_fingerprint": self._fingerprint,
            "corpus": self.corpus.description,
            "contexts": asdict(self.contexts),
            "hook": self.hook,
            "out_hook": self.out_hook,
            "block_contexts": self.block_contexts,
            "exclude_special": self.exclude_special,
        }

    def _blocks(self) -> Iterator[np.ndarray]:
        """Index rows ``[contexts * L, 4]`` of successive blocks, forever (epochs)."""
        while True:  # epochs
            it = iter(self.stream)
            n = 0
            while block := list(islice(it, self.block_contexts)):
                n += len(block)
                yield np.concatenate([c.index for c in block])
            if n == 0:
                raise CorpusError(f"corpus {self.corpus.name!r} yields no context: it is empty or too short")

    def _rows(self, index: np.ndarray) -> tuple[Tensor, ...]:
        from mechscope.saes.harvest import harvest_batch

        L = self.contexts.context_length
        tokens = torch.from_numpy(index[:, 0].astype(np.int64)).reshape(-1, L)
        parts: list[dict[str, Tensor]] = []
        with torch.no_grad():
            for start in range(0, len(tokens), self.batch_contexts):
                parts.append(
                    harvest_batch(self.model, tokens[start : start + self.batch_contexts], self.plan)
                )
        hooks = [self.hook] + ([self.out_hook] if self.out_hook else [])
        return tuple(torch.cat([p[h] for p in parts]) for h in hooks)

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[Batch]:
        skip = start_step * batch_size
        pending: tuple[Tensor, ...] | None = None
        for b, index in enumerate(self._blocks()):
            keep = index[:, 1] != SPECIAL if self.exclude_special else np.ones(len(index), dtype=bool)
            n = int(keep.sum())
            if skip >= n:  # consumed before the resume point: no forward needed
                skip -= n
                continue
            perm = torch.from_numpy(np.random.default_rng([seed, b]).permutation(n))
            rows = tuple(r[torch.from_numpy(keep)][perm][skip:] for r in self._rows(index))
            skip = 0
            pending = (
                rows if pending is None else tuple(torch.cat(p) for p in zip(pending, rows, strict=True))
            )
            while len(pending[0]) >= batch_size:
                out = tuple(p[:batch_size] for p in pending)
                pending = tuple(p[batch_size:] for p in pending)
                yield _split(out, self.out_hook)


class TensorSource:
    """Rows already in memory (``x``, and a transcoder's ``target``): a new seeded permutation per epoch."""

    def __init__(
        self,
        x: Float[Tensor, "n d_in"],
        target: Float[Tensor, "n d_out"] | None = None,
        *,
        hook: str = "",
        out_hook: str | None = None,
    ):
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"x must be a non-empty [n d_in] matrix, got shape {tuple(x.shape)}")
        if target is not None and (target.ndim != 2 or len(target) != len(x)):
            raise ValueError(f"target must be [{len(x)} d_out], got shape {tuple(target.shape)}")
        self.x, self.target, self.hook, self.out_hook = x, target, hook, out_hook

    def __len__(self) -> int:
        return len(self.x)

    @property
    def widths(self) -> tuple[int, int]:
        return self.x.shape[1], (self.x if self.target is None else self.target).shape[1]

    def identity(self) -> dict[str, Any]:
        return {"source": "tensor", "rows": len(self.x), "widths": list(self.widths), "hook": self.hook}

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[Batch]:
        n = len(self.x)
        if batch_size > n:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {n} rows (lower batch_size or init_tokens)"
            )
        per_epoch = n // batch_size  # a partial batch at the end of an epoch is dropped
        order_epoch, order = -1, None
        for step in count(start_step):
            epoch, i = divmod(step, per_epoch)
            if epoch != order_epoch:
                order_epoch, order = (
                    epoch,
                    torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n)),
                )
            rows = order[i * batch_size : (i + 1) * batch_size]
            yield self.x[rows] if self.target is None else (self.x[rows], self.target[rows])
