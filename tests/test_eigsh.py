"""Tests of specdens.eigsh against exact spectra, numpy.linalg.eigvalsh and ARPACK.

Tolerances come from the maths of the method:

* every returned pair satisfies the convergence test ``beta_m |s_i| <= tol * anorm`` with
  ``anorm <= ||A||``; the explicit residual differs from that estimate by the rounding
  errors of the Lanczos relation, ``O(eps ||A||)`` per basis vector, bounded here by
  ``10 * ncv * eps * ||A||``;
* for symmetric ``A`` and a unit ``x`` with ``r = ||A x - theta x||``, an eigenvalue lies
  within ``r`` of ``theta``, and within ``r**2 / delta`` when every other eigenvalue is at
  least ``delta`` away from ``theta`` (Kato-Temple; Parlett 1998, chapter 11);
* with full reorthogonalisation the basis, hence the Ritz vectors, are orthonormal to
  ``O(ncv * eps)``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg as sla
from hypothesis import given, settings
from hypothesis import strategies as st

from specdens import LanczosWarning, aslinearoperator
from specdens._array import to_numpy
from specdens.algorithms.eigsh import WHICH, EigshResult, EigshWarning, eigsh
from specdens.algorithms.lanczos import ScaleError

EPS64 = 2.0**-52
EPS32 = 2.0**-23


def matrix_with_spectrum(lam: np.ndarray, seed: int = 0) -> np.ndarray:
    """``Q diag(lam) Q^T`` with a random orthogonal ``Q``, exactly symmetric."""
    n = len(lam)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def expected(lam: np.ndarray, k: int, which: str) -> np.ndarray:
    """The ``k`` eigenvalues ``which`` asks for, ascending, from the full spectrum."""
    lam = np.sort(lam)
    if which == "LA":
        out = lam[-k:]
    elif which == "SA":
        out = lam[:k]
    elif which == "LM":
        out = lam[np.argsort(-np.abs(lam), kind="stable")[:k]]
    else:  # BE: k // 2 from the low end, the rest from the high end
        out = np.concatenate([lam[: k // 2], lam[len(lam) - (k - k // 2):]])
    return np.sort(out)


def check_result(r: EigshResult, A: np.ndarray, lam: np.ndarray, which: str, k: int,
                 eps: float = EPS64) -> None:
    """Everything the docstring of eigsh promises, against the exact spectrum ``lam``."""
    assert isinstance(r, EigshResult)
    assert r.converged and r.num_converged == k
    assert r.eigenvalues.shape == (k,) and r.residuals.shape == (k,)
    assert r.eigenvalues.dtype == np.float64 and r.residuals.dtype == np.float64
    assert np.all(np.diff(r.eigenvalues) >= 0), "eigenvalues must be ascending"
    norm = float(np.max(np.abs(lam)))
    slack = 10 * r.ncv * eps * norm
    # anorm is the largest |Ritz value| seen, a Rayleigh quotient: rounded inner products of
    # length n put it up to n eps ||A|| above ||A|| (Higham's gamma_n bound); ~20 eps is
    # seen at n = 300 with single-threaded BLAS
    assert r.anorm <= norm * (1 + A.shape[0] * eps)
    # The convergence test, and the explicit residuals it implies.
    assert np.all(r.residual_estimates <= r.tol * r.anorm)
    assert np.all(r.residuals <= r.tol * norm + slack), (r.residuals, r.tol * norm)
    # Eigenvalues: within the residual, and within residual**2 / gap, of the exact ones.
    want = expected(lam, k, which)
    err = np.abs(r.eigenvalues - want)
    assert np.all(err <= r.residuals + slack), (err, r.residuals)
    # delta: distance from theta to the eigenvalues other than the nearest one.
    spectrum = np.sort(lam)
    delta = np.array([
        np.min(np.abs(np.delete(spectrum, np.argmin(np.abs(spectrum - t))) - t))
        for t in r.eigenvalues
    ])
    with np.errstate(divide="ignore"):  # delta = 0 for a repeated eigenvalue: no bound
        quadratic = r.residuals**2 / delta
    assert np.all(err <= quadratic + slack), (err, quadratic)
    if r.eigenvectors is not None:
        X = to_numpy(r.eigenvectors)
        assert X.shape == (A.shape[0], k)
        assert np.max(np.abs(X.T @ X - np.eye(k))) <= 10 * r.ncv * eps
        # The reported residuals are the true ones.
        R = np.linalg.norm(A @ X - X * r.eigenvalues, axis=0)
        np.testing.assert_allclose(r.residuals, R, rtol=0, atol=slack)


# -- agreement with exact spectra, eigvalsh and ARPACK ---------------------------------


@pytest.fixture(scope="module")
def indefinite():
    """n = 300, eigenvalues uniform in [-3, 2] (indefinite, |lambda_min| > lambda_max)."""
    lam = np.sort(np.random.default_rng(11).uniform(-3.0, 2.0, 300))
    return matrix_with_spectrum(lam, seed=1), lam


@pytest.mark.parametrize("which", WHICH)
def test_matches_exact_eigvalsh_and_scipy(indefinite, which):
    A, lam = indefinite
    k = 5
    r = eigsh(A, k, which=which)
    check_result(r, A, lam, which, k)
    norm = float(np.max(np.abs(lam)))
    ref = expected(np.linalg.eigvalsh(A), k, which)
    np.testing.assert_allclose(r.eigenvalues, ref, rtol=0, atol=r.tol * norm)
    # ARPACK at machine precision (tol=0), with eigenvectors: ascending order.
    arpack = sla.eigsh(A, k, which=which, tol=0)[0]
    np.testing.assert_allclose(r.eigenvalues, arpack, rtol=0, atol=r.tol * norm)
    assert r.which == which and r.dtype == "float64"


@pytest.mark.parametrize("n, k", [(200, 1), (500, 8)])
def test_sizes_and_counts(n, k):
    lam = np.sort(np.random.default_rng(n).standard_normal(n)) ** 3
    A = matrix_with_spectrum(lam, seed=n)
    for which in ("LA", "SA"):
        check_result(eigsh(A, k, which=which), A, lam, which, k)


@pytest.mark.parametrize("tol", [1e-4, 1e-10])
def test_tolerance_is_met(indefinite, tol):
    A, lam = indefinite
    r = eigsh(A, 4, which="LM", tol=tol)
    assert r.tol == tol
    check_result(r, A, lam, "LM", 4)


def test_tighter_tolerance_costs_more_products(indefinite):
    A, _ = indefinite
    loose, tight = eigsh(A, 4, tol=1e-3), eigsh(A, 4, tol=1e-12)
    assert loose.matvecs < tight.matvecs
    assert tight.residuals.max() < loose.residuals.max()


def test_tol_zero_means_machine_precision(indefinite):
    A, lam = indefinite
    r = eigsh(A, 2, tol=0)
    assert r.tol == EPS64
    check_result(r, A, lam, "LA", 2)


def test_clustered_spectrum():
    """A tight cluster at the top (gaps 1e-4 ||A||) below an isolated eigenvalue."""
    n = 400
    lam = np.concatenate([np.linspace(0.0, 0.5, n - 6), 1.0 + 1e-4 * np.arange(5), [2.0]])
    A = matrix_with_spectrum(lam, seed=3)
    r = eigsh(A, 6, which="LA", ncv=30)
    check_result(r, A, lam, "LA", 6)


def test_return_eigenvectors_false(indefinite):
    A, _ = indefinite
    full = eigsh(A, 3, which="SA")
    vals = eigsh(A, 3, which="SA", return_eigenvectors=False)
    assert vals.eigenvectors is None
    np.testing.assert_array_equal(vals.eigenvalues, full.eigenvalues)
    np.testing.assert_array_equal(vals.residuals, full.residuals)


def test_deterministic_seed_and_v0(indefinite):
    A, lam = indefinite
    a, b = eigsh(A, 3, seed=7), eigsh(A, 3, seed=7)
    np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
    np.testing.assert_array_equal(a.eigenvectors, b.eigenvectors)
    v0 = np.random.default_rng(3).standard_normal(A.shape[0])
    check_result(eigsh(A, 3, v0=v0), A, lam, "LA", 3)


def test_repr(indefinite):
    A, _ = indefinite
    text = repr(eigsh(A, 2))
    assert text.startswith("EigshResult(which='LA', k=2, eigenvalues=[")
    assert "converged=True (2/2)" in text and "matvecs=" in text


def test_matvec_count_is_exact(indefinite):
    A, lam = indefinite
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v

    op = aslinearoperator(matvec, shape=A.shape, dtype="float64")
    r = eigsh(op, 3)
    assert r.matvecs == len(calls)
    check_result(r, A, lam, "LA", 3)


# -- other operators and array libraries ----------------------------------------------


def test_scipy_sparse_matrix():
    n = 500
    rng = np.random.default_rng(4)
    B = scipy.sparse.random(n, n, density=0.01, random_state=rng, format="csr")
    A = (B + B.T + scipy.sparse.diags(np.linspace(-1.0, 1.0, n))).tocsr()
    dense = A.toarray()
    lam = np.linalg.eigvalsh(dense)
    for which in ("LA", "BE"):
        r = eigsh(A, 4, which=which)
        check_result(r, dense, lam, which, 4)
        assert isinstance(r.eigenvectors, np.ndarray)
        arpack = sla.eigsh(A, 4, which=which, tol=0)[0]
        np.testing.assert_allclose(r.eigenvalues, arpack, rtol=0, atol=r.tol * np.abs(lam).max())


def test_scipy_linear_operator(indefinite):
    A, lam = indefinite
    r = eigsh(sla.aslinearoperator(A), 3, which="SA")
    check_result(r, A, lam, "SA", 3)


def test_torch_tensor_stays_torch(indefinite):
    torch = pytest.importorskip("torch")
    A, lam = indefinite
    T = torch.asarray(A)
    r = eigsh(T, 4, which="BE")
    assert isinstance(r.eigenvectors, torch.Tensor)
    assert r.eigenvectors.dtype == torch.float64 and r.eigenvectors.device == T.device
    check_result(r, A, lam, "BE", 4)


def float32_problem(lam: np.ndarray, seed: int):
    """A float32 matrix, and the exact (float64) spectrum of that rounded matrix: the
    reference. Its float32 products differ from exact ones by ~sqrt(n) eps32 ||A||,
    inside the slack ``10 * ncv * eps32 * ||A||`` of check_result."""
    A32 = matrix_with_spectrum(lam, seed=seed).astype(np.float32)
    A = A32.astype(np.float64)
    return A32, A, np.linalg.eigvalsh(A)


def test_torch_float32():
    """float32 operator and arithmetic: eps is eps32 and the default tol sqrt(eps32)."""
    torch = pytest.importorskip("torch")
    A32, A, lam = float32_problem(np.concatenate([np.linspace(-1, 1, 197), [1.5, 2, 3]]), 5)
    r = eigsh(torch.asarray(A32), 3, dtype="float32")
    assert r.eigenvectors.dtype == torch.float32 and r.dtype == "float32"
    assert r.tol == pytest.approx(np.sqrt(EPS32))
    check_result(r, A, lam, "LA", 3, eps=EPS32)


def test_float32_operator_float64_arithmetic():
    """float64 Lanczos on a float32 operator: the operator's eps sets the default tol."""
    torch = pytest.importorskip("torch")
    A32, A, lam = float32_problem(np.concatenate([np.linspace(0, 1, 197), [1.5, 2, 3]]), 6)
    r = eigsh(torch.asarray(A32), 3, v0=torch.ones(200, dtype=torch.float32))
    assert r.eigenvectors.dtype == torch.float64 and r.dtype == "float64"
    assert r.tol == pytest.approx(np.sqrt(EPS32))
    check_result(r, A, lam, "LA", 3, eps=EPS32)


