"""Gradient concentration, outliers, bulk edge and negative mass against exact references.

The gradient concentration of a real network is checked against numpy's ``eigh`` of the
dense Hessian built by ``torch.autograd.functional.hessian`` (independently of the
specdens operator), with the tolerance of the Davis-Kahan sin-theta theorem: for
orthonormal ``X`` with ``X^T H X`` diagonal, ``R = H X - X Theta`` and ``delta`` the
distance from the computed eigenvalues to the rest of the spectrum,
``|g^T (X X^T - U U^T) g| / ||g||^2 <= ||R||_F / delta``; the reference's own error is
``~ n eps ||H|| / gap`` (backward-stable ``eigh``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import specdens
from specdens.analysis import (
    GradientConcentration,
    SpectrumStats,
    gradient_concentration,
    negative_mass,
    spectrum_stats,
)
from specdens.summary import bulk, outliers

torch = pytest.importorskip("torch")
EPS = np.finfo(np.float64).eps


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small products: one thread is fastest (threads mostly wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- exact small cases -------------------------------------------------------------------
def test_diagonal_operator_exact_fraction_and_overlaps():
    lam = np.arange(1.0, 101.0)
    A = np.diag(lam)
    g = np.zeros(100)
    g[-1], g[-2], g[0] = 3.0, 1.0, 4.0  # ||g||^2 = 26; top-2 eigenvectors hold 10 of it
    c = gradient_concentration(A, g, k=2)
    assert isinstance(c, GradientConcentration) and c.k == 2 and c.which == "LA"
    np.testing.assert_allclose(c.eigenvalues, [99.0, 100.0], rtol=1e-12)
    # Davis-Kahan: the separation from the rest of the spectrum is delta = 99 - 98 = 1
    tol = float(np.sqrt(np.sum(c.residuals**2))) / 1.0 + 10 * EPS
    assert abs(c.fraction - 10 / 26) <= tol
    np.testing.assert_allclose(c.overlaps, [1 / 26, 9 / 26], rtol=0, atol=tol)
    assert c.gradient_norm == pytest.approx(math.sqrt(26), rel=1e-15)
    # the gap is to the next Ritz value (98), widened by its residual
    assert 1.0 - 1e-6 < c.gap <= 1.0
    assert c.converged and c.error_estimate < 1e-6
    assert "GradientConcentration(which='LA', k=2" in repr(c)
    # the most negative and the largest in magnitude
    B = np.diag(np.concatenate([[-50.0, -40.0], np.linspace(-1, 1, 96), [30.0, 45.0]]))
    h = np.ones(100)
    sa = gradient_concentration(B, h, k=2, which="SA")
    np.testing.assert_allclose(sa.eigenvalues, [-50.0, -40.0], rtol=1e-12)
    assert sa.fraction == pytest.approx(2 / 100, abs=1e-10)
    lm = gradient_concentration(B, h, k=3, which="LM")
    np.testing.assert_allclose(lm.eigenvalues, [-50.0, -40.0, 45.0], rtol=1e-12)
    assert lm.fraction == pytest.approx(3 / 100, abs=1e-10)
    assert lm.gap == pytest.approx(10.0, abs=1e-6)  # |-40| - |30|


@pytest.mark.parametrize("dtype, scale", [
    ("float64", 1e160), ("float64", 1e-170), ("float64", 1e300), ("float64", 1e-300),
    ("float32", 1e20), ("float32", 1e-22), ("float32", 1e35),
])
def test_gradient_of_any_scale_gives_the_exact_fraction(dtype, scale):
    """The fraction is scale-free: squaring g without scaling overflowed (NaN, or a
    plausible 0.0 in float32) or underflowed (NaN) for large or small finite g."""
    A = np.diag(np.arange(1.0, 101.0)).astype(dtype)
    g = np.zeros(100, dtype=dtype)
    g[-1], g[0] = 3.0 * scale, 4.0 * scale  # 9 of 25 in the top eigenvector
    assert np.all(np.isfinite(g)) and np.all(g[[0, -1]] != 0)
    c = gradient_concentration(A, g, k=1, dtype=dtype)
    eps = float(np.finfo(dtype).eps)
    # Davis-Kahan with the separation 100 - 99 = 1, plus rounding
    tol = float(np.sqrt(np.sum(c.residuals**2))) + 10 * eps
    assert abs(c.fraction - 9 / 25) <= tol
    np.testing.assert_allclose(c.overlaps, [9 / 25], rtol=0, atol=tol)
    exact_norm = 5.0 * float(np.abs(g[0])) / 4.0  # ||(3s, 4s)|| = 5s, s as stored
    assert c.gradient_norm == pytest.approx(exact_norm, rel=10 * eps)
    assert math.isfinite(c.error_estimate) and c.converged


@pytest.mark.parametrize("n", [10, 300])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_degenerate_eigenvalues_are_not_separated(n, which):
    """A repeated eigenvalue split by rounding (the identity: computed gaps of 0 to 2.2e-16,
    which gave error_estimate 1.35 and 2.0 for SA before) is not separated: the gap is not
    larger than the edge eigenvalue's residual plus 8 eps |lambda| (GAP_ROUNDING), so
    error_estimate is inf. numpy's eigvalsh confirms the degeneracy."""
    from specdens.analysis import GAP_ROUNDING

    rng = np.random.default_rng(0)
    g = rng.standard_normal(n)
    A = np.eye(n)
    lam = np.linalg.eigvalsh(A)
    assert np.ptp(lam) == 0.0
    c = gradient_concentration(A, g, k=2, which=which)
    np.testing.assert_allclose(c.eigenvalues, [1.0, 1.0], rtol=0, atol=4 * EPS)
    assert abs(c.gap) <= float(c.residuals.max()) + GAP_ROUNDING * EPS
    assert c.error_estimate == math.inf
    # a rotated matrix whose 2nd and 3rd largest eigenvalues coincide
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    mu = np.concatenate([np.linspace(-1.0, 1.0, n - 3), [3.0, 3.0, 4.0]])
    B = (Q * mu) @ Q.T
    B = (B + B.T) / 2
    mu_ref = np.linalg.eigvalsh(B)
    assert mu_ref[-2] - mu_ref[-3] <= 10 * n * EPS * 4.0  # degenerate up to rounding
    assert gradient_concentration(B, g, k=2, which="LA").error_estimate == math.inf


