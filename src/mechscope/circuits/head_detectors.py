"""Head detectors: which heads do previous-token, duplicate-token and induction attention.

Behavioural scores come from the heads' real attention patterns on repeated random tokens
(Olsson et al. 2022, "In-context Learning and Induction Heads"): a sequence ``[BOS] r r`` where
``r`` is ``seq_len`` random tokens. For a query in the second copy at position ``i``:

* previous-token: attention to ``i - 1`` (averaged over every query position ``>= 1``);
* duplicate-token: attention to ``i - seq_len``, the same token's earlier occurrence;
* induction: attention to ``i - seq_len + 1``, the token *after* the earlier occurrence.

Each score is the mean attention weight on the target, so 1.0 is a perfect head and chance is
about ``1 / position``. The weight-based copying score is the positive-eigenvalue fraction
``sum(lambda) / sum(|lambda|)`` of the head's OV circuit (Elhage et al. 2021): near 1 for heads
whose output raises the logit of the token they attend to.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.circuits.qk_ov import ov_circuit
from mechscope.models import HookedModel

DETECTORS = ("previous_token", "duplicate_token", "induction")


def repeated_tokens(
    model: HookedModel, seq_len: int = 32, batch: int = 8, seed: int = 0, vocab: Tensor | None = None
) -> Int[Tensor, "batch pos"]:
    """``[BOS] r r`` with ``r`` uniformly random tokens from ``vocab`` (default: every non-special token)."""
    g = torch.Generator().manual_seed(seed)
    if vocab is None:
        special = set(model.tokenizer.all_special_ids)
        vocab = torch.tensor(
            [i for i in range(min(model.cfg.d_vocab, len(model.tokenizer))) if i not in special]
        )
    r = vocab[torch.randint(len(vocab), (batch, seq_len), generator=g)]
    parts = [r, r]
    bos = model.tokenizer.bos_token_id
    if bos is not None:
        parts.insert(0, torch.full((batch, 1), bos))
    return torch.cat(parts, dim=1).to(model.device)


@torch.no_grad()
def head_scores(
    model: HookedModel, seq_len: int = 32, batch: int = 8, seed: int = 0, vocab: Tensor | None = None
) -> dict[str, Float[Tensor, "n_layers n_heads"]]:
    """Every detector's score for every head, from one run on repeated random tokens.

    ``vocab`` restricts the random tokens (e.g. to the bytes a byte-level toy model was trained
    on: tokens it never saw say nothing about its heads).
    """
    tokens = repeated_tokens(model, seq_len, batch, seed, vocab)
    offset = tokens.shape[1] - 2 * seq_len  # 1 with a BOS
    _, cache = model.run_with_cache(tokens, lambda n: n.endswith("hook_pattern"))
    pattern = cache.stack("attn.hook_pattern").float()  # [layer batch head q_pos k_pos]
    q = torch.arange(offset + seq_len, tokens.shape[1])  # queries in the second copy
    prev_q = torch.arange(1, tokens.shape[1])
    return {
        "previous_token": pattern[..., prev_q, prev_q - 1].mean((1, 3)),
        "duplicate_token": pattern[..., q, q - seq_len].mean((1, 3)),
        "induction": pattern[..., q, q - seq_len + 1].mean((1, 3)),
    }


@torch.no_grad()
def copying_scores(model: HookedModel) -> Float[Tensor, "n_layers n_heads"]:
    """Positive-eigenvalue fraction of each head's OV circuit (1 = pure copying)."""
    out = torch.empty(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        eig = ov_circuit(model, layer).eigenvalues  # [n_heads d_head], complex
        out[layer] = (eig.sum(-1).real / eig.abs().sum(-1)).float()
    return out