def test_float32_matrix_plus_float64_matrix_uses_the_products_eps():
    """A float32 matrix plus a float64 one has dtype float64 but products carrying float32
    rounding: eps32 sets the default tol and the symmetry test, as for the float32
    matrix alone (not eps64, which read that rounding as asymmetry and set a tol below
    it)."""
    A32, A, lam = float32_problem(np.concatenate([np.linspace(-1, 1, 197), [1.5, 2, 3]]), 7)
    n = A.shape[0]
    op = aslinearoperator(A32) + aslinearoperator(np.zeros((n, n)))
    assert op.dtype == np.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no LanczosWarning, no EigshWarning
        r = eigsh(op, 3)
    assert r.tol == pytest.approx(np.sqrt(EPS32))
    check_result(r, A, lam, "LA", 3, eps=EPS32)
    # Adding exact zeros changes no product: the run is that of the float32 matrix.
    alone = eigsh(aslinearoperator(A32), 3)
    np.testing.assert_array_equal(r.eigenvalues, alone.eigenvalues)
    assert (r.num_restarts, r.matvecs) == (alone.num_restarts, alone.matvecs)


def test_jax_array_stays_jax():
    jax = pytest.importorskip("jax")
    if not hasattr(jax, "enable_x64"):
        pytest.skip("this jax has no jax.enable_x64 context manager for float64")
    import jax.numpy as jnp

    lam = np.concatenate([np.linspace(-1.0, 1.0, 150), [2.0, 2.5, 4.0]])
    A = matrix_with_spectrum(lam, seed=7)
    with jax.enable_x64(True):
        J = jnp.asarray(A)
        assert J.dtype == jnp.float64
        r = eigsh(J, 3)
        assert isinstance(r.eigenvectors, jax.Array)
        assert r.eigenvectors.dtype == jnp.float64
        check_result(r, A, lam, "LA", 3)


