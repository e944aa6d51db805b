"""A byte-level tokenizer built in code, so ``tiny-*`` models need no download.

Ids 0-255 are the bytes (GPT-2's byte-to-unicode alphabet), then ``<bos>`` 256, ``<eos>`` 257,
``<pad>`` 258. Any text round-trips.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIALS = ("<bos>", "<eos>", "<pad>")


@lru_cache(maxsize=1)
def _tokenizer_object() -> Tokenizer:
    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)} | {s: 256 + i for i, s in enumerate(SPECIALS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level tokenizer (vocab 259)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer_object(), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
