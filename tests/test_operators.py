"""Operators: every wrapper and composition checked against its dense matrix in float64.

Each array library is exercised through the same cases: the operator must match the
float64 reference matrix, keep its vectors in its own library and dtype, and refuse bad
input with an error that names the problem.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

import specdens
from specdens import LinearOperatorBase, aslinearoperator

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
xps = pytest.importorskip("array_api_strict")

N = 7
STRICT_ARRAY = type(xps.asarray(0.0))


@contextlib.contextmanager
def jax_x64():
    """float64 in jax for the duration of a block only (jax defaults to float32).

    ``jax.experimental.enable_x64`` where the installed jax still has it, otherwise the
    ``jax.enable_x64`` config context manager; neither leaks into other tests.
    """
    try:
        from jax.experimental import enable_x64 as _enable
    except ImportError:
        def _enable():
            return jax.enable_x64(True)
    with _enable():
        yield


def as_np(x: Any) -> np.ndarray:
    """Any array as float64 numpy, independently of specdens' own conversion."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    if isinstance(x, jax.Array):
        return np.asarray(x, dtype=np.float64)
    return np.from_dlpack(x).astype(np.float64)  # array-api-strict


def sym(n: int = N, seed: int = 0) -> np.ndarray:
    M = np.random.default_rng(seed).standard_normal((n, n))
    return (M + M.T) / 2


def nonsym(n: int = N, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, n))


# -- protocol objects -------------------------------------------------------------------
class MatvecOnly:
    """The minimal protocol: shape, dtype, matvec."""

    def __init__(self, A: Any):
        self.A = A
        self.shape = tuple(A.shape)
        self.dtype = A.dtype
        self.matvec_calls = 0

    def matvec(self, v: Any) -> Any:
        self.matvec_calls += 1
        return self.A @ v


class WithMatmat(MatvecOnly):
    """The protocol plus the optional block product."""

    def __init__(self, A: Any):
        super().__init__(A)
        self.matmat_calls = 0

    def matmat(self, V: Any) -> Any:
        self.matmat_calls += 1
        return self.A @ V


class WithRmatvec(MatvecOnly):
    def rmatvec(self, v: Any) -> Any:
        return self.A.T @ v


# -- cases: one per input kind and library ----------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    wrap: Callable[[np.ndarray], Any]  # float64 numpy matrix -> input of aslinearoperator
    vec: Callable[[np.ndarray], Any]  # numpy array -> a vector of the operator's library
    native: type | tuple[type, ...]  # type of the arrays the operator returns
    dtype: str
    library: str
    ctx: Callable[[], Any] = contextlib.nullcontext
    tol: float = 1e-12

    def __str__(self) -> str:
        return self.id


def _np(dtype):
    return lambda x: np.asarray(x, dtype=dtype)


def _torch(dtype):
    return lambda x: torch.asarray(np.asarray(x), dtype=dtype)


def _jax(dtype):
    return lambda x: jnp.asarray(np.asarray(x), dtype=dtype)


def _strict(dtype):
    return lambda x: xps.asarray(np.asarray(x), dtype=dtype)


def _custom_scipy(A: np.ndarray) -> spla.LinearOperator:
    return spla.LinearOperator(A.shape, matvec=lambda v: A @ v, rmatvec=lambda v: A.T @ v,
                               dtype=np.float64)


def _product_fn(M: Any) -> Callable[[Any], Any]:
    return lambda v: M @ v


F32 = 2e-5
CASES = [
    Case("numpy-f64", _np(np.float64), _np(np.float64), np.ndarray, "float64", "numpy"),
    Case("numpy-f32", _np(np.float32), _np(np.float32), np.ndarray, "float32", "numpy",
         tol=F32),
    Case("numpy-int", lambda A: np.round(4 * A).astype(np.int64), _np(np.float64), np.ndarray,
         "float64", "numpy"),
    Case("csr_matrix", sp.csr_matrix, _np(np.float64), np.ndarray, "float64", "numpy"),
    Case("csr_array", sp.csr_array, _np(np.float64), np.ndarray, "float64", "numpy"),
    Case("csr_array-f32", lambda A: sp.csr_array(A.astype(np.float32)), _np(np.float32),
         np.ndarray, "float32", "numpy", tol=F32),
    Case("scipy-aslinearoperator", spla.aslinearoperator, _np(np.float64), np.ndarray,
         "float64", "numpy"),
    Case("scipy-custom", _custom_scipy, _np(np.float64), np.ndarray, "float64", "numpy"),
    Case("torch-f64", _torch(torch.float64), _torch(torch.float64), torch.Tensor, "float64",
         "torch"),
    Case("torch-f32", _torch(torch.float32), _torch(torch.float32), torch.Tensor, "float32",
         "torch", tol=F32),
    Case("jax-f32", _jax(jnp.float32), _jax(jnp.float32), jax.Array, "float32", "jax",
         tol=F32),
    Case("jax-f64", _jax(jnp.float64), _jax(jnp.float64), jax.Array, "float64", "jax",
         ctx=jax_x64),
    Case("strict-f64", _strict(xps.float64), _strict(xps.float64), STRICT_ARRAY, "float64",
         "array_api_strict"),
    Case("strict-f32", _strict(xps.float32), _strict(xps.float32), STRICT_ARRAY, "float32",
         "array_api_strict", tol=F32),
    Case("protocol-numpy", lambda A: MatvecOnly(A), _np(np.float64), np.ndarray, "float64",
         "numpy"),
    Case("protocol-matmat-numpy", lambda A: WithMatmat(A), _np(np.float64), np.ndarray,
         "float64", "numpy"),
    Case("protocol-torch-f32", lambda A: WithMatmat(torch.asarray(A, dtype=torch.float32)),
         _torch(torch.float32), torch.Tensor, "float32", "torch", tol=F32),
    Case("callable-numpy", lambda A: (lambda v: A @ v), _np(np.float64), np.ndarray,
         "float64", "numpy"),
    Case("callable-torch-f64", lambda A: _product_fn(torch.asarray(A)),
         _torch(torch.float64), torch.Tensor, "float64", "torch"),
    Case("callable-jax-f32", lambda A: _product_fn(jnp.asarray(A, dtype=jnp.float32)),
         _jax(jnp.float32), jax.Array, "float32", "jax", tol=F32),
    Case("callable-strict-f64", lambda A: _product_fn(xps.asarray(A)),
         _strict(xps.float64), STRICT_ARRAY, "float64", "array_api_strict"),
]
CASE_IDS = [c.id for c in CASES]
BY_ID = {c.id: c for c in CASES}


def make(case: Case, A: np.ndarray, **kw: Any) -> LinearOperatorBase:
    obj = case.wrap(A)
    if case.id.startswith("callable"):
        dtype = {"torch": getattr(torch, case.dtype), "jax": getattr(jnp, case.dtype),
                 "numpy": case.dtype, "array_api_strict": case.dtype}[case.library]
        kw.setdefault("shape", A.shape)
        kw.setdefault("dtype", dtype)
        if case.library == "array_api_strict":
            kw.setdefault("xp", xps)
    return aslinearoperator(obj, **kw)


