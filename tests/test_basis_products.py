"""The reorthogonalisation products with the Lanczos basis (``specdens.algorithms._basis``)
against numpy, in float64, including torch's CPU path that splits ``n`` into one chunk
per thread (a sum in another order: agreement to a few ulps of the terms' magnitude)."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace

from specdens.algorithms import _basis


@pytest.fixture
def two_torch_threads():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield torch
    torch.set_num_threads(before)


@pytest.mark.parametrize("n", [(1 << 17) + 3, 1 << 17, 1000])
def test_torch_chunked_products_match_numpy(two_torch_threads, n):
    torch = two_torch_threads
    rng = np.random.default_rng(0)
    k, m, j = 2, 7, 5
    Q = rng.standard_normal((k, m, n))
    w = rng.standard_normal((k, n))
    h = rng.standard_normal((k, j))
    Qs_t = torch.from_numpy(Q)[:, :j, :]  # a slice of the preallocated basis, as in the engine
    xp = array_namespace(Qs_t)
    chunks = _basis._torch_chunks(Qs_t)
    assert chunks == (2 if n >= 1 << 16 else 1)
    proj = _basis.project(xp, Qs_t, torch.from_numpy(w)).numpy()
    comb = _basis.combine(xp, torch.from_numpy(h), Qs_t).numpy()
    ref_proj = np.einsum("kjn,kn->kj", Q[:, :j], w)
    ref_comb = np.einsum("kj,kjn->kn", h, Q[:, :j])
    # sums of n (projection) or j (combination) random terms of size ~1, in two orders:
    # the rounding of each is ~ eps sqrt(n) times the partial sums' size ~ sqrt(n)
    eps = np.finfo(np.float64).eps
    assert np.max(np.abs(proj - ref_proj)) <= 10 * n * eps
    assert np.max(np.abs(comb - ref_comb)) <= 10 * j * eps * np.max(np.abs(ref_comb))
    assert proj.shape == (k, j) and comb.shape == (k, n)


def test_numpy_products():
    rng = np.random.default_rng(1)
    Q = rng.standard_normal((3, 4, 50))
    w = rng.standard_normal((3, 50))
    h = rng.standard_normal((3, 4))
    np.testing.assert_allclose(_basis.project(np, Q, w), np.einsum("kjn,kn->kj", Q, w),
                               rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(_basis.combine(np, h, Q), np.einsum("kj,kjn->kn", h, Q),
                               rtol=1e-13, atol=1e-13)


def test_engine_with_chunked_products_matches_numpy(two_torch_threads):
    """A whole float64 Lanczos run at n = 2^17 on torch with two threads (the chunked
    products) against the same run on numpy: the coefficients agree to rounding."""
    torch = two_torch_threads
    import specdens

    n = 1 << 17
    d = np.linspace(-1.0, 3.0, n)
    d[-3:] = [5.0, 7.0, 11.0]
    ref = specdens.lanczos(specdens.aslinearoperator(lambda v: d * v, shape=(n, n),
                                                     dtype="float64"), 30, num_probes=2)
    dt = torch.from_numpy(d)
    op = specdens.aslinearoperator(lambda v: dt * v, shape=(n, n), dtype=torch.float64,
                                   xp="torch")
    assert _basis._torch_chunks(torch.zeros((2, 30, n), dtype=torch.float64)) == 2
    r = specdens.lanczos(op, 30, num_probes=2)
    np.testing.assert_allclose(r.alpha, ref.alpha, rtol=0, atol=1e-12 * 11.0)
    np.testing.assert_allclose(r.beta, ref.beta, rtol=0, atol=1e-12 * 11.0)


def test_products_that_require_grad_are_detached(two_torch_threads):
    """A torch callable built from tensors that require grad (a model's weights) returns
    products in an autograd graph: the engine cuts them out (no graph through the steps,
    and the chunked products, which write into preallocated memory, work)."""
    torch = two_torch_threads
    import specdens

    n = 1 << 17
    d = torch.linspace(-1.0, 3.0, n, dtype=torch.float64)
    plain = specdens.aslinearoperator(lambda v: d * v, shape=(n, n), dtype=torch.float64,
                                      xp="torch")
    dg = d.clone().requires_grad_(True)
    graph = specdens.aslinearoperator(lambda v: dg * v, shape=(n, n), dtype=torch.float64,
                                      xp="torch")
    r = specdens.lanczos(graph, 12, num_probes=2, return_basis=True)
    ref = specdens.lanczos(plain, 12, num_probes=2)
    assert not r.basis.requires_grad
    np.testing.assert_array_equal(r.alpha, ref.alpha)
    np.testing.assert_array_equal(r.beta, ref.beta)


def test_every_algorithm_detaches_products_that_require_grad():
    """eigsh, kpm, the trace estimators and deflated SLQ on an operator whose products are
    in an autograd graph: the results are those without a graph, and autograd saves
    nothing for the algorithm's own arithmetic (only what the product itself saves), so
    no graph grows through the iterations."""
    torch = pytest.importorskip("torch")
    import specdens

    n = 300
    d = torch.linspace(-1.0, 3.0, n, dtype=torch.float64)
    d[-2:] = torch.tensor([6.0, 9.0], dtype=torch.float64)
    dg = d.clone().requires_grad_(True)
    calls = [0]

    def product(v, a):
        calls[0] += a is dg
        return a * v

    ops = [specdens.aslinearoperator(lambda v, a=a: product(v, a), shape=(n, n),
                                     dtype=torch.float64, xp="torch", symmetric=True)
           for a in (d, dg)]
    saved = [0]

    def pack(t):
        saved[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        product(torch.ones(n, dtype=torch.float64), dg)
    per_product, calls[0], saved[0] = saved[0], 0, 0
    assert per_product >= 1
    runs = [
        lambda op: specdens.eigsh(op, k=2).eigenvalues,
        lambda op: specdens.kpm(op, num_moments=20, num_probes=3).chebyshev_moments,
        lambda op: np.asarray([specdens.trace(op, num_matvecs=12, method="hutchinson").value]),
        lambda op: np.asarray([specdens.trace(op, num_matvecs=12, method="xtrace").value]),
        lambda op: specdens.slq(op, num_steps=10, num_probes=2, deflate=1).nodes,
        lambda op: specdens.lanczos(op, 10, num_probes=2).alpha,
    ]
    for run in runs:
        plain = np.asarray(run(ops[0]))
        calls[0] = saved[0] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            graph = np.asarray(run(ops[1]))
        np.testing.assert_array_equal(graph, plain)
        assert calls[0] > 0 and saved[0] == per_product * calls[0], (saved[0], calls[0])
