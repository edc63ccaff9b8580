"""Reviewed defects of the quadrature-based functionals: the negative mass of a spectrum
with a zero-eigenvalue atom, exact rules in the negative-mass bounds, Student-t intervals,
the default width's rounding floor, and input checks."""

import math

import numpy as np
import pytest
from scipy.stats import t as student_t

import specdens
from specdens.analysis import negative_mass, negative_mass_bounds, spectrum_stats

EPS = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)


def _rotated(values, rng):
    n = values.size
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * values) @ Q.T
    return 0.5 * (A + A.T), Q


# ------------------------------------------------------------------ zero-eigenvalue atom


def test_negative_mass_ignores_the_rounding_of_a_zero_eigenvalue_atom():
    """n = 400, 360 eigenvalues exactly 0 (a Hessian's null space), 10 in [-5, -1], 30
    positive. Every probe's Krylov space is invariant after 41 steps (41 distinct
    eigenvalues), so each rule is the probe's spectral measure and its mass below zero is
    ``sum_{lambda_i < 0} (u_i^T v)^2`` exactly, to rounding. (The breakdown's rounding at
    step 41 may exceed the float64 threshold, 100 eps ||T||: then it is caught at step 42,
    and the extra node's weight is of order ``(beta_41 / ||T||)^2``, the square of a
    rounding.) The zero atom (~0.9 of each probe's weight) comes out as a Ritz value
    ~1e-13 of either sign; with the strict sign about half the probes counted it as
    negative (0.33 +/- 0.12 for an exact 0.025).

    Tolerance: the weights are squared eigenvector components of the tridiagonal, exact to
    ``O(eps ||A|| / gap)`` each (Davis-Kahan); with ``||A|| = 200`` and the smallest gap
    between distinct eigenvalues 1/29 (the positives in [0.5, 1.5]), 1e3 of those
    (``1e3 eps * 200 * 29``, 1.3e-9) bounds the sum of the ten negative weights with room.
    """
    rng = np.random.default_rng(11)
    n = 400
    lam = np.zeros(n)
    lam[:10] = -np.linspace(1.0, 5.0, 10)
    lam[10:20] = np.linspace(50.0, 200.0, 10)
    lam[20:40] = np.linspace(0.5, 1.5, 20)
    A, Q = _rotated(lam, rng)
    k = 8
    V = rng.choice([-1.0, 1.0], size=(n, k))
    d = specdens.slq(A, num_steps=60, probes=V)
    assert np.all(d.breakdown) and np.all((d.lengths == 41) | (d.lengths == 42))
    C = (Q.T @ (V / np.sqrt(n))) ** 2           # (n, k): the probes' spectral measures
    exact = C[lam < 0].sum(axis=0)
    tol = 1e3 * EPS * 200.0 * 29.0
    est = negative_mass(d)
    assert abs(est.value - exact.mean()) <= tol
    # the standard error is that of the same per-probe masses
    assert est.stderr == pytest.approx(exact.std(ddof=1) / math.sqrt(k), abs=tol)
    assert abs(d.fraction_negative() - exact.mean()) <= tol
    st = spectrum_stats(d)
    assert abs(st.negative_mass - exact.mean()) <= tol
    assert st.negative_mass_stderr == est.stderr
    assert st.rule["negative_tol"] == d.negative_tolerance()
    # exact rules: the bounds are the estimate itself
    lo, hi = negative_mass_bounds(d)
    assert abs(lo - exact.mean()) <= tol and abs(hi - exact.mean()) <= tol
    # the default is twice the rounding floor, 4 eps max|theta| (float64 throughout)
    assert d.negative_tolerance() == pytest.approx(2 * 4 * EPS * 200.0, rel=1e-12)
    # tol=0 is still the strict sign of the Ritz values
    valid = d._valid()
    strict = np.mean(np.sum(np.where(valid & (d.nodes < 0), d.weights, 0.0), axis=1))
    assert negative_mass(d, tol=0.0).value == pytest.approx(strict, abs=4 * EPS)
    assert d.fraction_negative(0.0) == pytest.approx(strict, abs=4 * EPS)
    with pytest.raises(ValueError, match="tol"):
        d.fraction_negative(float("nan"))
    with pytest.raises(ValueError, match="tol"):
        negative_mass(d, tol=-1e-3)


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_a_float32_positive_semi_definite_operator_has_no_negative_mass(dtype):
    """A float32 rank-20 Gram matrix (a GGN): positive semi-definite, so its negative mass
    is 0. Its null space comes out as Ritz values ~0.1 to 0.3 eps32 max|theta| of either
    sign (float32 products, under float64 or float32 arithmetic), below the default
    tolerance, twice the floor 4 eps32 max|theta|, while the stored matrix's own rounding
    eigenvalues are ~eps32 * 1e-2 of it: nothing is below ``-tol`` and the estimate is 0
    exactly (it was 0.44 +/- 0.01)."""
    rng = np.random.default_rng(2)
    n, r = 500, 20
    G = rng.standard_normal((n, r)).astype(np.float32)
    B = (G @ G.T / np.float32(n)).astype(np.float32)
    d = specdens.slq(B, num_steps=40, num_probes=5, seed=1,
                     **({} if dtype is None else {"dtype": dtype}))
    assert negative_mass(d).value == 0.0
    assert d.fraction_negative() == 0.0
    assert negative_mass_bounds(d)[0] == 0.0
    assert spectrum_stats(d).negative_mass == 0.0
    scale = float(np.max(np.abs(d.nodes[d._valid()])))
    assert d.rounding_floor() == pytest.approx(4 * EPS32 * scale, rel=1e-12)