def check_native(case: Case, y: Any) -> None:
    assert isinstance(y, case.native), type(y)
    assert specdens._array.dtype_name(y.dtype) == case.dtype


def assert_close(got: Any, want: np.ndarray, tol: float) -> None:
    got = as_np(got)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


# -- every input kind against its dense matrix ------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_wrapper_matches_dense(case: Case) -> None:
    rng = np.random.default_rng(2)
    A = nonsym()
    x, X = rng.standard_normal(N), rng.standard_normal((N, 3))
    with case.ctx():
        op = make(case, A)
        Aref = as_np(case.wrap(A)) if case.id == "numpy-int" else A
        assert isinstance(op, LinearOperatorBase)
        assert isinstance(op, specdens.LinearOperator)
        assert op.shape == (N, N)
        assert specdens._array.dtype_name(op.dtype) == case.dtype
        assert op.array_library == case.library

        y = op.matvec(case.vec(x))
        check_native(case, y)
        assert_close(y, Aref @ x, case.tol)

        Y = op.matmat(case.vec(X))
        check_native(case, Y)
        assert_close(Y, Aref @ X, case.tol)

        assert_close(op @ case.vec(x), Aref @ x, case.tol)
        assert_close(op @ case.vec(X), Aref @ X, case.tol)
        # An (n, 1) vector stays (n, 1).
        assert_close(op.matvec(case.vec(x[:, None])), (Aref @ x)[:, None], case.tol)

        D = op.to_dense()
        check_native(case, D)
        assert_close(D, Aref, case.tol)
        # Several identity blocks.
        assert_close(op.to_dense(block_size=3), Aref, case.tol)


def test_protocol_objects_use_their_own_products() -> None:
    A = nonsym()
    with_mm, plain = WithMatmat(A), MatvecOnly(A)
    op_mm, op_plain = aslinearoperator(with_mm), aslinearoperator(plain)
    X = np.ones((N, 4))
    np.testing.assert_allclose(op_mm.matmat(X), A @ X)
    assert with_mm.matmat_calls == 1 and with_mm.matvec_calls == 0
    # Without matmat the block is done column by column.
    np.testing.assert_allclose(op_plain.matmat(X), A @ X)
    assert plain.matvec_calls == 4


def test_callable_declares_library_and_device_by_keyword() -> None:
    T = torch.asarray(sym())
    op = aslinearoperator(lambda v: T @ v, shape=(N, N), dtype="float64", xp="torch",
                          device="cpu")
    assert op.array_library == "torch" and str(op.device) == "cpu"
    assert isinstance(op.matvec(torch.ones(N, dtype=torch.float64)), torch.Tensor)
    # A bare torch module works too (it is wrapped as array-API).
    op2 = aslinearoperator(lambda v: T @ v, shape=(N, N), dtype="float64", xp=torch)
    assert_close(op2.to_dense(), sym(), 1e-12)
    # jax: "cpu" names jax's default CPU device.
    J = jnp.asarray(sym(), dtype=jnp.float32)
    opj = aslinearoperator(lambda v: J @ v, shape=(N, N), dtype="float32", xp="jax",
                           device="cpu")
    assert_close(opj.to_dense(), sym(), F32)


def test_protocol_object_with_xp_and_device_attributes() -> None:
    class TorchOp:
        shape = (N, N)
        dtype = torch.float64
        device = "cpu"

        def __init__(self):
            self.T = torch.asarray(sym())

        def matvec(self, v):
            return self.T @ v

    op = aslinearoperator(TorchOp())
    assert op.array_library == "torch"
    assert_close(op.to_dense(), sym(), 1e-12)
    assert isinstance(TorchOp(), specdens.LinearOperator)


def test_dtype_keyword_converts_arrays() -> None:
    A = sym()
    for obj in (A, sp.csr_array(A), torch.asarray(A)):
        op = aslinearoperator(obj, dtype="float32")
        assert specdens._array.dtype_name(op.dtype) == "float32"
        assert_close(op.to_dense(), A, F32)
    op = aslinearoperator(np.asarray(A), dtype=torch.float32)  # any library's dtype object
    assert op.dtype == np.float32


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_aslinearoperator_is_idempotent_and_accepts_np_matrix() -> None:
    op = aslinearoperator(sym())
    assert aslinearoperator(op) is op
    op2 = aslinearoperator(np.asmatrix(sym()))
    assert type(op2.to_dense()) is np.ndarray
    np.testing.assert_allclose(op2.to_dense(), sym())


def test_isinstance_protocol() -> None:
    class NoDtype:
        shape = (N, N)

        def matvec(self, v):
            return v

    assert isinstance(MatvecOnly(sym()), specdens.LinearOperator)
    assert isinstance(WithMatmat(sym()), specdens.LinearOperator)
    assert isinstance(aslinearoperator(sym()), specdens.LinearOperator)
    assert isinstance(spla.aslinearoperator(sym()), specdens.LinearOperator)
    assert not isinstance(NoDtype(), specdens.LinearOperator)
    assert not isinstance(sym(), specdens.LinearOperator)
    assert not isinstance(lambda v: v, specdens.LinearOperator)


# -- composition algebra ----------------------------------------------------------------
ALGEBRA = ["numpy-f64", "numpy-f32", "csr_matrix", "csr_array", "scipy-aslinearoperator",
           "torch-f64", "torch-f32", "jax-f32", "jax-f64", "strict-f64",
           "protocol-matmat-numpy", "callable-numpy", "callable-torch-f64"]


@pytest.mark.parametrize("case", [BY_ID[i] for i in ALGEBRA], ids=ALGEBRA)
def test_algebra_matches_dense(case: Case) -> None:
    S, M = sym(), nonsym()
    I = np.eye(N)
    x = np.random.default_rng(3).standard_normal(N)
    with case.ctx():
        A, B = make(case, S), make(case, M)
        expected = {
            "A+B": (A + B, S + M),
            "A-B": (A - B, S - M),
            "2*A": (2 * A, 2 * S),
            "A*2": (A * 2, 2 * S),
            "np.float64(2)*A": (np.float64(2.0) * A, 2 * S),
            "A*np.float32(2)": (A * np.float32(2.0), 2 * S),
            "-A": (-A, -S),
            "A/2": (A / 2, S / 2),
            "A@B": (A @ B, S @ M),
            "B@A": (B @ A, M @ S),
            "shift": (A.shift(1.5), S + 1.5 * I),
            "shift-neg": (B.shift(-0.25), M - 0.25 * I),
            "2*(A@B)-B.shift(1)": (2 * (A @ B) - B.shift(1.0), 2 * S @ M - M - I),
        }
        for name, (op, dense) in expected.items():
            assert isinstance(op, LinearOperatorBase), name
            assert specdens._array.dtype_name(op.dtype) == case.dtype, name
            assert op.array_library == case.library, name
            D = op.to_dense()
            check_native(case, D)
            assert_close(D, dense, case.tol * 10)
            y = op.matvec(case.vec(x))
            check_native(case, y)
            assert_close(y, dense @ x, case.tol * 10)


