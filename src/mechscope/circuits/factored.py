"""FactoredMatrix: a low-rank product ``A @ B`` kept factored.

Circuits read off the weights are products like ``W_E W_Q W_K^T W_E^T`` (``d_vocab x d_vocab``,
rank at most ``d_head``). Materialising them costs ``d_vocab^2`` memory (2.4 GB for a 49k
vocabulary in float32); keeping ``A [.., m, k]`` and ``B [.., k, n]`` costs ``(m + n) k``.
Everything here (SVD, eigenvalues, norms, products, row/column lookup) works on the factors,
with any leading batch axes (e.g. ``[n_heads, ...]``) broadcast, following TransformerLens'
``FactoredMatrix`` vocabulary.
"""

from __future__ import annotations

from functools import cached_property

import torch
from jaxtyping import Float
from torch import Tensor


class FactoredMatrix:
    """The matrix ``A @ B`` with ``A [... m k]`` and ``B [... k n]`` never multiplied out unless asked."""

    def __init__(self, A: Float[Tensor, "... m k"], B: Float[Tensor, "... k n"]):
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"inner dimensions differ: A is {tuple(A.shape)}, B is {tuple(B.shape)}")
        self.A, self.B = A, B

    # ------------------------------------------------------------------ shape
    @property
    def shape(self) -> torch.Size:
        batch = torch.broadcast_shapes(self.A.shape[:-2], self.B.shape[:-2])
        return torch.Size((*batch, self.A.shape[-2], self.B.shape[-1]))

    @property
    def ldim(self) -> int:
        return self.A.shape[-2]

    @property
    def rdim(self) -> int:
        return self.B.shape[-1]

    @property
    def mdim(self) -> int:
        """The inner (factored) dimension: an upper bound on the rank."""
        return self.A.shape[-1]

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, inner={self.mdim})"

    # ------------------------------------------------------------------ algebra
    @property
    def AB(self) -> Float[Tensor, "... m n"]:
        """The full matrix (materialised)."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[Tensor, "... k k"]:
        """``B @ A`` (square when ``m == n``): same nonzero eigenvalues as ``AB``, ``k x k`` only."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square AB, got {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        return FactoredMatrix(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    def __matmul__(self, other: Tensor | FactoredMatrix) -> FactoredMatrix:
        if isinstance(other, FactoredMatrix):
            # Keep the smaller inner dimension factored.
            if self.mdim <= other.mdim:
                return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
            return FactoredMatrix(self.A @ (self.B @ other.A), other.B)
        if other.ndim == 1:
            return FactoredMatrix(self.A, (self.B @ other).unsqueeze(-1))
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other: Tensor) -> FactoredMatrix:
        if other.ndim == 1:
            return FactoredMatrix((other @ self.A).unsqueeze(-2), self.B)
        return FactoredMatrix(other @ self.A, self.B)

    def __mul__(self, scalar: float) -> FactoredMatrix:
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def __getitem__(self, index) -> FactoredMatrix:
        """Index leading (batch) axes, e.g. ``ov[head]``; use :meth:`row`/:meth:`column` for entries."""
        index = index if isinstance(index, tuple) else (index,)
        batch = self.shape[:-2]
        if len(index) > len(batch):
            raise IndexError("index only the batch axes; use .row(i) / .column(j) for matrix entries")
        A = self.A.expand(*batch, *self.A.shape[-2:])[index]
        B = self.B.expand(*batch, *self.B.shape[-2:])[index]
        return FactoredMatrix(A, B)

    def row(self, i: int | Tensor) -> Float[Tensor, "... n"]:
        """Row(s) ``i`` of ``AB``, computed from the factors."""
        return (
            self.A[..., i, :].unsqueeze(-2).matmul(self.B).squeeze(-2)
            if isinstance(i, int)
            else self.A[..., i, :] @ self.B
        )

    def column(self, j: int | Tensor) -> Float[Tensor, "... m"]:
        """Column(s) ``j`` of ``AB``."""
        if isinstance(j, int):
            return (self.A @ self.B[..., :, j].unsqueeze(-1)).squeeze(-1)
        return self.A @ self.B[..., :, j]

    def diagonal(self) -> Float[Tensor, "... m"]:
        """The diagonal of a square ``AB`` without materialising it."""
        if self.ldim != self.rdim:
            raise ValueError(f"diagonal needs a square AB, got {tuple(self.shape)}")
        return torch.einsum("...ik,...ki->...i", self.A, self.B)

    # ------------------------------------------------------------------ spectra
    @cached_property
    def _svd(self) -> tuple[Tensor, Tensor, Tensor]:
        # AB = Qa Ra Rb^T Qb^T with thin QRs; the SVD of the k x k core gives AB's SVD.
        Qa, Ra = torch.linalg.qr(self.A)
        Qb, Rb = torch.linalg.qr(self.B.transpose(-1, -2))
        U, S, Vh = torch.linalg.svd(Ra @ Rb.transpose(-1, -2))
        return Qa @ U, S, Vh @ Qb.transpose(-1, -2)

    def svd(self) -> tuple[Float[Tensor, "... m k"], Float[Tensor, "... k"], Float[Tensor, "... k n"]]:
        """Thin SVD ``U, S, Vh`` with ``AB = U diag(S) Vh`` (``Vh`` is V transposed, as in torch)."""
        return self._svd

    @property
    def S(self) -> Float[Tensor, "... k"]:
        return self._svd[1]

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of a square ``AB`` (the nonzero ones are those of ``BA``; complex in general)."""
        return torch.linalg.eigvals(self.BA)

    def norm(self) -> Float[Tensor, ...]:
        """Frobenius norm, from the singular values."""
        return self.S.pow(2).sum(-1).sqrt()
