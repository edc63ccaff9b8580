"""The engine on torch, jax and array-api-strict arrays: vectors stay in their library
and on their device, and results match numpy in float64."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import sym_from_spectrum

import specdens


@pytest.fixture
def A(rng):
    lam = np.concatenate([np.linspace(-1.0, 1.0, 76), [3.0, 4.0, 8.0, 9.0]])
    return sym_from_spectrum(lam, rng)


def _reference(A, **kw):
    return specdens.lanczos(A, 15, num_probes=3, seed=1, **kw)


def _check_against_numpy(Aw, A, basis_type, **kw):
    ref = _reference(A, **kw)
    r = specdens.lanczos(Aw, 15, num_probes=3, seed=1, return_basis=kw.get("reorth", "full")
                         == "full", **kw)
    # Without reorthogonalisation, rounding differences between libraries (summation
    # order) are amplified once Ritz values converge (Paige 1971): compare the steps
    # before that exactly, and the quadrature's moments, which stay stable (Greenbaum 1989).
    steps = slice(None) if kw.get("reorth", "full") != "none" else slice(0, 6)
    np.testing.assert_allclose(r.alpha[:, steps], ref.alpha[:, steps], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.beta[:, steps], ref.beta[:, steps], rtol=1e-12, atol=1e-12)
    m_ref = specdens.SpectralDensity.from_lanczos(ref).moments([1, 2, 3, 4]).value
    m_new = specdens.SpectralDensity.from_lanczos(r).moments([1, 2, 3, 4]).value
    np.testing.assert_allclose(m_new, m_ref, rtol=1e-10)
    if r.basis is not None:
        assert isinstance(r.basis, basis_type)
    return r


@pytest.mark.parametrize("reorth", ["full", "local", "none"])
def test_array_api_strict(A, reorth):
    xs = pytest.importorskip("array_api_strict")
    _check_against_numpy(xs.asarray(A), A, type(xs.asarray(A)), reorth=reorth)


@pytest.mark.parametrize("reorth", ["full", "local", "none"])
def test_torch_tensors_stay_torch(A, reorth):
    torch = pytest.importorskip("torch")
    r = _check_against_numpy(torch.tensor(A), A, torch.Tensor, reorth=reorth)
    if r.basis is not None:
        assert r.basis.dtype == torch.float64 and r.basis.device.type == "cpu"


def test_torch_float32_operator_float64_arithmetic(A):
    torch = pytest.importorskip("torch")
    r = specdens.lanczos(torch.tensor(A, dtype=torch.float32), 15, return_basis=True)
    # float64 arithmetic; the basis of a float32 operator is float32 unless asked for
    assert r.basis.dtype == torch.float32 and r.dtype == "float64"
    assert r.basis_dtype == "float32"
    r64 = specdens.lanczos(torch.tensor(A, dtype=torch.float32), 15, return_basis=True,
                           basis_dtype="float64")
    assert r64.basis.dtype == torch.float64 and r64.basis_dtype == "float64"
    r32 = specdens.lanczos(torch.tensor(A, dtype=torch.float32), 15, dtype="float32")
    assert r32.dtype == "float32"
    np.testing.assert_allclose(r32.alpha, r.alpha, atol=100 * np.finfo(np.float32).eps * 9)


def test_jax_arrays_float64_and_float32(A):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    with jax.enable_x64(True):
        r = _check_against_numpy(jnp.asarray(A), A, jax.Array)
        assert r.basis.dtype == jnp.float64
    # Without x64, JAX has no float64: the engine works in float32 and says so.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r32 = specdens.lanczos(jnp.asarray(A, dtype=jnp.float32), 15, num_probes=3, seed=1)
    assert r32.dtype == "float32"
    ref = _reference(A)
    np.testing.assert_allclose(r32.alpha, ref.alpha, atol=1e3 * np.finfo(np.float32).eps * 9)
    with pytest.raises(TypeError, match="jax_enable_x64"):
        specdens.lanczos(jnp.asarray(A, dtype=jnp.float32), 5, dtype="float64")


def test_slq_density_identical_across_libraries(A):
    torch = pytest.importorskip("torch")
    d_np = specdens.slq(A, num_steps=20, num_probes=2)
    d_t = specdens.slq(torch.tensor(A), num_steps=20, num_probes=2)
    np.testing.assert_allclose(d_t.nodes, d_np.nodes, atol=1e-12)
    np.testing.assert_allclose(d_t.weights, d_np.weights, atol=1e-12)


def test_device_errors_name_the_devices(A):
    torch = pytest.importorskip("torch")
    op = specdens.aslinearoperator(torch.tensor(A))
    with pytest.raises(TypeError, match="torch arrays"):
        op.matvec(np.ones(A.shape[0]))
    with pytest.raises(TypeError, match="probes are numpy arrays"):
        specdens.lanczos(op, 5, probes=np.ones(A.shape[0]))


def test_no_host_round_trip_per_step_on_device_arrays(A):
    """On torch, alpha and beta are read back only at the end (or every check_every
    steps): a NaN at step 3 is reported after the run, not by a per-step check."""
    torch = pytest.importorskip("torch")
    T = torch.tensor(A)
    calls = {"n": 0}

    def matmat(V):
        calls["n"] += 1
        out = T @ V
        return out * float("nan") if calls["n"] == 3 else out

    op = specdens.aslinearoperator(lambda v: T @ v, shape=A.shape, dtype=torch.float64)
    op._fm = matmat
    with pytest.raises(FloatingPointError, match="step 3 for probe 0"):
        specdens.lanczos(op, 12, num_probes=2)
    assert calls["n"] == 12  # ran to the end: no synchronisation per step
    calls["n"] = 0
    with pytest.raises(FloatingPointError, match="step 3 for probe 0"):
        specdens.lanczos(op, 12, num_probes=2, check_every=4)
    assert calls["n"] == 4  # read back at step 4 and stopped


def test_torch_rows_get_standard_strides():
    """A dense torch matrix's product is an ``(n, 1)`` column; its transpose is a row that
    torch calls contiguous with strides ``(1, 1)``, which its copy kernels treat slowly
    (37x for a basis row at n = 1e6). The engine's rows get the standard strides, as a
    view, without a copy."""
    torch = pytest.importorskip("torch")
    from specdens import _array

    column = torch.arange(6.0).reshape(6, 1)
    row = column.T
    assert row.is_contiguous() and row.stride() == (1, 1)
    fixed = _array.row_major(row)
    assert fixed.stride() == (6, 1) and fixed.data_ptr() == row.data_ptr()
    assert torch.equal(fixed, row)
    block = torch.arange(12.0).reshape(6, 2).T  # really column-major: copied
    out = _array.row_major(block)
    assert out.stride() == (6, 1) and torch.equal(out, block)
    # the re-view alone (what the engine's converting copies read from): no copy ever
    assert _array.standard_strides(row).stride() == (6, 1)
    assert _array.standard_strides(row).data_ptr() == row.data_ptr()
    assert _array.standard_strides(block) is block


@pytest.mark.parametrize("k", [1, 3])
def test_operator_that_reuses_its_output_buffer(rng, k):
    """An operator that writes every product into the same output buffer (CUDA-graph
    replay does) and returns it: the engine copies it before updating in place. A
    re-view with standard strides shares the buffer's memory, so the copy is decided by
    memory, not object identity (which once let the engine write into the buffer: alpha
    off by 143 at k = 1)."""
    torch = pytest.importorskip("torch")
    n = 120
    A = sym_from_spectrum(np.linspace(-1.0, 2.0, n), rng)
    At = torch.from_numpy(A)
    buffers = {}

    class Buffered:
        shape, dtype, xp = (n, n), torch.float64, "torch"

        def matvec(self, v):
            return At @ v

        def matmat(self, V):
            out = buffers.setdefault(V.shape[1], torch.empty(n, V.shape[1], dtype=torch.float64))
            return torch.matmul(At, V, out=out)

    op = specdens.aslinearoperator(Buffered(), symmetric=True)
    ref = specdens.lanczos(A, 20, num_probes=k, seed=1)
    r = specdens.lanczos(op, 20, num_probes=k, seed=1)
    np.testing.assert_allclose(r.alpha, ref.alpha, rtol=0, atol=1e-12 * 2.0)
    np.testing.assert_allclose(r.beta, ref.beta, rtol=0, atol=1e-12 * 2.0)


def test_operator_that_returns_its_input_leaves_the_start_block_alone():
    """An operator returning its input (its product is our q): the engine must not update
    the start block in place, which a block run again with both Gram-Schmidt sweeps
    starts from."""
    torch = pytest.importorskip("torch")
    from specdens.algorithms import lanczos as engine

    n = 50

    class Same:
        shape, dtype, xp = (n, n), torch.float64, "torch"

        def matvec(self, v):
            return v

        def matmat(self, W):
            return W

    op = specdens.aslinearoperator(Same(), symmetric=True)
    for k in (1, 2):
        V0 = torch.ones(k, n, dtype=torch.float64) / n ** 0.5
        before = V0.clone()
        out = engine._run_block(op, V0, 3, "full", None, torch.float64, torch.float64, 1e-8, 0,
                                False, 0, lambda j: None)
        assert torch.equal(V0, before)
        np.testing.assert_allclose(out["alpha"][:, 0], 1.0, rtol=1e-14)


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_bfloat16_operator_outputs_reach_the_host(library, tmp_path):
    """numpy has no bfloat16 (torch refused .numpy() on it; JAX hands numpy ml_dtypes
    arrays): every path that copies an operator's output to the host widens it, exactly.
    A = diag(1..40) is exact in bfloat16 (integers up to 256), and so are its products
    with the unit and all-ones vectors. A Lanczos product with a unit Rademacher probe q
    rounds q and A q, each entry by at most u = 2**-8, so alpha_1 = moments(1) is within
    (2u + u**2) mean(lambda) < eps_bf16 * 1.01 * mean(lambda) of tr(A) / n."""
    from specdens.analysis import gradient_concentration
    from specdens.testing import dense_eigenvalues

    lam = np.arange(1.0, 41.0)
    n = lam.size
    if library == "torch":
        torch = pytest.importorskip("torch")
        A = torch.diag(torch.asarray(lam)).to(torch.bfloat16)
        g = torch.ones(n, dtype=torch.bfloat16)
    else:
        jnp = pytest.importorskip("jax.numpy")
        A = jnp.diag(jnp.asarray(lam, dtype=jnp.float32)).astype(jnp.bfloat16)
        g = jnp.ones(n, dtype=jnp.bfloat16)
    eps_bf16 = 2.0**-7
    np.testing.assert_array_equal(specdens.aslinearoperator(A).to_scipy().matvec(np.ones(n)),
                                  lam)
    np.testing.assert_array_equal(dense_eigenvalues(A), lam)
    # the symmetry check and the checkpoint's fingerprint read products back
    r = specdens.lanczos(A, 10, num_probes=2, seed=0, check_symmetry=True)
    m1 = specdens.SpectralDensity.from_lanczos(r).moments(1).value
    assert abs(m1 - lam.mean()) <= eps_bf16 * 1.01 * lam.mean()
    ck = tmp_path / "ck.npz"
    d = specdens.slq(A, num_steps=10, num_probes=2, seed=0, checkpoint=ck)
    again = specdens.slq(A, num_steps=10, num_probes=2, seed=0, checkpoint=ck)  # resumed
    np.testing.assert_array_equal(again.nodes, d.nodes)
    assert abs(d.moments(1).value - lam.mean()) <= eps_bf16 * 1.01 * lam.mean()
    # g = ones: 2/40 of it lies in the top two eigenvectors. The computed residuals are
    # bfloat16 products, off by up to eps_bf16 ||A||; with them, each eigenvalue is
    # within its residual, and (Davis-Kahan) the fraction within ||R||_F / delta, delta
    # the distance from the Ritz values to the rest of the spectrum (38 and below).
    c = gradient_concentration(A, g, k=2, seed=0)
    slack = eps_bf16 * lam.max()
    assert np.all(np.abs(c.eigenvalues - lam[-2:]) <= c.residuals + slack)
    delta = float(np.min(c.eigenvalues)) - lam[-3]
    assert delta > 0
    bound = (np.sqrt(np.sum(c.residuals**2)) + np.sqrt(2) * slack) / delta
    assert abs(c.fraction - 2 / n) <= bound


def test_same_device_needs_the_same_index():
    from specdens._array import same_device

    assert same_device("cuda", "cuda:0") and same_device("cuda:0", "cuda")
    assert same_device("cuda:1", "cuda:1") and same_device("cpu", "cpu")
    # a bare name means index 0 (torch's current device on a CUDA machine), not any index
    assert not same_device("cuda", "cuda:1") and not same_device("cuda:1", "cuda")


def test_shares_memory_sees_array_api_strict_views_and_not_empty_tensors():
    xps = pytest.importorskip("array_api_strict")
    torch = pytest.importorskip("torch")
    from specdens._array import shares_memory

    x = xps.asarray(np.arange(4.0).reshape(2, 2))
    assert shares_memory(x[0, :], x)
    assert shares_memory(xps.matrix_transpose(x), x)
    assert not shares_memory(xps.asarray(np.arange(4.0)), x)
    # two distinct empty tensors have no memory to share (both report data_ptr 0)
    assert not shares_memory(torch.zeros(0), torch.zeros(0))
    t = torch.zeros(3)
    assert shares_memory(t[1:], t) and not shares_memory(torch.zeros(3), t)