def test_array_api_strict():
    xps = pytest.importorskip("array_api_strict")
    lam = np.concatenate([np.linspace(-4.0, 1.0, 200), [1.5, 3.0]])
    A = matrix_with_spectrum(lam, seed=8)
    S = xps.asarray(A)
    r = eigsh(S, 3, which="LM")
    assert type(r.eigenvectors).__module__.startswith("array_api_strict")
    assert r.eigenvectors.device == S.device
    check_result(r, A, lam, "LM", 3)


# -- invariant subspaces, multiplicities, tiny operators ---------------------------------


def test_repeated_eigenvalues_found_after_breakdown():
    """Three distinct eigenvalues: every Krylov space is invariant after 3 steps, and the
    random restarts find all five copies of the largest one, as ARPACK does."""
    n = 200
    lam = np.repeat([1.0, 2.0, 3.0], [n - 10, 5, 5])
    A = matrix_with_spectrum(lam, seed=2)
    r = eigsh(A, 6)
    check_result(r, A, lam, "LA", 6)  # [2, 3, 3, 3, 3, 3]
    # Each expansion stops at its breakdown, after at most 3 steps (plus the k products
    # of the final residual check).
    assert r.num_restarts >= 4 and r.matvecs <= 3 * (r.num_restarts + 1) + 6


