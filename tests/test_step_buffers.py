"""The reused ``(k, n)`` buffers of a Lanczos step (``specdens.algorithms._buffers``): the
engine computes exactly what it computes with new arrays at every step, never writes into
the caller's arrays, and stops making arrays after its second step."""

from __future__ import annotations

import numpy as np
import pytest

import specdens
from specdens.algorithms import _buffers
from specdens.operators.wrappers import CallableOperator

N = 3000


def _diagonal(lib: str, dtype: str):
    d = np.linspace(-1.0, 3.0, N)
    d[-3:] = [5.0, 7.0, 11.0]
    if lib == "numpy":
        dd = d.astype(dtype)
        return specdens.aslinearoperator(lambda v: dd * v, shape=(N, N), dtype=dtype,
                                         xp="numpy", symmetric=True)
    torch = pytest.importorskip("torch")
    dt = torch.from_numpy(d).to(getattr(torch, dtype))
    return specdens.aslinearoperator(
        lambda v: dt * v if v.ndim == 1 else dt[:, None] * v, shape=(N, N),
        dtype=getattr(torch, dtype), xp="torch", symmetric=True)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("op_dtype,work,basis", [
    ("float32", "float64", "float32"),  # a float32 model: the product's input is the basis row
    ("float64", "float64", "float32"),
    ("float32", "float64", "float64"),
    ("float64", "float64", "float64"),
    ("float32", "float32", "float32"),
])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("reorth", ["full", "partial", "local", "none"])
def test_buffers_change_nothing(monkeypatch, lib, op_dtype, work, basis, k, reorth):
    """Bit for bit the run made with a new array at every step: same operations, same
    dtypes, only the memory they are written into differs."""
    op = _diagonal(lib, op_dtype)
    kw = dict(num_probes=k, seed=3, dtype=work, reorth=reorth)
    if reorth != "none":
        kw["basis_dtype"] = basis
    if reorth == "local":
        kw["window"] = 4
    r = specdens.lanczos(op, 25, return_basis=reorth in ("full", "partial"), **kw)
    monkeypatch.setattr(_buffers, "LIBRARIES", ())
    ref = specdens.lanczos(op, 25, return_basis=reorth in ("full", "partial"), **kw)
    np.testing.assert_array_equal(r.alpha, ref.alpha)
    np.testing.assert_array_equal(r.beta, ref.beta)
    if reorth in ("full", "partial"):
        np.testing.assert_array_equal(np.asarray(r.basis), np.asarray(ref.basis))
        np.testing.assert_array_equal(np.asarray(r.last_vector), np.asarray(ref.last_vector))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_callers_probes_are_left_alone(lib):
    """The start block comes from the caller's probes and a block may be rerun from it:
    the buffers never include it."""
    op = _diagonal(lib, "float64")
    P = np.random.default_rng(0).standard_normal((N, 2))
    if lib == "torch":
        import torch

        P = torch.from_numpy(P)
    before = np.array(P.numpy() if lib == "torch" else P, copy=True)
    r = specdens.lanczos(op, 20, probes=P)
    np.testing.assert_array_equal(np.asarray(P), before)
    assert np.all(np.isfinite(r.alpha))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_no_new_vectors_after_the_second_step(lib):
    """Three vectors of the working dtype rotate: from the third step on, ``new_vector``
    writes into the memory of the vector of two steps ago."""
    if lib == "torch":
        torch = pytest.importorskip("torch")
        from array_api_compat import torch as xp

        wdt, bdt = torch.float64, torch.float32

        def ptr(a):
            return a.data_ptr()
    else:
        from array_api_compat import numpy as xp

        wdt, bdt = np.float64, np.float32

        def ptr(a):
            return a.__array_interface__["data"][0]
    k, n = 2, 64
    bufs = _buffers.StepBuffers(xp, k, n, wdt, bdt, bdt, None if lib == "numpy" else "cpu",
                                prev_owned=True)
    zeros = q_prev = xp.zeros((k, n), dtype=wdt)  # the engine's own
    start = q = xp.ones((k, n), dtype=wdt)  # the caller's
    ws = []
    for j in range(8):
        rows = xp.full((n, k), float(j), dtype=bdt).T  # the operator's (transposed) product
        w = bufs.new_vector(rows)
        np.testing.assert_array_equal(np.asarray(w), float(j))
        ws.append(w)  # (all kept alive: no address is freed and handed out again)
        bufs.retire(q_prev)
        q_prev, q = q, w
    p = [ptr(w) for w in ws]
    # step 0 makes a vector; step 1 reuses the zero q_prev; step 2 makes one (its q_prev
    # is the caller's start block); from then on, the memory of the vector of three steps
    # before (retired as q_prev at the end of the step before)
    assert p[1] == ptr(zeros) and len({p[0], p[1], p[2], ptr(start)}) == 4
    assert all(p[j] == p[j - 3] for j in range(3, 8))
    # the copy in the basis's dtype and the combination's scratch are one buffer, made once
    wb = bufs.in_basis_dtype(q)
    assert bufs.scratch is not None and ptr(bufs.scratch) == ptr(wb)
    assert ptr(bufs.in_basis_dtype(q_prev)) == ptr(wb)