def test_rounding_floor_is_capped_where_nothing_converged():
    """Two steps on a spread spectrum: no Ritz value has converged, the smallest residual
    bound is ~0.1 of the range; the floor is capped at float32's, 4 eps32 max|theta|, so
    the default negative tolerance ignores no genuine node (the estimate equals the strict
    one: no node lies within 1e-6 of zero here)."""
    lam = np.linspace(-3.0, 1.0, 200)
    d = specdens.slq(np.diag(lam), num_steps=2, num_probes=3, seed=0)
    scale = float(np.max(np.abs(d.nodes[d._valid()])))
    assert np.min(d.residuals[d._valid()]) > 1e-3 * scale
    assert d.rounding_floor() == pytest.approx(4 * EPS32 * scale, rel=1e-12)
    assert np.all(np.abs(d.nodes[d._valid()]) > 1e-6 * scale)
    assert d.fraction_negative() == d.fraction_negative(0.0)


# ------------------------------------------------------------------ exact rules in the bounds


@pytest.mark.parametrize("diag,exact", [
    (-2.0 * np.ones(20), 1.0),                                  # one step, broke down
    (np.array([-1.0, 2.0]), 0.5),                               # L == n
    (np.r_[-3.0 * np.ones(50), np.ones(50)], 0.5),              # two steps, broke down
    (np.r_[np.zeros(95), [1.0, 2.0, 3.0, 4.0, 5.0]], 0.0),      # a zero atom
])
def test_negative_mass_bounds_of_exact_rules_are_the_rule_itself(diag, exact):
    """A probe whose rule is exact (a breakdown, or L == n) has that rule as its spectral
    measure: the Chebyshev-Markov-Stieltjes interval [S - w_k, S + w_{k+1}] collapses to S
    (it was (0, 1) for -2 I). For Rademacher probes on a diagonal matrix the measure is
    the spectrum itself, so both bounds are the exact fraction; the weights are exact to a
    few rounding units of the 2x2 or 6x6 tridiagonal's eigensolver (8 eps)."""
    d = specdens.slq(np.diag(diag), num_steps=10, num_probes=2)
    assert np.all(d.breakdown) or np.all(d.lengths == diag.size)
    lo, hi = negative_mass_bounds(d)
    assert lo == pytest.approx(exact, abs=8 * EPS)
    assert hi == pytest.approx(exact, abs=8 * EPS)
    assert negative_mass(d).value == pytest.approx(exact, abs=8 * EPS)


# ------------------------------------------------------------------ Student-t intervals


