"""FactoredMatrix against the dense computation."""

from __future__ import annotations

import pytest
import torch

from mechscope.circuits.factored import FactoredMatrix


@pytest.fixture
def fm() -> FactoredMatrix:
    g = torch.Generator().manual_seed(0)
    return FactoredMatrix(
        torch.randn(3, 12, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 12, generator=g, dtype=torch.float64),
    )


def test_products_and_transposes_equal_dense(fm):
    dense = fm.A @ fm.B
    assert fm.shape == dense.shape and fm.mdim == 4
    torch.testing.assert_close(fm.AB, dense)
    torch.testing.assert_close(fm.T.AB, dense.mT)
    other = torch.randn(12, 5, dtype=torch.float64)
    torch.testing.assert_close((fm @ other).AB, dense @ other)
    torch.testing.assert_close((other.T @ fm).AB, other.T @ dense)
    torch.testing.assert_close((fm @ fm).AB, dense @ dense)
    torch.testing.assert_close((2.0 * fm).AB, 2 * dense)
    torch.testing.assert_close(fm[1].AB, dense[1])


def test_lookup_equals_dense(fm):
    dense = fm.AB
    torch.testing.assert_close(fm.row(3), dense[:, 3])
    torch.testing.assert_close(fm.column(7), dense[:, :, 7])
    torch.testing.assert_close(fm.row(torch.tensor([1, 2])), dense[:, [1, 2]])
    torch.testing.assert_close(fm.diagonal(), dense.diagonal(dim1=-2, dim2=-1))


def test_spectra_equal_dense(fm):
    dense = fm.AB
    U, S, Vh = fm.svd()
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[..., :4])
    torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh, dense)
    torch.testing.assert_close(fm.norm(), torch.linalg.matrix_norm(dense))
    dense_eig = torch.linalg.eigvals(dense)
    top = dense_eig[torch.arange(3)[:, None], dense_eig.abs().argsort(-1, descending=True)[:, :4]]
    torch.testing.assert_close(fm.eigenvalues.abs().sort(-1).values, top.abs().sort(-1).values)


def test_mismatched_factors_are_refused():
    # In tests jaxtyping refuses the call first; in production the ValueError does.
    with pytest.raises(Exception, match="inner dimensions|k=3"):
        FactoredMatrix(torch.randn(4, 3), torch.randn(2, 4))
