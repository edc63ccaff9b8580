"""Deflated SLQ: exact atoms plus SLQ of the deflated operator, unbiased, lower variance.

References are exact: the dense matrix and ``numpy.linalg.eigvalsh``. Statistical checks
use fixed seeds and bounds of 4 standard errors (a false failure has probability about
6e-5 per check, and the seeds make every run deterministic).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import sym_from_spectrum

import specdens
from specdens.examples import hessian_like

N_SMALL = 300
STEPS = 25


@pytest.fixture(scope="module")
def outlier_case():
    """n = 300: bulk in [-0.2, 1] plus 6 outliers; dense matrix, exact eigenvalues and
    one eigsh run of the top 6 pairs, reused by the tests."""
    rng = np.random.default_rng(7)
    lam = np.concatenate([np.linspace(-0.2, 1.0, N_SMALL - 6), [6.0, 9.0, 14.0, 20.0, 31.0,
                                                                  45.0]])
    A = sym_from_spectrum(lam, rng)
    eig = specdens.eigsh(A, k=6, which="LA")
    return A, np.linalg.eigvalsh(A), eig


def _exact_quadratic_form_variance(B: np.ndarray) -> float:
    """Var[z^T B z] for a Rademacher z (Hutchinson, 1989): 2 (||B||_F^2 - sum B_ii^2)."""
    return 2.0 * (np.sum(B * B) - np.sum(np.diag(B) ** 2))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sphere"])
def test_deflated_estimates_are_unbiased_over_seeds(outlier_case, kind):
    """The mean over 40 seeds (5 probes each) of tr(A^p)/n and tr(exp(A/10))/n lies within
    4 standard errors of the exact value; 25 steps make the quadrature exact for p <= 49
    and its error for the exponential below 1e-12 (checked)."""
    A, lam, eig = outlier_case
    funcs = {1: lambda t: t, 2: lambda t: t**2, 3: lambda t: t**3,
             "exp": lambda t: np.exp(t / 10)}
    exact = {1: lam.mean(), 2: np.mean(lam**2), 3: np.mean(lam**3),
             "exp": np.mean(np.exp(lam / 10))}
    per_seed = {key: [] for key in funcs}
    for seed in range(40):
        d = specdens.slq(A, num_steps=STEPS, num_probes=5, seed=seed, deflate=eig, probes=kind)
        for key, fn in funcs.items():
            est = d.trace(fn)
            assert est.quadrature_error <= 1e-12 * d.n * abs(exact[key]) + 1e-9
            per_seed[key].append(est.value / d.n)
    for key in funcs:
        v = np.asarray(per_seed[key])
        se = v.std(ddof=1) / np.sqrt(v.size)
        assert se > 0  # a real spread over seeds, so the bound is not vacuous
        assert abs(v.mean() - exact[key]) <= 4 * se, (kind, key, v.mean(), exact[key], se)


def test_scales_atoms_and_spectrum_of_the_deflated_part(outlier_case):
    A, lam, eig = outlier_case
    n, k = A.shape[0], eig.k
    d = specdens.slq(A, num_steps=STEPS, num_probes=6, seed=1, deflate=eig, probes="sphere")
    # sphere probes: exact scale (n - k) / n, so the measure has mass exactly 1
    np.testing.assert_allclose(d.probe_scales, (n - k) / n, rtol=1e-15)
    loc, mass = d.atoms()
    assert mass.sum() == pytest.approx(1.0, abs=1e-13)
    np.testing.assert_allclose(d.deflated_eigenvalues, lam[-k:], rtol=1e-10)
    assert np.all(d.deflated_residuals <= 1e-6 * np.abs(lam).max())
    # the k atoms carry mass 1/n each
    for v in lam[-k:]:
        assert mass[np.isclose(loc, v, rtol=1e-9)].sum() == pytest.approx(1.0 / n, rel=1e-12)
    # the quadrature nodes lie in the spectrum of the deflated part: no outlier is left
    valid = np.arange(d.num_steps)[None, :] < d.lengths[:, None]
    tol = 1e-8 * np.abs(lam).max()
    assert d.nodes[valid].max() <= lam[-k - 1] + tol
    assert d.nodes[valid].min() >= lam[0] - tol
    b = d.bounds()
    assert b.upper == pytest.approx(lam[-1], rel=1e-10) and b.upper_residual < 1e-6
    # Rademacher probes: scale ||P v||^2 / n, mean (n - k) / n over many probes
    r = specdens.slq(A, num_steps=3, num_probes=400, seed=2, deflate=eig)
    assert not np.allclose(r.probe_scales, (n - k) / n)
    se = r.probe_scales.std(ddof=1) / np.sqrt(400)
    assert abs(r.probe_scales.mean() - (n - k) / n) <= 4 * se
    # densities and CDF include the atoms
    assert d.cdf(np.array([lam[-1] + 1]))[0] == pytest.approx(1.0, abs=1e-13)
    assert d.cdf(np.array([lam[-k - 1] + 1e-6]))[0] == pytest.approx((n - k) / n, abs=1e-13)
    assert "deflated=6" in repr(d)


def test_variance_reduction_matches_hutchinson_theory(outlier_case):
    """Per-probe moments are exact quadratic forms (degree <= 2m - 1), so their variance is
    Hutchinson's: 2(||B||_F^2 - sum B_ii^2)/n^2 with B = A^p (plain) or P A^p P
    (deflated). Check the empirical variances against it and the reduction it predicts."""
    A, lam, eig = outlier_case
    n = A.shape[0]
    V = eig.eigenvectors
    P = np.eye(n) - V @ V.T
    probes = 400
    plain = specdens.slq(A, num_steps=3, num_probes=probes, seed=5)
    defl = specdens.slq(A, num_steps=3, num_probes=probes, seed=5, deflate=eig)
    for p in (1, 2):
        B = np.linalg.matrix_power(A, p)
        var_plain = _exact_quadratic_form_variance(B) / n**2
        var_defl = _exact_quadratic_form_variance(P @ B @ P) / n**2
        emp_plain = plain.moments(p).stderr ** 2 * probes
        emp_defl = defl.moments(p).stderr ** 2 * probes
        # sample variances of 400 draws: within a factor 1.5 of the exact ones
        assert var_plain / 1.5 <= emp_plain <= 1.5 * var_plain, (p, emp_plain, var_plain)
        assert var_defl / 1.5 <= emp_defl <= 1.5 * var_defl, (p, emp_defl, var_defl)
        # The reduction in standard error. For Gaussian probes it would be exactly
        # sqrt(sum lam^2p / sum_bulk lam^2p) (Var = 2 ||B||_F^2): 6.8x for p = 1 and 326x
        # for p = 2 here; Rademacher probes, which have no diagonal variance, gain more.
        gaussian_ratio = np.sqrt(np.sum(lam ** (2 * p)) / np.sum(lam[:-6] ** (2 * p)))
        assert gaussian_ratio > (6 if p == 1 else 300)
        assert np.sqrt(var_plain / var_defl) >= gaussian_ratio
        assert np.sqrt(emp_plain / emp_defl) >= gaussian_ratio / 1.5


def test_equal_matvec_budget_on_hessian_like():
    """At the same number of products (eigsh's included) the deflated estimate of
    tr(H)/n and tr(H^2)/n has a standard error at least 5x and 100x smaller."""
    op = hessian_like(1000)
    d = specdens.slq(op, num_steps=30, num_probes=20, seed=0, deflate=10)
    budget = d.matvecs
    assert budget == d.extra["deflation"]["eigsh_matvecs"] + 30 * 20
    plain = specdens.slq(op, num_steps=30, num_probes=budget // 30, seed=0)
    assert plain.matvecs <= budget
    ratio = np.asarray(plain.moments([1, 2]).stderr) / np.asarray(d.moments([1, 2]).stderr)
    assert ratio[0] > 5 and ratio[1] > 100, ratio
    exact = [op.eigenvalues.mean(), np.mean(op.eigenvalues**2)]
    est = d.moments([1, 2])
    assert np.all(np.abs(np.asarray(est.value) - exact) <= 4 * np.asarray(est.stderr))


def test_largest_magnitude_deflation_takes_negative_outliers():
    rng = np.random.default_rng(3)
    lam = np.concatenate([np.linspace(-1, 1, 194), [-40.0, -25.0, 8.0, 9.0, 30.0, 50.0]])
    A = sym_from_spectrum(lam, rng)
    la = specdens.slq(A, num_steps=20, num_probes=2, deflate=3)
    lm = specdens.slq(A, num_steps=20, num_probes=2, deflate=3, deflate_which="LM")
    np.testing.assert_allclose(la.deflated_eigenvalues, [9.0, 30.0, 50.0], rtol=1e-10)
    np.testing.assert_allclose(lm.deflated_eigenvalues, [-40.0, 30.0, 50.0], rtol=1e-10)
    assert lm.extra["deflation"]["which"] == "LM"
    assert lm.fraction_negative() == pytest.approx(np.mean(lam < 0), abs=0.05)


def test_reusing_an_eigsh_result_costs_no_eigensolver_products(outlier_case):
    # (only the k products that check the result against this operator)
    A, _, eig = outlier_case
    fresh = specdens.slq(A, num_steps=10, num_probes=3, seed=4, deflate=6)
    reused = specdens.slq(A, num_steps=10, num_probes=3, seed=4, deflate=eig)
    assert reused.extra["deflation"]["check_matvecs"] == eig.k
    assert reused.matvecs == 30 + eig.k
    assert fresh.matvecs == 30 + fresh.extra["deflation"]["eigsh_matvecs"]
    assert reused.extra["deflation"]["eigsh_matvecs"] == 0
    np.testing.assert_allclose(reused.nodes, fresh.nodes, atol=1e-8)


def test_deflated_density_file_roundtrip(outlier_case, tmp_path):
    A, _, eig = outlier_case
    d = specdens.slq(A, num_steps=10, num_probes=2, deflate=eig)
    p = tmp_path / "d.npz"
    d.save(p)
    with np.load(p, allow_pickle=False) as z:
        assert int(z["version"]) == 2  # version-1 readers refuse it instead of dropping atoms
    e = specdens.SpectralDensity.load(p)
    np.testing.assert_array_equal(e.deflated_eigenvalues, d.deflated_eigenvalues)
    np.testing.assert_array_equal(e.deflated_residuals, d.deflated_residuals)
    assert e.moments(2).value == d.moments(2).value
    plain = specdens.slq(A, num_steps=10, num_probes=2)
    plain.save(p)
    with np.load(p, allow_pickle=False) as z:
        assert int(z["version"]) == 1


def test_torch_deflation_matches_numpy(outlier_case):
    torch = pytest.importorskip("torch")
    A, _, _ = outlier_case
    d_np = specdens.slq(A, num_steps=15, num_probes=3, seed=2, deflate=4)
    d_t = specdens.slq(torch.tensor(A), num_steps=15, num_probes=3, seed=2, deflate=4)
    np.testing.assert_allclose(d_t.deflated_eigenvalues, d_np.deflated_eigenvalues, rtol=1e-12)
    np.testing.assert_allclose(d_t.probe_scales, d_np.probe_scales, rtol=1e-10)
    np.testing.assert_allclose(d_t.nodes, d_np.nodes, atol=1e-8)
    np.testing.assert_allclose(d_t.moments([1, 2]).value, d_np.moments([1, 2]).value,
                               rtol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"deflate": 300}, ValueError, "smaller than the operator size"),
        ({"deflate": -1}, ValueError, "at least 1"),
        ({"deflate": 2.5}, TypeError, "integer"),
        ({"deflate": 3, "deflate_which": "SM"}, ValueError, "LA"),
        ({"eigsh_options": {"tol": 1e-6}}, ValueError, "deflate"),
        # (was silently ignored: a plain estimate)
        ({"deflate_which": "SA"}, ValueError, "deflate_which='SA' only applies with deflate"),
        ({"deflate": 0, "deflate_which": "LA"}, ValueError, "only applies with deflate"),
        ({"deflate": 3, "eigsh_options": {"which": "SA"}}, ValueError, "which"),
    ],
)
def test_bad_deflation_arguments(outlier_case, kwargs, exc, match):
    A, _, _ = outlier_case
    with pytest.raises(exc, match=match):
        specdens.slq(A, num_steps=5, **kwargs)


def test_eigsh_result_of_another_operator_is_refused(outlier_case):
    _, _, eig = outlier_case
    with pytest.raises(ValueError, match="size 300"):
        specdens.slq(np.eye(50), num_steps=5, deflate=eig)
    no_vectors = specdens.eigsh(np.diag(np.arange(50.0)), k=2, return_eigenvectors=False)
    with pytest.raises(ValueError, match="eigenvectors"):
        specdens.slq(np.diag(np.arange(50.0)), num_steps=5, deflate=no_vectors)


def test_float32_operator_deflated_without_a_spurious_asymmetry_warning():
    """The deflated operator computes its projections in float64 but its products carry
    the float32 rounding of A: the engine's symmetry check must expect float32 noise."""
    import warnings

    rng = np.random.default_rng(0)
    M = rng.standard_normal((300, 300))
    M = (M + M.T) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = specdens.slq(M.astype(np.float32), num_steps=60, num_probes=3, deflate=5)
    assert d.deflated_eigenvalues.shape == (5,)
    # the atoms are the top eigenvalues of the float32 matrix, to float32 accuracy
    top = np.linalg.eigvalsh(M.astype(np.float32).astype(np.float64))[-5:]
    scale = np.max(np.abs(top))
    np.testing.assert_allclose(np.sort(d.deflated_eigenvalues), top,
                               atol=1e3 * np.finfo(np.float32).eps * scale)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_deflated_subspace_stays_out_of_the_lanczos_vectors(sign):
    """``P A P`` has the eigenvalue 0 on the deflated span; with the rest of the spectrum
    on one side of 0 (here [1, 2] and its mirror), the recurrence would amplify rounding
    along that span into Ritz values at 0 (weights ~1e-32, but bounds() and the density's
    grid took them for spectrum). Locked out at every step, every Ritz value of the
    deflated part lies in the rest of the spectrum, up to the rounding of Ritz values
    (~ m eps ||A||; 1e-10 ||A|| leaves a wide margin), on numpy and on torch."""
    rng = np.random.default_rng(15)
    n = 400
    rest = rng.uniform(1.0, 2.0, n - 3)
    lam = sign * np.r_[rest, [10.0, 20.0, 30.0]]
    A = sym_from_spectrum(lam, rng)
    which = "LA" if sign > 0 else "SA"
    tol = 1e-10 * 30.0
    lo, hi = lam[: n - 3].min(), lam[: n - 3].max()
    torch = pytest.importorskip("torch")
    for op in (A, torch.from_numpy(A)):
        d = specdens.slq(op, num_steps=80, num_probes=3, deflate=3, deflate_which=which)
        valid = d._valid()
        assert np.all(d.nodes[valid] >= lo - tol) and np.all(d.nodes[valid] <= hi + tol)
        b = d.bounds()
        assert (b.lower, b.upper) == pytest.approx((lam.min(), lam.max()), abs=1e-6)
        assert d.density()[0][0] > lam.min() - 0.5 * (hi - lo)


def _outlier_matrix(n=300):
    """Bulk N(0, 0.3^2) plus outliers 6..10 and -5..-3 (as in the review's repro)."""
    rng = np.random.default_rng(2)
    ev = np.concatenate([rng.standard_normal(n - 8) * 0.3, [10, 9, 8, 7, 6, -5, -4, -3]])
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * ev) @ Q.T, np.sort(ev)