@pytest.mark.parametrize("k", [2, 3, 5])
def test_interval_uses_the_student_t_quantile(k):
    """The standard error of k probes is itself estimated: the normal quantile (1.96)
    covered 0.70 / 0.64 of a nominal 95% with 2 probes. The half-width is Student's
    quantile with k - 1 degrees of freedom times stderr (12.71 for k = 2), componentwise;
    to the rounding of one product and one sum (4 eps relative)."""
    # (not diagonal: Rademacher probes of a diagonal matrix have no spread, stderr 0)
    A, _ = _rotated(np.linspace(-1.0, 3.0, 300), np.random.default_rng(6))
    e = specdens.slq(A, num_steps=8, num_probes=k, seed=4).moments(np.array([1, 2]))
    assert np.all(np.asarray(e.stderr) > 0)
    q = student_t.ppf(0.975, k - 1)
    lo, hi = e.interval(0.95)
    np.testing.assert_allclose(np.asarray(hi) - e.value, q * np.asarray(e.stderr), rtol=4 * EPS)
    np.testing.assert_allclose(e.value - np.asarray(lo), q * np.asarray(e.stderr), rtol=4 * EPS)
    s = specdens.slq(A, num_steps=8, num_probes=k, seed=4).moments(2)
    lo, hi = s.interval(0.9)
    assert hi - s.value == pytest.approx(student_t.ppf(0.95, k - 1) * s.stderr, rel=4 * EPS)


def test_interval_of_one_probe_is_refused():
    """One probe has no standard error (NaN): no interval, a clear error instead of
    (NaN, NaN)."""
    e = specdens.slq(np.diag(np.linspace(0.0, 1.0, 50)), num_steps=5, num_probes=1).moments(1)
    with pytest.raises(ValueError, match="num_probes >= 2"):
        e.interval()
    with pytest.raises(ValueError, match="confidence"):
        specdens.slq(np.eye(4) * np.arange(4), num_steps=2, num_probes=2).moments(1).interval(1.5)


# ------------------------------------------------------------------ default width


def test_default_sigma_stays_above_the_rounding_floor_of_float32_products():
    """A float32 rank-20 operator (98% zero eigenvalues) under the default float64
    arithmetic, no breakdown: its null space comes out as dozens of Ritz values a float32
    rounding apart. Their gaps are not resolved (each Ritz value is uncertain by the
    floor, 4 eps32 max|theta|): the width must not go below it (6.9e-9, 1/90 of the
    floor, before); the rounding-level cluster then reads as one bump."""
    rng = np.random.default_rng(0)
    n, r = 1000, 20
    G = rng.standard_normal((n, r)).astype(np.float32)
    B = (G @ G.T / np.float32(n)).astype(np.float32)
    d = specdens.slq(B, num_steps=60, num_probes=3)
    assert not np.any(d.breakdown)
    scale = float(np.max(np.abs(d.nodes[d._valid()])))
    floor = 4 * EPS32 * scale
    sigma = d.default_sigma()
    assert sigma >= floor
    assert d.rounding_floor() == pytest.approx(floor, rel=1e-12)
    # the cluster's Ritz values (every node below 1e-4 of the scale) lie within one width
    # of each other's: one bump, no needles
    for i in range(d.num_probes):
        th = d.nodes[i, : d.lengths[i]]
        cluster = th[np.abs(th) < 1e-4 * scale]
        assert cluster.size > 10 and np.ptp(cluster) <= 2 * sigma


# ------------------------------------------------------------------ input checks


@pytest.fixture
def small():
    return specdens.slq(np.diag(np.linspace(-1.0, 1.0, 100)), num_steps=10, num_probes=3)


def test_a_non_finite_grid_is_refused(small):
    """A NaN grid point gave a NaN density value silently."""
    with pytest.raises(ValueError, match="grid"):
        small.density([0.0, np.nan, 0.5], sigma=0.1)
    with pytest.raises(ValueError, match="grid"):
        small.density(np.array([0.0, np.inf]), sigma=0.1)


def test_moments_of_no_power_are_refused_clearly(small):
    """An empty array of powers failed inside numpy ('need at least one array to stack')."""
    with pytest.raises(ValueError, match="at least one power"):
        small.moments(np.array([], dtype=int))


def test_complex_function_values_are_refused(small):
    """np.emath.sqrt is complex at the negative Ritz values: the imaginary part was dropped
    with a mere ComplexWarning (a real 34.0 for a complex 33.5 + 33.5j)."""
    with pytest.raises(TypeError, match="complex"):
        small.trace(np.emath.sqrt)
    with pytest.raises(TypeError, match="complex"):
        small.trace(lambda t: t + 0j)
    # real results of the same functions are fine
    assert small.trace(lambda t: np.sqrt(np.maximum(t, 0.0))).value > 0
