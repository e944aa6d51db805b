"""Activations for probing: one forward per batch caches every requested hook point at once.

A probe reads one vector per example. Which vector is a choice with consequences, so it is explicit:

* ``read="last"`` — the last real token of each prompt (padding skipped). For a causal model this is
  the only position that has seen the whole prompt, so it is the default for per-prompt labels.
* ``read="mean"`` — the mean over the prompt's real tokens.
* ``read="all"`` — every real token is an example (per-token labels; see :func:`flatten_token_labels`).
* ``read=<int>`` — one position counted over real tokens (``0`` = the first, BOS when the model
  prepends one; ``-2`` = the one before last).

The forward stops after the deepest block any requested point lives in, and the cache keeps only the
rows read, so probing 30 layers costs one truncated forward per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.models.errors import MechscopeError
from mechscope.models.hook_names import parse

Read = str | int


class ProbeError(MechscopeError, ValueError):
    """Probe or CCS input that cannot be fitted: labels that do not match the examples, a hook point with
    no variance, a single class, an unknown ``read`` mode, a missing optional package."""


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed CPU work on one intra-op thread (restored after).

    Probe fitting is many small matmuls; extra threads only add sync cost, and on a busy machine they
    spin: measured on a loaded 2-core box, a circle fit took 28 s with 2 threads and 0.07 s with one
    (toy/superposition.py does the same for the same reason).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def default_probe_hooks(model) -> list[str]:
    """The residual stream before block 0 (the embeddings) and after every block: the usual probe sweep."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]


def _stop_layer(model, names: Sequence[str]) -> int | None:
    """The first block no requested point needs (None: run the whole model)."""
    deepest = -1
    for n in names:
        layer, _ = parse(n)
        if layer is None and n not in ("hook_embed", "hook_pos_embed"):
            return None  # ln_final, raw HF paths: need the full forward
        deepest = max(deepest, -1 if layer is None else layer)
    return None if deepest + 1 >= model.cfg.n_layers else deepest + 1


def _rows(act: Tensor, mask: Tensor, read: Read) -> Tensor:
    lengths = mask.sum(1)
    if read == "last":
        return act[torch.arange(act.shape[0]), lengths - 1]
    if read == "mean":
        m = mask.unsqueeze(-1).to(act.dtype)
        return (act * m).sum(1) / m.sum(1)
    if read == "all":
        return act[mask.bool()]
    pos = torch.full_like(lengths, read) if read >= 0 else lengths + read
    if bool((pos < 0).any() or (pos >= lengths).any()):
        raise ProbeError(
            f"read={read} is outside a prompt of {int(lengths.min())} real tokens; pick a valid position"
        )
    return act[torch.arange(act.shape[0]), pos]


def gather_activations(
    model,
    texts: Sequence[str],
    names: Sequence[str] | None = None,
    *,
    read: Read = "last",
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Float[Tensor, "_example _width"]]:
    """Each text's activation at each hook point, as float32 on the CPU.

    Args:
        model: a :class:`~mechscope.HookedModel`.
        texts: the prompts (a list, not a single string).
        names: hook points; default :func:`default_probe_hooks` (embeddings + every ``resid_post``).
        read: which position(s) become examples (see the module docstring).
        batch_size: prompts per forward pass.
        progress: called as ``progress(done, total)`` after each batch.

    Returns:
        ``{hook name: [example width]}``; with ``read="all"`` the examples are the real tokens of every
        text in order.
    """
    if isinstance(texts, str) or not len(texts):
        raise ProbeError("texts must be a non-empty list of strings (got a single string or nothing)")
    if not (read in ("last", "mean", "all") or isinstance(read, int)):
        raise ProbeError(f"read must be 'last', 'mean', 'all' or an int position, got {read!r}")
    names = list(names) if names is not None else default_probe_hooks(model)
    for n in names:
        model.hook_point(n)  # an unknown name raises with the closest valid ones
    stop = _stop_layer(model, names)
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for start in range(0, len(texts), batch_size):
        toks = model.tokenize(list(texts[start : start + batch_size]))  # right-padded: positions stay put
        mask = torch.ones_like(toks.ids) if toks.mask is None else toks.mask
        with torch.no_grad():
            _, cache = model.run_with_cache(toks.ids, names, stop_at_layer=stop, attention_mask=toks.mask)
        for n in names:
            out[n].append(_rows(cache[n], mask, read).float().cpu())
        if progress is not None:
            progress(min(start + batch_size, len(texts)), len(texts))
    return {n: torch.cat(v) for n, v in out.items()}


def flatten_token_labels(model, texts: Sequence[str], labels: Sequence[Sequence]) -> list:
    """Per-token labels (one list per text, one entry per real token) flattened in ``read="all"`` order.

    The lengths are checked against the tokenizer so a label never lands on the wrong token.
    """
    if len(labels) != len(texts):
        raise ProbeError(f"{len(labels)} label lists for {len(texts)} texts; give one list per text")
    flat: list = []
    for i, (text, row) in enumerate(zip(texts, labels, strict=True)):
        n = len(model.to_str_tokens(text))
        if len(row) != n:
            raise ProbeError(
                f"text {i} has {n} tokens ({model.to_str_tokens(text)}) but {len(row)} labels; "
                "give one label per token, BOS included when the model prepends one"
            )
        flat.extend(row)
    return flat
