"""Text <-> tokens with one BOS policy per family and padding that keeps positions right.

Batches of strings of different lengths are padded on the right by default (as TransformerLens
does): every real token keeps the position it would have alone, and the returned attention mask
marks the padding. ``padding_side="left"`` is available (generation uses it); the model then
passes position ids computed from the mask, so positions stay correct either way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mechscope.models.errors import TokenizationError


class Tokens(NamedTuple):
    """A tokenised batch."""

    ids: Int[Tensor, "batch pos"]
    """Token ids, padded with the pad id."""
    mask: Int[Tensor, "batch pos"] | None
    """1 for real tokens, 0 for padding; None when nothing is padded."""


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def encode(tokenizer: PreTrainedTokenizerBase, text: str, *, prepend_bos: bool) -> list[int]:
    """One string to ids, with a BOS in front iff ``prepend_bos``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise TokenizationError(
                "prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False"
            )
        ids = [tokenizer.bos_token_id] + ids
    return ids


def to_tokens(
    tokenizer: PreTrainedTokenizerBase,
    text: str | list[str],
    *,
    prepend_bos: bool,
    padding_side: str = "right",
    device: torch.device | str | None = None,
) -> Tokens:
    """Strings to a padded id tensor and its mask (mask None if no row is padded)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise ValueError("no text to tokenize: pass a string or a non-empty list of strings")
    rows = [encode(tokenizer, t, prepend_bos=prepend_bos) for t in texts]
    width = max(len(r) for r in rows)
    if width == 0:
        raise TokenizationError("the text tokenizes to nothing; pass non-empty text or prepend_bos=True")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if padding_side == "right" else slice(width - len(r), width)
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    padded = bool((mask == 0).any())
    return Tokens(ids.to(device), mask.to(device) if padded else None)


def to_str_tokens(tokenizer: PreTrainedTokenizerBase, ids: Tensor | list[int]) -> list[str]:
    """Each token id decoded on its own (a 1-D sequence)."""
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if ids and isinstance(ids[0], list):
        raise ValueError("to_str_tokens takes one sequence; index the batch first")
    return [tokenizer.decode([i]) for i in ids]


def to_single_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """The id of ``text`` if it is exactly one token, else a TokenizationError listing the pieces."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise TokenizationError(
            f"{text!r} is {len(ids)} tokens {pieces}, not one; pick a single-token string "
            "(often with a leading space, e.g. ' Paris') or use to_tokens"
        )
    return ids[0]


def default_prepend_bos(tokenizer: PreTrainedTokenizerBase, family_default: bool | None) -> bool:
    """The family's BOS policy, else whatever the tokenizer does with ``add_special_tokens``."""
    if family_default is not None:
        return family_default and tokenizer.bos_token_id is not None
    return _adds_bos(tokenizer)
