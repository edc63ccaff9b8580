"""Exact invariants of the Lanczos engine, in float64 against dense references."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import sym_from_spectrum

import specdens
import specdens.examples
from specdens.algorithms.lanczos import LanczosWarning

EPS = np.finfo(np.float64).eps


def test_lanczos_relation_and_orthogonality(spectrum_matrix):
    A, lam = spectrum_matrix
    m, k = 40, 3
    r = specdens.lanczos(A, m, num_probes=k, return_basis=True)
    norm_a = np.max(np.abs(lam))
    for i in range(k):
        Q = r.basis[i]  # (m, n), rows are Lanczos vectors
        T = r.tridiagonal_matrix(i)
        e_m = np.zeros(m)
        e_m[-1] = 1.0
        resid = A @ Q.T - Q.T @ T - r.beta[i, -1] * np.outer(r.last_vector[i], e_m)
        # Each column's error is a few rounding errors of a matvec plus CGS2 projections.
        assert np.max(np.abs(resid)) <= 50 * m * EPS * norm_a
        # CGS2 keeps orthogonality at the level of eps (Giraud, Langou & Rozloznik 2005).
        assert np.max(np.abs(Q @ Q.T - np.eye(m))) <= 10 * m * EPS
        assert abs(np.linalg.norm(r.last_vector[i]) - 1.0) <= 10 * EPS * np.sqrt(A.shape[0])
    assert r.reorth == "full"
    assert r.alpha.dtype == np.float64 and r.beta.dtype == np.float64
    assert r.matvecs == m * k
    assert r.asymmetry < 1e3 * EPS


def test_gauss_quadrature_exact_below_degree_2m(rng):
    n, m = 150, 6
    lam = rng.uniform(-1.0, 2.0, n)
    A = sym_from_spectrum(lam, rng)
    u = rng.standard_normal(n)
    u /= np.linalg.norm(u)
    d = specdens.slq(A, num_steps=m, probes=u)
    powers = np.arange(0, 2 * m)
    est = d.moments(powers).value
    exact = []
    v = u.copy()
    for _ in powers:
        exact.append(u @ v)
        v = A @ v
    exact = np.array(exact)
    scale = np.max(np.abs(lam)) ** powers
    # Exact up to rounding: the error of the p-th power sum grows like p * n * eps.
    assert np.all(np.abs(est - exact) <= 100 * (powers + 1) * EPS * scale)
    # ... and no longer exact at degree 2m (the rule is not exact there).
    v2m = u @ np.linalg.matrix_power(A, 2 * m) @ u
    assert abs(d.moments(2 * m).value - v2m) > 1e3 * EPS * np.max(np.abs(lam)) ** (2 * m)


def test_exact_recovery_when_steps_reach_n(rng):
    n = 25
    lam = np.sort(rng.uniform(-3.0, 4.0, n))
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    A = (Q * lam) @ Q.T
    A = 0.5 * (A + A.T)
    u = rng.standard_normal(n)
    u /= np.linalg.norm(u)
    d = specdens.slq(A, num_steps=200, probes=u)
    assert d.num_steps == n  # capped at n
    L = d.lengths[0]
    nodes, w = d.nodes[0, :L], d.weights[0, :L]
    np.testing.assert_allclose(np.sort(nodes), lam, atol=1e3 * EPS * np.max(np.abs(lam)))
    exact_w = (Q.T @ u) ** 2
    np.testing.assert_allclose(w[np.argsort(nodes)], exact_w, atol=1e-10)


def test_shift_equivariance(spectrum_matrix):
    A, lam = spectrum_matrix
    op = specdens.aslinearoperator(A)
    s = 3.25
    d0 = specdens.slq(op, num_steps=30, num_probes=2, seed=7)
    d1 = specdens.slq(op.shift(s), num_steps=30, num_probes=2, seed=7)
    scale = np.max(np.abs(lam)) + s
    np.testing.assert_allclose(d1.nodes, d0.nodes + s, atol=1e-10 * scale)
    np.testing.assert_allclose(d1.weights, d0.weights, atol=1e-9)


def test_indefinite_spectra_are_not_clamped(rng):
    lam = np.linspace(-5.0, -1.0, 80)
    A = sym_from_spectrum(lam, rng)
    d = specdens.slq(A, num_steps=20, num_probes=2)
    b = d.bounds()
    assert -5.0 - 1e-9 <= b.lower < -4.9 and -1.1 < b.upper <= -1.0 + 1e-9
    assert d.fraction_negative() == pytest.approx(1.0)
    assert np.all(d.nodes < 0)


def test_float32_outliers_far_above_the_bulk_do_not_stop_probes(rng):
    """A Hessian-like spectrum, bulk in [-0.05, 0.05] and outliers up to 1e3 (||T|| / bulk
    width = 1e4): the bulk's beta are ~1e-5 of ||T||, genuine, far above a float32
    product's rounding. Probes must not stop there (the former sqrt(eps32) = 3.4e-4
    threshold stopped them after ~12 steps, 2 bulk nodes each, and reported the rule as
    exact). The float32 run then matches the float64 one: the same number of bulk nodes,
    and the fraction of negative eigenvalues within the weight of one node (a node near 0
    may cross it under float32 rounding, eps32 ||A|| ~ 1e-4)."""
    n = 1500
    lam = np.r_[rng.uniform(-0.05, 0.05, n - 10), np.linspace(100.0, 1000.0, 10)]
    A = sym_from_spectrum(lam, rng)
    d64 = specdens.slq(A, num_steps=60, num_probes=2, seed=3)
    r32 = specdens.lanczos(A.astype(np.float32), 60, num_probes=2, seed=3)
    assert r32.basis_dtype == "float32"
    d32 = specdens.SpectralDensity.from_lanczos(r32)
    np.testing.assert_array_equal(d32.lengths, [60, 60])
    bulk = [np.sum(np.abs(d.nodes) < 1, axis=1) for d in (d64, d32)]
    np.testing.assert_array_equal(bulk[1], bulk[0])
    assert np.all(bulk[0] > 40)
    assert abs(d32.fraction_negative() - d64.fraction_negative()) <= d64.weights.max()
    # the float64 operator with a float32 basis (what reorth="auto" falls back to) too
    d = specdens.slq(A, num_steps=60, num_probes=2, seed=3, basis_dtype="float32")
    np.testing.assert_array_equal(d.lengths, [60, 60])


@pytest.mark.parametrize("top", [2e4, 1e5, 4e5])
def test_float32_arithmetic_does_not_stop_at_a_bulk_far_below_the_outliers(rng, top):
    """float32 arithmetic, a bulk uniform in [0, 1] under outliers at top, top / 2 and
    top / 5 (n = 1000). The bulk's beta are about its width, 0.3 / top of ||T|| (15 to 120
    eps32 ||T||): genuine, far above the ~1 eps32 ||T|| that a step's rounding leaves
    orthogonal to the basis. The former threshold, 100 eps32 ||T||, stopped every probe
    after 5 steps from top = 3e4 on with rules read as exact (the bulk drawn as five atoms,
    default width 2500 for 0.02). The probes must run their 60 steps, and the rule must be
    the float64 run's to float32 rounding: the same number of bulk nodes, and the CDF in
    the bulk within one weight (a node within rounding of the point may cross it). The
    default width is the median gap, never below the run's rounding floor ``f = 4 eps32
    max|theta|`` (each node is uncertain by ``f``, so each gap by ``2 f``): within ``2 f``
    of the float64 run's, or ``f`` itself."""
    n = 1000
    lam = np.concatenate([rng.uniform(0.0, 1.0, n - 3), [top, top / 2, top / 5]])
    A = sym_from_spectrum(lam, rng)
    d64 = specdens.slq(A, num_steps=60, num_probes=3, seed=2)
    d32 = specdens.slq(A, num_steps=60, num_probes=3, seed=2, dtype="float32")
    assert not np.any(d32.breakdown) and np.all(d32.lengths == 60)
    bulk = [np.sum(np.abs(d.nodes - 0.5) < 0.6, axis=1) for d in (d64, d32)]
    np.testing.assert_array_equal(bulk[1], bulk[0])
    assert abs(d32.cdf(0.5) - d64.cdf(0.5)) <= d64.weights.max()
    f = d32.rounding_floor()
    assert f == pytest.approx(4 * float(np.finfo(np.float32).eps) * top, rel=1e-6)
    s32, s64 = d32.default_sigma(), d64.default_sigma()
    assert s32 == f or abs(s32 - s64) <= 2 * f
    assert s32 >= f


