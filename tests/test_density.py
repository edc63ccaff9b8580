"""SpectralDensity: normalisation, CDF, functionals, bounds and the result file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import sym_from_spectrum
from scipy.integrate import quad

import specdens
from specdens import SpectralDensity


@pytest.fixture
def dens(spectrum_matrix):
    A, lam = spectrum_matrix
    return specdens.slq(A, num_steps=40, num_probes=4, seed=2), lam


def test_weights_rows_sum_to_one(dens):
    d, _ = dens
    assert d.nodes.shape == d.weights.shape == (4, 40)
    assert d.nodes.dtype == np.float64
    np.testing.assert_allclose(d.weights.sum(axis=1), 1.0, rtol=0, atol=1e-14)
    loc, mass = d.atoms()
    assert mass.sum() == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize("kernel", ["gaussian", "lorentzian"])
def test_density_is_exactly_normalised(dens, kernel):
    d, _ = dens
    sigma = 0.05
    loc, mass = d.atoms()
    # The kernels are normalised on the real line: integrate the density exactly (quad on
    # the closed form) instead of on a grid, and find 1 with no renormalisation.
    f = lambda t: float(d.density(np.array([t]), sigma=sigma, kernel=kernel)[1][0])  # noqa: E731
    pieces = np.linspace(loc.min() - 1, loc.max() + 1, 60)
    inner = sum(quad(f, a, b, limit=200)[0] for a, b in zip(pieces[:-1], pieces[1:], strict=True))
    tails = quad(f, -np.inf, pieces[0])[0] + quad(f, pieces[-1], np.inf)[0]
    assert inner + tails == pytest.approx(1.0, abs=1e-6)


def test_density_values_match_kernel_formula(dens):
    d, _ = dens
    loc, mass = d.atoms()
    t = np.array([-0.5, 0.3, 19.9])
    s = 0.1
    g = (np.exp(-0.5 * ((t[:, None] - loc) / s) ** 2) / (s * np.sqrt(2 * np.pi))) @ mass
    l_ = (s / np.pi / ((t[:, None] - loc) ** 2 + s * s)) @ mass
    np.testing.assert_allclose(d.density(t, sigma=s)[1], g, rtol=1e-12)
    np.testing.assert_allclose(d.density(t, sigma=s, kernel="lorentzian")[1], l_, rtol=1e-12)


def test_default_sigma_is_scale_free_and_shift_invariant(spectrum_matrix):
    A, _ = spectrum_matrix
    d = specdens.slq(A, num_steps=30)
    d2 = specdens.slq(3.0 * A, num_steps=30)
    d3 = specdens.slq(specdens.aslinearoperator(A).shift(-7.0), num_steps=30)
    assert d2.default_sigma() == pytest.approx(3.0 * d.default_sigma(), rel=1e-8)
    assert d3.default_sigma() == pytest.approx(d.default_sigma(), rel=1e-6)
    grid, vals = d.density()
    assert grid[0] < d.bounds().lower and grid[-1] > d.bounds().upper
    assert np.all(vals >= 0)


def test_cdf_is_a_distribution_function(dens):
    d, lam = dens
    x = np.linspace(lam.min() - 1, lam.max() + 1, 500)
    F = d.cdf(x)
    assert np.all(np.diff(F) >= 0) and F[0] == 0.0 and F[-1] == pytest.approx(1.0)
    Fs = d.cdf(x, sigma=0.01)
    assert np.all(np.diff(Fs) >= -1e-15) and Fs[-1] == pytest.approx(1.0)
    # the smoothed CDF is the integral of the smoothed density
    g, v = d.density(np.linspace(-3, 25, 40001), sigma=0.2)
    cum = np.concatenate([[0], np.cumsum(0.5 * (v[1:] + v[:-1]) * np.diff(g))])
    np.testing.assert_allclose(np.interp(5.0, g, cum), d.cdf(5.0, sigma=0.2), atol=1e-6)


@pytest.mark.parametrize("sigma", [-0.01, 0.0, float("nan"), float("inf")])
def test_smoothed_cdf_refuses_a_bad_kernel_width(sigma):
    """The eigenvalues lie in [1, 2]: the smoothed CDF of width 0.01 is 0 at 0 and 1 at 3
    (up to ndtr(-100) = 0), and a width that is not positive and finite is refused, by
    cdf as by density and default_grid (a negative width gave the decreasing [1, 0.5, 0]
    at [0, 1.5, 3], 0 divided by zero, NaN gave NaN and inf a flat 0.5)."""
    d = specdens.slq(np.diag(np.linspace(1.0, 2.0, 100)), num_steps=20, num_probes=2)
    np.testing.assert_allclose(d.cdf([0.0, 3.0], sigma=0.01), [0.0, 1.0], rtol=0, atol=1e-14)
    for call in (lambda: d.cdf([0.0, 1.5, 3.0], sigma=sigma),
                 lambda: d.density(sigma=sigma), lambda: d.default_grid(sigma)):
        with pytest.raises(ValueError, match="sigma must be positive and finite"):
            call()


def test_moments_trace_and_stderr(dens):
    d, lam = dens
    est = d.moments([0, 1, 2])
    assert est.value[0] == pytest.approx(1.0)
    assert est.stderr.shape == (3,) and est.num_probes == 4
    tr = d.trace(lambda t: t)
    assert tr.value == pytest.approx(d.n * est.value[1])
    assert tr.stderr == pytest.approx(d.n * est.stderr[1])
    # the per-probe quadrature is exact for degree < 2m: the mean is within a few
    # standard errors of the exact normalised trace
    assert abs(est.value[2] - np.mean(lam**2)) <= 5 * est.stderr[2]
    single = specdens.slq(np.diag(lam), num_steps=5, num_probes=1)
    assert np.isnan(single.moments(1).stderr)
    with pytest.raises(ValueError, match="integer"):
        d.moments(1.5)


def test_fraction_negative(rng):
    lam = np.concatenate([-np.linspace(0.5, 1.0, 30), np.linspace(1.0, 2.0, 70)])
    d = specdens.slq(sym_from_spectrum(lam, rng), num_steps=100, num_probes=3)  # exact (n=100)
    assert d.fraction_negative() == pytest.approx(np.mean([
        np.sum(d.weights[i][d.nodes[i] < 0]) for i in range(3)]), abs=1e-14)
    assert 0.1 < d.fraction_negative() < 0.5


def test_bounds_residuals_enclose_eigenvalues(dens):
    d, lam = dens
    b = d.bounds()
    assert lam.min() - 1e-9 <= b.lower and b.upper <= lam.max() + 1e-9
    # every Ritz value is within its residual of an eigenvalue
    for i in range(d.num_probes):
        for th, r in zip(d.nodes[i], d.residuals[i], strict=True):
            assert np.min(np.abs(lam - th)) <= r + 1e-9
    lo, hi = b.interval
    assert lo <= b.lower and hi >= b.upper


def test_save_load_roundtrip(dens, tmp_path):
    d, _ = dens
    p = tmp_path / "r.npz"
    d.save(p)
    e = SpectralDensity.load(p)
    for f in ("nodes", "weights", "residuals", "lengths", "probe_scales"):
        np.testing.assert_array_equal(getattr(e, f), getattr(d, f))
    assert (e.n, e.num_steps, e.seed, e.reorth, e.matvecs) == (d.n, d.num_steps, d.seed,
                                                              d.reorth, d.matvecs)
    with np.load(p, allow_pickle=False) as z:  # the documented format, readable without specdens
        assert str(z["format"]) == "specdens.SpectralDensity" and int(z["version"]) == 1
        assert json.loads(str(z["meta"]))["n"] == d.n


def test_failed_save_leaves_the_old_file_intact(dens, tmp_path):
    """Metadata JSON cannot hold raises before the file is touched, and a save replaces
    the file atomically: the old result stays readable, no temporary file is left."""
    import dataclasses

    d, _ = dens
    p = tmp_path / "r.npz"
    d.save(p)
    before = p.read_bytes()
    bad = dataclasses.replace(d, extra={"when": np.datetime64("2024-01-01")})
    with pytest.raises(TypeError, match="cannot store"):
        bad.save(p)
    assert p.read_bytes() == before
    np.testing.assert_array_equal(SpectralDensity.load(p).nodes, d.nodes)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["r.npz"]
    # a good save replaces it, at exactly the path given (no ".npz" appended)
    dataclasses.replace(d, extra={"when": "2024-01-01"}).save(p)
    assert SpectralDensity.load(p).extra == {"when": "2024-01-01"}
    d.save(tmp_path / "plain")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["plain", "r.npz"]


def test_breakdown_at_the_last_step_gives_an_exact_rule(tmp_path):
    """Five distinct eigenvalues: every Krylov space is invariant after 5 steps, so with
    num_steps=5 the recurrence breaks down exactly at the last step (lengths ==
    num_steps, which lengths < num_steps misses). The 5-point Gauss rule is then the
    probe's measure itself: exact for every f (as with num_steps=6), and the quadrature
    error is the change of f within the nodes' residuals, the run's rounding r = 4 eps
    max|theta| here: at most max|f'| r, plus the rounding of f itself. For a Rademacher
    probe u of a diagonal matrix u^T f(A) u / n = tr f(A) / n, so each probe's value is
    exact up to rounding."""
    ev = np.repeat([1.0, 2.0, 3.0, 4.0, 5.0], 20)
    A = np.diag(ev)
    d = specdens.slq(A, num_steps=5, num_probes=2, seed=0)
    assert d.lengths.tolist() == [5, 5]
    m10, tr = d.moments(10), d.trace(np.exp)
    assert m10.value == pytest.approx(np.mean(ev**10), rel=1e-12)
    assert tr.value == pytest.approx(np.exp(ev).sum(), rel=1e-12)
    from specdens.algorithms.quadrature import PRODUCT_ROUNDINGS

    eps = np.finfo(float).eps
    r = PRODUCT_ROUNDINGS * eps * 5.0
    assert 0 < m10.quadrature_error <= 10 * 5.0**9 * r + 2 * eps * 5.0**10
    assert 0 < tr.quadrature_error <= 100 * (np.exp(5.0) * r + 2 * eps * np.exp(5.0))
    assert d.breakdown.tolist() == [True, True]
    # the flags are kept by the file and by concatenate
    d.save(tmp_path / "d.npz")
    e = SpectralDensity.load(tmp_path / "d.npz")
    np.testing.assert_array_equal(e.breakdown, d.breakdown)
    assert e.moments(10).quadrature_error == m10.quadrature_error
    more = specdens.slq(A, num_steps=5, num_probes=1, seed=0, first_probe=2)
    both = SpectralDensity.concatenate([d, more])
    assert both.breakdown.tolist() == [True] * 3
    assert both.trace(np.exp).quadrature_error == pytest.approx(tr.quadrature_error,
                                                               rel=1e-12)
    # a file of an older specdens, without the flags, still loads; a breakdown is then
    # recognised when it came before the last step
    d6 = specdens.slq(A, num_steps=6, num_probes=2, seed=0)
    d6.save(tmp_path / "d6.npz")
    with np.load(tmp_path / "d6.npz", allow_pickle=False) as z:
        data = {k: z[k] for k in z.files if k != "breakdown"}
    np.savez(tmp_path / "old.npz", **data)
    old = SpectralDensity.load(tmp_path / "old.npz")
    assert old.breakdown is None
    np.testing.assert_array_equal(old.nodes, d6.nodes)
    assert old.moments(10).quadrature_error == d6.moments(10).quadrature_error
    assert 0 < old.moments(10).quadrature_error <= 10 * 5.0**9 * r + 2 * eps * 5.0**10


def test_load_refuses_corrupt_and_foreign_files(dens, tmp_path):
    d, _ = dens
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable specdens result"):
        SpectralDensity.load(junk)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.arange(3))
    with pytest.raises(ValueError, match="not a specdens SpectralDensity file"):
        SpectralDensity.load(foreign)
    good = tmp_path / "good.npz"
    d.save(good)
    with np.load(good) as z:
        data = dict(z)
    bad_version = tmp_path / "v.npz"
    np.savez(bad_version, **{**data, "version": np.array(99)})
    with pytest.raises(ValueError, match="version 99"):
        SpectralDensity.load(bad_version)
    bad_weights = tmp_path / "w.npz"
    np.savez(bad_weights, **{**data, "weights": data["weights"] * 2})
    with pytest.raises(ValueError, match="weights do not sum to 1"):
        SpectralDensity.load(bad_weights)
    missing = tmp_path / "m.npz"
    np.savez(missing, **{k: v for k, v in data.items() if k != "nodes"})
    with pytest.raises(ValueError, match="missing"):
        SpectralDensity.load(missing)
    pickled = tmp_path / "p.npz"
    np.savez(pickled, **{**data, "meta": np.array([{"n": 1}], dtype=object)})
    with pytest.raises(ValueError):
        SpectralDensity.load(pickled)
    truncated = tmp_path / "t.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable"):
        SpectralDensity.load(truncated)


def test_density_argument_errors(dens):
    d, _ = dens
    with pytest.raises(ValueError, match="kernel"):
        d.density(kernel="box")
    with pytest.raises(ValueError, match="sigma"):
        d.density(sigma=-1.0)


def test_reprs(dens):
    d, _ = dens
    assert "SpectralDensity(n=200, num_probes=4, num_steps=40" in repr(d)
    assert "Estimate(value=" in repr(d.moments(1))


def test_concatenate_refuses_repeated_probes(spectrum_matrix, tmp_path):
    """A repeated probe is not an independent sample: concatenating an estimate with itself
    (or two runs over the same seed and probe indices) would halve the variance estimate
    for nothing. Disjoint probe ranges of one seed, and other seeds, combine."""
    A, _ = spectrum_matrix
    d = specdens.slq(A, num_steps=10, num_probes=3, seed=2)
    with pytest.raises(ValueError, match="same estimate twice"):
        SpectralDensity.concatenate([d, d])
    again = specdens.slq(A, num_steps=10, num_probes=2, seed=2, first_probe=2)
    with pytest.raises(ValueError, match="probe 2 of seed 2 twice"):
        SpectralDensity.concatenate([d, again])
    # the same file read back twice is two objects holding the same probes
    d.save(tmp_path / "d.npz")
    loaded = [SpectralDensity.load(tmp_path / "d.npz") for _ in range(2)]
    np.testing.assert_array_equal(loaded[0].probe_indices, [0, 1, 2])
    with pytest.raises(ValueError, match="probe 0 of seed 2 twice"):
        SpectralDensity.concatenate(loaded)

    rest = specdens.slq(A, num_steps=10, num_probes=2, seed=2, first_probe=3)
    both = SpectralDensity.concatenate([d, rest])
    np.testing.assert_array_equal(both.probe_indices, np.arange(5))
    assert both.num_probes == 5 and both.seed == 2
    other = SpectralDensity.concatenate([d, specdens.slq(A, num_steps=10, num_probes=3, seed=3)])
    assert other.num_probes == 6 and other.seed is None  # two seeds: each probe keeps its own
    assert other.probe_seeds == (2, 2, 2, 3, 3, 3)
    np.testing.assert_array_equal(other.probe_indices, [0, 1, 2, 0, 1, 2])


def test_probes_of_several_seeds_keep_their_identity(tmp_path):
    """Parts of different seeds: the result's seed is None (not the first part's), each
    probe keeps its seed, and a later concatenation that repeats one of them is refused,
    also after a save and load (the identity was dropped, so the same probes of seed 1
    were accepted twice). Files without per-probe seeds (older ones, or one seed) load."""
    A = np.diag(np.linspace(0.0, 1.0, 50))
    s1 = specdens.slq(A, num_steps=5, num_probes=2, seed=1)
    s2 = specdens.slq(A, num_steps=5, num_probes=2, seed=2)
    mixed = SpectralDensity.concatenate([s1, s2])
    assert mixed.seed is None and mixed.probe_seeds == (1, 1, 2, 2)
    np.testing.assert_array_equal(mixed.probe_indices, [0, 1, 0, 1])
    again = specdens.slq(A, num_steps=5, num_probes=2, seed=1)  # probes 0 and 1 of seed 1
    with pytest.raises(ValueError, match="probe 0 of seed 1 twice"):
        SpectralDensity.concatenate([mixed, again])
    mixed.save(tmp_path / "mixed.npz")
    loaded = SpectralDensity.load(tmp_path / "mixed.npz")
    assert loaded.seed is None and loaded.probe_seeds == (1, 1, 2, 2)
    np.testing.assert_array_equal(loaded.probe_indices, mixed.probe_indices)
    np.testing.assert_array_equal(loaded.nodes, mixed.nodes)
    with pytest.raises(ValueError, match="probe 1 of seed 2 twice"):
        SpectralDensity.concatenate([specdens.slq(A, num_steps=5, num_probes=1, seed=2,
                                                  first_probe=1), loaded])
    # disjoint probes still combine, and the identities follow
    more = SpectralDensity.concatenate(
        [loaded, specdens.slq(A, num_steps=5, num_probes=2, seed=1, first_probe=2)])
    assert more.probe_seeds == (1, 1, 2, 2, 1, 1)
    np.testing.assert_array_equal(more.probe_indices, [0, 1, 0, 1, 2, 3])
    # one seed throughout: no per-probe list, in memory or in the file
    one = SpectralDensity.concatenate(
        [s1, specdens.slq(A, num_steps=5, num_probes=2, seed=1, first_probe=2)])
    assert one.seed == 1 and one.probe_seeds is None
    one.save(tmp_path / "one.npz")
    with np.load(tmp_path / "one.npz") as z:
        assert "probe_seeds" not in json.loads(str(z["meta"]))
    assert SpectralDensity.load(tmp_path / "one.npz").probe_seeds is None


def _wide(outliers, seed=0):
    """A bulk of 300 eigenvalues in [-1e-4, 1e-3] and far outliers (a Hessian's shape)."""
    rng = np.random.default_rng(seed)
    lam = np.concatenate([rng.uniform(-1e-4, 1e-3, 300), outliers])
    return specdens.slq(np.diag(lam), num_steps=40, num_probes=3, seed=seed)


@pytest.mark.parametrize("outliers", [[1e6], [-3e4, 2e5], [40.0, 7e3, 5e5]])
@pytest.mark.parametrize("sigma", [None, 1e-6, 4e-5])
def test_wide_spectrum_default_grid_integrates_to_the_total_mass(outliers, sigma):
    """Range / sigma above ~6700 gives a non-uniform default grid. Its trapezoid integral
    is the Gaussian density's total mass (1) to rounding; it was 2.68 when the windows
    around the Ritz values stopped 4 widths out (the kernel still e^-8 of its peak) and
    the next interval jumped to the coarse grid.

    Tolerance: within the windows the spacing is uniform, h = sigma/3, where the
    trapezoid rule's error on a Gaussian is 2 exp(-2 pi^2 9) ~ 1e-77; at the windows'
    edges and in the graded gaps the kernel is below eps of its peak and the intervals
    grow geometrically from sigma/3, so they add O(eps). What remains is the rounding of
    the grid points themselves, |u| <= eps |x| / 2: the rule on the rounded points
    differs from the rule on exact ones by at most max|u| (h^2 / 6) int |phi'''|, with
    int |phi'''| = 1.38 / sigma^3 for a unit Gaussian of width sigma, i.e.
    0.0128 eps max|x| / sigma; doubled, plus 100 eps for the summation."""
    d = _wide(np.array(outliers))
    s = d.default_sigma() if sigma is None else sigma
    grid, values = d.density(sigma=sigma)
    dx = np.diff(grid)
    assert np.all(dx > 0) and not np.allclose(dx, dx[0])  # the refined, non-uniform grid
    loc, mass = d.atoms()
    eps = np.finfo(np.float64).eps
    tol = 2 * 0.0128 * eps * np.max(np.abs(loc)) / s + 100 * eps
    assert abs(np.trapezoid(values, grid) - mass.sum()) <= tol
    # every Ritz value sits in a window of spacing <= sigma/3 reaching GRID_PAD widths out
    from specdens.density import GRID_PAD
    for x in loc[:: max(1, loc.size // 40)]:
        inside = grid[(grid >= x - GRID_PAD * s) & (grid <= x + GRID_PAD * s)]
        assert np.max(np.diff(inside)) <= s / 3 * (1 + 1e-6)
        assert inside[0] - (x - GRID_PAD * s) <= s / 3
        assert (x + GRID_PAD * s) - inside[-1] <= s / 3


def _lorentzian_mass_on(d, a, b, sigma):
    loc, mass = d.atoms()
    return float(np.sum(mass * (np.arctan((b - loc) / sigma) - np.arctan((a - loc) / sigma)))
                 / np.pi)


@pytest.mark.parametrize("case", ["single", "narrow", "wide"])
def test_lorentzian_default_grid_holds_the_documented_mass(case):
    """The Lorentzian's tails are heavy: the default grid holds the documented share of
    its mass, sum m_i (atan((b - x_i)/s) - atan((a - x_i)/s)) / pi, at least (2/pi)
    atan(GRID_PAD) = 0.925 (a single point spectrum; it was (2/pi) atan(5) = 0.874 with
    5 widths of padding), and the trapezoid rule on the grid recovers that share.

    Tolerance: on the uniform parts (spacing sigma/3) the rule's error on a Lorentzian,
    aliasing exp(-2 pi 3) plus the end corrections (h^2/12) |f'| at GRID_PAD widths, is
    below 1e-5; over a graded step from x to r x the rule overestimates a 1/x^2 tail by
    (r + 1/r)/2 - 1 (r = GRID_GROWTH), and the tails beyond GRID_PAD widths hold at most
    1 - (2/pi) atan(GRID_PAD) of the mass."""
    pad = np.sqrt(2 * np.log(1 / np.finfo(np.float64).eps))  # GRID_PAD, as documented
    if case == "single":
        d = specdens.slq(np.array([[1.0]]), num_steps=1, num_probes=1)
    elif case == "narrow":
        d = specdens.slq(np.diag(np.linspace(0.0, 1.0, 100)), num_steps=30, num_probes=3)
    else:
        d = _wide(np.array([3e3, 5e5]))
    s = d.default_sigma()
    grid, values = d.density(kernel="lorentzian")
    held = _lorentzian_mass_on(d, grid[0], grid[-1], s)
    floor = 2 / np.pi * np.arctan(pad)
    assert held >= floor - 1e-15
    if case == "single":
        assert held == pytest.approx(floor, rel=1e-12)
    from specdens.density import GRID_GROWTH, GRID_PAD
    assert GRID_PAD == pytest.approx(pad, rel=1e-15)
    tol = 1e-5 + ((GRID_GROWTH + 1 / GRID_GROWTH) / 2 - 1) * (1 - floor)
    assert abs(np.trapezoid(values, grid) - held) <= tol
    # the Gaussian on the same default grid: the whole mass (to the grid's rounding, as in
    # test_wide_spectrum_default_grid_integrates_to_the_total_mass)
    g, v = d.density()
    np.testing.assert_array_equal(g, grid)
    eps = np.finfo(np.float64).eps
    tol = 2 * 0.0128 * eps * np.max(np.abs(d.atoms()[0])) / s + 100 * eps
    assert abs(np.trapezoid(v, g) - 1.0) <= tol


def test_load_refuses_meta_that_is_missing_or_contradicts_the_arrays(tmp_path):
    """A meta without n was a bare KeyError, a meta that is not an object a TypeError,
    and a meta contradicting the arrays (num_steps, or an n smaller than the rules'
    length) loaded; each is now a ValueError naming the file and the field."""
    d = specdens.slq(np.diag([1.0, 2.0, 3.0]), num_steps=3, num_probes=2)
    d.save(tmp_path / "ok.npz")
    with np.load(tmp_path / "ok.npz") as z:
        data = dict(z)
    meta = json.loads(str(data["meta"]))
    cases = [
        ("non.npz", {k: v for k, v in meta.items() if k != "n"}, "meta has no 'n' field"),
        ("nosteps.npz", {k: v for k, v in meta.items() if k != "num_steps"},
         "meta has no 'num_steps' field"),
        ("nstr.npz", {**meta, "n": "3"}, "'n' must be a positive integer"),
        ("list.npz", [1, 2], "meta is not a JSON object"),
        ("steps.npz", {**meta, "num_steps": 99}, "num_steps=99 but the rules have 3 steps"),
        ("small.npz", {**meta, "n": 2}, "n=2 is smaller than the rules' length"),
        ("seeds.npz", {**meta, "probe_seeds": [1]}, "inconsistent array shapes"),
        ("badseeds.npz", {**meta, "probe_seeds": [1, -2]}, "'probe_seeds'"),
        ("conv.npz", {**meta, "convergence": {"bogus": 1}}, "bad meta"),
    ]
    for name, m, needle in cases:
        np.savez(tmp_path / name, **{**data, "meta": np.array(json.dumps(m))})
        with pytest.raises(ValueError, match=needle) as info:
            SpectralDensity.load(tmp_path / name)
        assert f"{name} is a corrupt specdens file" in str(info.value)
    np.savez(tmp_path / "ver.npz", **{**data, "version": np.array("abc")})
    with pytest.raises(ValueError, match="ver.npz is a corrupt specdens file: bad version"):
        SpectralDensity.load(tmp_path / "ver.npz")
    np.savez(tmp_path / "scales.npz", **{**data, "probe_scales": np.array([-1.0, 3.0])})
    with pytest.raises(ValueError, match="probe scales"):
        SpectralDensity.load(tmp_path / "scales.npz")
    assert SpectralDensity.load(tmp_path / "ok.npz").n == 3


def test_fraction_negative_refuses_a_bad_tol_and_the_step_cdf_keeps_nan():
    """fraction_negative(tol=nan) returned 0 and tol=-1.5 the fraction below +1.5, where
    negative_mass refuses both; the step CDF read NaN as +inf (1.0)."""
    d = specdens.slq(np.diag([-1.0, 1.0, 2.0, 3.0]), num_steps=4, num_probes=2, seed=0)
    assert d.fraction_negative(tol=0.5) == pytest.approx(0.25)
    for tol in (float("nan"), -1.5, float("inf")):
        with pytest.raises(ValueError, match="tol must be finite and >= 0"):
            d.fraction_negative(tol=tol)
    assert np.isnan(d.cdf(np.nan))
    np.testing.assert_allclose(d.cdf([np.nan, 0.0, 10.0]), [np.nan, 0.25, 1.0])
    assert np.isnan(d.cdf(np.nan, sigma=1.0))


def test_standard_errors_do_not_overflow_or_underflow_with_the_scale():
    """The per-probe moments of an operator of scale 1e100 are ~1e200: their squared
    deviations overflowed and moments(2) reported stderr inf (0 at 1e-100, claiming an
    exact estimate). In units of a power of two (exact) the standard error scales with
    the operator: the same bits at c = 2^k for these c."""
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.standard_normal((50, 50)))[0]
    A = (Q * np.linspace(1.0, 3.0, 50)) @ Q.T
    ref = specdens.slq(A, num_steps=10, num_probes=4).moments(np.array([1, 2]))
    for k in (330, -330):
        c = 2.0**k
        m = specdens.slq(c * A, num_steps=10, num_probes=4).moments(np.array([1, 2]))
        np.testing.assert_array_equal(m.value / c ** np.array([1, 2]), ref.value)
        np.testing.assert_array_equal(m.stderr / c ** np.array([1, 2]), ref.stderr)


def test_default_sigma_keeps_the_atoms_of_a_few_eigenvalue_spectrum_apart():
    # An operator with three distinct eigenvalues: every probe's Krylov space is
    # invariant after three steps, and its Ritz values are the exact atoms. The default
    # width must not merge them (the median gap, 1.5 here, made one bump of them).
    rng = np.random.default_rng(3)
    values = np.repeat([0.0, 1.0, 3.0], [450, 100, 50])
    Q, _ = np.linalg.qr(rng.standard_normal((values.size, values.size)))
    A = (Q * values) @ Q.T
    A = (A + A.T) / 2
    d = specdens.slq(A, num_steps=20, num_probes=4, seed=0)
    assert np.all(d.breakdown) and np.all(d.lengths == 3)
    sigma = d.default_sigma()
    assert sigma <= 1.0 / 8 * (1 + 1e-9)
    # the curve at the midpoints between atoms, at least 4 widths from either, is at most
    # exp(-8) of the two peaks (the median gap put it at 0.66 of them)
    _, peaks = d.density(np.array([0.0, 1.0, 3.0]))
    _, mids = d.density(np.array([0.5, 2.0]))
    assert mids[0] <= np.exp(-8) * (peaks[0] + peaks[1]) * (1 + 1e-9)
    assert mids[1] <= np.exp(-32) * (peaks[1] + peaks[2]) * (1 + 1e-9)
    grid, vals = d.density()
    # and the mass near each atom is the estimate's mass there (tails beyond 4 widths)
    loc, mass = d.atoms()
    for a in (0.0, 1.0, 3.0):
        near = np.abs(grid - a) < 0.5
        expected = mass[np.abs(loc - a) < 1e-6].sum()
        assert np.trapezoid(vals[near], grid[near]) == pytest.approx(expected, rel=1e-4)


def test_default_sigma_of_a_full_dimension_run_is_the_median_gap():
    # a small matrix run to dimension n: its Ritz values are its n eigenvalues, and the
    # default still smooths them by their median gap
    rng = np.random.default_rng(4)
    A = rng.standard_normal((12, 12))
    A = (A + A.T) / 2
    d = specdens.slq(A, num_steps=30, num_probes=2, seed=0)
    assert np.all(d.lengths == 12)
    gaps = np.concatenate([np.diff(np.sort(d.nodes[i, :12])) for i in range(2)])
    assert d.default_sigma() == pytest.approx(np.median(gaps), rel=1e-12)


def test_default_sigma_of_a_float32_low_rank_run_ignores_rounding_gaps():
    # A rank-40 operator in float32 arithmetic: every probe's Krylov space becomes
    # invariant, and its zero eigenvalue comes out as a few Ritz values ~1e-7 apart (the
    # rounding). They are one atom: the width is an eighth of the smallest gap between
    # the operator's distinct eigenvalues, not of the rounding's (needles 1e-8 wide).
    rng = np.random.default_rng(5)
    n, r = 1000, 40
    values = np.linspace(1.0, 2.0, r)
    Q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    A = ((Q * values) @ Q.T).astype(np.float32)
    A = (A + A.T) / 2
    d = specdens.slq(A, num_steps=90, num_probes=3, seed=0, dtype="float32")
    assert np.all(d.breakdown) and np.all(d.lengths < n)
    smallest = np.min(np.diff(np.r_[0.0, values]))  # the eigenvalue 0 included
    # the Ritz values resolve the eigenvalues to float32 rounding of ||A|| = 2
    assert d.default_sigma() == pytest.approx(smallest / 8, abs=1e-4 * smallest)


def test_a_breakdown_that_merges_eigenvalues_is_not_reported_exact():
    """A spectrum spanning 1e24 (exact diagonal products): every probe breaks down at
    beta <= 100 eps ||T|| after 24 steps, merging the 17 eigenvalues below 1e-2 into one
    node. The rule is exact only for an operator within the run's resolution of A: for
    log and 1/x, steep there, the estimate is far off (1/x: 5e4 against 1.3e12), and
    the quadrature error said 0 beside it. It is now the change of f within the nodes'
    residuals: NaN for log (undefined below 0) and larger than the estimate for 1/x,
    while smooth functions of the same run stay at rounding."""
    import scipy.sparse as sp

    lam = np.logspace(-12, 12, 40)
    d = specdens.slq(sp.diags(lam), num_steps=40, num_probes=4, seed=0)
    assert d.breakdown.all() and (d.lengths < 40).all()
    inv = d.trace(lambda t: 1.0 / t)
    assert abs(inv.value - np.sum(1 / lam)) > 0.99 * np.sum(1 / lam)   # (the failure)
    assert inv.quadrature_error > abs(inv.value)
    assert np.isnan(d.trace(np.log).quadrature_error)
    first = d.moments(1)
    assert first.value == pytest.approx(lam.mean(), rel=1e-12)
    assert first.quadrature_error <= 1e-12 * first.value