@pytest.mark.parametrize("seed", range(10))
def test_separation_allowance_follows_the_products_dtype(seed):
    """A float32 matrix plus a float64 one has float32 products. Its two largest
    eigenvalues, 5 and the next float32 (one ulp, 2**-21 = 0.8 eps32 * 5, apart), are
    within the rounding allowance GAP_ROUNDING * eps32 * max|lambda| = 8 eps32 * 5,
    so they are not separated: error_estimate is inf from every start vector (with
    eps64 the allowance vanished, and a split of the pair by float32 rounding passed for
    a gap from some start vectors)."""
    from specdens.analysis import GAP_ROUNDING

    n = 100
    top = np.float32(5.0)
    lam = np.concatenate([np.linspace(-1.0, 1.0, n - 2), [top, np.nextafter(top, np.inf)]])
    A32 = np.diag(lam.astype(np.float32))
    exact = np.linalg.eigvalsh(A32.astype(np.float64))
    assert 0 < exact[-1] - exact[-2] < GAP_ROUNDING * np.finfo(np.float32).eps * 5.0
    op = specdens.aslinearoperator(A32) + specdens.aslinearoperator(np.zeros((n, n)))
    g = np.random.default_rng(seed).standard_normal(n)
    c = gradient_concentration(op, g, k=1, seed=seed)
    assert c.converged
    assert c.error_estimate == math.inf


def test_a_small_genuine_gap_is_separated():
    """The allowance is at rounding level: a relative gap of 1e-6 still gives a finite
    Davis-Kahan bound, which holds against numpy's eigh."""
    n = 100
    lam = np.concatenate([np.linspace(0.0, 1.0, n - 2), [2.0, 2.0 + 2e-6]])
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * lam) @ Q.T
    A = (A + A.T) / 2
    g = rng.standard_normal(n)
    c = gradient_concentration(A, g, k=1, tol=1e-14)
    w, U = np.linalg.eigh(A)
    exact = float((U[:, -1] @ g) ** 2 / (g @ g))
    assert math.isfinite(c.error_estimate) and c.gap > 1e-6
    # the reference's own error: ~ n eps ||A|| / gap (backward-stable eigh)
    assert abs(c.fraction - exact) <= c.error_estimate + 10 * n * EPS * 2.0 / 2e-6


def test_gap_unknown_when_no_next_eigenvalue():
    A = np.diag([1.0, 2.0, 3.0])
    c = gradient_concentration(A, np.array([1.0, 1.0, 1.0]), k=2)
    assert math.isnan(c.gap) and math.isnan(c.error_estimate)
    assert c.fraction == pytest.approx(2 / 3, abs=1e-12)