def test_default_breakdown_tolerances():
    """float64 keeps 100 eps (2.2e-14 of ||T||); float32 arithmetic uses the run's rounding
    floor, 4 eps32 (4.8e-7), not 100 eps32 (1.2e-5, where a Hessian's bulk lives)."""
    from specdens.algorithms.lanczos import default_breakdown_tol

    assert default_breakdown_tol("float64") == 100 * EPS
    assert default_breakdown_tol("float32") == 4 * float(np.finfo(np.float32).eps)


def test_auto_budget_counts_every_kept_basis():
    """With return_basis=True every block's basis is kept, so reorth="auto" must fit all
    the probes' bases in max_basis_bytes, not one block's: 4 probes in blocks of 1 with a
    budget of two float64 bases chose a float64 basis and returned twice the budget.
    Now a float32 basis (exactly the budget) is chosen, and a budget below that is refused
    with an error that names it (local reorthogonalisation keeps no basis to return)."""
    n, m = 2000, 10
    A = np.diag(np.linspace(0.0, 1.0, n))
    budget = 2 * m * n * 8
    r = specdens.lanczos(A, m, num_probes=4, block_size=1, reorth="auto", return_basis=True,
                         max_basis_bytes=budget)
    assert (r.reorth, r.basis_dtype) == ("full", "float32")
    assert r.basis.nbytes <= budget
    with pytest.raises(ValueError, match="max_basis_bytes"):
        specdens.lanczos(A, m, num_probes=4, block_size=1, reorth="auto", return_basis=True,
                         max_basis_bytes=m * n * 8)
    # without return_basis one block's basis is what is held
    r = specdens.lanczos(A, m, num_probes=4, block_size=1, reorth="auto",
                         max_basis_bytes=m * n * 8)
    assert (r.reorth, r.basis_dtype) == ("full", "float64")


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 1.5, "1e-8", True])
def test_breakdown_tol_is_checked(bad):
    with pytest.raises(ValueError, match="breakdown_tol"):
        specdens.lanczos(np.eye(5), 3, breakdown_tol=bad)


def test_breakdown_on_identity():
    r = specdens.lanczos(np.eye(50), 30, num_probes=3)
    assert list(r.lengths) == [1, 1, 1] and r.breakdown.all()
    d = specdens.SpectralDensity.from_lanczos(r)
    assert np.all(d.nodes[:, 0] == 1.0) and np.all(d.weights[:, 0] == 1.0)
    assert np.all(d.weights[:, 1:] == 0.0)
    # numpy operators are checked every step, so the run stops once every probe broke down.
    assert r.matvecs == 3


