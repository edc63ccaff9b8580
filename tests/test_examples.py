"""The example operators: their matrices have exactly the spectra they claim."""

from __future__ import annotations

import numpy as np
import pytest

import specdens
from specdens.examples import (
    EXAMPLES,
    SpectrumOperator,
    get_example,
    hessian_like,
    marchenko_pastur,
    semicircle,
    uniform,
)

N = 400


@pytest.fixture(scope="module", params=sorted(EXAMPLES))
def example(request):
    op = EXAMPLES[request.param](N, seed=3)
    A = np.asarray(op.to_dense(), dtype=np.float64)
    return request.param, op, A


def test_is_an_operator(example):
    name, op, _ = example
    assert isinstance(op, specdens.LinearOperatorBase)
    assert op.shape == (N, N)
    assert op.symmetric is True
    assert op.eigenvalues.dtype == np.float64
    assert op.eigenvalues.shape == (N,)
    assert np.all(np.diff(op.eigenvalues) >= 0), "eigenvalues are stored ascending"
    assert specdens.aslinearoperator(op) is op


def test_dense_matrix_is_symmetric(example):
    _, op, A = example
    scale = np.abs(op.eigenvalues).max()
    assert np.max(np.abs(A - A.T)) <= 1e-14 * scale


def test_eigenvalues_match_dense_eigvalsh(example):
    name, op, A = example
    ev = np.linalg.eigvalsh(A)
    scale = np.abs(ev).max()
    np.testing.assert_allclose(ev, op.eigenvalues, rtol=0, atol=1e-12 * scale, err_msg=name)


def test_matvec_and_matmat_agree_with_dense(example):
    _, op, A = example
    rng = np.random.default_rng(0)
    V = rng.standard_normal((N, 3))
    np.testing.assert_allclose(op @ V, A @ V, atol=1e-12 * np.abs(A).max() * np.sqrt(N))
    np.testing.assert_allclose(op @ V[:, 0], A @ V[:, 0],
                               atol=1e-12 * np.abs(A).max() * np.sqrt(N))


def test_spectrum_is_deterministic_and_seed_only_moves_eigenvectors():
    for factory in EXAMPLES.values():
        a, b = factory(257, seed=0), factory(257, seed=1)
        np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
        np.testing.assert_array_equal(a.eigenvalues, factory(257, seed=0).eigenvalues)
    v = np.random.default_rng(1).standard_normal(257)
    a, b, c = hessian_like(257, seed=0), hessian_like(257, seed=1), hessian_like(257, seed=0)
    assert not np.allclose(a @ v, b @ v)
    np.testing.assert_array_equal(a @ v, c @ v)


def test_eigenvectors_are_spread_out():
    """The random rotation delocalises the eigenvectors: no column of A is nearly a
    multiple of a unit vector, so Rademacher probes see every eigenvalue."""
    op = hessian_like(512, seed=0)
    A = np.asarray(op.to_dense())
    off = np.abs(A - np.diag(np.diag(A))).max(axis=0)
    assert np.all(off > 1e-3 * np.abs(op.eigenvalues).max())


def test_hessian_like_shape():
    op = hessian_like(3000)
    lam = op.eigenvalues
    assert lam.size == 3000
    outl = lam[-10:]
    bulk = lam[:-10]
    np.testing.assert_array_equal(outl, op.outliers)
    assert 0.35 <= np.mean(lam < 0) <= 0.45
    assert np.abs(lam[lam < 0]).max() < 0.2, "negative eigenvalues are small"
    assert outl.min() > 4 * bulk.max(), "outliers are well separated from the bulk"
    assert np.all(np.diff(outl) > 1.0), "outliers are distinct"
    # a peak at zero: a quarter of the spectrum within 3% of the bulk's width of 0
    assert np.mean(np.abs(bulk) < 0.03 * (bulk.max() - bulk.min())) > 0.25