def test_algebra_mixes_input_kinds_of_one_library() -> None:
    S, M = sym(), nonsym()
    dense, sparse, scipy_op = aslinearoperator(S), aslinearoperator(sp.csr_array(M)), \
        spla.aslinearoperator(M)
    np.testing.assert_allclose((dense + sparse).to_dense(), S + M)
    np.testing.assert_allclose((dense @ sparse).to_dense(), S @ M)
    # Objects that are operators but not specdens ones are wrapped on the fly.
    np.testing.assert_allclose((dense + scipy_op).to_dense(), S + M)
    np.testing.assert_allclose((dense - scipy_op).to_dense(), S - M)
    np.testing.assert_allclose((dense @ scipy_op).to_dense(), S @ M)
    np.testing.assert_allclose((scipy_op + dense).to_dense(), M + S)
    np.testing.assert_allclose((WithMatmat(M) + dense).to_dense(), M + S)
    np.testing.assert_allclose((WithMatmat(M) - dense).to_dense(), M - S)
    np.testing.assert_allclose((WithMatmat(M) @ dense).to_dense(), M @ S)


def test_mixed_precision_composition_in_torch() -> None:
    S, M = sym(), nonsym()
    A64 = aslinearoperator(torch.asarray(S, dtype=torch.float64))
    B32 = aslinearoperator(torch.asarray(M, dtype=torch.float32))
    for op, dense in ((A64 + B32, S + M), (A64 @ B32, S @ M), (B32 @ A64, M @ S)):
        assert op.dtype == torch.float64
        D = op.to_dense()
        assert D.dtype == torch.float64
        assert_close(D, dense, 1e-5)


# -- transposes -------------------------------------------------------------------------
TRANSPOSABLE = ["numpy-f64", "csr_matrix", "csr_array", "scipy-aslinearoperator",
                "scipy-custom", "torch-f64", "torch-f32", "jax-f32", "strict-f64"]


@pytest.mark.parametrize("case", [BY_ID[i] for i in TRANSPOSABLE], ids=TRANSPOSABLE)
def test_transpose_of_nonsymmetric(case: Case) -> None:
    S, M = sym(), nonsym()
    with case.ctx():
        A, B = make(case, S), make(case, M)
        for op, dense in ((B.T, M.T), (B.T.T, M), ((A + B).T, (S + M).T),
                          ((A @ B).T, M.T @ S.T), ((2 * B).T, 2 * M.T),
                          (B.shift(3.0).T, M.T + 3 * np.eye(N)), ((-B).T, -M.T)):
            D = op.to_dense()
            check_native(case, D)
            assert_close(D, dense, case.tol * 10)


def test_transpose_through_rmatvec() -> None:
    M = nonsym()
    op = aslinearoperator(WithRmatvec(M))
    np.testing.assert_allclose(op.T.to_dense(), M.T)
    np.testing.assert_allclose(op.T.T.to_dense(), M)
    op2 = aslinearoperator(lambda v: M @ v, shape=(N, N), dtype="float64")
    with pytest.raises(TypeError, match="does not know its transpose"):
        _ = op2.T


def test_transpose_unknown_is_an_error() -> None:
    M = nonsym()
    op = aslinearoperator(lambda v: M @ v, shape=(N, N), dtype="float64")
    with pytest.raises(TypeError, match="CallableOperator does not know its transpose.*symmetric"):
        _ = op.T
    # ... also inside a composition.
    with pytest.raises(TypeError, match="does not know its transpose"):
        _ = (op + aslinearoperator(M)).T
    with pytest.raises(TypeError, match="does not know its transpose"):
        _ = (2 * op).T
    # A scipy LinearOperator without rmatvec: refused at .T, not at the first product.
    lo = spla.LinearOperator((N, N), matvec=lambda v: M @ v, dtype=np.float64)
    with pytest.raises(TypeError, match="no rmatvec"):
        _ = aslinearoperator(lo).T
    # to_scipy still works, without an rmatvec.
    np.testing.assert_allclose(aslinearoperator(lo).to_scipy().matmat(np.eye(N)), M)


def test_symmetric_true_makes_T_self() -> None:
    S = sym()
    ops = [aslinearoperator(S, symmetric=True),
           aslinearoperator(sp.csr_array(S), symmetric=True),
           aslinearoperator(spla.LinearOperator((N, N), matvec=lambda v: S @ v,
                                                dtype=np.float64), symmetric=True),
           aslinearoperator(lambda v: S @ v, shape=(N, N), dtype="float64", symmetric=True),
           aslinearoperator(torch.asarray(S), symmetric=True)]
    for op in ops:
        assert op.T is op
        assert (2 * op).T.symmetric
        assert (op + op).T is not None and (op + op).symmetric
        assert op.shift(1.0).symmetric
        assert_close((op.shift(1.0).T).to_dense(), S + np.eye(N), 1e-12)


# -- numpy on either side of @ ----------------------------------------------------------
def test_numpy_array_matmul_operator() -> None:
    M = nonsym()
    x, X = np.arange(N, dtype=np.float64), np.random.default_rng(4).standard_normal((2, N))
    assert LinearOperatorBase.__array_ufunc__ is None
    for op in (aslinearoperator(M), aslinearoperator(sp.csr_matrix(M)),
               aslinearoperator(spla.aslinearoperator(M)), aslinearoperator(WithRmatvec(M))):
        np.testing.assert_allclose(op @ x, M @ x)
        np.testing.assert_allclose(op @ X.T, M @ X.T)
        # numpy defers to the operator (``__array_ufunc__ = None``): x @ A, row vectors.
        np.testing.assert_allclose(x @ op, x @ M)
        np.testing.assert_allclose(X @ op, X @ M)
        assert type(x @ op) is np.ndarray
    # A symmetric operator needs no transpose for x @ A.
    S = sym()
    cb = aslinearoperator(lambda v: S @ v, shape=(N, N), dtype="float64", symmetric=True)
    np.testing.assert_allclose(x @ cb, x @ S)
    # ... an unknown transpose is refused.
    cb2 = aslinearoperator(lambda v: M @ v, shape=(N, N), dtype="float64")
    with pytest.raises(TypeError, match="transpose"):
        _ = x @ cb2
    # numpy arrays are not operators: elementwise ops are refused, not broadcast.
    op = aslinearoperator(M)
    with pytest.raises(TypeError):
        _ = x * op
    with pytest.raises(TypeError):
        _ = M + op
    with pytest.raises(TypeError):
        _ = op + M


def test_torch_tensor_matmul_operator() -> None:
    M = nonsym()
    op = aslinearoperator(torch.asarray(M))
    x = torch.arange(N, dtype=torch.float64)
    y = x @ op
    assert isinstance(y, torch.Tensor)
    assert_close(y, np.arange(N) @ M, 1e-12)
    assert_close(op @ x, M @ np.arange(N), 1e-12)


