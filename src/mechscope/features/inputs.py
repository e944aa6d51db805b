"""Where a build's activations come from: the model run over a corpus, or an activation store on disk.

Both yield the same thing, batch after batch of whole contexts: the index rows ``[batch pos 4]``
(token, document, token_offset, char_offset, as in :mod:`mechscope.data.contexts`), the source
hook's activations ``[batch * pos, d_in]``, and the source labels of the documents they touch. A
build reads contexts ``start .. stop`` of the stream, so a resumed build continues where it stopped.

* :class:`CorpusInput`: the corpus's fixed-length contexts, each batch one forward that stops
  after the hook's layer (:func:`~mechscope.saes.harvest.harvest_batch`). Resuming tokenises the
  contexts already counted but runs no model on them.
* :class:`StoreInput`: the contexts of a harvested :class:`~mechscope.saes.store.ActivationStore`
  (``mechscope harvest``), in store order, read from its memory-mapped shards: no forward at all.
  The store must hold the source's hook and come from the same model (weight fingerprint). Its
  context settings replace ``FeatureConfig.contexts``, since the store fixed them at harvest time.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.data.contexts import ContextConfig, context_stream
from mechscope.data.corpus import Corpus, load_corpus
from mechscope.features.sources import FeatureSource
from mechscope.models.hooked import HookedModel
from mechscope.saes.harvest import harvest_batch, model_fingerprint, plan_hooks
from mechscope.saes.store import ActivationStore, IncompatibleStoreError

Batch = tuple[Int[Tensor, "batch pos 4"], Float[Tensor, "rows d_in"], dict[int, str]]


class CorpusInput:
    """The model's activations on the corpus's contexts, computed batch by batch."""

    def __init__(
        self, model: HookedModel, src: FeatureSource, corpus: Corpus | str | Path, contexts: ContextConfig
    ):
        self.model, self.hook = model, src.hook
        self.corpus = load_corpus(corpus)
        self.contexts = contexts
        self.plan = plan_hooks(model, [src.hook])  # unknown hook / no per-token vector: an error now
        self.name = f"corpus {self.corpus.name!r}"

    def identity(self) -> dict[str, Any]:
        return {"corpus": self.corpus.description}

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[Batch]:
        contexts = islice(iter(context_stream(self.model, self.corpus, self.contexts)), start, stop)
        while batch := list(islice(contexts, batch_size)):
            index = torch.from_numpy(np.stack([c.index for c in batch]))
            acts = harvest_batch(self.model, index[..., 0].long(), self.plan)[self.hook]
            yield index, acts, {d: info.source for c in batch for d, info in c.documents.items()}


class StoreInput:
    """Activations read from a harvested store, context by context in store order."""

    def __init__(self, model: HookedModel, src: FeatureSource, store: ActivationStore):
        want = store.identity.get("model_fingerprint")
        if want != model_fingerprint(model):
            raise IncompatibleStoreError(
                f"store {store.root} was harvested from {store.identity.get('model')!r}, whose weights differ "
                f"from {model.name or 'the model given'!r}: build from that model, or harvest a new store"
            )
        store.check(hook=src.hook)  # same model, so the hook's width is the source's
        self.store, self.hook = store, src.hook
        self.name = f"store {store.root}"
        ident = store.identity
        self.contexts = ContextConfig(
            context_length=ident["context_length"],
            seed=ident["seed"],
            prepend_bos=ident.get("bos") is not None,
            document_buffer=ident["document_buffer"],
            context_buffer=ident["context_buffer"],
        )

    def identity(self) -> dict[str, Any]:
        # The store's own identity names its corpus, model and contexts; its path is not part of it.
        return {"corpus": self.store.identity["corpus"], "store": self.store.identity}

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[Batch]:
        L = self.store.context_length
        stop = min(stop, self.store.n_tokens // L)
        for first in range(start, stop, batch_size):
            n = min(batch_size, stop - first)
            rows = np.arange(first * L, (first + n) * L)
            index = torch.from_numpy(self.store.index_rows(rows)).view(n, L, 4)
            acts = self.store.read(self.hook, rows)
            yield index, acts, self._sources(index[..., 1].reshape(-1), first * L)

    def _sources(self, documents: Tensor, first_row: int) -> dict[int, str]:
        """Each document's source label, looked up at one of its rows (``locate`` reads its shard's table)."""
        ids, inverse = torch.unique(documents, return_inverse=True)
        first = torch.full((len(ids),), len(documents)).scatter_reduce(
            0, inverse, torch.arange(len(documents)), "amin"
        )
        return {
            int(d): self.store.locate(first_row + int(r)).source
            for d, r in zip(ids, first, strict=True)
            if d >= 0
        }


def open_input(
    model: HookedModel,
    src: FeatureSource,
    data: Corpus | str | Path | ActivationStore,
    contexts: ContextConfig,
) -> CorpusInput | StoreInput:
    """The input for ``data``: a store is read as it is, anything else is a corpus for the model to run on."""
    if isinstance(data, ActivationStore):
        return StoreInput(model, src, data)
    return CorpusInput(model, src, data, contexts)
