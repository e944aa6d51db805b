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

CUDA_MIN_D_SAE = 65_536
"""On CUDA the dense matmuls are fast enough that the sparse kernels pay only from about this width. H200,
d_in 576, k 32, batch 4096, one Adam step (``benchmarks/bench_gpu.py``): dense 3.1x faster at d_sae 4608
and 1.9x at 18432; at 73728 sparse 1.05x faster with 2.7x less memory. On the CPU they pay at every width."""


def use_sparse(device: torch.device, d_sae: int) -> bool:
    """Whether a training step on ``device`` should take the sparse kernels (see :data:`CUDA_MIN_D_SAE`)."""
    return device.type != "cuda" or d_sae >= CUDA_MIN_D_SAE


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
        if ctx.needs_input_grad[0]:  # [batch, d_in]: the chosen encoder columns, weighted
            grad_x = F.embedding_bag(idx, W_enc.t().contiguous(), per_sample_weights=grad, mode="sum")
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


def sparse_code(values: Float[Tensor, "batch k"], idx: Int[Tensor, "batch k"], d_sae: int) -> Tensor:
    """The code as a sparse COO ``[batch d_sae]`` tensor (for statistics; no gradient). A dense one would
    cost a ``batch x d_sae`` allocation per step, more than the sparse backward itself."""
    rows = torch.arange(values.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
    return torch.sparse_coo_tensor(
        torch.stack([rows, idx.flatten()]),
        values.detach().flatten(),
        (values.shape[0], d_sae),
        check_invariants=False,
    )


def active_latents(acts: Tensor) -> tuple[Tensor, Tensor]:
    """``(fired [d_sae] bool, number of non-zero entries)`` of a dense or sparse COO code ``[batch d_sae]``."""
    if not acts.is_sparse:
        active = acts > 0
        return active.any(0), active.sum()
    positive = acts._values() > 0
    fired = torch.zeros(acts.shape[1], dtype=torch.bool, device=acts.device)
    fired[acts._indices()[1][positive]] = True
    return fired, positive.sum()
