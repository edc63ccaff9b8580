"""The kernel polynomial method: exact identities with SLQ, the derived resolution bound
against the exact probe measure, agreement with SLQ on the example spectra, moments."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import sym_from_spectrum

import specdens
from specdens import KPMDensity
from specdens.algorithms.kpm import jackson_damping
from specdens.algorithms.probes import draw_probe
from specdens.examples import hessian_like, marchenko_pastur, semicircle, uniform

N_OP = 600


NUM_W1 = 40_001


def _w1_to_discrete(cdf, lo, hi, loc, mass, num=NUM_W1):
    """Wasserstein-1 distance int |F - G| between a measure with CDF ``cdf`` on [lo, hi]
    and the discrete measure (loc, mass), by the midpoint rule on a fine grid (error at
    most the cell width times the total variation of F - G, i.e. 2 (hi - lo) / num)."""
    edges = np.linspace(lo, hi, num)
    mid = 0.5 * (edges[1:] + edges[:-1])
    order = np.argsort(loc)
    cum = np.concatenate([[0.0], np.cumsum(mass[order])])
    G = cum[np.searchsorted(loc[order], mid, side="right")]
    return float(np.sum(np.abs(cdf(mid) - G)) * (edges[1] - edges[0]))


def _probe_measure(A, seed, num_probes, kind="rademacher"):
    """The exact measure SLQ and KPM both estimate: sum_j mean_i s_i (u_i^T q_j)^2
    delta(lambda_j), from the dense eigendecomposition."""
    lam, Q = np.linalg.eigh(A)
    n = A.shape[0]
    mass = np.zeros(n)
    for i in range(num_probes):
        u, s = draw_probe(kind, n, seed, i)
        mass += s * (Q.T @ u) ** 2
    return lam, mass / num_probes


@pytest.fixture(scope="module", params=["semicircle", "marchenko_pastur", "hessian_like",
                                        "uniform"])
def example(request):
    factory = {"semicircle": semicircle, "marchenko_pastur": marchenko_pastur,
               "hessian_like": hessian_like, "uniform": uniform}[request.param]
    op = factory(N_OP, seed=1)
    return request.param, op, np.asarray(op.to_dense())


def test_kpm_equals_jackson_damped_slq_moments(example):
    """An m-point Gauss rule reproduces u^T T_k(B) u for k <= 2m - 1: with the same probes
    and interval, KPM from num_moments <= 2m moments and the Chebyshev moments of the SLQ
    rules are the same numbers, and so are the densities, up to rounding."""
    _, op, _ = example
    k = specdens.kpm(op, 120, 4, seed=2)
    d = specdens.slq(op, num_steps=60, num_probes=4, seed=2)
    k2 = KPMDensity.from_spectral_density(d, 120, center=k.center, half_width=k.half_width)
    np.testing.assert_allclose(k2.chebyshev_moments, k.chebyshev_moments, atol=1e-11)
    grid, a = k.density()
    _, b = k2.density(grid)
    np.testing.assert_allclose(b, a, atol=1e-10 * a.max())
    x = np.linspace(k.center - k.half_width, k.center + k.half_width, 50)
    np.testing.assert_allclose(k2.cdf(x), k.cdf(x), atol=1e-11)
    assert k.lanczos_bounds is not None
    # bounds (40 Lanczos steps from each of 2 Gaussian probes) + floor(120 / 2) per probe
    assert k.matvecs == 2 * 40 + 4 * 60


def test_resolution_bound_against_the_probe_measure_and_agreement_with_slq(example):
    """W1(KPM, probe measure) <= resolution() (derived in specdens.algorithms.kpm from the
    Jackson kernel's second moment) and W1(SLQ, probe measure) <= pi (b - a) / (4 m) (a
    Gauss rule matches 2m moments, so by Jackson's theorem on 1-Lipschitz functions); hence
    the two estimates agree to within the sum of their documented accuracies."""
    name, op, A = example
    num_moments, steps, probes, seed = 150, 40, 3, 4
    k = specdens.kpm(op, num_moments, probes, seed=seed)
    d = specdens.slq(op, num_steps=steps, num_probes=probes, seed=seed)
    loc, mass = _probe_measure(A, seed, probes)
    lo, hi = k.center - k.half_width, k.center + k.half_width
    res = k.resolution()
    # ~ pi (b - a) / (2 (N + 1)) up to O(1/N): sqrt((1 - g_2) / 2) = pi / (N + 1) (1 + O(1/N))
    assert res == pytest.approx(np.pi * (hi - lo) / (2 * (num_moments + 1)), rel=1 / num_moments)
    quad = 2 * (hi - lo) / NUM_W1  # the integration error of _w1_to_discrete
    w_kpm = _w1_to_discrete(k.cdf, lo, hi, loc, mass)
    assert w_kpm <= res + quad, (name, w_kpm, res)
    from scipy.stats import wasserstein_distance

    s_loc, s_mass = d.atoms()
    w_slq = wasserstein_distance(s_loc, loc, u_weights=s_mass, v_weights=mass)
    slq_bound = np.pi * (loc.max() - loc.min()) / (4 * steps)
    assert w_slq <= slq_bound
    w_cross = _w1_to_discrete(k.cdf, lo, hi, s_loc, s_mass)
    assert w_cross <= res + slq_bound + quad, (name, w_cross)
    # the bound is not vacuous: the resolution is a few percent of the interval
    assert res <= 0.02 * (hi - lo)


def test_jackson_kernel_second_moment_formula():
    """For A = y I the probe measure is delta_y, so the KPM density is the Jackson kernel
    itself: its mean is g_1 y and its second moment about y is (1 - g_2)/2 + y^2 (1 - 2 g_1
    + g_2), the quantities the resolution bound rests on (integrated numerically)."""
    N = 64
    g = jackson_damping(N)
    for y in (0.0, 0.4, -0.7):
        k = specdens.kpm(y * np.eye(30), N, 2, bounds=(-1.0, 1.0), widen=0.0)
        t = np.cos(np.linspace(np.pi, 0, 200_001))  # Chebyshev-spaced for the edges
        _, rho = k.density(t)
        mid = 0.5 * (t[1:] + t[:-1])
        w = 0.5 * (rho[1:] + rho[:-1]) * np.diff(t)
        assert np.sum(w) == pytest.approx(1.0, abs=1e-4)
        assert np.sum(w * mid) == pytest.approx(g[1] * y, abs=1e-4)
        second = np.sum(w * (mid - y) ** 2)
        assert second == pytest.approx((1 - g[2]) / 2 + y * y * (1 - 2 * g[1] + g[2]), rel=1e-3)
        # Jackson's kernel is non-negative
        assert rho.min() >= -1e-12 * rho.max()


def test_moments_cdf_and_trace(example):
    name, op, A = example
    lam = np.linalg.eigvalsh(A)
    k = specdens.kpm(op, 100, 30, seed=0)
    d = specdens.slq(op, num_steps=50, num_probes=30, seed=0)
    # moments from the undamped Chebyshev moments: the same quadratic forms as SLQ's
    ps = np.array([1, 2, 3])
    np.testing.assert_allclose(k.moments(ps).value, d.moments(ps).value, rtol=1e-9,
                               atol=1e-12)
    est = k.moments(ps)
    exact = np.array([np.mean(lam**p) for p in ps])
    assert np.all(np.abs(np.asarray(est.value) - exact) <= 5 * np.asarray(est.stderr))
    assert k.moments(0).value == pytest.approx(1.0, abs=1e-12)
    # the CDF is the integral of the density, reaching the total mass (integrated on
    # Chebyshev-spaced points: the series carries a 1/sqrt(1 - x^2) factor at the ends)
    lo, hi = k.center - k.half_width, k.center + k.half_width
    t = k.center + k.half_width * np.cos(np.linspace(np.pi, 0.0, 200_001))
    _, rho = k.density(t)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (rho[1:] + rho[:-1]) * np.diff(t))])
    x = np.linspace(lo, hi, 9)
    np.testing.assert_allclose(k.cdf(x), np.interp(x, t, cum), atol=1e-5)
    assert k.cdf(np.array(hi + 1.0)) == pytest.approx(1.0, abs=1e-12)
    assert k.cdf(np.array(lo - 1.0)) == 0.0
    # tr f(A) for a smooth f: within 5 standard errors plus the truncation estimate
    f = lambda t: np.exp(t / np.abs(lam).max())  # noqa: E731
    tr = k.trace(f)
    assert abs(tr.value - f(lam).sum()) <= 5 * tr.stderr + tr.quadrature_error, name
    assert k.fraction_negative() == pytest.approx(float(k.cdf(0.0)))


def test_both_results_share_the_density_interface(spectrum_matrix):
    A, _ = spectrum_matrix
    k = specdens.kpm(A, 40, 2)
    d = specdens.slq(A, num_steps=20, num_probes=2)
    for est in (k, d):
        assert isinstance(est, specdens.DensityEstimate)
        grid, vals = est.density()
        assert grid.shape == vals.shape
        assert isinstance(est.moments(1), specdens.Estimate)
    assert "KPMDensity(n=200" in repr(k) and "resolution=" in repr(k)


def test_bounds_from_lanczos_enclose_the_spectrum(example):
    _, op, A = example
    lam = np.linalg.eigvalsh(A)
    k = specdens.kpm(op, 40, 2, seed=1)
    b = k.bounds()
    assert b.lower < lam.min() and lam.max() < b.upper
    assert np.all(np.abs(k.chebyshev_moments) <= 1 + 1e-10)


@pytest.mark.parametrize("library", ["torch", "array_api_strict"])
def test_other_array_libraries_match_numpy(spectrum_matrix, library):
    A, _ = spectrum_matrix
    if library == "torch":
        torch = pytest.importorskip("torch")
        M = torch.tensor(A)
    else:
        xs = pytest.importorskip("array_api_strict")
        M = xs.asarray(A)
    a = specdens.kpm(A, 50, 3, seed=5)
    b = specdens.kpm(M, 50, 3, seed=5)
    assert b.center == pytest.approx(a.center, rel=1e-12)
    np.testing.assert_allclose(b.chebyshev_moments, a.chebyshev_moments, atol=1e-12)


def test_errors(spectrum_matrix, rng):
    A, lam = spectrum_matrix
    with pytest.raises(ValueError, match="not inside the KPM interval"):
        specdens.kpm(A, 60, 2, bounds=(-1.0, 5.0))
    with pytest.raises(ValueError, match="at least 2"):
        specdens.kpm(A, 1, 2)
    with pytest.raises(ValueError, match="kernel"):
        specdens.kpm(A, 10, 2, kernel="lorentz")
    with pytest.raises(ValueError, match="bounds"):
        specdens.kpm(A, 10, 2, bounds=(3.0, 1.0))
    k = specdens.kpm(A, 10, 2)
    with pytest.raises(ValueError, match="up to p = 9"):
        k.moments(10)
    with pytest.raises(ValueError, match="sigma"):
        k.density(sigma=0.1)
    d = specdens.slq(sym_from_spectrum(np.linspace(1, 2, 30), rng), num_steps=5, deflate=2)
    with pytest.raises(ValueError, match="deflation"):
        KPMDensity.from_spectral_density(d, 10)


@pytest.mark.parametrize("bounds", [None, (-1e-320, 1e-320)])
def test_zero_operator_gives_the_kernel_of_an_atom_at_zero(bounds):
    """The zero matrix (a Hessian at a flat point) has no spectral scale: the interval is
    the unit one, B = 0 and u^T T_k(B) u = T_k(0) mu_0 = cos(k pi / 2) mu_0 exactly, up to
    the rounding of mu_0 = ||u||^2 (n eps). The density is the Jackson kernel of an atom at
    0 (finite), and it integrates to mu_0 g_0 = mu_0. A subnormal interval given as bounds
    is widened to a half-width whose reciprocal is finite."""
    n, N = 50, 20
    A = np.zeros((n, n))
    k = specdens.kpm(A, N, 3, seed=4, bounds=bounds)
    tol = 10 * n * np.finfo(float).eps
    assert np.isfinite(k.half_width) and k.half_width > 0
    assert np.isfinite(1.0 / k.half_width)
    expected = np.cos(np.arange(N) * np.pi / 2)
    expected[np.abs(expected) < 0.5] = 0.0  # cos(k pi/2) is 0 for odd k, not 6e-17
    np.testing.assert_allclose(k.chebyshev_moments, np.broadcast_to(expected, (3, N)),
                               rtol=0, atol=tol)
    g, v = k.density()
    assert np.all(np.isfinite(v)) and np.all(v >= -tol * np.max(v))
    if bounds is None:
        assert k.half_width == pytest.approx(1.01, rel=0, abs=1e-15)
        # exact reference: the damped series of the atom at 0, summed with numpy
        x = (g - k.center) / k.half_width
        damp = jackson_damping(N)
        series = damp[0] + 2 * sum(damp[j] * expected[j] * np.cos(j * np.arccos(x))
                                   for j in range(1, N))
        ref = series / (np.pi * np.sqrt(1 - x * x)) / k.half_width
        np.testing.assert_allclose(v, ref, rtol=0, atol=N * tol * np.max(ref))
        assert k.moments(2).value == pytest.approx(0.0, abs=tol)
    lo, hi = k.bounds().interval
    total = float(k.cdf(hi) - k.cdf(lo))
    assert total == pytest.approx(1.0, abs=tol)


def _block_matrix():
    """diag(0 .. 1) with the block [[0, 5], [5, 0]] in the corner: eigenvalues -5 and 5
    with eigenvectors (1, -1, 0, ...) and (1, 1, 0, ...) / sqrt(2). A Rademacher vector
    has u_1 = +-u_2, so it is orthogonal to one of the two, for every seed."""
    A = np.diag(np.linspace(0.0, 1.0, 50))
    A[0, 0] = A[1, 1] = 0.0
    A[0, 1] = A[1, 0] = 5.0
    return A


@pytest.mark.parametrize("seed", range(5))
def test_default_interval_encloses_eigenvalues_a_rademacher_probe_misses(seed):
    """The bounds' Lanczos probes are Gaussian (orthogonal to a fixed vector with
    probability 0). Review: with one Rademacher probe, kpm failed on the block matrix for
    20 of 20 seeds (interval [0.016, 5.02]) and on [[2, 1], [1, 2]] (interval [3, 3]: the
    probe (1, +-1) / sqrt(2) is an eigenvector)."""
    for A, N, probes in [(_block_matrix(), 50, 10), (np.array([[2.0, 1.0], [1.0, 2.0]]), 10, 2)]:
        lam = np.linalg.eigvalsh(A)
        k = specdens.kpm(A, N, probes, seed=seed)
        lo, hi = k.bounds().interval
        assert lo < lam[0] and lam[-1] < hi, (A.shape, seed, (lo, hi))
        assert np.all(np.abs(k.chebyshev_moments) <= 1 + 1e3 * N * np.finfo(float).eps)
        # the interval is tight: widened by 1% of the half-width around the spectrum
        assert k.half_width == pytest.approx(1.01 * (lam[-1] - lam[0]) / 2, rel=1e-6)


class _NaNAfter:
    """A matrix whose products turn to NaN after ``good`` of them (a broken operator)."""

    def __init__(self, A, good):
        self.A, self.left = A, good
        self.shape, self.dtype = A.shape, A.dtype

    def matvec(self, v):
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, V):
        self.left -= 1
        return self.A @ V if self.left >= 0 else np.full((self.shape[0], V.shape[1]), np.nan)


def test_recurrence_overflow_blames_the_interval_not_the_operator(rng):
    """With bounds far too narrow the recurrence T_k(B) u grows until the products (or
    the map to B) overflow; that is the interval's fault, reported as such (review: 'the
    operator returned NaN or Inf'). An operator that returns NaN for a vector of the
    recurrence that had not grown is still blamed."""
    X = rng.standard_normal((30, 30))
    A = X + X.T  # spectrum within about [-16, 16]
    with np.errstate(all="ignore"):
        for N, bounds in [(50, (-1.0, 1.0)), (2000, (-1.0, 1.0)), (200, (0.0, 1e-100))]:
            with pytest.raises(ValueError, match="spectrum is not inside the KPM interval"):
                specdens.kpm(A, N, 2, bounds=bounds)
        with pytest.raises(FloatingPointError, match="operator returned NaN or Inf"):
            specdens.kpm(_NaNAfter(A, 3), 20, 2, bounds=(-40.0, 40.0))


def _symmetric_and_skew(n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """A symmetric S of spectral radius 1 and a skew-symmetric K of about 0.05 of it."""
    rng = np.random.default_rng(0)
    S = rng.standard_normal((n, n))
    S = (S + S.T) / 2
    S /= np.abs(np.linalg.eigvalsh(S)).max()
    K = rng.standard_normal((n, n))
    return S, (K - K.T) / 2 * 0.05


def test_asymmetric_operator_is_reported():
    """Review: the doubling trick assumes a symmetric operator; S + 0.05 K (K skew) with
    bounds=(-10, 10) silently returned moments(2) = 0.344 against tr(A^2)/n = 0.213. The
    moments <u, t_k>, k <= K, computed directly (one dot per product) differ from the
    doubled ones by ~1e-3 relative for it, and by rounding (~k eps) for a symmetric
    operator, float32 products and 400 moments included: a LanczosWarning for the first
    only (threshold sqrt(eps_eff))."""
    import warnings

    from specdens.algorithms.lanczos import LanczosWarning

    S, K = _symmetric_and_skew()
    with pytest.warns(LanczosWarning, match="not symmetric"):
        specdens.kpm(S + K, 40, 4, bounds=(-10, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        specdens.kpm(S, 40, 4, bounds=(-10, 10))
        specdens.kpm(S, 400, 4, bounds=(-1.01, 1.01))
        specdens.kpm(S.astype(np.float32), 400, 4, bounds=(-1.01, 1.01))
        specdens.kpm(S.astype(np.float32), 400, 4, bounds=(-1.01, 1.01), dtype="float64")


def test_symmetry_check_uses_a_fixed_number_of_direct_moments(monkeypatch):
    """Review: the direct moments <u, t_k> were computed after every product, for all K
    (3-16% slower on a cheap sparse operator); asymmetry shows at k = 2-3, so only
    k = 2 .. _SYMMETRY_K are computed, whatever the number of moments, and the
    asymmetric operator is still reported with many moments."""
    import specdens.algorithms.kpm as kpm_mod
    from specdens.algorithms.lanczos import LanczosWarning

    seen = []
    real = kpm_mod._warn_if_asymmetric

    def spy(mu, direct, sq, eps):
        seen.append(direct.shape)
        return real(mu, direct, sq, eps)

    monkeypatch.setattr(kpm_mod, "_warn_if_asymmetric", spy)
    S, K = _symmetric_and_skew()
    with pytest.warns(LanczosWarning, match="not symmetric"):
        specdens.kpm(S + K, 60, 3, bounds=(-10, 10))
    assert seen == [(3, 7)]  # k = 2 .. 8 of 30 products (all 29 were computed)
    seen.clear()
    specdens.kpm(S, 6, 2, bounds=(-1.01, 1.01))  # 6 moments take 3 products: k = 2, 3
    assert seen == [(2, 2)]


def test_fraction_negative_takes_the_protocols_default():
    """``DensityEstimate.fraction_negative(tol=None)``: SLQ's default is its rounding floor,
    KPM's is 0 (it has no Ritz values); both accept None and refuse a negative tol."""
    lam = np.linspace(-1.0, 2.0, 300)
    A = np.diag(lam)
    d = specdens.kpm(A, num_moments=60, num_probes=4, seed=0)
    assert d.fraction_negative(None) == d.fraction_negative() == d.fraction_negative(0.0)
    assert 0.2 < d.fraction_negative() < 0.45  # exact 1/3, smoothed by the kernel
    with pytest.raises(ValueError, match="tol"):
        d.fraction_negative(-1.0)