@pytest.mark.parametrize("library", ["numpy", "torch", "array_api_strict"])
def test_low_rank_operator(library):
    """Rank 3: the first Krylov space is invariant; the zero eigenvalues come from the
    random restart, and the complement check confirms the three nonzero ones. Numpy
    stops at a breakdown at once; other libraries find it after the expansion."""
    n = 300
    U = np.linalg.qr(np.random.default_rng(9).standard_normal((n, 3)))[0]
    A = (U * np.array([1.0, 2.0, 5.0])) @ U.T
    A = (A + A.T) / 2
    M = A
    if library == "torch":
        M = pytest.importorskip("torch").asarray(A)
    elif library == "array_api_strict":
        M = pytest.importorskip("array_api_strict").asarray(A)
    lam = np.concatenate([np.zeros(n - 3), [1.0, 2.0, 5.0]])
    for which, k in (("LA", 5), ("SA", 2), ("BE", 4)):
        r = eigsh(M, k, which=which)
        check_result(r, A, lam, which, k)  # LA: [0, 0, 1, 2, 5]
        # Invariant subspaces: the residuals are at rounding level, far below tol.
        assert r.residuals.max() <= 10 * r.ncv * EPS64 * 5.0


def test_zero_operator():
    r = eigsh(np.zeros((6, 6)), 3)
    np.testing.assert_array_equal(r.eigenvalues, np.zeros(3))
    assert r.converged and np.all(r.residuals == 0)


@pytest.mark.parametrize("which", WHICH)
def test_tiny_operators(which):
    lam = np.array([3.0, -1.0, 2.0, -5.0, 4.0])
    A = np.diag(lam)
    for k in range(1, 5):
        r = eigsh(A, k, which=which)
        assert r.ncv == 5
        check_result(r, A, lam, which, k)
    r = eigsh(np.array([[2.0, 1.0], [1.0, 2.0]]), 1, which=which)
    np.testing.assert_allclose(r.eigenvalues, [1.0 if which == "SA" else 3.0], rtol=0,
                               atol=10 * r.ncv * EPS64 * 3.0)


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.integers(-4, 4), min_size=2, max_size=20),
    data=st.data(),
)
def test_small_integer_spectra_exact(values, data):
    """n <= ncv, heavy multiplicities: the basis reaches the whole space (through
    breakdowns and random restarts), so the result is exact to rounding."""
    lam = np.asarray(values, dtype=float)
    n = len(lam)
    k = data.draw(st.integers(1, n - 1), label="k")
    which = data.draw(st.sampled_from(WHICH), label="which")
    A = matrix_with_spectrum(lam, seed=n)
    r = eigsh(A, k, which=which)
    assert r.converged
    atol = 10 * r.ncv * EPS64 * max(float(np.max(np.abs(lam))), 1.0)
    want = expected(lam, k, which)
    if which == "LM":  # a tie between lambda and -lambda may be broken either way
        np.testing.assert_allclose(np.sort(np.abs(r.eigenvalues)), np.sort(np.abs(want)),
                                   rtol=0, atol=atol)
        assert np.all(np.min(np.abs(r.eigenvalues[:, None] - lam), axis=1) <= atol)
    else:
        np.testing.assert_allclose(r.eigenvalues, want, rtol=0, atol=atol)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(21, 80),
    bounds=st.tuples(st.integers(-5, 0), st.integers(1, 5)),
    data=st.data(),
)
def test_integer_spectra_with_multiplicities_exact(n, bounds, data):
    """n > ncv and at most 11 distinct eigenvalues, each repeated: every Krylov space
    becomes invariant, the random restarts and the search for missed copies find all
    the copies the wanted part needs (ARPACK often misses some here)."""
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    lam = rng.integers(bounds[0], bounds[1] + 1, n).astype(float)
    k = data.draw(st.integers(1, 10), label="k")
    which = data.draw(st.sampled_from(WHICH), label="which")
    A = matrix_with_spectrum(lam, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LanczosWarning)  # locked rows are not "asymmetry"
        r = eigsh(A, k, which=which, seed=seed)
    assert r.converged
    atol = 10 * r.ncv * EPS64 * max(float(np.max(np.abs(lam))), 1.0)
    want = expected(lam, k, which)
    if which == "LM":
        np.testing.assert_allclose(np.sort(np.abs(r.eigenvalues)), np.sort(np.abs(want)),
                                   rtol=0, atol=atol)
    else:
        np.testing.assert_allclose(r.eigenvalues, want, rtol=0, atol=atol)
    assert np.all(r.residuals <= r.tol * r.anorm + atol)