def test_torch_mixed_dtype_block_subtraction_and_dots():
    """The row-by-row paths torch takes for speed (a float32 block subtracted from a
    float64 one; row-wise dot products) against numpy."""
    torch = pytest.importorskip("torch")
    from array_api_compat import torch as xp

    from specdens import _array
    from specdens.algorithms.lanczos import _rowdot

    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 500))
    x = rng.standard_normal((4, 500)).astype(np.float32)
    out = _array.subtract_rows(torch.from_numpy(w.copy()), torch.from_numpy(x))
    np.testing.assert_array_equal(out.numpy(), w - x.astype(np.float64))
    a, b = rng.standard_normal((2, 3, 500))
    got = _rowdot(xp, torch.from_numpy(a), torch.from_numpy(b)).numpy()
    # sums of 500 products of size ~1 in two orders
    np.testing.assert_allclose(got, np.einsum("kn,kn->k", a, b), rtol=0,
                               atol=10 * 500 * np.finfo(np.float64).eps)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("op_dtype", ["float32", "float64"])
def test_operator_that_writes_into_its_input_is_refused(lib, op_dtype):
    """The vectors an operator is given are memory the engine reuses (the basis row
    itself for a float32 operator with a float32 basis): an operator that scales its input
    in place would corrupt the run silently, so the first product is checked."""
    d = np.linspace(-1.0, 3.0, N).astype(op_dtype)
    if lib == "torch":
        torch = pytest.importorskip("torch")
        d = torch.from_numpy(d)

    def scales_in_place(V):
        V *= 2.0
        return (d[:, None] * V) / 2.0

    op = CallableOperator(lambda v: scales_in_place(v[:, None])[:, 0], (N, N), op_dtype,
                          matmat=scales_in_place, xp=lib, symmetric=True)
    with pytest.raises(ValueError, match="changed the vectors it was given"):
        specdens.lanczos(op, 10, num_probes=2, basis_dtype="float32")


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_column_major_probes_leave_the_buffers_row_major(monkeypatch, lib):
    """Explicit probes of shape (n, k) make a column-major start block; the rotating
    buffers stay row-major (the zero vector the block starts from included), so the run is
    bit for bit the one without buffers."""
    op = _diagonal(lib, "float32")
    P = np.random.default_rng(1).standard_normal((N, 4))
    if lib == "torch":
        import torch

        P = torch.from_numpy(P)
    kw = dict(probes=P, reorth="full", basis_dtype="float32")
    r = specdens.lanczos(op, 20, **kw)
    monkeypatch.setattr(_buffers, "LIBRARIES", ())
    ref = specdens.lanczos(op, 20, **kw)
    np.testing.assert_array_equal(r.alpha, ref.alpha)
    np.testing.assert_array_equal(r.beta, ref.beta)