# -- to_scipy ---------------------------------------------------------------------------
class RecordingTorch:
    """A torch-backed symmetric protocol object that records the arrays it is given."""

    def __init__(self, S: np.ndarray, dtype):
        self.T = torch.asarray(S, dtype=dtype)
        self.shape, self.dtype = tuple(S.shape), dtype
        self.seen: set = set()

    def matvec(self, v):
        self.seen.add((type(v).__name__, v.dtype))
        return self.T @ v

    def matmat(self, V):
        self.seen.add((type(V).__name__, V.dtype))
        return self.T @ V


@pytest.mark.parametrize("tdtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_to_scipy_eigsh_and_lobpcg_on_torch(tdtype) -> None:
    n = 40
    lam = np.concatenate([np.linspace(-1.0, 1.0, n - 3), [3.0, 4.0, 6.0]])
    Q, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((n, n)))
    S = (Q * lam) @ Q.T
    S = (S + S.T) / 2
    rec = RecordingTorch(S, tdtype)
    op = aslinearoperator(rec, symmetric=True)
    L = op.to_scipy()
    assert isinstance(L, spla.LinearOperator)
    assert L.shape == (n, n) and L.dtype == np.float64
    tol = 1e-10 if tdtype == torch.float64 else 1e-4

    y = L.matvec(np.ones(n))
    assert type(y) is np.ndarray and y.dtype == np.float64
    np.testing.assert_allclose(y, S @ np.ones(n), atol=tol * 10)
    Y = L.matmat(np.eye(n)[:, :3])
    assert Y.dtype == np.float64 and Y.shape == (n, 3)
    np.testing.assert_allclose(L.rmatvec(np.ones(n)), S @ np.ones(n), atol=tol * 10)

    vals = spla.eigsh(L, k=3, which="LA", return_eigenvectors=False, tol=1e-8)
    np.testing.assert_allclose(np.sort(vals), [3.0, 4.0, 6.0], atol=tol * 10)

    X0 = np.random.default_rng(6).standard_normal((n, 3))
    vals, vecs = spla.lobpcg(L, X0, largest=True, tol=tol, maxiter=200)
    assert vecs.dtype == np.float64
    np.testing.assert_allclose(np.sort(vals), [3.0, 4.0, 6.0], atol=1e-3)

    # Inside, the products ran on torch tensors of the operator's dtype.
    assert rec.seen and all(name == "Tensor" and dt == tdtype for name, dt in rec.seen)


@pytest.mark.parametrize("case", [BY_ID[i] for i in ("numpy-f32", "csr_array", "jax-f32",
                                                     "jax-f64", "strict-f64",
                                                     "callable-jax-f32")],
                         ids=lambda c: c.id)
def test_to_scipy_float64_boundary(case: Case) -> None:
    M = nonsym()
    with case.ctx():
        op = make(case, M)
        L = op.to_scipy()
        Y = L.matmat(np.eye(N))
        assert type(Y) is np.ndarray and Y.dtype == np.float64
        np.testing.assert_allclose(Y, M, atol=case.tol * 10 * np.abs(M).max())
        y = L.matvec(np.ones(N))
        assert y.dtype == np.float64
        np.testing.assert_allclose(y, M @ np.ones(N), atol=case.tol * 100)
        if not case.id.startswith("callable"):
            np.testing.assert_allclose(L.rmatvec(np.ones(N)), M.T @ np.ones(N),
                                       atol=case.tol * 100)


@pytest.mark.parametrize("case", [BY_ID[i] for i in ("numpy-f64", "csr_array", "torch-f64",
                                                     "strict-f64")],
                         ids=lambda c: c.id)
def test_to_scipy_complex_vectors(case: Case) -> None:
    """A real operator is linear over C: A (x + i y) = A x + i A y (the adjoint: A^T). The
    imaginary part is applied, not dropped (no ComplexWarning), and the result matches the
    complex product of the dense matrix to the dot-product rounding bound, entrywise
    |error| <= 2 n eps (|M| |z|) (n eps for each of the two computations)."""
    M = nonsym()
    rng = np.random.default_rng(3)
    z = rng.standard_normal(N) + 1j * rng.standard_normal(N)
    Z = rng.standard_normal((N, 3)) + 1j * rng.standard_normal((N, 3))
    eps = np.finfo(np.float64).eps

    def check(got, ref, absM, absX):
        assert got.dtype == np.complex128 and got.shape == ref.shape
        bound = 2 * N * eps * (absM @ absX)
        assert np.all(np.abs(got.real - ref.real) <= bound)
        assert np.all(np.abs(got.imag - ref.imag) <= bound)

    with case.ctx(), warnings.catch_warnings():
        warnings.simplefilter("error", np.exceptions.ComplexWarning)
        L = make(case, M).to_scipy()
        check(L.matvec(z), M @ z, np.abs(M), np.abs(z))
        check(L @ z, M @ z, np.abs(M), np.abs(z))
        check(L.matvec(z[:, None]), M @ z[:, None], np.abs(M), np.abs(z[:, None]))
        check(L.matmat(Z), M @ Z, np.abs(M), np.abs(Z))
        check(L.rmatvec(z), M.T @ z, np.abs(M.T), np.abs(z))
        check(L.rmatmat(Z), M.T @ Z, np.abs(M.T), np.abs(Z))
        # real input keeps the float64 boundary
        assert L.matvec(z.real).dtype == np.float64


# -- repr -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [BY_ID[i] for i in ("numpy-f64", "csr_array", "torch-f32",
                                                     "jax-f32", "strict-f64",
                                                     "callable-torch-f64")],
                         ids=lambda c: c.id)
def test_repr_names_shape_dtype_device_library(case: Case) -> None:
    with case.ctx():
        op = make(case, sym())
        text = repr(op)
        assert f"shape=({N}, {N})" in text
        assert f"dtype={case.dtype}" in text
        assert "device=" in text and ("cpu" in text.lower())
        assert f"library={case.library}" in text
        assert "dtype=" in repr(op.shift(1.0)) and "library=" in repr(2 * op)


# -- n = 0 ------------------------------------------------------------------------------
def test_empty_operator() -> None:
    for op in (aslinearoperator(np.zeros((0, 0))),
               aslinearoperator(lambda v: v, shape=(0, 0), dtype="float64"),
               aslinearoperator(torch.zeros((0, 0), dtype=torch.float64))):
        assert op.shape == (0, 0)
        D = op.to_dense()
        assert tuple(D.shape) == (0, 0)
        v = op.xp.zeros((0,), dtype=op.dtype)
        assert tuple(op.matvec(v).shape) == (0,)
        assert tuple((op + op).matvec(v).shape) == (0,)
        assert op.to_scipy().shape == (0, 0)