def test_marchenko_pastur_shape():
    op = marchenko_pastur(3000, ratio=0.5)
    a, b = op.edges
    assert a == pytest.approx((1 - np.sqrt(0.5)) ** 2)
    assert b == pytest.approx((1 + np.sqrt(0.5)) ** 2)
    lam = op.eigenvalues
    np.testing.assert_array_equal(lam[-3:], [5.0, 8.0, 12.0])
    bulk = lam[:-3]
    assert a < bulk.min() and bulk.max() < b
    # the bulk's mean and second moment are those of the MP law: 1 and 1 + ratio
    assert bulk.mean() == pytest.approx(1.0, rel=1e-3)
    assert np.mean(bulk**2) == pytest.approx(1.5, rel=2e-3)
    # ratio > 1: an atom at zero of mass 1 - 1/ratio
    op2 = marchenko_pastur(1000, ratio=2.0, spikes=())
    assert np.mean(op2.eigenvalues == 0) == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="ratio"):
        marchenko_pastur(100, ratio=-1.0)


def test_semicircle_and_uniform_moments():
    lam = semicircle(4000).eigenvalues
    assert lam.min() > -2 and lam.max() < 2
    assert np.mean(lam) == pytest.approx(0.0, abs=1e-12)
    assert np.mean(lam**2) == pytest.approx(1.0, rel=1e-3)  # semicircle of radius 2
    lam = uniform(1000, low=2, high=4).eigenvalues
    np.testing.assert_allclose(np.diff(lam), 2 / 1000)
    assert lam.mean() == pytest.approx(3.0)


def test_scales_to_large_n():
    op = hessian_like(2**20, seed=0)
    v = np.ones(2**20)
    w = op @ v
    assert w.shape == (2**20,) and np.all(np.isfinite(w))
    # Q is orthogonal: ||A v||^2 = sum lam_i^2 (Q^T v)_i^2 lies in [min lam^2, max lam^2] ||v||^2
    assert np.linalg.norm(w) <= 40.0 * np.linalg.norm(v) * (1 + 1e-12)


def test_get_example():
    op = get_example("uniform", 50, seed=2)
    assert op.shape == (50, 50) and op.seed == 2
    assert get_example("laplacian_1d").shape == (3000, 3000)
    with pytest.raises(ValueError, match="unknown example 'nope'.*hessian_like.*uniform"):
        get_example("nope")
    with pytest.raises(ValueError, match="n must be at least"):
        get_example("hessian_like", 5)
    with pytest.raises(TypeError, match="n must be an integer"):
        get_example("uniform", 2.5)