def test_loose_tolerance_with_locking():
    """tol=1e-4 on a spectrum with multiplicities: locked vectors keep dropped couplings
    up to tol * anorm / (2 sqrt(ncv)); the results still meet tol, and the symmetry check
    does not mistake those couplings for asymmetry."""
    lam = np.random.default_rng(3).integers(-3, 4, 150).astype(float)
    A = matrix_with_spectrum(lam, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LanczosWarning)
        r = eigsh(A, 8, which="BE", tol=1e-4)
    check_result(r, A, lam, "BE", 8)


def test_multiplicity_residual_bound_holds_without_breakdown():
    """A triple top eigenvalue in a continuous spectrum: whatever copies Lanczos finds,
    each Ritz value is within its residual of an eigenvalue (no claim on the count:
    further copies surface only through rounding errors)."""
    n = 200
    lam = np.linspace(0.0, 1.0, n)
    lam[-3:] = 2.0
    A = matrix_with_spectrum(lam, seed=2)
    r = eigsh(A, 4)
    assert r.converged
    slack = 10 * r.ncv * EPS64 * 2.0
    dist = np.min(np.abs(r.eigenvalues[:, None] - lam[None, :]), axis=1)
    assert np.all(dist <= r.residuals + slack)
    # The largest Ritz value is 2 to within residual**2 / gap, gap ~ 1 (Kato-Temple).
    assert abs(r.eigenvalues[-1] - 2.0) <= r.residuals[-1] ** 2 / 0.9 + slack


# -- non-convergence, asymmetry, errors ----------------------------------------------------


def test_not_converged_warns_and_reports(indefinite):
    A, _ = indefinite
    with pytest.warns(EigshWarning, match=r"only \d+ of 6 eigenpairs"):
        r = eigsh(A, 6, ncv=9, maxiter=0, tol=1e-12)
    assert not r.converged and r.num_converged < 6
    assert r.num_restarts == 0 and r.matvecs == 9 + 6
    # ncv below k + 3 is raised to k + 3 (the search for missed eigenvalues needs room)
    with pytest.warns(EigshWarning):
        assert eigsh(A, 6, ncv=7, maxiter=0).ncv == 9
    assert r.eigenvalues.shape == (6,) and np.all(np.isfinite(r.residuals))
    assert "converged=False" in repr(r)


def test_nonsymmetric_operator_warns():
    rng = np.random.default_rng(10)
    noise = 1e-3 * rng.standard_normal((100, 100))
    A = matrix_with_spectrum(np.linspace(1.0, 2.0, 100), seed=4) + noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EigshWarning)
        with pytest.warns(LanczosWarning, match="not symmetric"):
            eigsh(A, 2, maxiter=3)


def test_nan_from_operator_names_restart_and_step():
    n = 100
    A = matrix_with_spectrum(np.linspace(0.0, 1.0, n), seed=5)
    calls = []

    def matvec(v):
        calls.append(1)
        out = A @ v
        if len(calls) == 27:
            out = out * np.nan
        return out

    op = aslinearoperator(matvec, shape=(n, n), dtype="float64")
    with pytest.raises(FloatingPointError, match=r"restart 1, Lanczos step \d+ of 20"):
        eigsh(op, 3)


