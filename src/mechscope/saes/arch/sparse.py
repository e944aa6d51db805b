"""Sparse training kernels for SAEs whose latents are k per token (TopK).

With ``k`` of ``d_sae`` latents active, a dense training step wastes most of its work: the decoder's
``acts @ W_dec`` and every backward matmul multiply mostly zeros. Here only the encoder's forward stays
dense (it must score every latent to pick the top k). The kept pre-activations get a backward that
touches only the chosen latents (``torch.sparse.mm`` over ``batch * k`` entries), and the decoder is an
``embedding_bag`` over the chosen rows of ``W_dec``. Same maths as the dense path (a test compares the
losses and every gradient); about ``d_sae / k`` times less work outside the encoder's forward. This is
the approach of EleutherAI's sparsify, written with stock PyTorch ops so it runs on CPU and GPU alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

SPARSE_DTYPES = (torch.float32, torch.float64)
"""Dtypes ``torch.sparse.mm`` supports on every device; others take the dense path."""


class GatheredPreActs(torch.autograd.Function):
    """``out[b, j] = x[b] . W_enc[:, idx[b, j]] + b_enc[idx[b, j]]``, with ``values`` (those numbers, already
    computed by the dense forward) returned as is and a backward that is sparse in the latents."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor, values: Tensor) -> Tensor:
        ctx.save_for_backward(x, W_enc, idx)
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc, idx = ctx.saved_tensors
        batch, k = idx.shape
        d_sae = W_enc.shape[1]
        rows = torch.arange(batch, device=idx.device).repeat_interleave(k)
        # [d_sae, batch], one entry per kept pre-activation.
        g_t = torch.sparse_coo_tensor(
            torch.stack([idx.flatten(), rows]), grad.flatten(), (d_sae, batch), check_invariants=False
        )
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.sparse.mm(g_t.t(), W_enc.t())  # [batch, d_in]
        if ctx.needs_input_grad[1]:
            grad_w = torch.sparse.mm(g_t, x).t()  # [d_in, d_sae]
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device)
            grad_b.index_add_(0, idx.flatten(), grad.flatten())
        return grad_x, grad_w, grad_b, None, None


def gathered_pre_acts(
    x: Float[Tensor, "batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    pre: Float[Tensor, "batch d_sae"],
    idx: Int[Tensor, "batch k"],
) -> Float[Tensor, "batch k"]:
    """The pre-activations ``pre`` (computed without grad) at ``idx``, differentiable w.r.t. the encoder."""
    return GatheredPreActs.apply(x, W_enc, b_enc, idx, pre.gather(-1, idx))


def sparse_decode(
    values: Float[Tensor, "batch k"], idx: Int[Tensor, "batch k"], W_dec: Float[Tensor, "d_sae d_out"]
) -> Float[Tensor, "batch d_out"]:
    """``sum_j values[b, j] * W_dec[idx[b, j]]`` (no bias)."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=values, mode="sum")


def scatter_dense(
    values: Float[Tensor, "batch k"], idx: Int[Tensor, "batch k"], d_sae: int
) -> Float[Tensor, "batch d_sae"]:
    """The dense ``[batch d_sae]`` code (for statistics; no gradient)."""
    return values.new_zeros(values.shape[0], d_sae).scatter_(-1, idx, values.detach())
