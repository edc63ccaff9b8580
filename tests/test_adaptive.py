"""Adaptive probe counts: convergence, honest non-convergence, coverage of the reported
interval, and the equality with a fixed-count run."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import sym_from_spectrum
from scipy.stats import t as student_t

import specdens
from specdens import ProbeCountWarning


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(11)
    lam = np.concatenate([rng.uniform(0.5, 2.0, 196), [4.0, 5.0, 6.0, 8.0]])
    return sym_from_spectrum(lam, rng), np.sort(lam)


def test_converges_on_an_easy_case_and_equals_a_fixed_run(case):
    A, lam = case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = specdens.slq(A, num_steps=8, num_probes="auto", rtol=0.1, probe_block=4, seed=3)
    c = d.convergence
    assert c.converged and c.num_probes == d.num_probes <= c.max_probes == 100
    assert c.target == "moments [1, 2]" and c.confidence == 0.95
    assert c.num_probes % 4 == 0 and len(c.history) == c.num_probes // 4
    assert c.history[-1][1] == c.worst_ratio <= 1.0
    assert all(r > 1.0 for _, r in c.history[:-1])  # it stopped at the first success
    assert c.quantile == pytest.approx(student_t.ppf(0.975, c.num_probes - 1))
    est = d.moments([1, 2])
    assert np.all(c.quantile * np.asarray(est.stderr) <= 0.1 * np.abs(est.value))
    # probes continue from round to round: the same as asking for that many at once, in
    # blocks of the same width (a BLAS product of another width may round differently:
    # 3e-14 apart with OpenBLAS's AVX-512 kernels at 32 probes in one block)
    fixed = specdens.slq(A, num_steps=8, num_probes=c.num_probes, seed=3, block_size=4)
    np.testing.assert_array_equal(d.nodes, fixed.nodes)
    np.testing.assert_array_equal(d.weights, fixed.weights)
    assert d.matvecs == fixed.matvecs == 8 * c.num_probes
    assert "converged=True" in repr(d)


def test_reports_non_convergence_when_max_probes_is_too_small(case):
    A, _ = case
    with pytest.warns(ProbeCountWarning, match="max_probes=6"):
        d = specdens.slq(A, num_steps=8, num_probes="auto", rtol=1e-5, max_probes=6,
                         probe_block=4, seed=0)
    c = d.convergence
    assert not c.converged and c.num_probes == 6 == d.num_probes
    assert [h[0] for h in c.history] == [4, 6]
    assert c.worst_ratio > 1.0


def test_coverage_of_the_reported_interval():
    """Over 200 seeds, the interval value +- quantile * stderr at confidence 0.9 contains
    the exact tr(A)/n in at least 80% of the runs: the nominal 90%, less the optional-
    stopping loss described in specdens.algorithms.adaptive (about 4 points here, where
    blocks of only 4 probes let runs stop after 4 probes), less 3 binomial standard
    deviations (0.021). The per-probe quadrature is exact (degree 1 <= 2m - 1), so the
    interval has no bias to absorb. A single probe's standard deviation is 0.24, so
    atol = 0.08 needs about (1.645 * 0.24 / 0.08)^2 = 24 probes."""
    rng = np.random.default_rng(5)
    lam = np.concatenate([rng.normal(0.0, 1.0, 146), [9.0, -7.0, 12.0, 15.0]])
    A = sym_from_spectrum(lam, rng)
    exact = lam.mean()
    covered, counts = [], []
    for seed in range(200):
        d = specdens.slq(A, num_steps=2, num_probes="auto", target="trace", atol=0.08,
                         rtol=0.0, confidence=0.9, probe_block=4, max_probes=400, seed=seed)
        c = d.convergence
        assert c.converged
        est = d.moments(1)
        covered.append(abs(est.value - exact) <= c.quantile * est.stderr)
        counts.append(c.num_probes)
    coverage = np.mean(covered)
    assert coverage >= 0.80, coverage
    assert np.mean(counts) > 8  # several rounds on average: the stopping rule was exercised


@pytest.mark.parametrize("target", ["density", "trace", [2, 3], np.exp])
def test_other_targets(case, target):
    A, _ = case
    d = specdens.slq(A, num_steps=10, num_probes="auto", target=target, rtol=0.5,
                     probe_block=3, max_probes=100, seed=1)
    c = d.convergence
    assert c.converged
    if callable(target):
        assert c.target == "trace of exp"
        est = d.trace(np.exp)
        assert c.quantile * est.stderr <= 0.5 * abs(est.value)
    elif target == "density":
        assert c.target == "density"
        from specdens.algorithms.adaptive import per_probe_density

        first = specdens.slq(A, num_steps=10, num_probes=3, seed=1)
        sigma = first.default_sigma()
        grid = first.default_grid(sigma)
        per = per_probe_density(d, grid, sigma)
        # the per-probe densities average to the density
        np.testing.assert_allclose(per.mean(axis=0), d.density(grid, sigma=sigma)[1],
                                   rtol=1e-10, atol=1e-14)
        se = per.std(axis=0, ddof=1) / np.sqrt(d.num_probes)
        assert np.all(c.quantile * se <= 0.5 * per.mean(axis=0).max())


def test_numpy_array_of_powers_as_target():
    """A numpy array of moment powers is a sequence of powers like a list (it was compared
    with the target names first, which numpy refuses for more than one entry). On a
    diagonal matrix every Rademacher probe u gives tr(A^p) / n exactly (u_i^2 = 1):
    stderr 0, so the first round converges, to the exact moments up to rounding."""
    lam = np.linspace(-1.0, 3.0, 200)
    A = np.diag(lam)
    kw = dict(num_steps=20, num_probes="auto", max_probes=20, seed=0)
    d = specdens.slq(A, target=np.array([1, 2]), **kw)
    c = d.convergence
    assert c.converged and c.target == "moments [1, 2]"
    np.testing.assert_array_equal(d.nodes, specdens.slq(A, target=[1, 2], **kw).nodes)
    exact = [np.mean(lam), np.mean(lam**2)]
    np.testing.assert_allclose(d.moments([1, 2]).value, exact, rtol=1e-12)


def test_adaptive_with_deflation_runs_eigsh_once(case):
    A, lam = case
    d = specdens.slq(A, num_steps=8, num_probes="auto", deflate=4, rtol=1e-2,
                     probe_block=5, seed=2)
    c = d.convergence
    assert c.converged
    np.testing.assert_allclose(d.deflated_eigenvalues, lam[-4:], rtol=1e-10)
    eigsh_products = d.extra["deflation"]["eigsh_matvecs"]
    assert d.matvecs == eigsh_products + 8 * c.num_probes


def test_convergence_is_saved(case, tmp_path):
    A, _ = case
    d = specdens.slq(A, num_steps=6, num_probes="auto", rtol=0.1, seed=0)
    d.save(tmp_path / "a.npz")
    e = specdens.SpectralDensity.load(tmp_path / "a.npz")
    assert e.convergence == d.convergence


def test_torch_adaptive_matches_numpy(case):
    torch = pytest.importorskip("torch")
    A, _ = case
    a = specdens.slq(A, num_steps=6, num_probes="auto", rtol=0.1, seed=4, probe_block=3)
    b = specdens.slq(torch.tensor(A), num_steps=6, num_probes="auto", rtol=0.1, seed=4,
                     probe_block=3)
    assert a.convergence.converged
    assert a.convergence.num_probes == b.convergence.num_probes
    np.testing.assert_allclose(b.nodes, a.nodes, atol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_probes": "many"}, ValueError, "'auto'"),
        ({"num_probes": 3, "max_probes": 10}, ValueError, "only apply with num_probes='auto'"),
        ({"num_probes": 3, "target": "density"}, ValueError, "num_probes='auto'"),
        ({"num_probes": "auto", "rtol": 0.0, "atol": 0.0}, ValueError, "positive rtol or atol"),
        ({"num_probes": "auto", "rtol": -1.0}, ValueError, "rtol"),
        ({"num_probes": "auto", "confidence": 1.5}, ValueError, "confidence"),
        ({"num_probes": "auto", "max_probes": 1}, ValueError, "at least 2"),
        ({"num_probes": "auto", "target": "median"}, ValueError, "target"),
        ({"num_probes": "auto", "target": [1.5]}, ValueError, "integers"),
        ({"num_probes": "auto", "checkpoint": "x.npz"}, ValueError, "checkpoint"),
        ({"num_probes": "auto", "probes": np.ones(200)}, ValueError, "explicit"),
    ],
)
def test_bad_adaptive_arguments(case, kwargs, exc, match):
    A, _ = case
    with pytest.raises(exc, match=match):
        specdens.slq(A, num_steps=4, **kwargs)


def test_the_stopping_rule_does_not_depend_on_the_target_s_scale():
    """target = c x: the rule compares quantile * stderr with rtol |value|, which does
    not depend on c. Computed on the raw values, c = 1e160 overflowed the squares in the
    standard error (Inf: never converged, 'inf times the tolerance') and c = 1e-300
    underflowed them (0: converged on the first round). In units of the largest value
    the histories agree up to rounding: each per-probe value c sum_j w_j theta_j carries
    about (m + 2) roundings more than c times that of x, and the standard error, a
    difference of values, amplifies a relative error by max|value| / spread."""
    rng = np.random.default_rng(0)
    A = sym_from_spectrum(np.linspace(1.0, 3.0, 200), rng)
    m = 20
    runs = {}
    for c in (1.0, 1e160, 1e-300):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            d = specdens.slq(A, num_steps=m, num_probes="auto", target=lambda x, c=c: c * x,
                             rtol=1e-2, max_probes=30, probe_block=5)
        assert all("inf times" not in str(w.message) for w in caught)
        runs[c] = d.convergence
    per = d._per_probe(lambda x: x)
    eps = np.finfo(np.float64).eps
    for c in (1e160, 1e-300):
        assert [k for k, _ in runs[c].history] == [k for k, _ in runs[1.0].history]
        for (k, r), (_, r1) in zip(runs[c].history, runs[1.0].history, strict=True):
            amplification = np.max(np.abs(per[:k])) / np.std(per[:k], ddof=1)
            assert np.isfinite(r) and abs(r - r1) <= 10 * (m + 2) * eps * amplification * r1
        assert runs[c].converged == runs[1.0].converged
