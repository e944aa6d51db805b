"""Fixed-length contexts from a corpus: tokenise, pack across documents, shuffle by seed, index.

Activations are harvested on contexts of exactly ``context_length`` tokens, so that a batch needs
no padding and every stored row is a real token. How they are made, once and for all:

**Tokenising.** Each document is tokenised on its own, without special tokens; empty documents
are skipped.

**Packing.** The token stream is ``SEP doc0 SEP doc1 SEP doc2 ...``. ``SEP`` is the model's BOS
token when the model prepends one (GPT-2, Pythia, Gemma); otherwise ``<|endoftext|>`` if the
vocabulary has it (the document separator that GPT-2-style BPE models such as SmolLM2 were
pre-trained with), otherwise EOS, otherwise nothing. Contexts are cut from the stream one after
another. When the model prepends BOS, each context is BOS followed by ``context_length - 1``
stream tokens, and a separator that would come right after that BOS is dropped (never ``BOS
BOS``). A document longer than a context simply continues into the next one, and the tail
shorter than one context at the end of the corpus is dropped. This is the packing of
SAELens/TransformerLens ``tokenize_and_concatenate``.

**Shuffling.** Documents pass through a seeded shuffle buffer of ``document_buffer`` documents,
then contexts through one of ``context_buffer`` contexts (a buffer at least as large as the
corpus is a uniform permutation). The seed is part of the store's identity, so the same seed
gives the same contexts in the same order on any machine.

**Index.** Every row of a context carries ``(token, document, token_offset, char_offset)``:
the document's ordinal in the corpus, the token's position in that document's tokens, and the
character where the token starts in the document's text. BOS and separators have document -1.
With the document table (:class:`DocumentInfo` per document id) any activation row can be traced
back to its text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np
from jaxtyping import Int
from transformers import PreTrainedTokenizerBase

from mechscope.data.corpus import Corpus, CorpusError, Document
from mechscope.models.errors import ContextTooLongError

INDEX_FIELDS = ("token", "document", "token_offset", "char_offset")
"""The columns of a context's index rows (int32)."""
SPECIAL = -1
"""The document id of BOS and separator rows."""
_INT32_MAX = 2**31 - 1
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class ContextConfig:
    """How a corpus becomes contexts; every field is part of an activation store's identity."""

    context_length: int = 128
    """Tokens per context, BOS included."""
    seed: int = 0
    """Seed of both shuffle buffers."""
    prepend_bos: bool | None = None
    """Start each context with BOS; None: the model's own policy (``model.prepend_bos``)."""
    document_buffer: int = 1024
    """Documents held for shuffling (1: corpus order)."""
    context_buffer: int = 4096
    """Contexts held for shuffling (1: stream order)."""

    def __post_init__(self):
        if self.context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {self.context_length}")
        if self.document_buffer < 1 or self.context_buffer < 1:
            raise ValueError(
                f"document_buffer and context_buffer must be >= 1 (1 = no shuffling), "
                f"got {self.document_buffer} and {self.context_buffer}"
            )


class DocumentInfo(NamedTuple):
    """What the index keeps about one document."""

    source: str
    n_chars: int
    n_tokens: int


class Context(NamedTuple):
    """One context: its index rows and the documents they come from."""

    index: Int[np.ndarray, "pos field"]
    """``[context_length, 4]`` int32 rows of :data:`INDEX_FIELDS`."""
    documents: dict[int, DocumentInfo]


@dataclass(frozen=True)
class Packing:
    """The special tokens of the packing (see the module docstring)."""

    bos: int | None
    """Token that starts every context, or None."""
    separator: int | None
    """Token before every document, or None."""


def packing_for(tokenizer: PreTrainedTokenizerBase, prepend_bos: bool) -> Packing:
    """The BOS/separator choice of the module docstring for this tokenizer."""
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise CorpusError("prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False")
        return Packing(tokenizer.bos_token_id, tokenizer.bos_token_id)
    endoftext = tokenizer.get_vocab().get("<|endoftext|>")
    if endoftext is not None:
        return Packing(None, endoftext)
    return Packing(None, tokenizer.eos_token_id)