def test_wrong_output_shape_is_reported():
    op = aslinearoperator(lambda v: np.ones(3), shape=(5, 5), dtype="float64")
    with pytest.raises(ValueError, match="returned shape"):
        eigsh(op, 1)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"k": 0}, ValueError, "k must be at least 1"),
        ({"k": 30}, ValueError, r"k=30 must be smaller than the operator size n=30"),
        ({"k": 2.0}, TypeError, "k must be an integer"),
        ({"which": "XX"}, ValueError, "choose one of LA, SA, LM, BE"),
        ({"which": "SM"}, ValueError, "'SM' is not offered"),
        ({"ncv": 3}, ValueError, r"ncv=3 must satisfy k < ncv <= n"),
        ({"ncv": 31}, ValueError, r"ncv=31 must satisfy k < ncv <= n"),
        ({"tol": -1.0}, ValueError, "tol must be finite and >= 0"),
        ({"tol": float("nan")}, ValueError, "tol must be finite"),
        ({"maxiter": -1}, ValueError, "maxiter must be >= 0"),
        ({"dtype": "float16"}, TypeError, "dtype=float16 is not supported"),
        ({"v0": np.zeros(30)}, ValueError, "v0 must be finite and non-zero"),
        ({"v0": np.ones(29)}, ValueError, r"v0 must have shape \(30,\)"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
    ],
)
def test_invalid_arguments(kwargs, exc, match):
    A = np.diag(np.arange(30.0))
    kwargs = {"k": 3, **kwargs}
    k = kwargs.pop("k")
    with pytest.raises(exc, match=match):
        eigsh(A, k, **kwargs)


def test_v0_from_another_library_is_rejected():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="v0 is a torch array"):
        eigsh(np.diag(np.arange(10.0)), 2, v0=torch.ones(10, dtype=torch.float64))


def test_size_one_and_empty_operators():
    with pytest.raises(ValueError, match="k=1 must be smaller than the operator size n=1"):
        eigsh(np.ones((1, 1)), 1)
    with pytest.raises(ValueError, match="size 0"):
        eigsh(np.zeros((0, 0)), 1)


# -- scale, start vectors, operators that write into their input ---------------------------


@pytest.mark.parametrize("scale", [1e160, 1e-130])
def test_any_scale_in_float64(scale):
    """||A|| = 5e160: sum(w * w) would overflow (above ~1.3e154) and was reported as the
    operator returning Inf. Norms are scaled, so the run is that of A / scale up to
    rounding: the same tests hold relative to ||A||. (1e-130: above the ScaleError floor,
    where squares of the residual's entries would underflow.)"""
    lam = np.linspace(1.0, 5.0, 50)
    A = matrix_with_spectrum(lam, seed=3) * scale
    r = eigsh(A, 3, which="LA")
    assert r.converged and np.all(np.isfinite(r.residuals))
    norm = 5.0 * scale
    slack = 10 * r.ncv * EPS64 * norm
    np.testing.assert_allclose(r.eigenvalues, np.linalg.eigvalsh(A)[-3:], rtol=0,
                               atol=r.tol * norm + slack)
    X = to_numpy(r.eigenvectors)
    R = (A / scale) @ X - X * (r.eigenvalues / scale)  # residuals, computed at scale 1
    np.testing.assert_allclose(r.residuals / scale, np.linalg.norm(R, axis=0), rtol=0,
                               atol=slack / scale)


def test_large_scale_in_float32():
    """A float32 operator with ||A|| = 5e21 in float32 arithmetic (squares overflow above
    ~1.8e19): float32 tolerances, i.e. tol = sqrt(eps32) relative to ||A||."""
    lam = np.linspace(1.0, 5.0, 50)
    A = (matrix_with_spectrum(lam, seed=3) * 1e21).astype(np.float32)
    r = eigsh(A, 3, which="LA", dtype="float32")
    assert r.converged and r.dtype == "float32"
    assert abs(r.tol - np.sqrt(EPS32)) < 1e-12
    norm = 5e21
    ref = np.linalg.eigvalsh(A.astype(np.float64))[-3:]
    np.testing.assert_allclose(r.eigenvalues, ref, rtol=0,
                               atol=r.tol * norm + 10 * r.ncv * EPS32 * norm)


def test_overflow_of_the_arithmetic_does_not_blame_the_operator():
    """Finite products beyond float32's range (a float64 operator of norm 1e40 run in
    float32) are an operator too large for the arithmetic (ScaleError, as lanczos
    raises); an operator returning Inf is still named."""
    A = matrix_with_spectrum(np.linspace(1.0, 5.0, 30), seed=3) * 1e40
    op = aslinearoperator(lambda v: np.full(30, np.inf), shape=(30, 30), dtype="float64")
    with np.errstate(all="ignore"):  # (numpy's own warnings on the way to the error)
        with pytest.raises(ScaleError, match="too large for float32 arithmetic.*float64"):
            eigsh(A, 2, dtype="float32")
        with pytest.raises(FloatingPointError, match="operator returned NaN or Inf"):
            eigsh(op, 2)
    # too small: refused as documented (squares of its vectors' entries underflow)
    with pytest.raises(ScaleError, match="too small for float64"):
        eigsh(A * 1e-190, 2)


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_v0_of_any_scale(scale, dtype):
    """v0 is divided by its largest entry (a power of ten times ones becomes ones
    exactly) before anything is squared or converted, so the run is the one from
    ones: bit for bit."""
    A = np.diag(np.arange(1.0, 41.0))
    ref = eigsh(A, 2, v0=np.ones(40), dtype=dtype)
    r = eigsh(A, 2, v0=np.full(40, scale), dtype=dtype)
    np.testing.assert_array_equal(r.eigenvalues, ref.eigenvalues)
    assert r.converged


