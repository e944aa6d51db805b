"""Contexts: packing worked out by hand, the index traced back to the text, seeded shuffling, errors."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

import mechscope as ms
from mechscope.data.contexts import SPECIAL, ContextConfig, ContextStream, buffer_shuffle, context_stream
from mechscope.data.corpus import Corpus, CorpusError
from mechscope.models.errors import ContextTooLongError
from mechscope.models.tiny import _tokenizer_object

# The tiny models' byte tokenizer: ids 0-255 are bytes, <bos> 256, <eos> 257.
BOS, EOS = 256, 257
TEXTS = ["abc", "defgh"]


@pytest.fixture(scope="module")
def llama() -> ms.HookedModel:  # no BOS: separator is EOS
    return ms.load_model("tiny-llama")


@pytest.fixture(scope="module")
def gpt2() -> ms.HookedModel:  # prepends BOS, which is also the separator
    return ms.load_model("tiny-gpt2")


def _unshuffled(length: int, **kw) -> ContextConfig:
    return ContextConfig(context_length=length, document_buffer=1, context_buffer=1, **kw)


def _ids(s: str) -> list[int]:
    return list(s.encode())


def test_packing_without_bos_by_hand(llama):
    stream = context_stream(llama, Corpus.from_texts(TEXTS), _unshuffled(4))
    assert stream.packing.bos is None and stream.packing.separator == EOS
    got = [c.index[:, 0].tolist() for c in stream]
    # stream: EOS a b c EOS d e f g h -> two contexts, the tail "g h" dropped
    assert got == [[EOS, *_ids("abc")], [EOS, *_ids("def")]]


def test_packing_with_bos_by_hand(gpt2):
    stream = context_stream(gpt2, Corpus.from_texts(TEXTS), _unshuffled(4))
    assert stream.packing.bos == BOS == stream.packing.separator
    contexts = list(stream)
    # stream: BOS a b c BOS d e f g h; the second context would start BOS BOS: one is dropped
    assert [c.index[:, 0].tolist() for c in contexts] == [[BOS, *_ids("abc")], [BOS, *_ids("def")]]
    assert contexts[1].index.tolist() == [
        [BOS, SPECIAL, SPECIAL, SPECIAL],
        [ord("d"), 1, 0, 0],
        [ord("e"), 1, 1, 1],
        [ord("f"), 1, 2, 2],
    ]
    assert contexts[1].documents == {1: ("texts:1", 5, 5)}


def test_documents_continue_across_contexts_and_mid_document_contexts_start_with_bos(gpt2):
    stream = context_stream(gpt2, Corpus.from_texts(["abcdefghij", "xyz"]), _unshuffled(4))
    got = [c.index[:, 0].tolist() for c in stream]
    # BOS abcdefghij BOS xyz: [BOS a b c] [BOS d e f] [BOS g h i] [BOS j BOS x]... the separator stays
    # inside a context (it marks the boundary); only one that would follow the row-start BOS goes.
    assert got == [
        [BOS, *_ids("abc")],
        [BOS, *_ids("def")],
        [BOS, *_ids("ghi")],
        [BOS, ord("j"), BOS, ord("x")],
    ]


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_index_traces_every_row_back_to_its_text(which, request):
    model = request.getfixturevalue(which)
    texts = ["The cat sat on the mat.", "", "A dog ran!", "Short", "x" * 300, "Ünïcödé ok"]
    corpus = Corpus.from_texts(texts)
    contexts = list(context_stream(model, corpus, ContextConfig(context_length=16, seed=3)))
    tokenizer = model.tokenizer
    seen: dict[int, list[int]] = {}
    for c in contexts:
        assert c.index.shape == (16, 4) and c.index.dtype == np.int32
        for token, doc, tok_off, char_off in c.index.tolist():
            if doc == SPECIAL:
                assert token in (BOS, EOS)
                continue
            text = texts[doc]
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # independent re-tokenisation
            assert ids[tok_off] == token
            if text.isascii():
                assert text[char_off] == tokenizer.decode([token])
            seen.setdefault(doc, []).append(tok_off)
            assert c.documents[doc] == (f"texts:{doc}", len(text), len(ids))
    assert 1 not in seen  # the empty document has no rows
    for offsets in seen.values():
        assert sorted(offsets) == list(range(len(offsets)))  # each token once, none skipped before the tail


def test_shuffling_is_seeded(llama):
    corpus = Corpus.from_texts([f"document number {i} " * (i % 5 + 1) for i in range(60)])

    def order(seed):
        return [
            c.index[:, 0].tobytes()
            for c in context_stream(llama, corpus, ContextConfig(context_length=8, seed=seed))
        ]

    assert order(0) == order(0)
    assert order(0) != order(1)
    plain = [c.index[:, 0].tobytes() for c in context_stream(llama, corpus, _unshuffled(8))]
    assert order(0) != plain
    # Shuffling only contexts (documents in corpus order) permutes the same contexts.
    cfg = ContextConfig(context_length=8, document_buffer=1, context_buffer=10_000, seed=5)
    assert sorted(c.index[:, 0].tobytes() for c in context_stream(llama, corpus, cfg)) == sorted(plain)


def test_buffer_shuffle():
    rng = np.random.default_rng(0)
    items = list(range(100))
    out = list(buffer_shuffle(items, 10, rng))
    assert sorted(out) == items and out != items
    assert list(buffer_shuffle(items, 1, np.random.default_rng(0))) == items
    # Item i enters a buffer of 10 when i - 10 items have left it, so it leaves no sooner.
    assert all(pos >= item - 9 for pos, item in enumerate(out))
    assert list(buffer_shuffle(items, 10, np.random.default_rng(0))) == out


def test_errors(llama):
    corpus = Corpus.from_texts(["abc"])
    with pytest.raises(ContextTooLongError, match="exceeds the model's context window of 128"):
        context_stream(llama, corpus, ContextConfig(context_length=129))
    with pytest.raises(ValueError, match="context_length must be at least 2"):
        ContextConfig(context_length=1)
    with pytest.raises(ValueError, match="document_buffer and context_buffer must be >= 1"):
        ContextConfig(context_buffer=0)
    no_bos = PreTrainedTokenizerFast(tokenizer_object=_tokenizer_object(), eos_token="<eos>")
    with pytest.raises(CorpusError, match="no BOS token"):
        ContextStream(corpus, no_bos, ContextConfig(), prepend_bos=True)
