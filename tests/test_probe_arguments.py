"""Probe arguments: the seed (a non-negative integer, or None for irreproducible probes,
refused where a run must be reproducible) and the number of explicit start vectors."""

from __future__ import annotations

import numpy as np
import pytest

import specdens
from specdens.algorithms.probes import check_seed

A = np.diag(np.linspace(-1.0, 2.0, 30)) + 0.01 * np.ones((30, 30))


@pytest.mark.parametrize("seed, exc", [(-1, ValueError), (1.5, TypeError), (2.0, TypeError),
                                       (True, TypeError), ("3", TypeError)])
def test_bad_seeds_are_named_everywhere(seed, exc):
    calls = [
        lambda: specdens.slq(A, num_steps=5, seed=seed),
        lambda: specdens.lanczos(A, 5, seed=seed),
        lambda: specdens.kpm(A, 10, 2, seed=seed),
        lambda: specdens.trace(A, num_matvecs=6, method="hutchinson", seed=seed),
        lambda: specdens.diagonal(A, num_matvecs=6, method="xdiag", seed=seed),
        lambda: check_seed(seed),
    ]
    for call in calls:
        with pytest.raises(exc, match="seed must be a non-negative integer"):
            call()


def test_integer_seeds_of_any_integer_type_are_accepted():
    a = specdens.slq(A, num_steps=5, num_probes=2, seed=7)
    b = specdens.slq(A, num_steps=5, num_probes=2, seed=np.int64(7))
    assert np.array_equal(a.nodes, b.nodes) and b.seed == 7 and type(b.seed) is int


def test_seed_none_draws_fresh_probes_but_no_reproducible_run(tmp_path):
    # plain runs: fresh entropy, numpy's convention
    d = specdens.slq(A, num_steps=5, num_probes=2, seed=None)
    assert d.seed is None and d.num_probes == 2
    # a checkpoint could never be resumed: refused before anything is written
    path = tmp_path / "run.npz"
    for call in (lambda: specdens.slq(A, num_steps=5, seed=None, checkpoint=path),
                 lambda: specdens.lanczos(A, 5, seed=None, checkpoint=path)):
        with pytest.raises(ValueError, match=r"checkpoint= needs a reproducible run.*seed=None"):
            call()
    assert not path.exists()
    # explicit start vectors do not depend on the seed: a checkpoint is fine
    r = specdens.lanczos(A, 5, probes=np.ones(30), seed=None, checkpoint=path)
    assert r.seed is None and path.exists()
    # deflation's eigsh needs an integer seed for its start vector, unless given one
    with pytest.raises(ValueError, match=r"deflate=k.*integer seed.*seed=None"):
        specdens.slq(A, num_steps=5, seed=None, deflate=2)
    d = specdens.slq(A, num_steps=5, seed=None, deflate=2, eigsh_options={"seed": 3})
    assert d.num_deflated == 2


def test_num_probes_must_match_explicit_start_vectors():
    V = np.random.default_rng(0).standard_normal((30, 3))
    for call in (lambda: specdens.lanczos(A, 5, probes=V, num_probes=7),
                 lambda: specdens.slq(A, num_steps=5, probes=V, num_probes=2)):
        with pytest.raises(ValueError, match=r"num_probes=\d but probes holds 3 start vectors"):
            call()
    # equal, or the default 1 (which cannot be told apart from an explicit 1): the vectors rule
    assert specdens.lanczos(A, 5, probes=V, num_probes=3).num_probes == 3
    assert specdens.lanczos(A, 5, probes=V).num_probes == 3
    assert specdens.slq(A, num_steps=5, probes=V[:, 0], num_probes=1).num_probes == 1


@pytest.mark.parametrize("scale, dtype, probe_dtype", [
    (1e-160, "float64", np.float64), (1e-200, "float64", np.float64),
    (1e200, "float64", np.float64), (1e-30, "float32", np.float64),
    (1e22, "float32", np.float64), (1e30, "float32", np.float64),
    (1e-30, "float32", np.float32), (1e30, "float32", np.float32),
])
def test_explicit_start_vectors_of_any_finite_scale(scale, dtype, probe_dtype):
    """Start vectors are normalised in units of their largest entry, in float64 when
    they or the arithmetic are float64: a norm taken directly squares entries that
    overflow (alpha0 = 0 for 1e22 in float32; refused as non-finite for 1e200 in float64),
    underflow (1e-30 in float32 gave NaN, blamed on the operator; 1e-200 refused as zero)
    or lose digits as subnormals (1e-160 in float64). The run must equal the one from the
    unit vector up to the rounding of normalising it: a few eps of the arithmetic, times
    ||A|| (m = 3 steps on a well-conditioned Krylov space)."""
    rng = np.random.default_rng(1)
    v = rng.standard_normal(30)
    v[0] = 0.0  # an exact zero among small entries (t3b: 0/0 in float32)
    ref = specdens.lanczos(A, 3, probes=v / np.linalg.norm(v), dtype=dtype)
    r = specdens.lanczos(A, 3, probes=(v * scale).astype(probe_dtype), dtype=dtype)
    tol = 30 * np.finfo(dtype).eps * np.linalg.norm(A, 2)
    np.testing.assert_allclose(r.alpha, ref.alpha, rtol=0, atol=tol)
    np.testing.assert_allclose(r.beta, ref.beta, rtol=0, atol=tol)
    assert np.array_equal(r.lengths, ref.lengths) and not r.breakdown.any()


def test_bad_explicit_start_vectors_are_refused_naming_the_argument():
    V = np.random.default_rng(0).standard_normal((30, 3))
    with pytest.raises(ValueError, match=r"probes has shape \(30, 0\): no start vectors"):
        specdens.lanczos(A, 5, probes=V[:, :0])
    with pytest.raises(TypeError, match=r"probes are complex \(complex128\)"):
        specdens.lanczos(A, 5, probes=V.astype(np.complex128))
    W = V.copy()
    W[4, 1] = np.inf
    with pytest.raises(ValueError, match="start vector 1 has NaN or Inf"):
        specdens.lanczos(A, 5, probes=W)
    W[4, 1] = 0.0
    W[:, 2] = 0.0
    with pytest.raises(ValueError, match="start vector 2 is zero"):
        specdens.lanczos(A, 5, probes=W)
    torch = pytest.importorskip("torch")
    T = torch.tensor(A)
    with pytest.raises(ValueError, match="probes are on device meta"):
        specdens.lanczos(T, 5, probes=torch.tensor(V).to("meta"))
    with pytest.raises(TypeError, match=r"probes are complex \(complex64\)"):
        specdens.lanczos(T, 5, probes=torch.tensor(V).to(torch.complex64))
    # float32 vectors of entries ~1e30 (squares beyond float32): their float32 rounding,
    # not their scale, separates the run from float64 vectors
    r = specdens.lanczos(T, 5, probes=torch.tensor(V, dtype=torch.float32) * 1e30)
    np.testing.assert_allclose(r.alpha, specdens.lanczos(A, 5, probes=V).alpha, rtol=0,
                               atol=30 * np.finfo(np.float32).eps * np.linalg.norm(A, 2))


@pytest.mark.parametrize("budget, exc", [(-5, ValueError), (float("nan"), ValueError),
                                         (True, TypeError), ("1e6", TypeError)])
def test_max_basis_bytes_is_checked(budget, exc):
    with pytest.raises(exc, match="max_basis_bytes"):
        specdens.lanczos(A, 5, reorth="auto", max_basis_bytes=budget)
