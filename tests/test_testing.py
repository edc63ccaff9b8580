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


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_dense_eigenvalues_refuses_a_non_finite_matrix(bad):
    # NaN - NaN is NaN and NaN > tol is False: the symmetry check alone let a NaN matrix
    # through, and eigvalsh then made up eigenvalues ([0, -0]).
    A = np.diag([1.0, 2.0, 3.0])
    A[0, 0] = bad
    with pytest.raises(ValueError, match="1 non-finite entries"):
        dense_eigenvalues(A)
    np.testing.assert_allclose(dense_eigenvalues(np.diag([3.0, 1.0, 2.0])), [1.0, 2.0, 3.0])


def test_compare_refuses_non_finite_eigenvalues_and_bad_max_moment(rng):
    lam = np.linspace(1.0, 10.0, 10)
    A = sym_from_spectrum(lam, rng)
    d = specdens.slq(A, num_steps=5, num_probes=2, seed=0)
    for bad in (np.nan, np.inf):
        ev = lam.copy()
        ev[3] = bad
        with pytest.raises(ValueError, match="1 non-finite eigenvalues"):
            compare(d, ev)
    for m in (0, -1):
        with pytest.raises(ValueError, match="max_moment must be at least 1"):
            compare(d, lam, max_moment=m)
    for m in (2.5, True, "2"):
        with pytest.raises(TypeError, match="max_moment must be an integer"):
            compare(d, lam, max_moment=m)
    c = compare(d, lam, max_moment=1)  # the smallest valid choice: the mean eigenvalue
    np.testing.assert_allclose(c.moments, [lam.mean()], rtol=1e-14)
    assert c.moment_estimates.shape == (1,)


def test_dense_matrix_checks_block_size(rng):
    S = sym_from_spectrum(np.arange(1.0, 6.0), rng)
    ops = [S, specdens.aslinearoperator(S) + specdens.aslinearoperator(np.eye(5))]
    refs = [S, S + np.eye(5)]
    for op, ref in zip(ops, refs, strict=True):
        for bad in (-4, -1, 0):
            with pytest.raises(ValueError, match="block_size must be at least 1"):
                dense_matrix(op, block_size=bad)
        for bad in (2.5, True):
            with pytest.raises(TypeError, match="block_size must be an integer"):
                dense_matrix(op, block_size=bad)
        np.testing.assert_allclose(dense_matrix(op, block_size=2), ref, atol=1e-14)


def test_dense_matrix_is_a_new_array(rng):
    S = sym_from_spectrum(np.arange(1.0, 6.0), rng)
    A = S.copy()
    D = dense_matrix(A)
    np.testing.assert_array_equal(D, S)
    assert not np.shares_memory(D, A)
    D[0, 0] = 99.0  # the caller's matrix is left alone
    np.testing.assert_array_equal(A, S)