def test_spectrum_operator_validation():
    with pytest.raises(ValueError, match="at least one"):
        SpectrumOperator([])
    with pytest.raises(ValueError, match="finite"):
        SpectrumOperator([1.0, np.nan])
    op = SpectrumOperator([3.0, 1.0, 2.0], seed=5)
    np.testing.assert_array_equal(op.eigenvalues, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(np.linalg.eigvalsh(op.to_dense()), [1.0, 2.0, 3.0], atol=1e-14)
    assert "SpectrumOperator" in repr(op)


def _mp_reference_quantile(ratio, p):
    """``F^{-1}(p)`` of the Marchenko-Pastur bulk (its continuous part normalised to 1),
    independently of the module: scipy's ``quad`` of the density, in the substitutions
    ``x = a + u^2`` (mass of ``[a, x]``) and ``x = b - v^2`` (mass of ``[x, b]``), which
    make the integrands bounded also when ``a = 0``, inverted by ``brentq`` (a quantile
    of the upper tail from ``(a + b) / 2`` up, where ``b - v^2`` stays away from 0)."""
    from scipy import integrate, optimize

    s = np.sqrt(ratio)
    a = (abs(1 - ratio) / (1 + s)) ** 2  # (1 - sqrt(ratio))^2 without cancellation
    b = (1 + s) ** 2
    w = b - a
    norm = np.pi * min(1.0, ratio)  # 2 pi ratio times the continuous mass min(1, r) / r

    def lower(x):
        U = np.sqrt(max(x - a, 0.0))
        # the integrand rises from 0 to its plateau around u = sqrt(a): break points at
        # sqrt(a) times powers of 10, so that quad resolves the rise however small a is
        pts = [np.sqrt(a) * 10.0**k for k in range(40) if 0 < np.sqrt(a) * 10.0**k < U]
        return integrate.quad(lambda u: u * u * np.sqrt(max(w - u * u, 0.0)) / (a + u * u),
                              0.0, U, points=pts or None, epsabs=0, epsrel=1e-13,
                              limit=200)[0] / norm

    def upper(x):
        return integrate.quad(lambda v: v * v * np.sqrt(max(w - v * v, 0.0)) / (b - v * v),
                              0.0, np.sqrt(max(b - x, 0.0)), epsabs=0, epsrel=1e-13,
                              limit=200)[0] / norm

    if p < 0.9:
        g, lo = (lambda x: lower(x) - p), a
    else:  # the upper tail, above the midpoint of [a, b] (F there is below 0.9)
        g, lo = (lambda x: (1 - p) - upper(x)), (a + b) / 2
    return optimize.brentq(g, lo, b, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)


@pytest.mark.parametrize("ratio", [1.0, 0.999999, 0.5, 2.0])
def test_marchenko_pastur_quantiles_match_an_independent_reference(ratio):
    """The bulk is the quantiles ``F^{-1}((i + 1/2) / m)`` of the MP law to float64
    accuracy, also at ``ratio = 1`` (lower edge 0, where the density is infinite: it used
    to give NaN) and just below it (lower edge 2.5e-13: the smallest eigenvalues used to
    be 2% off). The reference CDF is accurate to quad's ``epsrel`` 1e-13; since the CDF
    grows at least like ``sqrt(x - a)`` at the lower edge (and its complement like
    ``(b - x)^(3/2)`` at the upper one), that is at most 2e-13 relative in ``x``, plus
    brentq's 4 eps: 3e-13."""
    m = 600
    n = 2 * m if ratio > 1 else m  # ratio 2: half of the spectrum is the atom at 0
    op = marchenko_pastur(n, ratio=ratio, spikes=())
    lam = op.eigenvalues
    assert np.all(np.isfinite(lam))
    a, b = op.edges
    if ratio > 1:
        assert np.sum(lam == 0) == n - m
        lam = lam[n - m:]
    assert lam.size == m and a < lam[0] and lam[-1] < b
    for i in (0, 1, 2, m // 2, m - 2, m - 1):
        ref = _mp_reference_quantile(ratio, (i + 0.5) / m)
        assert lam[i] == pytest.approx(ref, rel=3e-13, abs=0), (ratio, i)


def test_marchenko_pastur_spikes_lie_above_the_bulk():
    """The spikes are outliers above the edge ``b``: one inside the bulk is refused (it
    used to be reported in ``.outliers``)."""
    b = (1 + np.sqrt(0.5)) ** 2
    with pytest.raises(ValueError, match="above the bulk's edge"):
        marchenko_pastur(100, ratio=0.5, spikes=(1.0,))
    with pytest.raises(ValueError, match="above the bulk's edge"):
        marchenko_pastur(100, ratio=0.5, spikes=(b, 5.0))
    with pytest.raises(ValueError, match="above the bulk's edge"):
        marchenko_pastur(100, ratio=2.0, spikes=(5.0,))  # b = 5.83: 5 is inside
    with pytest.raises(ValueError, match="finite"):
        marchenko_pastur(100, spikes=(np.inf,))
    op = marchenko_pastur(100, ratio=0.5, spikes=(3.0,))
    np.testing.assert_array_equal(op.outliers, [3.0])


@pytest.mark.parametrize("bad", [2.7, True, 3.0, "3"])
def test_hessian_like_num_outliers_must_be_an_integer(bad):
    """As ``n``: 2.7 used to be truncated to 2 outliers and True taken as 1."""
    with pytest.raises(TypeError, match="num_outliers must be an integer"):
        hessian_like(30, num_outliers=bad)
    op = hessian_like(30, num_outliers=np.int64(3))
    assert op.outliers.size == 3 and op.params["num_outliers"] == 3
    assert type(op.params["num_outliers"]) is int


@pytest.mark.parametrize("ratio", [0.1, 0.5, 2.0, 10.0])
def test_marchenko_pastur_default_spikes_stand_above_the_bulk_for_every_ratio(ratio):
    """The default spikes are (5, 8, 12) up to ratio 0.5 and scale with the edge ``b``
    beyond, so every ratio has outliers at the same relative height above the bulk."""
    b = (1 + np.sqrt(ratio)) ** 2
    b0 = (1 + np.sqrt(0.5)) ** 2
    op = marchenko_pastur(200, ratio=ratio)
    np.testing.assert_allclose(op.outliers, np.array([5.0, 8.0, 12.0]) * max(1.0, b / b0),
                               rtol=4 * np.finfo(float).eps)
    assert op.outliers[0] > 1.7 * b
    np.testing.assert_array_equal(np.sort(op.eigenvalues)[-3:], op.outliers)