def test_breakdown_on_low_rank_operator_keeps_quadrature_exact(rng):
    n, rank = 120, 4
    U = np.linalg.qr(rng.standard_normal((n, rank)))[0]
    dvals = np.array([-2.0, 1.0, 3.0, 6.0])
    A = (U * dvals) @ U.T
    u = rng.standard_normal(n)
    u /= np.linalg.norm(u)
    d = specdens.slq(A, num_steps=50, probes=u)
    L = d.lengths[0]
    assert L == rank + 1 and d.extra == {}
    r = specdens.lanczos(A, 50, probes=u)
    assert r.breakdown[0]
    nodes, w = d.nodes[0, :L], d.weights[0, :L]
    # exact measure: atoms at dvals with weights (U^T u)^2 and at 0 with the rest
    c = (U.T @ u) ** 2
    order = np.argsort(nodes)
    expect_nodes = np.sort(np.concatenate([dvals, [0.0]]))
    expect_w = np.concatenate([c[:1], [1 - c.sum()], c[1:]])
    np.testing.assert_allclose(nodes[order], expect_nodes, atol=1e-12)
    np.testing.assert_allclose(w[order], expect_w, atol=1e-12)
    for p in range(1, 12):  # exact for every degree after a breakdown
        assert d.moments(p).value == pytest.approx(u @ np.linalg.matrix_power(A, p) @ u,
                                                   rel=1e-10, abs=1e-12)


def test_probes_are_counter_seeded(spectrum_matrix):
    A, _ = spectrum_matrix
    r4 = specdens.lanczos(A, 20, num_probes=4, seed=3)
    r2 = specdens.lanczos(A, 20, num_probes=2, seed=3)
    rb = specdens.lanczos(A, 20, num_probes=4, seed=3, block_size=1)
    np.testing.assert_allclose(r4.alpha[:2], r2.alpha, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(r4.beta[:2], r2.beta, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(r4.alpha, rb.alpha, rtol=1e-12, atol=1e-14)
    other = specdens.lanczos(A, 20, num_probes=1, seed=4)
    assert not np.allclose(other.alpha[0], r4.alpha[0])


def test_one_matmat_per_step_for_the_whole_block(spectrum_matrix):
    A, _ = spectrum_matrix
    calls = []

    def matmat(V):
        calls.append(V.shape)
        return A @ V

    op = specdens.aslinearoperator(lambda v: A @ v, shape=A.shape, dtype="float64")
    op._fm = matmat
    specdens.lanczos(op, 12, num_probes=5)
    assert calls == [(A.shape[0], 5)] * 12


@pytest.mark.parametrize("mode", ["local", "none"])
def test_other_reorth_modes(spectrum_matrix, mode):
    A, lam = spectrum_matrix
    full = specdens.slq(A, num_steps=40, num_probes=2)
    other = specdens.slq(A, num_steps=40, num_probes=2, reorth=mode, window=8)
    assert other.reorth == mode
    # Extreme Ritz values converge in every mode (Paige 1971): the outlier at 20 is found.
    assert other.bounds().upper == pytest.approx(20.0, rel=1e-8)
    # Low moments are preserved even without reorthogonalisation (degree < 2m).
    np.testing.assert_allclose(other.moments([1, 2]).value, full.moments([1, 2]).value,
                               rtol=1e-6)


def test_auto_picks_by_memory_budget(spectrum_matrix):
    A, _ = spectrum_matrix
    n = A.shape[0]
    full = specdens.lanczos(A, 30, reorth="auto", max_basis_bytes=30 * n * 8)
    half = specdens.lanczos(A, 30, reorth="auto", max_basis_bytes=15 * n * 8)
    local = specdens.lanczos(A, 30, reorth="auto", max_basis_bytes=5 * n * 8)
    none = specdens.lanczos(A, 30, reorth="auto", max_basis_bytes=n * 8)
    assert (full.reorth, half.reorth, local.reorth, none.reorth) == (
        "full", "full", "local", "none")
    assert (full.basis_dtype, half.basis_dtype) == ("float64", "float32")
    assert local.window == 5
    # an explicit basis dtype is kept: then a window that fits
    kept = specdens.lanczos(A, 30, reorth="auto", basis_dtype="float64",
                            max_basis_bytes=15 * n * 8)
    assert (kept.reorth, kept.window, kept.basis_dtype) == ("local", 15, "float64")
    assert specdens.lanczos(A, 10, reorth="auto").reorth == "full"


def test_float32_basis(spectrum_matrix):
    A, _ = spectrum_matrix
    r = specdens.lanczos(A, 30, basis_dtype="float32", return_basis=True)
    assert r.basis.dtype == np.float32 and r.basis_dtype == "float32"
    Q = r.basis[0].astype(np.float64)
    assert np.max(np.abs(Q @ Q.T - np.eye(30))) <= 10 * 30 * np.finfo(np.float32).eps
    r64 = specdens.lanczos(A, 30)
    np.testing.assert_allclose(r.alpha, r64.alpha, atol=1e-4 * 20)


def test_float32_operator_with_float64_arithmetic(spectrum_matrix):
    A, _ = spectrum_matrix
    r = specdens.lanczos(A.astype(np.float32), 20)
    assert r.dtype == "float64" and r.alpha.dtype == np.float64
    r64 = specdens.lanczos(A, 20)
    # Products are rounded to float32: the coefficients agree to float32 accuracy.
    np.testing.assert_allclose(r.alpha, r64.alpha, atol=50 * np.finfo(np.float32).eps * 20)


def test_nan_from_operator_names_step_and_probe(spectrum_matrix):
    A, _ = spectrum_matrix
    count = {"n": 0}

    def matmat(V):
        count["n"] += 1
        out = A @ V
        if count["n"] == 4:
            out[3, 1] = np.nan
        return out

    op = specdens.aslinearoperator(lambda v: A @ v, shape=A.shape, dtype="float64")
    op._fm = matmat
    with pytest.raises(FloatingPointError, match=r"step 4 for probe 1"):
        specdens.slq(op, num_steps=10, num_probes=3)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_inf_from_operator_is_an_error(spectrum_matrix):
    A, _ = spectrum_matrix
    op = specdens.aslinearoperator(lambda v: A @ v * np.inf, shape=A.shape, dtype="float64")
    with pytest.raises(FloatingPointError, match="step 1 for probe 0"):
        specdens.slq(op, num_steps=5)


def test_asymmetry_is_detected(rng):
    B = rng.standard_normal((60, 60))
    with pytest.warns(LanczosWarning, match="not symmetric"):
        specdens.lanczos(B, 10)
    with pytest.raises(ValueError, match="not symmetric"):
        specdens.lanczos(B, 10, check_symmetry=True)
    S = B + B.T
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = specdens.lanczos(S, 10, check_symmetry=True)
    assert r.matvecs == 12  # two for the symmetry check


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda A: specdens.lanczos(A, 0), ValueError, "num_steps must be at least 1"),
        (lambda A: specdens.lanczos(A, 2.5), TypeError, "num_steps must be an integer"),
        (lambda A: specdens.lanczos(A, 5, num_probes=0), ValueError, "num_probes"),
        (lambda A: specdens.lanczos(A, 5, reorth="selective"), ValueError,
         "full, partial, local, none, auto"),
        (lambda A: specdens.lanczos(A, 5, probes="cauchy"), ValueError, "rademacher"),
        (lambda A: specdens.lanczos(A, 5, probes=np.ones(3)), ValueError, r"shape \(200,\)"),
        (lambda A: specdens.lanczos(A, 5, probes=np.zeros(200)), ValueError, "non-zero"),
        (lambda A: specdens.lanczos(A, 5, reorth="none", return_basis=True), ValueError,
         "return_basis"),
        (lambda A: specdens.lanczos(A, 5, dtype="float16"), TypeError, "float32 or float64"),
        (lambda A: specdens.lanczos(A[:, :10], 5), ValueError, "square"),
        (lambda A: specdens.lanczos(A.astype(np.complex128), 5), TypeError, "complex"),
        (lambda A: specdens.lanczos(np.zeros((0, 0)), 5), ValueError, "size 0"),
    ],
)
def test_bad_input_errors(spectrum_matrix, call, exc, match):
    A, _ = spectrum_matrix
    with pytest.raises(exc, match=match):
        call(A)