@pytest.mark.parametrize(
    "g, k, which, exc, needle",
    [
        (np.zeros(50), 3, "LA", ValueError, "zero"),
        (np.full(50, np.nan), 3, "LA", ValueError, "NaN"),
        (np.r_[np.inf, np.ones(49)], 3, "LA", ValueError, "Inf"),
        (np.ones(49), 3, "LA", ValueError, "shape"),
        (np.ones((50, 1)), 3, "LA", ValueError, "shape"),
        (np.ones(50), 50, "LA", ValueError, "smaller than the operator size"),
        (np.ones(50), 0, "LA", ValueError, "at least 1"),
        (np.ones(50), 3, "BE", ValueError, "which"),
        (np.ones(50), 3, "SM", ValueError, "which"),
    ],
)
def test_bad_input_names_the_problem(g, k, which, exc, needle):
    with pytest.raises(exc, match=needle):
        gradient_concentration(np.diag(np.arange(1.0, 51.0)), g, k, which=which)


def test_gradient_from_another_library_is_refused():
    with pytest.raises(TypeError, match="torch array but the operator works on numpy"):
        gradient_concentration(np.eye(10) * np.arange(10), torch.ones(10), 2)


# -- a real network against the dense Hessian --------------------------------------------
def _digits_mlp():
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data[:400] / 16.0, dtype=torch.float64)
    y = torch.tensor(d.target[:400], dtype=torch.int64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 10)).double()
    crit = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(60):
        opt.zero_grad()
        crit(model(X), y).backward()
        opt.step()
    return model, crit, X, y


def _dense_reference(model, crit, X, y, wd):
    """Loss of the flat parameter vector, its Hessian and gradient by plain autograd."""
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]

    def f(theta):
        parts = torch.split(theta, sizes)
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        out = torch.func.functional_call(model, params, (X,))
        return crit(out, y) + 0.5 * wd * torch.dot(theta, theta)

    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    H = torch.autograd.functional.hessian(f, theta).numpy()
    g = torch.autograd.functional.jacobian(f, theta).numpy()
    return 0.5 * (H + H.T), g


@pytest.fixture(scope="module")
def network():
    from specdens.backends.torch import ModelState, gradient, hessian

    model, crit, X, y = _digits_mlp()
    wd = 1e-3
    before = ModelState.capture(model)
    op = hessian(model, crit, [(X[:256], y[:256]), (X[256:], y[256:])], weight_decay=wd)
    g = gradient(model, crit, [(X[:256], y[:256]), (X[256:], y[256:])], weight_decay=wd)
    H, g_ref = _dense_reference(model, crit, X, y, wd)
    assert before.differences(model) == []
    return op, g, H, g_ref


def test_operator_and_gradient_match_plain_autograd(network):
    op, g, H, g_ref = network
    n = H.shape[0]
    assert n == 610
    scale = np.linalg.norm(H, 2)
    # products accumulate over 2 batches in float64: rounding ~ n eps ||H||
    np.testing.assert_allclose(specdens.testing.dense_matrix(op), H, rtol=0,
                               atol=10 * n * EPS * scale)
    np.testing.assert_allclose(g.numpy(), g_ref, rtol=0, atol=10 * n * EPS * np.abs(g_ref).max())


def _exact(H, g, which, k):
    lam, U = np.linalg.eigh(H)
    n = lam.size
    if which == "LA":
        idx, rest = np.arange(n - k, n), np.arange(n - k)
    elif which == "SA":
        idx, rest = np.arange(k), np.arange(k, n)
    else:
        order = np.argsort(-np.abs(lam), kind="stable")
        idx, rest = np.sort(order[:k]), np.sort(order[k:])
    proj = U[:, idx].T @ g
    return lam, U, idx, rest, float(proj @ proj / (g @ g)), (proj**2) / (g @ g)


