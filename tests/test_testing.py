"""specdens.testing: dense references and distances."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import sym_from_spectrum

import specdens
from specdens.testing import compare, dense_eigenvalues, dense_matrix


def test_dense_eigenvalues_through_matmat(spectrum_matrix):
    A, lam = spectrum_matrix
    calls = []
    op = specdens.aslinearoperator(lambda v: A @ v, shape=A.shape, dtype="float64")
    op._fm = lambda V: (calls.append(V.shape[1]), A @ V)[1]
    np.testing.assert_allclose(dense_eigenvalues(op), lam, atol=1e-12)
    assert sum(calls) == A.shape[0]  # identity blocks, each column once
    np.testing.assert_array_equal(dense_matrix(A), A)


def test_dense_eigenvalues_torch_float32(spectrum_matrix):
    torch = pytest.importorskip("torch")
    A, lam = spectrum_matrix
    ev = dense_eigenvalues(torch.tensor(A, dtype=torch.float32))
    assert ev.dtype == np.float64
    np.testing.assert_allclose(ev, lam, atol=1e3 * np.finfo(np.float32).eps * 20)


def test_dense_eigenvalues_symmetry_test_follows_the_products_dtype(rng):
    """X^T X of a square float32 X plus a float64 matrix: dtype float64, products with
    float32 rounding, so max|G - G^T| of the dense matrix is ~eps32 ||G||, above
    sqrt(eps64) ||G|| but within the tolerance of the products, sqrt(eps32) ||G||:
    symmetric. Each column is a float32 product X^T (X e_j) with inner products of
    length n, off by at most gamma_n (|X|^T |X|) e_j (Higham, Thm 3.5), so by Weyl the
    eigenvalues are within n eps32 || |X|^T |X| ||_F of those of the exact X^T X."""
    n = 200
    X32 = rng.standard_normal((n, n)).astype(np.float32)
    X = specdens.aslinearoperator(X32)
    op = X.T @ X + specdens.aslinearoperator(np.zeros((n, n)))
    assert op.dtype == np.float64
    X64 = X32.astype(np.float64)
    exact = np.linalg.eigvalsh(X64.T @ X64)
    bound = n * np.finfo(np.float32).eps * np.linalg.norm(np.abs(X64).T @ np.abs(X64))
    np.testing.assert_allclose(dense_eigenvalues(op), exact, rtol=0, atol=bound)


def test_dense_eigenvalues_refuses_nonsymmetric(rng):
    B = rng.standard_normal((20, 20))
    with pytest.raises(ValueError, match="not symmetric"):
        dense_eigenvalues(B)
    np.testing.assert_allclose(dense_eigenvalues(B, symmetrize=True),
                               np.linalg.eigvalsh(0.5 * (B + B.T)))


def test_compare_exact_recovery_is_zero_distance(rng):
    lam = np.sort(rng.uniform(-2, 3, 40))
    A = sym_from_spectrum(lam, rng)
    d = specdens.slq(A, num_steps=40, num_probes=3)
    c = compare(d, lam)
    assert c.spectral_range == pytest.approx(lam[-1] - lam[0])
    assert 0 < c.wasserstein_relative < 1 and 0 < c.kolmogorov_smirnov <= 1
    # With a probe whose weights are exactly uniform (a diagonal matrix and a Rademacher
    # probe), the SLQ measure is the empirical one: every distance vanishes.
    dd = specdens.slq(np.diag(lam), num_steps=40)
    cd = compare(dd, lam)
    assert cd.wasserstein < 1e-12
    # Ritz values equal the eigenvalues to rounding only, so the two step CDFs may jump
    # one rounding error apart: KS is then one atom's mass at most.
    assert cd.kolmogorov_smirnov <= 1 / lam.size + 1e-12
    assert np.all(cd.moment_errors < 1e-12)
    assert "W1/range" in repr(cd)


def test_compare_detects_a_wrong_spectrum(rng):
    lam = np.linspace(0, 1, 50)
    d = specdens.slq(np.diag(lam), num_steps=50)
    c = compare(d, lam + 0.1)
    assert c.wasserstein == pytest.approx(0.1, rel=1e-9)
    with pytest.raises(ValueError, match="50"):
        compare(d, lam[:10])