def test_integer_matrix_is_promoted(rng):
    A = np.array([[2, 1, 0], [1, 3, 1], [0, 1, 4]])
    d = specdens.slq(A, num_steps=5, probes=np.array([1.0, 0.5, 2.0]))
    np.testing.assert_allclose(np.sort(d.nodes[0, : d.lengths[0]]),
                               np.linalg.eigvalsh(A.astype(float)), atol=1e-12)


def test_operator_returning_wrong_shape_or_library(spectrum_matrix):
    A, _ = spectrum_matrix
    bad = specdens.aslinearoperator(lambda v: (A @ v)[:-1], shape=A.shape, dtype="float64")
    with pytest.raises(ValueError, match="returned shape"):
        specdens.lanczos(bad, 5)
    torch = pytest.importorskip("torch")
    wrong = specdens.aslinearoperator(lambda v: A @ v, shape=A.shape, dtype=torch.float64)
    with pytest.raises(TypeError, match="numpy"):
        specdens.lanczos(wrong, 5)


def test_gaussian_probes_are_unbiased_for_the_trace(rng):
    lam = np.concatenate([rng.uniform(0, 1, 95), [10, 20, 30, 40, 50]])
    A = sym_from_spectrum(lam, rng)
    d = specdens.slq(A, num_steps=10, num_probes=200, probes="gaussian")
    est = d.trace(lambda t: t)
    assert not np.allclose(d.probe_scales, 1.0)
    # the mean of 200 independent unbiased estimates is within 4 standard errors
    assert abs(est.value - lam.sum()) <= 4 * est.stderr
    sphere = specdens.slq(A, num_steps=10, num_probes=200, probes="sphere")
    assert np.all(sphere.probe_scales == 1.0)
    assert abs(sphere.trace(lambda t: t).value - lam.sum()) <= 4 * sphere.trace(lambda t: t).stderr


