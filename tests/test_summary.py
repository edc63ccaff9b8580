"""``specdens.summary.summarize``: its negative fraction against the exact eigenvalues."""

from __future__ import annotations

import numpy as np

import specdens
from specdens.analysis import negative_mass
from specdens.summary import summarize

EPS = np.finfo(np.float64).eps


def _matrix(n, lam, seed=0):
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def test_negative_fraction_counts_the_deflated_eigenvalues():
    """20 of 300 eigenvalues in [-10, -5], deflated (deflate_which="SA"); the rest in
    [0.5, 1]. The quadrature of the deflated operator has no node below zero, so the
    fraction is the deflated atoms' 20 / 300 exactly (before: 0.0, the nodes only), with
    no probe-to-probe variation; a few roundings (a sum of 1/n terms, times n, over n)
    stay within 8 eps."""
    n = 300
    rng = np.random.default_rng(1)
    lam = np.concatenate([rng.uniform(-10, -5, 20), rng.uniform(0.5, 1.0, n - 20)])
    A = _matrix(n, lam)
    exact = float(np.mean(np.linalg.eigvalsh(A) < 0))
    assert exact == 20 / n
    d = specdens.slq(A, num_steps=60, num_probes=10, deflate=20, deflate_which="SA")
    neg = summarize(d)["negative_fraction"]
    assert abs(neg["value"] - exact) <= 8 * EPS * exact
    assert neg["stderr"] is not None and neg["stderr"] <= 8 * EPS
    # the same functional as the density's own and analysis.negative_mass
    assert abs(neg["value"] - d.fraction_negative()) <= 8 * EPS * exact
    nm = negative_mass(d)
    assert abs(neg["value"] - nm.value) <= 8 * EPS * exact
    assert abs(neg["stderr"] - nm.stderr) <= 8 * EPS


def test_negative_fraction_without_deflation_is_the_quadrature_estimate():
    """Without deflation: the probes' quadrature mass below zero, its mean and standard
    error over probes as ``analysis.negative_mass`` (to rounding); and within the
    Hutchinson error (4 standard errors) plus the quadrature's resolution (the
    Chebyshev-Markov-Stieltjes bounds) of the exact fraction."""
    n = 200
    lam = np.concatenate([np.linspace(-3.0, -1.0, 50), np.linspace(1.0, 4.0, n - 50)])
    A = _matrix(n, lam)
    exact = float(np.mean(np.linalg.eigvalsh(A) < 0))
    d = specdens.slq(A, num_steps=40, num_probes=8, seed=3)
    neg = summarize(d)["negative_fraction"]
    nm = negative_mass(d)
    assert abs(neg["value"] - nm.value) <= 8 * EPS
    assert abs(neg["stderr"] - nm.stderr) <= 8 * EPS
    lo, hi = specdens.analysis.negative_mass_bounds(d)
    assert lo - 4 * nm.stderr <= exact <= hi + 4 * nm.stderr
    one = summarize(specdens.slq(A, num_steps=40, num_probes=1))["negative_fraction"]
    assert one["stderr"] is None  # one probe: no standard error


def test_outlier_rule_is_plain_json_for_numpy_options():
    """Options given as numpy scalars were echoed unchanged in ``outlier_rule``, and
    ``json.dumps`` failed on a float32 although the digest is meant for JSON. They are
    now Python floats (and ``side`` a str) of the same values."""
    import json

    A = _matrix(40, np.linspace(-1.0, 1.0, 40))
    d = specdens.slq(A, num_steps=10, num_probes=3, seed=np.int64(3))
    options = {"tail": np.float32(0.02), "gap": np.float64(0.5), "rtol": np.float32(1e-6),
               "side": np.str_("upper")}
    s = summarize(d, **options)
    rule = s["outlier_rule"]
    assert rule == {k: (str(v) if k == "side" else float(v)) for k, v in options.items()}
    assert all(type(v) is (str if k == "side" else float) for k, v in rule.items())
    assert type(s["seed"]) is int
    assert json.loads(json.dumps(s))["outlier_rule"] == rule
