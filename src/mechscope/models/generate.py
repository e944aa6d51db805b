"""Generation with hooks active at every step.

HF's ``generate`` runs with its KV cache: the prompt in one forward, then one forward per new
token. Hooks stay attached for the whole call, so a steering hook applies to the prompt and to
every generated token (a hook that edits fixed positions should check ``activation.shape[1]``,
which is 1 on the cached steps). Prompts are left-padded so every row ends at the same position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechscope.models.errors import ContextTooLongError

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel, HookSpec


def generate(
    model: HookedModel,
    input: str | list[str] | Tensor,
    *,
    attention_mask: Tensor | None = None,
    hooks: HookSpec = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    prepend_bos: bool | None = None,
    use_cache: bool = True,
    return_tokens: bool = False,
    **generate_kwargs: Any,
) -> str | list[str] | Tensor:
    """Continue ``input`` by ``max_new_tokens`` tokens, greedily unless ``do_sample``.

    A batch of token ids must be left-padded, with its ``attention_mask`` (``model.tokenize(texts,
    padding_side="left")`` gives both).

    Returns:
        The prompt plus continuation as text (a list for a list of prompts), or the token ids with
        ``return_tokens=True``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    single = isinstance(input, str) or (isinstance(input, Tensor) and input.ndim == 1)
    toks = model.prepare(input, attention_mask, prepend_bos, padding_side="left")
    if toks.ids.shape[1] + max_new_tokens > model.cfg.n_ctx:
        raise ContextTooLongError(
            f"{toks.ids.shape[1]} prompt tokens + {max_new_tokens} new exceed the context of {model.cfg.n_ctx}"
        )
    mask = toks.mask if toks.mask is not None else torch.ones_like(toks.ids)
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else {}
    if seed is not None:
        torch.manual_seed(seed)
    with model.hooks(hooks), torch.no_grad():
        out = model.hf_model.generate(
            input_ids=toks.ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=pad,
            use_cache=use_cache,
            **sampling,
            **generate_kwargs,
        )
    if return_tokens:
        return out[0] if single else out
    # Drop the left padding; keep the prompt, as TransformerLens does.
    texts = [
        tok.decode(row[int((m == 0).sum()) :], skip_special_tokens=True)
        for row, m in zip(out, mask, strict=True)
    ]
    return texts[0] if single else texts