def buffer_shuffle(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Yield ``items`` shuffled through a buffer of ``size`` (uniform when ``size`` >= their number)."""
    buf: list[T] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = x
    for j in rng.permutation(len(buf)):
        yield buf[int(j)]


class ContextStream:
    """The contexts of one (corpus, tokenizer, config), in their seeded order; re-iterable.

    Args:
        corpus: the documents.
        tokenizer: the model's tokenizer.
        cfg: context length, seed and buffers.
        prepend_bos: the resolved BOS policy (``cfg.prepend_bos`` if set, else the model's).
    """

    def __init__(
        self, corpus: Corpus, tokenizer: PreTrainedTokenizerBase, cfg: ContextConfig, *, prepend_bos: bool
    ):
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.packing = packing_for(tokenizer, prepend_bos)

    def __iter__(self) -> Iterator[Context]:
        rng = np.random.default_rng([self.cfg.seed, 2])
        return buffer_shuffle(self._packed(), self.cfg.context_buffer, rng)

    def _documents(self) -> Iterator[tuple[int, Document]]:
        rng = np.random.default_rng([self.cfg.seed, 1])
        return buffer_shuffle(enumerate(self.corpus), self.cfg.document_buffer, rng)

    def _encode(self, doc_id: int, doc: Document) -> Int[np.ndarray, "n field"] | None:
        """A document's index rows, its separator first; None when it has no tokens."""
        if doc_id > _INT32_MAX or len(doc.text) > _INT32_MAX:
            raise CorpusError(f"document {doc_id} ({doc.source}) is too large for the int32 index")
        try:
            enc = self.tokenizer(
                doc.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )
            starts = [s for s, _ in enc["offset_mapping"]]
        except NotImplementedError:  # slow tokenizers have no offsets: keep token offsets only
            enc = self.tokenizer(doc.text, add_special_tokens=False, verbose=False)
            starts = [SPECIAL] * len(enc["input_ids"])
        ids = enc["input_ids"]
        if not ids:
            return None
        n = len(ids)
        rows = np.empty((n, 4), dtype=np.int32)
        rows[:, 0] = ids
        rows[:, 1] = doc_id
        rows[:, 2] = np.arange(n)
        rows[:, 3] = starts
        sep = self.packing.separator
        if sep is None:
            return rows
        return np.concatenate([np.array([[sep, SPECIAL, SPECIAL, SPECIAL]], dtype=np.int32), rows])

    def _cut(self, buf: np.ndarray, pos: int) -> tuple[np.ndarray, int] | None:
        """The context starting at ``buf[pos]`` and the position after it, or None if too few tokens."""
        bos = self.packing.bos
        if bos is not None and pos < len(buf) and buf[pos, 1] == SPECIAL and buf[pos, 0] == bos:
            pos += 1  # the separator is the BOS itself: never BOS BOS
        need = self.cfg.context_length - (bos is not None)
        if len(buf) - pos < need:
            return None
        rows = buf[pos : pos + need]
        if bos is not None:
            rows = np.concatenate([np.array([[bos, SPECIAL, SPECIAL, SPECIAL]], dtype=np.int32), rows])
        return rows, pos + need

    def _packed(self) -> Iterator[Context]:
        buf = np.empty((0, 4), dtype=np.int32)
        pos = 0
        infos: dict[int, DocumentInfo] = {}
        for doc_id, doc in self._documents():
            rows = self._encode(doc_id, doc)
            if rows is None:
                continue
            buf = np.concatenate([buf[pos:], rows])
            pos = 0
            live = set(np.unique(buf[:, 1]).tolist())
            infos = {d: i for d, i in infos.items() if d in live}
            infos[doc_id] = DocumentInfo(doc.source, len(doc.text), int((rows[:, 1] >= 0).sum()))
            while (cut := self._cut(buf, pos)) is not None:
                index, pos = cut
                docs = {int(d): infos[int(d)] for d in np.unique(index[:, 1]) if d != SPECIAL}
                yield Context(index, docs)


def context_stream(model, corpus: Corpus, cfg: ContextConfig | None = None) -> ContextStream:
    """The contexts of ``corpus`` for ``model`` (its tokenizer and BOS policy), checked against its context window."""
    cfg = cfg or ContextConfig()
    if cfg.context_length > model.cfg.n_ctx:
        raise ContextTooLongError(
            f"context_length {cfg.context_length} exceeds the model's context window of {model.cfg.n_ctx}; "
            f"use --context-length {model.cfg.n_ctx} or less"
        )
    bos = model.prepend_bos if cfg.prepend_bos is None else cfg.prepend_bos
    return ContextStream(corpus, model.tokenizer, cfg, prepend_bos=bos)
