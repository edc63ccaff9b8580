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