# -- errors name the problem ------------------------------------------------------------
def test_error_not_square() -> None:
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        aslinearoperator(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        aslinearoperator(torch.ones((3, 4)))
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        aslinearoperator(sp.csr_array(np.ones((3, 4))))
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        aslinearoperator(lambda v: v, shape=(3, 4), dtype="float64")
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        aslinearoperator(spla.aslinearoperator(np.ones((3, 4))))
    with pytest.raises(ValueError, match=r"2-D.*\(3,\)"):
        aslinearoperator(np.ones(3))
    with pytest.raises(ValueError, match=r"2-D.*\(2, 2, 2\)"):
        aslinearoperator(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match=r"\(n, n\).*\(3,\)"):
        aslinearoperator(lambda v: v, shape=(3,), dtype="float64")


def test_error_shape_keyword_mismatch() -> None:
    with pytest.raises(ValueError, match=r"shape=\(4, 4\).*\(3, 3\)"):
        aslinearoperator(np.eye(3), shape=(4, 4))


def test_error_callable_needs_shape_and_dtype() -> None:
    with pytest.raises(TypeError, match="needs shape= and dtype="):
        aslinearoperator(lambda v: v)
    with pytest.raises(TypeError, match="needs shape= and dtype="):
        aslinearoperator(lambda v: v, shape=(3, 3))

    class NoDtype:
        shape = (3, 3)

        def matvec(self, v):
            return v

    with pytest.raises(TypeError, match="NoDtype has no dtype.*dtype="):
        aslinearoperator(NoDtype())
    assert aslinearoperator(NoDtype(), dtype="float64").dtype == np.float64


SUPPORTED = "float16, bfloat16, float32, float64"


def test_error_unsupported_dtypes_list_the_supported_ones() -> None:
    with pytest.raises(TypeError, match=f"complex128 is complex.*{SUPPORTED}"):
        aslinearoperator(np.eye(3) + 1j)
    with pytest.raises(TypeError, match=f"complex64 is complex.*{SUPPORTED}"):
        aslinearoperator(torch.eye(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=f"int32 is not supported.*{SUPPORTED}"):
        aslinearoperator(lambda v: v, shape=(3, 3), dtype="int32")
    with pytest.raises(TypeError, match=f"complex128 is complex.*{SUPPORTED}"):
        aslinearoperator(sp.csr_array(np.eye(3) + 1j))
    with pytest.raises(TypeError, match=f"complex128 is complex.*{SUPPORTED}"):
        aslinearoperator(np.eye(3), dtype="complex128")
    # Integer and boolean matrices are converted, not refused.
    assert aslinearoperator(np.eye(3, dtype=np.int32)).dtype == np.float64
    assert aslinearoperator(np.eye(3, dtype=bool)).dtype == np.float64
    assert aslinearoperator(sp.csr_array(np.eye(3, dtype=np.int64))).dtype == np.float64
    assert aslinearoperator(torch.eye(3, dtype=torch.int64)).dtype == torch.float64


def test_error_unknown_inputs() -> None:
    with pytest.raises(TypeError, match="got a list.*numpy.asarray"):
        aslinearoperator([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(TypeError, match="cannot make an operator from builtins.object"):
        aslinearoperator(object())
    with pytest.raises(ImportError, match="'no_such_library' is not importable"):
        aslinearoperator(lambda v: v, shape=(3, 3), dtype="float64", xp="no_such_library")


def test_error_vector_shapes() -> None:
    op = aslinearoperator(sym())
    with pytest.raises(ValueError, match=r"shape \(7, 7\).*\(4,\); expected \(7,\)"):
        op.matvec(np.ones(4))
    with pytest.raises(ValueError, match=r"block has shape \(4, 2\); expected \(7, k\)"):
        op.matmat(np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"block has shape \(7,\)"):
        op.matmat(np.ones(N))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        _ = np.ones(4) @ op


def test_error_composition_shapes() -> None:
    with pytest.raises(ValueError, match=r"cannot add operators of shapes \(7, 7\) and \(3, 3\)"):
        _ = aslinearoperator(sym()) + aslinearoperator(np.eye(3))
    with pytest.raises(ValueError, match=r"cannot multiply operators of shapes"):
        _ = aslinearoperator(sym()) @ aslinearoperator(np.eye(3))


def test_error_mixing_array_libraries() -> None:
    S = sym()
    np_op, t_op = aslinearoperator(S), aslinearoperator(torch.asarray(S))
    j_op = aslinearoperator(jnp.asarray(S, dtype=jnp.float32))
    with pytest.raises(TypeError, match="operator on numpy arrays with one on torch arrays"):
        _ = np_op + t_op
    with pytest.raises(TypeError, match="operator on torch arrays with one on jax arrays"):
        _ = t_op @ j_op
    with pytest.raises(TypeError, match="works on numpy arrays.*got a torch array"):
        np_op.matvec(torch.ones(N, dtype=torch.float64))
    with pytest.raises(TypeError, match="works on torch arrays.*got a numpy array.*to_scipy"):
        t_op.matvec(np.ones(N))
    with pytest.raises(TypeError, match="works on torch arrays.*got a jax array"):
        t_op.matmat(jnp.ones((N, 2)))
    with pytest.raises(TypeError, match="works on numpy arrays.*got a torch array"):
        _ = torch.ones(N, dtype=torch.float64) @ np_op
    # A callable whose library was not declared hints at xp=.
    cb = aslinearoperator(lambda v: v, shape=(N, N), dtype="float64")
    with pytest.raises(TypeError, match=r"got a torch array.*xp="):
        cb.matvec(torch.ones(N, dtype=torch.float64))


def test_error_dtype_mismatch_names_both_dtypes() -> None:
    op = aslinearoperator(torch.asarray(sym(), dtype=torch.float64))
    with pytest.raises(TypeError, match="operator has dtype float64, the input has dtype float32"):
        op.matvec(torch.ones(N, dtype=torch.float32))
    with pytest.raises(TypeError, match="dtype float64.*float32"):
        op.matmat(torch.ones((N, 2), dtype=torch.float32))


def test_error_devices() -> None:
    S = sym()
    meta = aslinearoperator(torch.empty((N, N), dtype=torch.float64, device="meta"))
    cpu = aslinearoperator(torch.asarray(S))
    assert "device=meta" in repr(meta)
    with pytest.raises(ValueError, match="device meta; got one on cpu"):
        meta.matvec(torch.ones(N, dtype=torch.float64))
    with pytest.raises(ValueError, match="device cpu with one on device meta"):
        _ = cpu + meta
    cb = aslinearoperator(lambda v: v, shape=(N, N), dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="device meta; got one on cpu"):
        cb.matvec(torch.ones(N, dtype=torch.float64))


def test_error_scalar_arithmetic() -> None:
    op = aslinearoperator(sym())
    with pytest.raises(TypeError):
        _ = op * op
    with pytest.raises(TypeError):
        _ = op * "2"
    with pytest.raises(TypeError):
        _ = op * 1j
    with pytest.raises(TypeError):
        _ = op / op


# -- helpers the checks above rely on ---------------------------------------------------
def test_dtype_names_and_devices_across_libraries() -> None:
    from specdens._array import dtype_name, same_device

    assert dtype_name(xps.float64) == "float64"
    assert dtype_name(xps.float32) == "float32"
    assert dtype_name(torch.bfloat16) == "bfloat16"
    assert dtype_name(torch.float16) == "float16"
    assert dtype_name(jnp.float32) == "float32"
    assert dtype_name(np.dtype("float64")) == "float64"
    assert same_device("cuda", "cuda:0") and same_device(torch.device("cpu"), "cpu")
    assert not same_device("cuda:0", "cuda:1") and not same_device("cpu", "meta")


def test_jax_x64_does_not_leak() -> None:
    with jax_x64():
        assert jnp.ones(2, dtype=jnp.float64).dtype == jnp.float64
    assert jnp.ones(2).dtype == jnp.float32
    assert not jax.config.jax_enable_x64


# -- dtypes are dtype objects ---------------------------------------------------------------
def test_callable_and_protocol_dtypes_are_numpy_dtypes() -> None:
    """numpy's namespace names the scalar types (numpy.float64, a class with no .name or
    .itemsize); operators report numpy dtypes, as their arrays and scipy do."""
    S = sym()
    ops = [aslinearoperator(lambda v: S @ v, shape=(N, N), dtype=dt)
           for dt in ("float64", np.float64, np.dtype("float64"), float)]
    ops += [aslinearoperator(MatvecOnly(S)), aslinearoperator(MatvecOnly(S), dtype="float32"),
            aslinearoperator(lambda v: v, shape=(N, N), dtype=jnp.float32)]
    for op in ops:
        assert isinstance(op.dtype, np.dtype), op.dtype
        assert op.dtype.itemsize in (4, 8) and op.dtype.name in ("float32", "float64")
        assert op.dtype == np.dtype(op.dtype.name)
    assert aslinearoperator(lambda v: v, shape=(N, N), dtype="float64",
                            xp="torch").dtype is torch.float64
    assert aslinearoperator(lambda v: v, shape=(N, N), dtype="float64",
                            xp=xps).dtype == xps.float64


# -- keywords on operators that are already operators -----------------------------------------
def test_symmetric_keyword_applies_to_specdens_operators_on_a_copy() -> None:
    S = sym()
    f = aslinearoperator(lambda v: S @ v, shape=(N, N), dtype="float64")
    g = aslinearoperator(f, symmetric=True)
    assert g.symmetric is True and g.T is g
    assert_close(g.rmatvec(np.ones(N)), S @ np.ones(N), 1e-12)
    # the operator passed in is left as it was
    assert f.symmetric is None
    with pytest.raises(TypeError, match="does not know its transpose"):
        _ = f.T
    # no keyword, or one that changes nothing: the same object
    assert aslinearoperator(f) is f and aslinearoperator(g, symmetric=True) is g
    # symmetric=False on a symmetric operator: a copy that uses its own transpose
    d = aslinearoperator(S, symmetric=True)
    e = aslinearoperator(d, symmetric=False)
    assert e.symmetric is False and d.symmetric is True and e.T is not e
    assert_close(e.T.to_dense(), S.T, 1e-12)


def test_dtype_keyword_converts_operators_and_scipy_operators() -> None:
    """dtype= converts a specdens operator or a scipy LinearOperator instead of being
    ignored: a matrix is converted, anything else wrapped (the products convert at
    the boundary and keep the coarser rounding)."""
    M = nonsym()
    x = np.random.default_rng(7).standard_normal(N)
    f = aslinearoperator(lambda v: M @ v, shape=(N, N), dtype="float64")
    cases = [f, aslinearoperator(M), aslinearoperator(sp.csr_array(M)), f + f,
             spla.aslinearoperator(M), _custom_scipy(M)]
    factors = [1.0, 1.0, 1.0, 2.0, 1.0, 1.0]
    for obj, c in zip(cases, factors, strict=True):
        op = aslinearoperator(obj, dtype="float32")
        assert op.dtype == np.float32, type(obj)
        y = op.matvec(x.astype(np.float32))
        assert y.dtype == np.float32 and y.shape == (N,)
        assert_close(y, c * M @ x, F32)
        assert specdens._array.dtype_name(specdens._checks.product_dtype(op)) == "float32"
    assert f.dtype == np.float64  # left as it was
    # float64 vectors around a float32 operator: float32 products, reported as such
    t32 = aslinearoperator(torch.asarray(M, dtype=torch.float32))
    w = aslinearoperator(lambda v: t32.matvec(v), shape=(N, N), dtype=torch.float32)
    op = aslinearoperator(w, dtype="float64")
    assert op.dtype == torch.float64
    y = op.matvec(torch.asarray(x))
    assert y.dtype == torch.float64
    assert_close(y, M @ x, F32)
    assert specdens._checks.product_dtype(op) == torch.float32
    # the transpose of a converted operator is converted too
    assert_close(aslinearoperator(_custom_scipy(M), dtype="float32").T.to_dense(), M.T, F32)
    with pytest.raises(TypeError, match="not supported"):
        aslinearoperator(f, dtype="int32")


# -- scipy's LinearOperator names ----------------------------------------------------------
def test_scipy_linear_operator_names() -> None:
    """dot, A * x, rmatvec, rmatmat, transpose(), .H, adjoint() and ndim mean what they
    mean for scipy.sparse.linalg.LinearOperator (real operators: the adjoint is the
    transpose)."""
    M = nonsym()
    rng = np.random.default_rng(8)
    x, X = rng.standard_normal(N), rng.standard_normal((N, 3))
    ref = spla.aslinearoperator(M)
    for op in (aslinearoperator(M), aslinearoperator(WithRmatvec(M)),
               aslinearoperator(_custom_scipy(M)), aslinearoperator(sp.csr_array(M))):
        assert op.ndim == ref.ndim == 2
        for got, want in ((op.dot(x), ref.dot(x)), (op * x, ref * x),
                          (op.dot(X), ref.dot(X)), (op * X, ref * X),
                          (op.dot(x[:, None]), ref.dot(x[:, None])),
                          (op.rmatvec(x), ref.rmatvec(x)), (op.rmatmat(X), ref.rmatmat(X)),
                          (op.H.matvec(x), ref.H.matvec(x)),
                          (op.adjoint().matvec(x), ref.adjoint().matvec(x)),
                          (op.transpose().matvec(x), ref.transpose().matvec(x)),
                          (op.T.matmat(X[:, :0]), M.T @ X[:, :0])):
            assert np.shape(got) == np.shape(want)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(op.dot(2.0).to_dense(), 2 * M)
        np.testing.assert_allclose(op.dot(op).to_dense(), M @ M)
    # symmetric operators are their own transpose; an unknown transpose is refused
    S = sym()
    cb = aslinearoperator(lambda v: S @ v, shape=(N, N), dtype="float64", symmetric=True)
    np.testing.assert_allclose(cb.rmatvec(x), S @ x)
    assert cb.H is cb and cb.adjoint() is cb and cb.transpose() is cb
    unknown = aslinearoperator(lambda v: M @ v, shape=(N, N), dtype="float64")
    with pytest.raises(TypeError, match="does not know its transpose"):
        unknown.rmatvec(x)
    # x * A for an array is no elementwise product: refused, naming @
    op = aslinearoperator(M)
    with pytest.raises(TypeError, match="x @ A"):
        _ = x * op
    with pytest.raises(TypeError, match="A @ B"):
        _ = op * op
    with pytest.raises(ValueError, match=r"dot: expected"):
        op.dot(np.ones((N, 2, 2)))
    # torch tensors: A * t is the product, in torch
    t = aslinearoperator(torch.asarray(M))
    assert_close(t * torch.asarray(x), M @ x, 1e-12)


# -- (n, 0) blocks ----------------------------------------------------------------------------
def test_matmat_of_an_empty_block() -> None:
    """An (n, 0) block gives an (n, 0) array of the operator's library and dtype for
    every operator (the column-by-column fallbacks used to stack an empty list)."""
    S, M = sym(), nonsym()
    f = aslinearoperator(lambda v: S @ v, shape=(N, N), dtype="float64", symmetric=True)
    tf_ = aslinearoperator(lambda v: v, shape=(N, N), dtype="float64", xp="torch")
    ops = [f, f + f, 2 * f, f.shift(1.0), aslinearoperator(WithRmatvec(M)).T,
           aslinearoperator(MatvecOnly(M)), aslinearoperator(S), tf_, tf_ @ tf_]
    for op in ops:
        Z = op.matmat(op.xp.zeros((N, 0), dtype=op.dtype))
        assert tuple(Z.shape) == (N, 0), op
        assert specdens._array.library_name(Z) == op.array_library
        assert specdens._array.dtype_name(Z.dtype) == specdens._array.dtype_name(op.dtype)
    assert f.to_scipy().matmat(np.zeros((N, 0))).shape == (N, 0)
    with jax_x64():
        j = aslinearoperator(lambda v: v, shape=(N, N), dtype=jnp.float64)
        assert tuple(j.matmat(jnp.zeros((N, 0))).shape) == (N, 0)


# -- shapes -------------------------------------------------------------------------------------
def test_shapes_must_be_non_negative_integers() -> None:
    for shape in ((2.5, 2.5), (2.0, 2.0), ("3", "3"), (None, None)):
        with pytest.raises(ValueError, match=r"two integers"):
            aslinearoperator(lambda v: v, shape=shape, dtype="float64")
    with pytest.raises(ValueError, match=r"non-negative.*\(-1, -1\)"):
        aslinearoperator(lambda v: v, shape=(-1, -1), dtype="float64")
    # integers of any kind are fine
    op = aslinearoperator(lambda v: v, shape=(np.int64(3), torch.tensor(3).item()),
                          dtype="float64")
    assert op.shape == (3, 3) and all(type(s) is int for s in op.shape)


def test_products_of_the_wrong_shape_are_errors() -> None:
    """A (1, n) row for a vector (e.g. from a numpy.matrix) is reported at the product,
    naming both shapes, not broadcast into a wrong result or a later obscure error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        M = np.asmatrix(np.diag([1.0, 2.0, 3.0]))
    g = aslinearoperator(lambda v: M @ v, shape=(3, 3), dtype="float64", symmetric=True)
    with pytest.raises(ValueError, match=r"matvec: .*returned shape \(1, 3\).*expected \(3,\)"):
        g.matvec(np.ones(3))
    with pytest.raises(ValueError, match=r"returned shape \(1, 3\).*expected \(3,\)"):
        g.matmat(np.ones((3, 2)))
    h = aslinearoperator(lambda v: np.ones((3, 3)), shape=(3, 3), dtype="float64")
    with pytest.raises(ValueError, match=r"returned shape \(3, 3\).*expected \(3,\)"):
        h.matvec(np.ones(3))

    class BadBlock(WithMatmat):
        def matmat(self, V):
            return self.A @ V[:, :1]

    with pytest.raises(ValueError, match=r"matmat: .*returned shape \(7, 1\).*\(7, 2\)"):
        aslinearoperator(BadBlock(sym())).matmat(np.ones((N, 2)))
    with pytest.raises(ValueError, match=r"returned shape \(1, 3\)"):
        specdens.eigsh(g, k=1)


# -- integer matrices -------------------------------------------------------------------------
def test_integer_matrices_become_the_widest_float_the_library_holds() -> None:
    """float64, or float32 where the library has no float64 (JAX without x64), with no
    warning from the library about a float64 it cannot make."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = aslinearoperator(jnp.eye(3, dtype=jnp.int32))
    assert op.dtype == jnp.float32
    assert_close(op.matvec(jnp.ones(3, dtype=jnp.float32)), np.ones(3), 0)
    with jax_x64():
        assert aslinearoperator(jnp.eye(3, dtype=jnp.int32)).dtype == jnp.float64
    assert aslinearoperator(np.eye(3, dtype=np.int32)).dtype == np.float64
    # and the error for an integer dtype says so
    with pytest.raises(TypeError, match=f"int32 is not supported.*{SUPPORTED}.*float64, or "
                                        "float32 where its library has no float64"):
        aslinearoperator(lambda v: v, shape=(3, 3), dtype="int32")
    with pytest.raises(TypeError, match="int64 is not supported.*floating"):
        aslinearoperator(spla.aslinearoperator(np.eye(3, dtype=np.int64)))


def test_zero_dimensional_real_arrays_scale_like_numbers():
    """``A * np.array(2.0)`` and ``A * torch.tensor(2.0)`` (a 0-d loss-scale tensor, say)
    are scalar products, as ``A * 2.0`` is; they raised numpy's "does not support ufuncs"
    or "unsupported operand" errors. A complex 0-d array is refused by name."""
    torch = pytest.importorskip("torch")
    D = np.diag([1.0, 2.0, 3.0])
    A = specdens.aslinearoperator(D)
    for c in (np.array(2.0), torch.tensor(2.0), np.float32(2.0)):
        np.testing.assert_array_equal((A * c).to_dense(), 2.0 * D)
        np.testing.assert_array_equal((c * A).to_dense(), 2.0 * D)
    with pytest.raises(TypeError, match="real scalar"):
        A * np.array(2j)


# -- reviewed edge cases -----------------------------------------------------------------
def test_to_dense_checks_block_size() -> None:
    S = sym()
    for op in (aslinearoperator(S) + aslinearoperator(np.eye(N)),  # through matmat
               aslinearoperator(S + np.eye(N))):  # a matrix, read as it is
        for bad in (-1, 0):
            with pytest.raises(ValueError, match="block_size must be at least 1"):
                op.to_dense(block_size=bad)
        for bad in (2.5, True):
            with pytest.raises(TypeError, match="block_size must be an integer"):
                op.to_dense(block_size=bad)
        assert_close(op.to_dense(block_size=3), S + np.eye(N), 1e-12)


def test_dense_operator_to_dense_is_a_copy() -> None:
    M = nonsym()
    for A in (M.copy(), torch.asarray(M.copy()), xps.asarray(M.copy())):
        op = aslinearoperator(A)
        for got, ref in ((op.to_dense(), M), (op.T.to_dense(), M.T)):
            assert_close(as_np(got), ref, 0.0)
            got[0, 0] = 99.0  # the operator's matrix is left alone
        assert_close(as_np(op.A), M, 0.0)


def test_scipy_operator_rmatvec_of_a_symmetric_one_without_rmatvec() -> None:
    S = sym()
    lo = spla.LinearOperator((N, N), matvec=lambda v: S @ v, dtype=np.float64)  # no rmatvec
    op = aslinearoperator(lo, symmetric=True)
    x, X = np.arange(1.0, N + 1), np.ones((N, 2))
    assert_close(op.rmatvec(x), S @ x, 1e-12)
    assert_close(op.rmatmat(X), S @ X, 1e-12)
    with pytest.raises(TypeError, match="no rmatvec"):
        aslinearoperator(lo).rmatvec(x)
    # an (n, 1) column stays one, as in scipy and for a matrix
    M = nonsym()
    ref = spla.aslinearoperator(M)
    col = x.reshape(-1, 1)
    for op in (aslinearoperator(ref), aslinearoperator(_custom_scipy(M))):
        got = op.rmatvec(col)
        assert got.shape == ref.rmatvec(col).shape == (N, 1)
        assert_close(got, M.T @ col, 1e-12)
        assert_close(op.rmatvec(x), M.T @ x, 1e-12)
        assert_close(op.rmatmat(X), M.T @ X, 1e-12)


def test_rmatvec_of_a_protocol_object_is_checked() -> None:
    M = nonsym()

    class RowRmatvec(MatvecOnly):
        def rmatvec(self, v: Any) -> Any:
            return (self.A.T @ v).reshape(1, -1)  # a (1, n) row: wrong

    op = aslinearoperator(RowRmatvec(M))
    with pytest.raises(ValueError, match=r"returned shape \(1, 7\)"):
        op.rmatvec(np.ones(N))
    with pytest.raises(TypeError, match="works on numpy arrays"):
        aslinearoperator(WithRmatvec(M)).rmatvec(torch.ones(N, dtype=torch.float64))
    assert_close(aslinearoperator(WithRmatvec(M)).rmatvec(np.ones(N)), M.T @ np.ones(N), 1e-12)


def test_scipy_compositions_have_an_adjoint_only_when_their_parts_do() -> None:
    M = nonsym()
    bare = spla.LinearOperator((N, N), matvec=lambda v: M @ v, dtype=np.float64)
    for lo in (bare + bare, bare @ bare, 2.0 * bare, bare + _custom_scipy(M)):
        with pytest.raises(TypeError, match="no rmatvec"):
            _ = aslinearoperator(lo).T
    full = _custom_scipy(M)
    for lo, ref in ((full + full, 2 * M), (full @ full, M @ M), (2.0 * full, 2 * M),
                    (spla.aslinearoperator(M) + full, 2 * M)):
        assert_close(aslinearoperator(lo).T.to_dense(), ref.T, 1e-12)


def test_to_scipy_round_trip_keeps_the_product_dtype() -> None:
    from specdens import _checks
    from specdens.testing import dense_eigenvalues

    # float32 products: symmetric to float32 rounding only (relative asymmetry ~1e-7,
    # above float64's sqrt(eps) = 1.5e-8, far below float32's 3.5e-4)
    S = sym(40)
    P = (S + 1e-7 * nonsym(40)).astype(np.float32)
    op32 = aslinearoperator(P)
    rt = aslinearoperator(op32.to_scipy(), symmetric=True)
    assert rt.dtype == np.float64
    assert _array_dtype_name(_checks.product_dtype(rt)) == "float32"
    assert_close(rt.to_dense(), P.astype(np.float64), 0.0)
    ref = np.linalg.eigvalsh(0.5 * (P.astype(np.float64) + P.T.astype(np.float64)))
    np.testing.assert_allclose(dense_eigenvalues(rt), ref, atol=1e-12)
    # a float64 operator's round trip stays float64
    rt64 = aslinearoperator(aslinearoperator(S).to_scipy())
    assert _array_dtype_name(_checks.product_dtype(rt64)) == "float64"


def _array_dtype_name(dt: Any) -> str:
    from specdens._array import dtype_name

    return dtype_name(dt)


def test_integer_scipy_operator_with_a_float_dtype() -> None:
    K = np.array([[2, 1, 0], [1, 3, -1], [0, -1, 4]])
    lo = spla.aslinearoperator(K)
    assert lo.dtype == np.int64
    x = np.array([0.5, -0.25, 0.125])  # not integers: the vectors must not become ints
    for dt, tol in (("float64", 1e-15), ("float32", F32)):
        op = aslinearoperator(lo, dtype=dt)
        assert op.dtype == np.dtype(dt)
        assert_close(op.to_dense(), K.astype(np.float64), 0.0)
        y = op.matvec(x.astype(dt))
        assert y.dtype == np.dtype(dt)
        assert_close(y, K @ x, tol)
        assert_close(op.T.matvec(x.astype(dt)), K.T @ x, tol)
    with pytest.raises(TypeError, match="dtype int64 is not supported.*dtype="):
        aslinearoperator(lo)


def test_float64_refused_where_jax_has_no_float64() -> None:
    if jax.config.read("jax_enable_x64"):
        pytest.skip("jax_enable_x64 is on for this process")
    S = sym(6)
    A = jnp.asarray(S, dtype=jnp.float32)
    with pytest.raises(TypeError, match="jax_enable_x64 is off.*jax.enable_x64"):
        aslinearoperator(lambda v: A @ v, shape=(6, 6), dtype="float64", xp="jax")
    with pytest.raises(TypeError, match="jax_enable_x64 is off"):
        aslinearoperator(aslinearoperator(A) + aslinearoperator(A), dtype="float64")
    op = aslinearoperator(lambda v: A @ v, shape=(6, 6), dtype="float32", xp="jax")
    assert_close(as_np(op.to_dense()), S, F32)
    with jax_x64():
        A64 = jnp.asarray(S)
        op = aslinearoperator(lambda v: A64 @ v, shape=(6, 6), dtype="float64", xp="jax")
        D = op.to_dense()
        assert D.dtype == jnp.float64
        assert_close(as_np(D), S, 1e-14)


def test_lists_as_vectors_for_numpy_operators() -> None:
    S = sym()
    v = list(np.arange(1.0, N + 1))
    V = [[float(i + j) for j in range(2)] for i in range(N)]
    for op in (aslinearoperator(S), aslinearoperator(_custom_scipy(S)),
               aslinearoperator(lambda x: S @ x, shape=(N, N), dtype="float64")):
        for got in (op.matvec(v), op.dot(v), op @ v, op * v, op.rmatvec(v) if op.symmetric
                    else op.matvec(tuple(v))):
            assert_close(got, S @ np.asarray(v), 1e-12)
        assert_close(op.matmat(V), S @ np.asarray(V), 1e-12)
        assert_close(op.dot(V), S @ np.asarray(V), 1e-12)
    top = aslinearoperator(torch.asarray(S))
    with pytest.raises(TypeError, match="got a list; .*torch arrays.*pass an array"):
        top.matvec(v)
    with pytest.raises(TypeError, match="pass an array"):
        top.dot(v)


def test_shift_needs_a_real_scalar() -> None:
    S = sym()
    op = aslinearoperator(S)
    for bad in ("1", 1j, np.complex128(1 + 2j), None):
        with pytest.raises(TypeError, match="shift needs a real scalar"):
            op.shift(bad)
    for s in (2, np.float32(2.0), np.array(2.0)):
        assert_close(op.shift(s).to_dense(), S + 2 * np.eye(N), 1e-12)
