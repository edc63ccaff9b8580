"""Property-based tests on random sizes and spectra (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import specdens

EPS = np.finfo(np.float64).eps

# Spectra whose scale is below ~1e-140 (squares of the vectors' entries underflow in
# float64) are refused by the engine with a ValueError (see
# test_lanczos.py::test_operators_too_small_for_the_arithmetic_are_refused); the
# properties are about the others, the zero spectrum included.
spectra = st.integers(1, 40).flatmap(
    lambda n: arrays(np.float64, n, elements=st.floats(-1e3, 1e3, allow_nan=False,
                                                       allow_subnormal=False))
).filter(lambda lam: not 0.0 < np.max(np.abs(lam)) < 1e-100)


def _matrix(lam: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, R = np.linalg.qr(rng.standard_normal((lam.size, lam.size)))
    Q = Q * np.sign(np.diag(R) + (np.diag(R) == 0))
    A = (Q * lam) @ Q.T
    return 0.5 * (A + A.T)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lam=spectra, seed=st.integers(0, 2**31), steps=st.integers(1, 50))
def test_quadrature_is_a_probability_measure_inside_the_spectrum(lam, seed, steps):
    A = _matrix(lam, seed)
    d = specdens.slq(A, num_steps=steps, num_probes=2, seed=seed)
    np.testing.assert_allclose(d.weights.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(d.weights >= 0)
    scale = max(np.max(np.abs(lam)), 1.0)
    tol = 1e3 * EPS * scale * lam.size
    valid = np.arange(d.nodes.shape[1])[None, :] < d.lengths[:, None]
    assert np.all(d.nodes[valid] >= lam.min() - tol) and np.all(d.nodes[valid] <= lam.max() + tol)
    assert np.all(d.lengths <= min(steps, lam.size))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lam=spectra, seed=st.integers(0, 2**31))
def test_full_run_reproduces_every_moment_of_the_probe(lam, seed):
    """With num_steps >= n the quadrature reproduces u^T A^p u for every p (here p <= 6)."""
    A = _matrix(lam, seed)
    u = np.random.default_rng(seed + 1).standard_normal(lam.size)
    u /= np.linalg.norm(u)
    d = specdens.slq(A, num_steps=lam.size, probes=u)
    scale = max(np.max(np.abs(lam)), 1e-300)
    v = u.copy()
    for p in range(7):
        exact = u @ v
        est = d.moments(p).value
        # rounding: each power multiplies errors of size ~ n eps ||A||^p
        assert abs(est - exact) <= 1e3 * (p + 1) * lam.size * EPS * scale**p + 1e-300
        v = A @ v


@settings(max_examples=30, deadline=None)
@given(lam=spectra, seed=st.integers(0, 2**31),
       shift=st.floats(-100, 100).filter(lambda s: s == 0.0 or abs(s) >= 1e-100))
def test_shift_moves_the_quadrature_rule(lam, seed, shift):
    """Lanczos is shift invariant, T(A + sI) = T(A) + sI, so the rule of A + sI is the rule
    of A moved by s.

    An L-node Gauss rule is fixed by its moments of degree < 2L, and those are what is
    compared. Nodes and weights themselves are not well conditioned: when the number of
    steps reaches the number of distinct eigenvalues, rounding gives the probe a component
    of size ~eps in a direction the exact Krylov space misses, and the last nodes move by up
    to ~1e5 eps ||A|| (measured), differently in each run. The moments are: the computed T
    is exact for a perturbation of A of norm ~ k eps ||A||, which moves the moment of degree
    p of the rule scaled to [-1, 1] by ~ p k eps (measured at most 6 p eps in 3600 cases).
    """
    A = _matrix(lam, seed)
    steps = min(10, lam.size)
    d0 = specdens.slq(A, num_steps=steps, seed=seed)
    d1 = specdens.slq(A + shift * np.eye(lam.size), num_steps=steps, seed=seed)
    scale = np.max(np.abs(lam)) + abs(shift)
    if scale == 0.0:
        np.testing.assert_array_equal(d1.nodes, d0.nodes)
        return
    for i in range(d0.nodes.shape[0]):
        x0 = (d0.nodes[i] + shift) / scale
        x1 = d1.nodes[i] / scale
        for p in range(1, 2 * min(d0.lengths[i], d1.lengths[i])):
            m0 = np.sum(d0.weights[i] * x0**p)
            m1 = np.sum(d1.weights[i] * x1**p)
            assert abs(m1 - m0) <= 10 * p * steps * EPS, (p, m0, m1)