def test_progress_callback(spectrum_matrix):
    A, _ = spectrum_matrix
    seen = []
    specdens.lanczos(A, 7, num_probes=2, block_size=1, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (14, 14) and seen[0] == (1, 14)


# --------------------------------------------------------------------------- partial


@pytest.mark.parametrize("example", ["hessian_like", "marchenko_pastur"])
def test_partial_reorthogonalisation_matches_full(example, monkeypatch):
    """Simon (1984): keeping |q_i^T q_j| <= sqrt(eps) makes T_m the projection of A on an
    orthonormal basis of the Krylov space up to O(eps ||A||), so its Ritz values agree with
    those of full reorthogonalisation to a small multiple of eps ||A|| (5 eps measured)."""
    from specdens.algorithms import lanczos as engine

    A = getattr(specdens.examples, example)(1500, seed=2)
    sweeps = []
    advance = engine._Omega.advance
    monkeypatch.setattr(engine._Omega, "advance",
                        lambda self, *a, **k: sweeps.append(advance(self, *a, **k)) or sweeps[-1])
    full = specdens.lanczos(A, 80, num_probes=2, seed=4, reorth="full")
    part = specdens.lanczos(A, 80, num_probes=2, seed=4, reorth="partial", return_basis=True)
    # it reorthogonalised, and not at every step
    assert 0 < sum(sweeps) < 0.7 * len(sweeps)
    assert part.reorth == "partial"
    eps = np.finfo(np.float64).eps
    norm = float(np.max(np.abs(A.eigenvalues)))
    for i in range(2):
        ritz_full = np.linalg.eigvalsh(full.tridiagonal_matrix(i))
        ritz_part = np.linalg.eigvalsh(part.tridiagonal_matrix(i))
        assert np.max(np.abs(ritz_full - ritz_part)) <= 100 * eps * norm
        Q = np.asarray(part.basis[i])
        assert np.max(np.abs(Q @ Q.T - np.eye(Q.shape[0]))) <= np.sqrt(eps)
    assert part.asymmetry <= 100 * eps


def test_partial_reorthogonalisation_detects_asymmetry(rng):
    n = 400
    M = rng.standard_normal((n, n))
    S = (M + M.T) / np.sqrt(8 * n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        specdens.lanczos(S, 40, reorth="partial")
    B = S + 1e-5 * rng.standard_normal((n, n)) / np.sqrt(n)
    with pytest.warns(LanczosWarning, match="not symmetric"):
        specdens.lanczos(B, 40, reorth="partial")


@pytest.mark.parametrize("operator_dtype,basis_dtype", [("float64", "float32"),
                                                        ("float32", None)])
def test_partial_reorthogonalisation_at_float32_precision(operator_dtype, basis_dtype):
    """With a float32 basis, or a float32 operator under float64 arithmetic, orthogonality
    is lost at float32 speed: Simon's recurrence must count that rounding (else it
    reorthogonalises too late and ghosts appear)."""
    torch = pytest.importorskip("torch")
    A = specdens.examples.hessian_like(800, seed=1)
    T = torch.tensor(A.to_dense(), dtype=getattr(torch, operator_dtype))
    ref = specdens.lanczos(T, 60, reorth="full", basis_dtype=basis_dtype, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no false asymmetry warning either
        part = specdens.lanczos(T, 60, reorth="partial", basis_dtype=basis_dtype, seed=1)
    eps32 = float(np.finfo(np.float32).eps)
    norm = float(np.max(np.abs(A.eigenvalues)))
    # both runs are orthogonal to float32 precision only
    ritz = [np.linalg.eigvalsh(r.tridiagonal_matrix(0)) for r in (ref, part)]
    assert np.max(np.abs(ritz[0] - ritz[1])) <= 100 * eps32 * norm


def _clustered(width=1e-11):
    """n = 120, three clusters of 40 eigenvalues of the given width at -1, 0.5 and 2."""
    rng = np.random.default_rng(2)
    Q, _ = np.linalg.qr(rng.standard_normal((120, 120)))
    for w in (1e-6, 1e-9, width):  # (the draws of the reviewer's reproduction)
        lam = np.concatenate([c + w * rng.standard_normal(40) for c in (-1.0, 0.5, 2.0)])
    A = (Q * lam) @ Q.T
    return 0.5 * (A + A.T)


def _two_eigenvalues(n=80, seed=2):
    """Eigenvalues -1 and 2 (n / 2 each): every probe's Krylov space has dimension 2."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * np.repeat([-1.0, 2.0], n // 2)) @ Q.T
    return 0.5 * (A + A.T)


@pytest.mark.parametrize("reorth", ["partial", "full"])
@pytest.mark.parametrize("case", [
    # betas of 2e-11 ||T||: above the default breakdown_tol (100 eps64) but below eps32,
    # the basis's rounding (Ritz values at -15.4 for a spectrum in [-1, 2])
    ("clustered", 40, dict(num_probes=1, basis_dtype="float32")),
    # breakdown_tol=0: the probes go on past the breakdowns at ~eps ||T|| (alpha grew to
    # 8e17 in float32 arithmetic; Ritz values at 1e44 with a float32 basis)
    ("two", 60, dict(num_probes=2, dtype="float32", breakdown_tol=0.0)),
    ("two", 60, dict(num_probes=2, basis_dtype="float32", breakdown_tol=0.0)),
    ("two", 60, dict(num_probes=2, breakdown_tol=0.0)),
    # ... up to m = n with a float32 basis under float64 arithmetic: past the breakdown
    # the first two sweeps leave float32-basis rounding that the float64 noise does not
    # dominate (a third sweep; Ritz values at 1e8 ||A|| before)
    ("two30", 30, dict(num_probes=3, basis_dtype="float32", breakdown_tol=0.0)),
])
@pytest.mark.parametrize("device", [False, True])
def test_probes_past_the_rounding_of_beta_stay_orthogonal(reorth, case, device, monkeypatch):
    """A probe whose beta is below the rounding that Simon's recurrence resolves, but
    above breakdown_tol, stays active: its next vector (mostly rounding) must be
    reorthogonalised. The Ritz values then lie in the spectrum up to the rounding of m
    steps, m eps ||A|| (eps the coarsest dtype's), nothing reads as asymmetry, and the
    basis is orthogonal to CGS2's 10 m eps (full) or semi-orthogonal, sqrt(eps) (partial).
    On a device (the DGKS test deferred) partial reorthogonalisation does not run the
    block again: both sweeps run where the estimate says that the first cancels, as on
    the host; full reorthogonalisation runs it again with both sweeps (its first pass,
    discarded, may overflow)."""
    from specdens.algorithms import lanczos as engine
    from specdens.algorithms.quadrature import quadrature_rules

    name, m, kw = case
    A = {"clustered": _clustered, "two": _two_eigenvalues,
         "two30": lambda: _two_eigenvalues(30, 0)}[name]()
    lam = np.linalg.eigvalsh(A)
    norm = float(np.max(np.abs(lam)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no LanczosWarning, no overflow
        host = specdens.lanczos(A, m, reorth=reorth, return_basis=True, **kw)
    r = host
    if device:
        calls = []
        run_block = engine._run_block
        monkeypatch.setattr(engine, "_run_block", lambda *a, **k: calls.append(
            k.get("both_sweeps", False)) or run_block(*a, **k))
        monkeypatch.setattr(engine, "_reads_are_free", lambda op: False)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("error", LanczosWarning)
            r = specdens.lanczos(A, m, reorth=reorth, return_basis=True, **kw)
        if reorth == "partial":
            assert calls == [False]
            np.testing.assert_array_equal(r.alpha, host.alpha)
            np.testing.assert_array_equal(r.beta, host.beta)
    eps = max(np.finfo(r.dtype).eps, np.finfo(r.basis_dtype).eps)
    nodes, _, _ = quadrature_rules(r)
    orth_tol = 10 * m * eps if reorth == "full" else np.sqrt(eps)
    for i in range(r.num_probes):
        L = int(r.lengths[i])
        assert L > 2  # not stopped: the betas are above breakdown_tol
        assert np.all(nodes[i, :L] >= lam[0] - m * eps * norm)
        assert np.all(nodes[i, :L] <= lam[-1] + m * eps * norm)
        Q = np.asarray(r.basis[i][:L], dtype=np.float64)
        assert np.max(np.abs(Q @ Q.T - np.eye(L))) <= orth_tol


@pytest.mark.parametrize("reorth", ["full", "partial"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_vector_that_gram_schmidt_cannot_orthogonalise_ends_its_probe(reorth, dtype):
    """A = -1e6 I: every Krylov space is invariant after one step. torch's products leave
    beta ~ 1e-22 there, not 0, so with breakdown_tol=0 the probes went on from that
    rounding, every 'new' vector a copy of the first (|q_1^T q_2| = 1). Three sweeps that
    all cancel mean the vector is in the basis's span to working precision: the probe
    stops whatever breakdown_tol."""
    torch = pytest.importorskip("torch")
    r = specdens.lanczos(torch.tensor(-1e6 * np.eye(12)), 14, num_probes=3, reorth=reorth,
                         dtype=dtype, breakdown_tol=0.0)
    assert np.all(r.lengths == 1) and r.breakdown.all()
    np.testing.assert_allclose(r.alpha[:, 0], -1e6, rtol=4 * np.finfo(dtype).eps)


# --------------------------------------------------------------------------- deferred DGKS


def _low_rank(n=400, rank=30, seed=0):
    rng = np.random.default_rng(seed)
    return sym_from_spectrum(np.r_[np.zeros(n - rank), rng.uniform(1.0, 2.0, rank)], rng)


@pytest.mark.parametrize("example", ["hessian_like", "marchenko_pastur", "low_rank"])
@pytest.mark.parametrize("reorth", ["full", "local"])
def test_deferred_second_sweep_matches_the_host_decision(example, reorth, monkeypatch):
    """On a device the DGKS test is computed there and not read back: the second sweep is
    skipped, and only a block where a vector that stays active needed it runs again. Where
    none did, the arithmetic is the host path's, so the coefficients agree exactly (up to
    the residual norm at a breakdown, where the host path swept twice)."""
    from specdens.algorithms import lanczos as engine

    A = _low_rank() if example == "low_rank" else getattr(specdens.examples, example)(600,
                                                                                     seed=3)
    host = specdens.lanczos(A, 60, num_probes=3, seed=1, reorth=reorth)
    calls = []
    run_block = engine._run_block
    monkeypatch.setattr(engine, "_run_block", lambda *a, **k: calls.append(
        k.get("both_sweeps", False)) or run_block(*a, **k))
    monkeypatch.setattr(engine, "_reads_are_free", lambda op: False)
    device = specdens.lanczos(A, 60, num_probes=3, seed=1, reorth=reorth)
    assert calls == [False]  # no block ran again
    np.testing.assert_array_equal(device.lengths, host.lengths)
    if example == "low_rank" and reorth == "full":  # invariant after about rank steps
        assert np.all(host.lengths <= 40) and host.breakdown.all()
    for i, L in enumerate(host.lengths):
        np.testing.assert_array_equal(device.alpha[i, :L], host.alpha[i, :L])
        np.testing.assert_array_equal(device.beta[i, :L - 1], host.beta[i, :L - 1])


def test_deferred_second_sweep_runs_the_block_again_on_cancellation(monkeypatch):
    """An operator that puts a large multiple of the first Lanczos vector into every
    product makes the first Gram-Schmidt sweep cancel at every step: the deferred test
    finds it at the end and the block runs again with both sweeps, which agrees with the
    host path (which sweeps twice at exactly those steps) to rounding."""
    from specdens.algorithms import lanczos as engine

    n, gamma = 400, 1e4
    rng = np.random.default_rng(5)
    d = np.linspace(-1.0, 1.0, n)
    e = rng.standard_normal(n)
    e /= np.linalg.norm(e)
    u = rng.standard_normal(n)
    u /= np.linalg.norm(u)

    def matvec(v):
        return d * v + gamma * (u @ v) * e

    op = specdens.aslinearoperator(matvec, shape=(n, n), dtype="float64")
    with pytest.warns(LanczosWarning, match="not symmetric"):  # as it is not
        host = specdens.lanczos(op, 30, probes=e[:, None])
    calls = []
    run_block = engine._run_block
    monkeypatch.setattr(engine, "_run_block", lambda *a, **k: calls.append(
        k.get("both_sweeps", False)) or run_block(*a, **k))
    monkeypatch.setattr(engine, "_reads_are_free", lambda op: False)
    seen = []
    with pytest.warns(LanczosWarning, match="not symmetric"):
        device = specdens.lanczos(op, 30, probes=e[:, None],
                                  progress=lambda done, total: seen.append(done))
    assert calls == [False, True]
    assert seen == sorted(seen) and seen[-1] == 30  # the rerun does not report again
    assert device.matvecs == 2 * 30
    # Both paths sweep twice wherever the first sweep cancels; they differ only by a
    # second sweep at steps where it was not needed (rounding: a few eps ||T||). Without
    # the rerun the cancelled steps keep eps * gamma-sized errors (6e-13 ||T|| measured).
    scale = max(float(np.max(np.abs(host.alpha))), float(np.max(np.abs(host.beta))))
    np.testing.assert_allclose(device.alpha, host.alpha, rtol=0, atol=1e-14 * scale)
    np.testing.assert_allclose(device.beta, host.beta, rtol=0, atol=1e-14 * scale)


def test_operators_too_small_for_the_arithmetic_are_refused(rng):
    """Eigenvalues ~1e-25 in float32 arithmetic: the squares of the vectors' entries
    (~1e-52) underflow, beta reads 0 and probes "break down" with rules that look exact
    (eigsh returned 6.3e-26 for 2.9e-25 with converged=True). Refused with an error that
    says what to do; float64 arithmetic on the same matrix is right; the zero matrix is
    not refused."""
    n = 60
    lam = np.linspace(-2.0, 3.0, n) * 1e-25
    A = sym_from_spectrum(lam, rng).astype(np.float32)
    with pytest.raises(ValueError, match="too small for float32"):
        specdens.slq(A, num_steps=20, num_probes=2, dtype="float32")
    with pytest.raises(ValueError, match="too small for float32"):
        specdens.eigsh(A, k=2, dtype="float32")
    exact = np.linalg.eigvalsh(A.astype(np.float64))[-2:]
    np.testing.assert_allclose(specdens.eigsh(A, k=2).eigenvalues, exact, rtol=1e-6)
    assert specdens.slq(A, num_steps=20, num_probes=2).lengths.tolist() == [20, 20]
    Z = np.zeros((30, 30), dtype=np.float32)
    assert np.all(specdens.slq(Z, num_steps=5, dtype="float32").nodes == 0.0)


@pytest.mark.parametrize(("scale", "dtype"), [(1e160, "float64"), (1e300, "float64"),
                                              (1e25, "float32")])
def test_operators_too_large_for_the_arithmetic_are_refused_as_such(rng, scale, dtype):
    """Eigenvalues ~1e160 in float64 (1e25 in float32) arithmetic: every product is finite
    but the squares of its entries overflow, beta reads inf, and the run blamed the
    operator ("returned NaN or Inf... a broken matvec"). It is a ScaleError naming the
    scale and the remedy; one power of ten smaller than sqrt(max) / ||A|| runs, and the
    rule then is the scaled rule of the unit matrix, to rounding."""
    n = 40
    lam = np.linspace(1.0, 3.0, n)
    A = sym_from_spectrum(lam, rng)
    with np.errstate(all="ignore"), pytest.raises(specdens.algorithms.lanczos.ScaleError,
                                                  match=f"too large for {dtype}"):
        specdens.slq(scale * A, num_steps=10, dtype=dtype)
    small = float(np.sqrt(np.finfo(dtype).max)) / 10 / lam[-1] / np.sqrt(n)
    d = specdens.slq(small * A, num_steps=10, dtype=dtype)
    ref = specdens.slq(A, num_steps=10, dtype=dtype)
    eps = float(np.finfo(dtype).eps)
    np.testing.assert_allclose(d.nodes / small, ref.nodes, rtol=0, atol=1e3 * eps * lam[-1])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_operators_run_every_step(rng, dtype):
    """The breakdown threshold is 100 eps of the arithmetic (float64), not of the products:
    100 eps of bfloat16 is 0.78 ||T||, and a threshold there stopped every probe of this
    Hessian-like spectrum after 2 steps with a rule that read as exact (KPM's bounds run
    too, which then refused the spectrum). The half-precision run must take every step and
    its Ritz values must lie in the spectrum of the rounded matrix, to its product
    rounding (eps_half ||A|| times a few)."""
    torch = pytest.importorskip("torch")
    n = 200
    lam = np.r_[rng.uniform(0.0, 1.0, n - 5), [10.0, 20.0, 30.0, 40.0, 50.0]]
    At = torch.tensor(sym_from_spectrum(lam, rng), dtype=getattr(torch, dtype))
    r = specdens.lanczos(At, 40, num_probes=4, seed=0)
    np.testing.assert_array_equal(r.lengths, [40] * 4)
    exact = np.linalg.eigvalsh(At.double().numpy())
    nodes = specdens.SpectralDensity.from_lanczos(r).nodes
    slack = 10 * float(torch.finfo(getattr(torch, dtype)).eps) * 50.0
    assert nodes.min() >= exact[0] - slack and nodes.max() <= exact[-1] + slack
    k = specdens.kpm(At, num_moments=30, num_probes=2)
    assert np.all(np.isfinite(k.density()[1]))


def test_float32_products_floor_the_residual_bounds(rng):
    """Ritz values are exact only to the run's rounding (the coarser of the products' and
    the arithmetic's), so residual bounds are floored at 4 eps max|theta|. Without the
    floor, the bounds (down to 1e-18, or 0) were far below the ~1 eps32 spread of two
    probes' copies of one eigenvalue, and every spike was reported once per probe (50
    outliers for 5): with float32 products, float32 arithmetic, or a float32 term inside a
    float64 sum. Each bound must cover the distance to the exact spectrum."""
    from specdens.summary import outliers
    n = 400
    lam = np.r_[rng.uniform(0.0, 1.0, n - 5), [5.0, 6.0, 7.0, 8.0, 9.0]]
    A = sym_from_spectrum(lam, rng)
    A32 = A.astype(np.float32)
    shift = 1e-3
    cases = {  # name: (operator, options, its exact spectrum)
        "float64": (A, {}, np.linalg.eigvalsh(A)),
        "float32 products": (A32, {}, np.linalg.eigvalsh(A32.astype(np.float64))),
        "float32 arithmetic": (A32, {"dtype": "float32"},
                               np.linalg.eigvalsh(A32.astype(np.float64))),
        # a float64 sum whose float32 term still rounds its products in float32
        "float32 + float64 shift": (
            specdens.aslinearoperator(A32) + specdens.aslinearoperator(shift * np.eye(n)), {},
            np.linalg.eigvalsh(A32.astype(np.float64)) + shift),
    }
    for name, (op, options, exact) in cases.items():
        d = specdens.slq(op, num_steps=60, num_probes=6, seed=1, **options)
        found = outliers(d)
        assert len(found) == 5, (name, found)
        valid = d._valid()
        dist = np.min(np.abs(d.nodes[valid][:, None] - exact[None, :]), axis=1)
        assert np.all(dist <= d.residuals[valid] + 64 * np.finfo(float).eps * 9.0), name
        np.testing.assert_allclose([o.value for o in found], np.sort(exact)[-5:],
                                   rtol=4 * np.finfo(np.float32).eps * 9 / 5)


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("reorth", ["full", "partial"])
def test_basis_of_a_run_stopped_early_is_zero_past_its_steps(library, reorth):
    """numpy and torch make the basis without a zero fill (only written rows are read). A
    run that stops early (every probe broke down: 3 distinct eigenvalues, so 3 steps)
    returns rows it never wrote: they must be zero, not whatever memory held. Freed
    NaN-filled memory of the basis's size is offered to the allocator first."""
    A = sym_from_spectrum(np.repeat([1.0, 2.0, 5.0], 20), np.random.default_rng(3))
    if library == "torch":
        torch = pytest.importorskip("torch")
        A = torch.from_numpy(A)
    for _ in range(3):
        junk = np.full((2, 12, 60), np.nan) if library == "numpy" else \
            torch.full((2, 12, 60), float("nan"))
        del junk
        r = specdens.lanczos(A, 12, num_probes=2, seed=1, check_every=1, reorth=reorth,
                             return_basis=True)
        basis = np.asarray(r.basis)
        assert (r.lengths == 3).all() and r.breakdown.all()
        assert np.all(basis[:, 3:] == 0), basis[:, 3:]
        # the written rows are orthonormal Lanczos vectors
        for p in range(2):
            G = basis[p, :3] @ basis[p, :3].T
            assert np.abs(G - np.eye(3)).max() < 1e-12


def test_a_non_finite_product_input_is_not_reported_as_changed():
    """NaN != NaN: an input with NaN entries read as written into by the operator."""
    from specdens.algorithms._buffers import StepBuffers

    bufs = StepBuffers(np, 1, 3, np.float64, np.float64, np.float64, None, prev_owned=True,
                       host=True)
    x = np.array([[1.0, np.nan, 2.0]])
    with pytest.raises(FloatingPointError, match="NaN or Inf entries before the product"):
        bufs.check_unchanged(x, bufs.snapshot(x))
    y = np.array([[1.0, 3.0, 2.0]])
    before = bufs.snapshot(y)
    bufs.check_unchanged(y, before)
    y[0, 1] = np.nan  # an operator that writes into its input is still caught
    with pytest.raises(ValueError, match="changed the vectors"):
        bufs.check_unchanged(y, before)


def test_reorth_none_reads_asymmetry_locally(rng):
    """Review: reorth='none' reported asymmetry=nan and no warning for S + 0.5 K (K
    skew). It now reads |q_{j-1}^T A q_j - beta_{j-1}| like partial mode (one dot per
    step): the asymmetric operator warns (relative coupling ~0.26 >> sqrt(eps)); a
    symmetric one, run for 120 steps on n = 50 without reorthogonalisation (orthogonality
    fully lost, ghosts), stays at rounding level and does not warn."""
    n = 50
    S = rng.standard_normal((n, n))
    S = S + S.T
    K = rng.standard_normal((n, n))
    K = K - K.T
    with pytest.warns(LanczosWarning, match="not symmetric"):
        r = specdens.lanczos(S + 0.5 * K, 20, num_probes=3, reorth="none")
    assert np.isfinite(r.asymmetry) and r.asymmetry > 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = specdens.lanczos(S, 120, num_probes=3, reorth="none")
        r32 = specdens.lanczos(S.astype(np.float32), 120, num_probes=3, reorth="none")
    assert r.asymmetry <= 1e3 * EPS
    assert r32.asymmetry <= 1e3 * float(np.finfo(np.float32).eps)