@pytest.mark.parametrize("which, k", [("LA", 10), ("LA", 3), ("SA", 4), ("LM", 6)])
def test_concentration_equals_dense_computation(network, which, k):
    op, g, H, g_ref = network
    n = H.shape[0]
    c = gradient_concentration(op, g, k, which=which)
    lam, U, idx, rest, exact, exact_overlaps = _exact(H, g_ref, which, k)
    assert c.converged
    np.testing.assert_allclose(c.eigenvalues, lam[idx], rtol=0,
                               atol=float(c.residuals.max()) + 10 * n * EPS * abs(lam).max())
    # Davis-Kahan with the exact separation delta between the computed eigenvalues and the
    # rest of the spectrum, plus the dense reference's own error.
    if which == "LM":
        delta = float(np.min(np.abs(c.eigenvalues)) - np.max(np.abs(lam[rest])))
    else:
        delta = float(np.min(np.abs(c.eigenvalues[:, None] - lam[rest][None, :])))
    assert delta > 1e-4 * abs(lam).max(), "the test needs a separated eigenspace"
    rnorm = float(np.sqrt(np.sum(c.residuals**2)))
    dense_gap = float(np.min(np.abs(lam[idx][:, None] - lam[rest][None, :])))
    allowance = 10 * n * EPS * abs(lam).max() / dense_gap + 10 * k * EPS
    tol = rnorm / delta + allowance
    assert tol < 1e-5  # the check is tight, not vacuous
    assert abs(c.fraction - exact) <= tol, (c.fraction, exact, tol)
    # the reported gap never exceeds the true separation, so error_estimate is a bound
    assert c.gap <= delta * (1 + 1e-12) + 1e-300
    assert abs(c.fraction - exact) <= c.error_estimate + allowance
    # each overlap, with the separation of its own eigenvalue from all the others
    for i, j in enumerate(idx):
        others = np.delete(lam, j)
        gap_i = float(np.min(np.abs(c.eigenvalues[i] - others)))
        tol_i = c.residuals[i] / gap_i + 10 * n * EPS * abs(lam).max() / gap_i + 10 * EPS
        assert abs(c.overlaps[i] - exact_overlaps[i]) <= tol_i
    # the concentration of a real gradient is a real share, well inside [0, 1]
    assert 0.0 < c.fraction < 1.0


def test_concentration_on_a_float32_operator_uses_float64_vectors(network):
    """eigsh works in float64 on a float32 model's operator; the gradient is cast."""
    from specdens.backends.torch import gradient, hessian

    model, crit, X, y = _digits_mlp()
    model = model.float()
    op = hessian(model, crit, (X[:100].float(), y[:100]))
    g = gradient(model, crit, (X[:100].float(), y[:100]))
    c = gradient_concentration(op, g, 3)
    H = specdens.testing.dense_matrix(op)
    lam, U, idx, rest, exact, _ = _exact(0.5 * (H + H.T), g.double().numpy(), "LA", 3)
    delta = float(np.min(c.eigenvalues) - lam[rest].max())
    # residuals include the float32 products' rounding (eigsh's tol is sqrt(eps32))
    assert abs(c.fraction - exact) <= float(np.sqrt(np.sum(c.residuals**2))) / delta + 1e-6


# -- outliers, bulk edge, negative mass ---------------------------------------------------
@pytest.fixture(scope="module")
def spiked():
    """n = 1000: a bulk uniform on [-0.2, 1] and three outliers 10, 20, 30."""
    rng = np.random.default_rng(7)
    bulk_vals = np.linspace(-0.2, 1.0, 997)
    lam = np.concatenate([bulk_vals, [10.0, 20.0, 30.0]])
    Q, _ = np.linalg.qr(rng.standard_normal((1000, 1000)))
    A = (Q * lam) @ Q.T
    A = 0.5 * (A + A.T)
    density = specdens.slq(A, num_steps=60, num_probes=8, seed=3)
    return A, lam, bulk_vals, density


def test_spectrum_stats_against_the_known_spectrum(spiked):
    A, lam, bulk_vals, density = spiked
    top = specdens.eigsh(A, 3).eigenvalues
    st = spectrum_stats(density, top)
    assert isinstance(st, SpectrumStats)
    assert st.num_outliers == 3 and st.num_lower_outliers == 0
    np.testing.assert_allclose([o.value for o in st.outliers], [10.0, 20.0, 30.0], rtol=1e-9)
    assert st.num_top_above == 3
    assert st.largest == pytest.approx(30.0, rel=1e-9)
    # the bulk edge is the 99% quantile of the SLQ measure without the outliers. Its error
    # in CDF terms: one quadrature weight (Chebyshev-Markov-Stieltjes) plus the probes'
    # noise (Rademacher: variance <= 2/n per probe)
    loc, mass = density.atoms()
    w_max = float(mass[np.abs(loc) < 2].max() * density.num_probes)
    sd = math.sqrt(2 / 1000 / density.num_probes)
    F = float(np.mean(bulk_vals <= st.bulk.upper))
    assert abs(F - 0.99) <= w_max + 4 * sd, (F, w_max, sd)
    assert st.edge_ratio == pytest.approx(st.largest / st.bulk.upper, rel=1e-15)
    assert st.bulk == bulk(density)
    assert st.outliers == outliers(density)
    # negative mass: the same functional as SpectralDensity.fraction_negative, and close to
    # the exact 1/6 of the bulk below 0 within one weight and the probe noise
    assert st.negative_mass == pytest.approx(density.fraction_negative(), abs=1e-15)
    exact_neg = float(np.mean(lam < 0))
    assert abs(st.negative_mass - exact_neg) <= w_max + 4 * sd
    assert "SpectrumStats(num_outliers=3" in repr(st)


