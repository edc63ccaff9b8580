"""The engine on TensorFlow tensors through specdens.backends.tf._namespace.

The checks of tests/test_array_libraries.py (the engine against numpy in float64,
vectors staying in their library and on their device, no read-back per step) and of
tests/test_operators.py (operators against their dense matrix, algebra, transposes, the
scipy boundary, errors naming the problem), run on TensorFlow; plus the namespace's own
functions against numpy.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import sym_from_spectrum

tf = pytest.importorskip("tensorflow")

from specdens.backends.tf import _namespace as tnp  # noqa: E402

import specdens  # noqa: E402
from specdens import LinearOperatorBase, _array, aslinearoperator  # noqa: E402

N = 7
F32 = 2e-5
CPU = tf.zeros(()).device  # the full name of the default device


class TFMatrix:
    """A TensorFlow matrix as a protocol object (shape, dtype, xp, device, products)."""

    xp = tnp

    def __init__(self, A, dtype=tf.float64, symmetric=None):
        self.A = tf.constant(np.asarray(A), dtype=dtype)
        self.shape = tuple(self.A.shape)
        self.dtype = dtype
        self.device = self.A.device
        self.symmetric = symmetric
        self.calls = 0

    def matvec(self, v):
        return tnp.matmul(self.A, v)

    def matmat(self, V):
        self.calls += 1
        return self.A @ V

    def rmatvec(self, v):
        return tnp.matmul(tf.transpose(self.A), v)


def as_tf(A, dtype=tf.float64, symmetric=None):
    return aslinearoperator(TFMatrix(A, dtype, symmetric))


@pytest.fixture
def A(rng):
    lam = np.concatenate([np.linspace(-1.0, 1.0, 76), [3.0, 4.0, 8.0, 9.0]])
    return sym_from_spectrum(lam, rng)


# -- the engine (the checks of test_array_libraries.py) ---------------------------------
@pytest.mark.parametrize("reorth", ["full", "local", "none"])
def test_tensorflow_tensors_stay_tensorflow(A, reorth):
    ref = specdens.lanczos(A, 15, num_probes=3, seed=1, reorth=reorth)
    r = specdens.lanczos(as_tf(A, symmetric=True), 15, num_probes=3, seed=1, reorth=reorth,
                         return_basis=reorth == "full")
    # without reorthogonalisation rounding differences grow once Ritz values converge
    # (Paige 1971): compare the steps before that exactly, and the stable moments
    steps = slice(None) if reorth != "none" else slice(0, 6)
    np.testing.assert_allclose(r.alpha[:, steps], ref.alpha[:, steps], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.beta[:, steps], ref.beta[:, steps], rtol=1e-12, atol=1e-12)
    m_ref = specdens.SpectralDensity.from_lanczos(ref).moments([1, 2, 3, 4]).value
    m_new = specdens.SpectralDensity.from_lanczos(r).moments([1, 2, 3, 4]).value
    np.testing.assert_allclose(m_new, m_ref, rtol=1e-10)
    if reorth == "full":
        assert isinstance(r.basis, tf.Tensor) and not isinstance(r.basis, tf.Variable)
        assert r.basis.dtype == tf.float64 and r.basis.device == CPU
        assert isinstance(r.last_vector, tf.Tensor)


def test_float32_operator_float64_arithmetic(A):
    op32 = as_tf(A, tf.float32, symmetric=True)
    r = specdens.lanczos(op32, 15, return_basis=True)
    # float64 arithmetic; the basis of a float32 operator is float32 unless asked for
    assert r.basis.dtype == tf.float32 and r.dtype == "float64"
    r64 = specdens.lanczos(op32, 15, return_basis=True, basis_dtype="float64")
    assert r64.basis.dtype == tf.float64
    r32 = specdens.lanczos(op32, 15, dtype="float32")
    assert r32.dtype == "float32"
    np.testing.assert_allclose(r32.alpha, r.alpha, atol=100 * np.finfo(np.float32).eps * 9)


def test_slq_density_and_eigsh_identical_to_numpy(A):
    d_np = specdens.slq(A, num_steps=20, num_probes=2)
    d_tf = specdens.slq(as_tf(A, symmetric=True), num_steps=20, num_probes=2)
    np.testing.assert_allclose(d_tf.nodes, d_np.nodes, atol=1e-12)
    np.testing.assert_allclose(d_tf.weights, d_np.weights, atol=1e-12)
    e = specdens.eigsh(as_tf(A, symmetric=True), k=4, which="LA")
    np.testing.assert_allclose(e.eigenvalues, [3.0, 4.0, 8.0, 9.0], atol=1e-10)
    assert isinstance(e.eigenvectors, tf.Tensor) and e.eigenvectors.shape == (80, 4)
    X = e.eigenvectors.numpy()
    np.testing.assert_allclose(A @ X, X * e.eigenvalues, atol=1e-8)


def test_device_errors_name_the_library(A):
    op = as_tf(A)
    with pytest.raises(TypeError, match="tensorflow arrays"):
        op.matvec(np.ones(A.shape[0]))
    with pytest.raises(TypeError, match="probes are numpy arrays"):
        specdens.lanczos(op, 5, probes=np.ones(A.shape[0]))
    # TensorFlow's own error names both dtypes (LinearOperatorBase._product rewrites only
    # TypeError/ValueError/RuntimeError, and TensorFlow raises InvalidArgumentError)
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError),
                       match="float64.*float32|double tensor but is a float tensor"):
        op.matvec(tf.ones(A.shape[0], tf.float32))


def test_no_host_round_trip_per_step(A):
    """alpha and beta are read back only at the end (or every check_every steps): a NaN at
    step 3 is reported after the run, not by a per-step check."""
    T = tf.constant(A)
    calls = {"n": 0}

    def matmat(V):
        calls["n"] += 1
        out = T @ V
        return out * float("nan") if calls["n"] == 3 else out

    op = aslinearoperator(lambda v: tnp.matmul(T, v), shape=A.shape, dtype=tf.float64, xp=tnp)
    op._fm = matmat
    with pytest.raises(FloatingPointError, match="step 3 for probe 0"):
        specdens.lanczos(op, 12, num_probes=2)
    assert calls["n"] == 12
    calls["n"] = 0
    with pytest.raises(FloatingPointError, match="step 3 for probe 0"):
        specdens.lanczos(op, 12, num_probes=2, check_every=4)
    assert calls["n"] == 4


# -- operators (the checks of test_operators.py) ----------------------------------------
def sym(n=N, seed=0):
    M = np.random.default_rng(seed).standard_normal((n, n))
    return (M + M.T) / 2


def nonsym(n=N, seed=1):
    return np.random.default_rng(seed).standard_normal((n, n))


def assert_close(got, want, tol):
    assert isinstance(got, tf.Tensor), type(got)
    got = got.numpy().astype(np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("dtype,tol", [(tf.float64, 1e-12), (tf.float32, F32)],
                         ids=["f64", "f32"])
def test_wrapper_matches_dense(dtype, tol):
    rng = np.random.default_rng(2)
    M = nonsym()
    x, X = rng.standard_normal(N), rng.standard_normal((N, 3))
    T = tf.constant(M, dtype)
    for op in (as_tf(M, dtype),
               aslinearoperator(lambda v: tnp.matmul(T, v), shape=(N, N), dtype=dtype,
                                xp=tnp)):
        assert isinstance(op, LinearOperatorBase) and isinstance(op, specdens.LinearOperator)
        assert op.shape == (N, N) and op.array_library == "tensorflow"
        assert _array.dtype_name(op.dtype) == dtype.name and op.device == CPU
        v, V = tf.constant(x, dtype), tf.constant(X, dtype)
        assert_close(op.matvec(v), M @ x, tol)
        assert op.matvec(v).dtype == dtype
        assert_close(op.matmat(V), M @ X, tol)
        assert_close(op @ v, M @ x, tol)
        assert_close(op.matvec(tf.constant(x[:, None], dtype)), (M @ x)[:, None], tol)
        assert_close(op.to_dense(), M, tol)
        assert_close(op.to_dense(block_size=3), M, tol)


def test_algebra_and_transposes_match_dense():
    S, M = sym(), nonsym()
    I = np.eye(N)
    x = np.random.default_rng(3).standard_normal(N)
    A, B = as_tf(S), as_tf(M)
    expected = {
        "A+B": (A + B, S + M), "A-B": (A - B, S - M), "2*A": (2 * A, 2 * S),
        "A*np.float32(2)": (A * np.float32(2.0), 2 * S), "-A": (-A, -S), "A/2": (A / 2, S / 2),
        "A@B": (A @ B, S @ M), "shift": (A.shift(1.5), S + 1.5 * I),
        "2*(A@B)-B.shift(1)": (2 * (A @ B) - B.shift(1.0), 2 * S @ M - M - I),
        "B.T": (B.T, M.T), "(A@B).T": ((A @ B).T, M.T @ S.T),
        "B.shift(3).T": (B.shift(3.0).T, M.T + 3 * I),
    }
    for name, (op, dense) in expected.items():
        assert op.array_library == "tensorflow", name
        assert_close(op.to_dense(), dense, 1e-11)
        assert_close(op.matvec(tf.constant(x)), dense @ x, 1e-11)
    # a float32 term in a float64 sum: the dtypes are promoted
    mixed = as_tf(S) + as_tf(M, tf.float32)
    assert mixed.dtype == tf.float64
    assert_close(mixed.to_dense(), S + M, 1e-6)


def test_to_scipy_and_repr():
    M = nonsym()
    L = as_tf(M).to_scipy()
    Y = L.matmat(np.eye(N))
    assert type(Y) is np.ndarray and Y.dtype == np.float64
    np.testing.assert_allclose(Y, M, atol=1e-12)
    np.testing.assert_allclose(L.rmatvec(np.ones(N)), M.T @ np.ones(N), atol=1e-12)
    text = repr(as_tf(sym(), tf.float32))
    assert f"shape=({N}, {N})" in text and "dtype=float32" in text
    assert "library=tensorflow" in text and f"device={CPU}" in text


def test_errors_mixing_libraries():
    op_tf, op_np = as_tf(sym()), aslinearoperator(sym())
    with pytest.raises(TypeError, match="operator on tensorflow arrays with one on numpy"):
        _ = op_tf + op_np
    with pytest.raises(TypeError, match="works on numpy arrays.*got a tensorflow array"):
        op_np.matvec(tf.ones(N, tf.float64))
    with pytest.raises(TypeError, match="cannot mix or use these array types together: "
                                        "numpy, tensorflow"):
        _array.namespace(tf.ones(2), np.ones(2))
    with pytest.raises(ValueError, match=r"block has shape \(4, 2\)"):
        op_tf.matmat(tf.ones((4, 2), tf.float64))


# -- the array helpers ------------------------------------------------------------------
def test_array_helpers_recognise_tensorflow():
    x = tf.constant([1.0, 2.0], tf.float64)
    var = tf.Variable(x)
    assert _array.namespace(x) is tnp and _array.namespace(var, x) is tnp
    assert _array.library_name(x) == "tensorflow" == _array.library_name(tnp)
    assert _array.library_name(var) == "tensorflow"
    assert _array.device_of(x) == CPU == _array.device_of(var)
    assert _array.canonical_device(tnp, "cpu") == CPU == _array.canonical_device(tnp)
    assert _array.dtype_name(tf.float64) == "float64" and _array.dtype_name(x.dtype) == "float64"
    assert not _array.is_host_namespace(tnp) and _array.supports_float64(tnp, CPU)
    np.testing.assert_array_equal(_array.to_numpy(x), [1.0, 2.0])
    y = _array.from_numpy(np.arange(3.0), tnp, CPU, tf.float32)
    assert isinstance(y, tf.Tensor) and y.dtype == tf.float32 and y.device == CPU


def test_import_does_not_import_tensorflow_for_other_arrays(tmp_path):
    code = ("import sys, numpy, specdens; specdens._array.namespace(numpy.ones(2)); "
            "specdens.lanczos(numpy.eye(4), 2); print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


# -- the namespace's functions against numpy --------------------------------------------
def test_namespace_functions_match_numpy():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4, 5))
    m, v, w = rng.standard_normal((3, 4)), rng.standard_normal(4), rng.standard_normal(3)
    t = tf.constant
    for got, want in [
        (tnp.matmul(t(a), t(b)), a @ b), (tnp.matmul(t(m), t(v)), m @ v),
        (tnp.matmul(t(w), t(m)), w @ m), (tnp.matmul(t(v), t(v)), v @ v),
        (tnp.matrix_transpose(t(a)), np.swapaxes(a, -1, -2)),
        (tnp.sum(t(m), axis=1), m.sum(axis=1)), (tnp.sum(t(m)), m.sum()),
        (tnp.max(t(m), axis=0), m.max(axis=0)), (tnp.max(t(m)), m.max()),
        (tnp.where(t(m) > 0, 0.0, t(m)), np.where(m > 0, 0.0, m)),
        (tnp.where(t(m) > 0, t(m), 1.5), np.where(m > 0, m, 1.5)),
        (tnp.maximum(t(m), 0.25), np.maximum(m, 0.25)), (tnp.minimum(t(m), t(m) * 2),
                                                         np.minimum(m, 2 * m)),
        (tnp.sqrt(tnp.abs(t(m))), np.sqrt(np.abs(m))),
        (tnp.stack([t(v), t(v)], axis=1), np.stack([v, v], axis=1)),
        (tnp.concat([t(m), t(m)], axis=1), np.concatenate([m, m], axis=1)),
        (tnp.concat([t(m), t(v)], axis=None), np.concatenate([m.ravel(), v])),
        (tnp.reshape(t(m), (-1, 2)), m.reshape(-1, 2)),
        (tnp.zeros_like(t(m)), np.zeros_like(m)), (tnp.ones_like(t(v)), np.ones_like(v)),
        (tnp.zeros((2, 3), dtype=tnp.float32), np.zeros((2, 3))),
        (tnp.ones((2,), dtype=tnp.float64, device="cpu"), np.ones(2)),
        (tnp.asarray(1.5), np.asarray(1.5)),
        (tnp.arange(4), np.arange(4)), (tnp.arange(1, 7, 2), np.arange(1, 7, 2)),
        (tnp.reshape(tnp.arange(3) == 1, (1, 3)), np.array([[False, True, False]])),
    ]:
        assert isinstance(got, tf.Tensor)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-14, atol=1e-14)
    assert tnp.asarray(1.5).dtype == tf.float64 and tnp.zeros((1,)).dtype == tf.float64
    assert tnp.isfinite(t([1.0, np.inf, np.nan])).numpy().tolist() == [True, False, False]
    x = t(m)
    assert tnp.astype(x, tnp.float64, copy=False) is x
    assert tnp.astype(x, tnp.float32).dtype == tf.float32
    assert tnp.result_type(tnp.float32, tnp.float64) == tf.float64
    assert tnp.result_type(x, tnp.float16) == tf.float64
    assert tnp.result_type(tnp.bfloat16, tnp.float16) == tf.float32
    with pytest.raises(TypeError, match="no promotion rule"):
        tnp.result_type(tnp.float32, tnp.int32)
    with pytest.raises(ValueError, match="matrix_transpose needs at least 2"):
        tnp.matrix_transpose(t(v))


def test_namespace_reductions_to_bool_and_empty():
    """``all``/``any`` (the engine's finiteness and convergence checks) as numpy's, with
    ``axis`` and ``keepdims``; ``empty`` allocates a tensor of the shape, dtype and device
    asked for (its contents are written before they are read)."""
    m = np.array([[1.0, 0.0, 2.0], [3.0, 4.0, 5.0]])
    t = tf.constant(m)
    for fn, ref in ((tnp.all, np.all), (tnp.any, np.any)):
        for x in (m, m > 2.5, np.zeros((2, 3)), np.ones((2, 3), bool)):
            got = fn(tf.constant(x))
            assert isinstance(got, tf.Tensor) and got.dtype == tf.bool
            assert bool(got) == bool(ref(x))
            for axis in (0, 1, (0, 1)):
                np.testing.assert_array_equal(fn(tf.constant(x), axis=axis).numpy(),
                                              ref(x, axis=axis))
            np.testing.assert_array_equal(fn(tf.constant(x), axis=1, keepdims=True).numpy(),
                                          ref(x, axis=1, keepdims=True))
    assert bool(tnp.all(tnp.isfinite(t))) and not bool(tnp.any(t < 0))
    e = tnp.empty((2, 3), dtype=tnp.float32, device=CPU)
    assert isinstance(e, tf.Tensor) and e.shape == (2, 3) and e.dtype == tf.float32
    assert e.device == CPU and tnp.empty(4).dtype == tf.float64


def test_namespace_has_every_function_the_engine_calls():
    """Every ``xp.<name>`` in the engine's source (specdens/) exists in the TensorFlow
    namespace: a name the engine starts to use must be added there too."""
    import pathlib
    import re

    root = pathlib.Path(specdens.__file__).parent
    names = set()
    for path in root.rglob("*.py"):
        names.update(re.findall(r"\bxp\.([A-Za-z_]\w*)", path.read_text()))
    assert {"all", "any", "empty", "asarray", "matmul"} <= names
    assert sorted(n for n in names if not hasattr(tnp, n)) == []


def test_set_rows_writes_one_row_along_one_axis():
    rng = np.random.default_rng(5)
    Q = tf.zeros((2, 4, 3), tf.float64)
    rows = rng.standard_normal((4, 2, 3))
    for j in range(4):
        Q = _array.set_rows(Q, (slice(None), j, slice(None)), tf.constant(rows[j]))
    assert isinstance(Q, tf.Tensor) and Q.device == CPU
    np.testing.assert_array_equal(Q.numpy(), np.swapaxes(rows, 0, 1))
    V = tf.zeros((3, 5), tf.float64)
    V2 = _array.set_rows(V, (1, slice(None)), tf.ones(5, tf.float32))  # cast to V's dtype
    expect = np.zeros((3, 5))
    expect[1] = 1.0
    np.testing.assert_array_equal(V2.numpy(), expect)
    np.testing.assert_array_equal(V.numpy(), np.zeros((3, 5)))  # a new tensor
    last = _array.set_rows(tf.zeros((2, 3)), (slice(None), 2), tf.ones(2))
    np.testing.assert_array_equal(last.numpy(), [[0, 0, 1], [0, 0, 1]])
    for bad in ((slice(0, 2), slice(None)), (1, 2), (slice(None), slice(None))):
        with pytest.raises(IndexError, match="one row along one axis"):
            tnp.set_rows(V, bad, tf.ones((2, 5), tf.float64))


def test_aslinearoperator_takes_tf_tensors(rng):
    """A tf.Tensor is an array for aslinearoperator (detected without importing TF in the
    core): products stay TF tensors and equal the dense matrix's; the dtype error names
    both dtypes."""
    M = rng.standard_normal((N, N))
    A = aslinearoperator(tf.constant(M))
    assert A.array_library == "tensorflow" and A.shape == (N, N)
    v = rng.standard_normal(N)
    Av = A.matvec(tf.constant(v))
    assert isinstance(Av, tf.Tensor)
    np.testing.assert_allclose(Av.numpy(), M @ v, rtol=1e-13, atol=1e-13)
    V = rng.standard_normal((N, 3))
    np.testing.assert_allclose(A.matmat(tf.constant(V)).numpy(), M @ V, rtol=1e-13,
                               atol=1e-13)
    np.testing.assert_allclose(_array.to_numpy(A.to_dense()), M, rtol=0, atol=0)
    with pytest.raises(TypeError, match="float64.*float32|float32.*float64"):
        A.matvec(tf.constant(v, dtype=tf.float32))
    S = sym_from_spectrum(np.linspace(-1.0, 2.0, N), rng)
    r = specdens.lanczos(aslinearoperator(tf.constant(S), symmetric=True), N)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(r.tridiagonal_matrix(0))),
                               np.linspace(-1.0, 2.0, N), atol=1e-12)