class _ScratchOperator:
    """A correct product that then reuses its input as scratch space."""

    def __init__(self, A):
        self.A = A
        self.shape, self.dtype = A.shape, A.dtype

    def matvec(self, v):
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, V):
        out = self.A @ V
        V[...] = 0
        return out


def test_operator_writing_into_its_input_is_caught():
    """The protocol forbids writing into the input; like lanczos, eigsh checks the
    first product (where reading back is free) instead of returning wrong values."""
    torch = pytest.importorskip("torch")
    A = matrix_with_spectrum(np.linspace(1.0, 10.0, 50), seed=4)
    for M in (A, torch.asarray(A)):
        with pytest.raises(ValueError, match="changed the vectors it was given"):
            eigsh(_ScratchOperator(M), 3)


# -- converged results do not miss wanted eigenvalues ----------------------------------------


def _review_case(seed: int, trial: int):
    """Trial ``trial`` of a seeded stream of small random problems (random spectra of
    six kinds: Gaussian, half-integers, one value repeated, three outliers over a bulk
    of width 1e-3, nearly zero, clustered at 1; random k, which, ncv and tol)."""
    rng = np.random.default_rng(seed)
    for _ in range(trial + 1):
        n = int(rng.integers(3, 80))
        kind = rng.integers(0, 6)
        if kind == 0:
            ev = rng.standard_normal(n)
        elif kind == 1:
            ev = np.round(rng.standard_normal(n) * 2) / 2
        elif kind == 2:
            ev = np.concatenate([np.full(int(rng.integers(1, n)), rng.standard_normal()),
                                 rng.standard_normal(n)])[:n]
        elif kind == 3:
            ev = np.concatenate([rng.standard_normal(3) * 10,
                                 rng.standard_normal(n) * 1e-3])[:n]
        elif kind == 4:
            ev = np.zeros(n)
            ev[: int(rng.integers(0, 4))] = rng.standard_normal()
        else:
            ev = 1 + 1e-7 * rng.standard_normal(n)
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        A = (Q * ev) @ Q.T
        A = (A + A.T) / 2
        k = int(rng.integers(1, n))
        which = ["LA", "SA", "LM", "BE"][rng.integers(0, 4)]
        kw = {}
        if rng.random() < 0.3:
            kw["ncv"] = int(rng.integers(k + 1, n + 1))
        if rng.random() < 0.3:
            kw["tol"] = float(10 ** rng.uniform(-12, -3))
    return A, k, which, kw


def _check_not_missing(r: EigshResult, A: np.ndarray, k: int, which: str) -> None:
    """A converged result holds the wanted eigenvalues: each within tol * anorm (the
    convergence test's bound) plus the rounding allowance of its exact counterpart."""
    lam = np.linalg.eigvalsh(A)
    want = expected(lam, k, which)
    atol = r.tol * r.anorm + 10 * r.ncv * EPS64 * max(float(np.max(np.abs(lam))), 1.0)
    if which == "LM":  # a tie between lambda and -lambda may be broken either way
        np.testing.assert_allclose(np.sort(np.abs(r.eigenvalues)), np.sort(np.abs(want)),
                                   rtol=0, atol=atol)
    else:
        np.testing.assert_allclose(r.eigenvalues, want, rtol=0, atol=atol)


@pytest.mark.parametrize("seed, trial", [(3, 298), (4, 80), (4, 55), (5, 274)])
def test_converged_result_misses_no_wanted_eigenvalue(seed, trial):
    """Found converged and wrong before: (3, 298), SA k=18 over a bulk of width 1e-3,
    missed -5.143e-4 (its eigenvector barely in the start vector) and returned the next
    one; (4, 80), LA k=6 with an eigenvalue of multiplicity 50, returned it once and
    the next distinct one in place of the copy; (4, 55), LM, and (5, 274), LA k=31,
    likewise. The search from a random vector after convergence finds them."""
    A, k, which, kw = _review_case(seed, trial)
    r = eigsh(A, k, which=which, **kw)
    assert r.converged
    _check_not_missing(r, A, k, which)