def test_negative_mass_estimate_and_its_standard_error(spiked):
    _, _, _, density = spiked
    est = negative_mass(density, tol=0.05)
    valid = np.arange(density.nodes.shape[1])[None, :] < density.lengths[:, None]
    per = np.sum(np.where(valid & (density.nodes < -0.05), density.weights, 0.0), axis=1)
    assert est.value == pytest.approx(per.mean(), abs=1e-15)
    assert est.stderr == pytest.approx(per.std(ddof=1) / math.sqrt(per.size), rel=1e-12)
    assert est.num_probes == density.num_probes
    with pytest.raises(ValueError, match="tol"):
        negative_mass(density, tol=-1.0)
    with pytest.raises(TypeError, match="SpectralDensity"):
        negative_mass(np.eye(3))


def test_edge_ratio_is_nan_for_a_negative_bulk():
    A = np.diag(np.concatenate([np.linspace(-2.0, -1.0, 300), [5.0]]))
    st = spectrum_stats(specdens.slq(A, num_steps=40, num_probes=2))
    assert st.bulk.upper < 0 and math.isnan(st.edge_ratio)
    assert st.num_outliers == 1 and st.num_top_above is None
    with pytest.raises(ValueError, match="finite"):
        spectrum_stats(specdens.slq(A, num_steps=10), [np.nan])
    # a string was read as the number it spells, a matrix flattened into "eigenvalues"
    d = specdens.slq(A, num_steps=10)
    with pytest.raises(TypeError, match="eigenvalues must be a 1-D array of numbers"):
        spectrum_stats(d, "5")
    with pytest.raises(ValueError, match=r"eigenvalues must be 1-D.*shape \(2, 2\)"):
        spectrum_stats(d, np.eye(2))


def test_negative_mass_bounds_contain_the_exact_fraction():
    """For a diagonal matrix, a Rademacher probe's spectral measure is the spectrum itself
    (v_i^2 = 1/n), so the Chebyshev-Markov-Stieltjes bounds must contain the exact share."""
    from specdens.analysis import negative_mass_bounds

    lam = np.linspace(-1.0, 2.0, 601)
    exact = float(np.mean(lam < -0.1))
    widths = []
    for steps in (6, 12, 40):
        d = specdens.slq(np.diag(lam), num_steps=steps, num_probes=3, seed=1)
        lo, hi = negative_mass_bounds(d, tol=0.1)
        assert lo - 1e-12 <= exact <= hi + 1e-12, (steps, lo, exact, hi)
        assert lo - 1e-12 <= negative_mass(d, tol=0.1).value <= hi + 1e-12
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]  # more Lanczos steps resolve it better
    st = spectrum_stats(d, negative_tol=0.1)
    assert st.negative_mass_bounds == (lo, hi)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edge_ratio_of_a_low_rank_psd_matrix_is_inf(dtype):
    """A rank-3 positive semi-definite matrix: 397 eigenvalues are exactly 0, so the bulk
    edge is 0 and the Ritz values there are rounding residues of either sign (1e-18 to
    1e-15 in float64, ~1e-7 in float32). The ratio was 1e15 to 1e18, or NaN when the
    residue was negative; an edge within the rounding floor (the smallest residual bound,
    4 eps max|theta| once a Ritz value has converged) now counts as 0: inf, documented.
    The floor is far below any real bulk edge: the spiked spectrum's ratio is unchanged
    (test_spectrum_stats_against_the_known_spectrum), and a negative edge stays NaN."""
    n = 400
    for seed in range(6):
        X = np.random.default_rng(seed).standard_normal((n, 3))
        A = (X @ np.diag([1.0, 2.0, 3.0]) @ X.T / n).astype(dtype)
        density = specdens.slq(A, num_steps=10, num_probes=4, seed=seed)
        st = spectrum_stats(density)
        exact = np.linalg.eigvalsh(A.astype(np.float64))
        assert abs(st.bulk.upper) <= 4 * np.finfo(dtype).eps * np.max(np.abs(exact))
        assert st.edge_ratio == math.inf, (seed, st.bulk.upper, st.edge_ratio)
        assert st.num_outliers == 3
        assert st.largest == pytest.approx(exact[-1], rel=1e-5)
    # the zero matrix: no top above the bulk either, the ratio has no meaning
    assert math.isnan(spectrum_stats(specdens.slq(np.zeros((5, 5)), num_steps=3)).edge_ratio)