def test_unconverged_eigsh_result_warns():
    """deflate= with an unconverged EigshResult (maxiter=0: residuals up to 3.6) gave a
    biased estimate without a word: tr(A^2)/n 1.262 +- 0.016 against the exact 1.358.
    It now draws an EigshWarning; a converged result draws none."""
    A, _ = _outlier_matrix()
    with pytest.warns(specdens.EigshWarning):
        bad = specdens.eigsh(A, 5, maxiter=0, ncv=8)
    assert not bad.converged
    with pytest.warns(specdens.EigshWarning, match="did not converge"):
        d = specdens.slq(A, num_steps=20, num_probes=2, deflate=bad)
    assert d.extra["deflation"]["check_matvecs"] == 5
    good = specdens.eigsh(A, 5)
    assert good.converged
    with warnings.catch_warnings():
        warnings.simplefilter("error", specdens.EigshWarning)
        specdens.slq(A, num_steps=20, num_probes=2, deflate=good)


def test_eigsh_result_of_another_operator_of_the_same_size_is_refused():
    """An EigshResult of diag(0..n-1) was accepted for another operator of the same n.
    One block product shows residuals ||A x - lambda x|| ~ 300 against the recorded
    ~4e-7; refused. The operator's own result (also one rounded to float32 and back,
    within float32 rounding) is accepted."""
    A, _ = _outlier_matrix()
    n = A.shape[0]
    other = specdens.eigsh(np.diag(np.arange(n, dtype=float)), 3)
    with pytest.raises(ValueError, match="another operator"):
        specdens.slq(A, num_steps=10, num_probes=2, deflate=other)
    own = specdens.eigsh(A, 3)
    d = specdens.slq(A, num_steps=10, num_probes=2, deflate=own)
    np.testing.assert_array_equal(d.deflated_eigenvalues, own.eigenvalues)
    own32 = specdens.eigsh(A.astype(np.float32), 3, dtype="float32")
    specdens.slq(A, num_steps=10, num_probes=2, deflate=own32)


def test_options_an_eigsh_result_cannot_honour_are_refused():
    """eigsh_options and a deflate_which other than the result's own were silently
    ignored with deflate=EigshResult."""
    A, _ = _outlier_matrix()
    r = specdens.eigsh(A, 3)
    with pytest.raises(ValueError, match="eigsh_options"):
        specdens.slq(A, num_steps=10, num_probes=2, deflate=r, eigsh_options={"tol": 1e-3})
    with pytest.raises(ValueError, match="deflate_which='SA'.*'LA'"):
        specdens.slq(A, num_steps=10, num_probes=2, deflate=r, deflate_which="SA")
    d = specdens.slq(A, num_steps=10, num_probes=2, deflate=r, deflate_which="LA")
    assert d.extra["deflation"]["which"] == "LA"
    sa = specdens.eigsh(A, 3, which="SA")
    d = specdens.slq(A, num_steps=10, num_probes=2, deflate=sa)  # its own which, by default
    assert d.extra["deflation"]["which"] == "SA"
    np.testing.assert_array_equal(d.deflated_eigenvalues, sa.eigenvalues)