@pytest.mark.parametrize("seed, trial", [(1, 76), (4, 41), (5, 68)])
def test_small_basis_reports_no_convergence_instead_of_a_wrong_result(seed, trial):
    """ncv = k + 1 left the search one vector (reported converged, and wrong, at first;
    then not converged within maxiter). The basis now has at least min(k + 3, n)
    vectors; whatever the outcome, a converged result holds the wanted eigenvalues."""
    A, k, which, kw = _review_case(seed, trial)
    assert kw["ncv"] == k + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EigshWarning)
        r = eigsh(A, k, which=which, **kw)
    if r.converged:
        _check_not_missing(r, A, k, which)


def test_converged_results_are_right_on_random_problems():
    """A small sweep of the same stream (another seed): every converged result holds
    the wanted eigenvalues."""
    for trial in range(40):
        A, k, which, kw = _review_case(6, trial)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EigshWarning)
            r = eigsh(A, k, which=which, **kw)
        if r.converged:
            _check_not_missing(r, A, k, which)


def test_both_ends_search_finds_a_missed_low_eigenvalue():
    """which='BE' wants both ends, so the search for missed eigenvalues must converge the
    complement's extreme Ritz pairs at both ends. Before, it waited for the high end only
    and returned [0, 0.01, 20, 30], converged, missing the second copy of 0 (scipy finds
    both). Compared with numpy.linalg.eigvalsh within tol * anorm plus rounding."""
    n = 200
    lam = np.concatenate([[0.0, 0.0], np.linspace(0.01, 1, n - 5), [10.0, 20.0, 30.0]])
    A = matrix_with_spectrum(lam, seed=0)
    r = eigsh(A, 4, which="BE", ncv=8, seed=0)
    assert r.converged
    _check_not_missing(r, A, 4, "BE")


def _stress_case(trial: int) -> np.ndarray:
    """Matrix ``trial`` of a review's seeded stream of random problems."""
    rng = np.random.default_rng(7)
    for _ in range(trial + 1):
        n = int(rng.integers(8, 70))
        kind = rng.integers(0, 5)
        if kind == 0:
            ev = rng.standard_normal(n)
        elif kind == 1:
            ev = np.round(rng.standard_normal(n), 0)
        elif kind == 2:
            ev = np.concatenate([rng.standard_normal(n - 6) * 0.1,
                                 1 + 1e-7 * rng.standard_normal(6)])
        elif kind == 3:
            ev = rng.choice([-2.0, -1, 0, 1, 2], n)
        else:
            ev = np.abs(rng.standard_normal(n)) ** 4
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        A = (Q * ev) @ Q.T
        A = (A + A.T) / 2
        rng.integers(1, n), rng.choice(["LA", "SA", "LM", "BE"])  # (k, which: unused)
        if rng.random() >= 0.5:
            rng.integers(1, n + 1)
        if rng.random() >= 0.7:
            rng.uniform(-12, -3)
    return A


def test_both_ends_search_on_a_large_k_problem():
    """A stress case from a review (n = 65, k = 42, ncv = 48): the low end was shifted by
    one slot (0.00163 returned for 0.00080) and reported converged."""
    A = _stress_case(14)
    assert A.shape == (65, 65)
    r = eigsh(A, 42, which="BE", ncv=48, seed=14)
    assert r.converged
    _check_not_missing(r, A, 42, "BE")


@pytest.mark.parametrize("ncv", [4, 5])
def test_search_converges_with_a_basis_of_k_plus_one(ncv):
    """ncv = k + 1: each restart of the search for missed eigenvalues kept only the k
    locked vectors and took one step, so it never converged (1000 restarts, 1007
    products; ncv = 5 took 596). A basis of at least min(k + 3, n) vectors is now used:
    a kept Ritz vector of the complement and two steps."""
    n = 100
    lam = np.r_[np.linspace(0, 1, n - 3), 5.0, 6.0, 7.0]
    A = np.diag(lam)
    r = eigsh(A, 3, ncv=ncv)
    assert r.ncv == 6
    check_result(r, A, lam, "LA", 3)


@pytest.mark.parametrize("ncv", [9, 10, 11, 12])
def test_search_converges_on_a_multiple_eigenvalue_with_a_small_basis(ncv):
    """An eigenvalue of multiplicity 6, k = 8, ncv = 9..12: never converged (the locked
    vectors no longer wanted took the room of the complement's Ritz vectors). numpy's
    eigvalsh is the reference."""
    n = 60
    lam = np.concatenate([np.linspace(-1, 1, n - 6), [3.0] * 6])
    A = matrix_with_spectrum(lam, seed=1)
    r = eigsh(A, 8, ncv=ncv)
    assert r.converged
    _check_not_missing(r, A, 8, "LA")
