"""Wrappers that turn arrays, sparse matrices, scipy operators and callables into operators."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _array, _checks
from .base import LinearOperatorBase


def _resolve_namespace(xp: Any, dtype: Any) -> Any:
    """Array namespace from an explicit ``xp`` (module or name) or a dtype's library."""
    if xp is None:
        module = type(dtype).__module__ if dtype is not None else "numpy"
        if module.startswith("torch"):
            xp = "torch"
        elif module.startswith(("jax", "jaxlib")):
            xp = "jax"
        elif module.startswith("array_api_strict"):
            xp = "array_api_strict"
        elif module.startswith("tensorflow"):
            xp = "tensorflow"
        else:
            xp = "numpy"
    if getattr(xp, "__name__", None) in ("numpy", "torch", "cupy", "tensorflow") \
            and _array._is_module(xp):
        xp = xp.__name__  # the bare module is not array-API (torch has no astype): wrap it
    if isinstance(xp, str):
        name = {"jax": "jax.numpy", "numpy": "array_api_compat.numpy",
                "torch": "array_api_compat.torch", "cupy": "array_api_compat.cupy",
                "tensorflow": "specdens.backends.tf._namespace"}.get(xp, xp)
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"array library {xp!r} is not importable: {exc}") from None
    return xp


_INTEGER_MATRICES = ("an integer or boolean matrix given without dtype= becomes float64, or "
                     "float32 where its library has no float64: JAX without jax_enable_x64")


def _check_dtype(dtype: Any, what: str = "operator", hint: str = _INTEGER_MATRICES) -> str:
    """The name of a supported dtype; a ``TypeError`` listing the supported ones (and,
    for integers, ``hint``) otherwise."""
    name = _array.dtype_name(dtype)
    if name.startswith(("int", "uint", "bool")):
        raise TypeError(f"{what} dtype {name} is not supported. Supported dtypes: "
                        f"{', '.join(_array.SUPPORTED_DTYPES)} ({hint}).")
    return _array.check_supported_dtype(dtype, what)


def _library_dtype(xp: Any, dtype: Any) -> Any:
    """``dtype`` as the dtype object of namespace ``xp``: a ``numpy.dtype`` for the
    libraries whose arrays report one (numpy, CuPy, JAX), whose namespaces name the
    scalar types (``numpy.float64``, a class without ``.name`` or ``.itemsize``)."""
    name = _check_dtype(dtype)
    out = _array.xp_dtype(xp, name)
    if isinstance(out, type):
        try:
            return np.dtype(out)
        except TypeError:
            pass
    return out


def _float_for_integers(xp: Any, device: Any) -> str:
    """The dtype integer and boolean matrices become: float64, or float32 where the
    library has no float64 (JAX without ``jax_enable_x64``, PyTorch on MPS)."""
    return "float64" if _array.supports_float64(xp, device) else "float32"


class DenseOperator(LinearOperatorBase):
    """An explicit matrix of any array-API library (numpy, torch, jax, cupy...)."""

    def __init__(self, A: Any, *, symmetric: bool | None = None):
        xp = _array.namespace(A)
        if len(A.shape) != 2:
            raise ValueError(f"a matrix operator needs a 2-D array; got shape {tuple(A.shape)}")
        name = _array.dtype_name(A.dtype)
        if name.startswith(("int", "uint", "bool")):
            A = xp.astype(A, _array.xp_dtype(xp, _float_for_integers(xp, _array.device_of(A))))
        _check_dtype(A.dtype, "matrix")
        super().__init__(tuple(A.shape), A.dtype, xp, _array.device_of(A))
        self.A = A
        self.symmetric = symmetric

    def _matvec(self, v: Any) -> Any:
        return self._mul(v)

    def _matmat(self, V: Any) -> Any:
        return self._mul(V)

    def _mul(self, X: Any) -> Any:
        # ``@`` keeps each library's dtype rules (torch refuses mixed dtypes, which
        # ``_product`` turns into an error naming both); tf.Tensor's ``@`` refuses a 1-D
        # operand, so TensorFlow goes through its namespace's matmul
        if self.array_library == "tensorflow":
            return self.xp.matmul(self.A, X)
        return self.A @ X

    def _transpose(self) -> LinearOperatorBase:
        return DenseOperator(self.xp.matrix_transpose(self.A), symmetric=self.symmetric)

    def to_dense(self, *, block_size: int = 256) -> Any:
        """A copy of the matrix (the operator's own is never handed out: writing into the
        result leaves the operator alone); ``block_size`` is checked, as for any
        operator, but not needed. JAX and TensorFlow arrays, which cannot be written
        into, are returned as they are."""
        _checks.positive_int(block_size, "block_size")
        if self.array_library in ("jax", "tensorflow"):
            return self.A
        return self.xp.asarray(self.A, copy=True)


class SparseOperator(LinearOperatorBase):
    """A scipy sparse matrix or array; vectors are numpy arrays."""

    def __init__(self, A: Any, *, symmetric: bool | None = None):
        import array_api_compat.numpy as npx

        if A.dtype.kind in "iub":
            A = A.astype(np.float64)
        _check_dtype(A.dtype, "sparse matrix")
        super().__init__(A.shape, A.dtype, npx, "cpu")
        self.A = A.tocsr()
        self.symmetric = symmetric

    def _matvec(self, v: Any) -> Any:
        return np.asarray(self.A @ v)

    def _matmat(self, V: Any) -> Any:
        return np.asarray(self.A @ V)

    def _transpose(self) -> LinearOperatorBase:
        return SparseOperator(self.A.T, symmetric=self.symmetric)


class ScipyOperator(LinearOperatorBase):
    """A ``scipy.sparse.linalg.LinearOperator``.

    ``dtype`` (a floating dtype) gives the vectors' dtype of a LinearOperator declared
    with an integer or boolean dtype: the vectors stay floating, and each product's
    output is converted to ``dtype``. A LinearOperator made by
    :meth:`~specdens.operators.LinearOperatorBase.to_scipy` carries the rounding of its
    products (``product_dtype``), which the operator keeps.
    """

    def __init__(self, A: Any, *, symmetric: bool | None = None, dtype: Any = None):
        import array_api_compat.numpy as npx

        declared = A.dtype if A.dtype is not None else np.dtype(np.float64)
        if dtype is None:
            dtype = declared
            _check_dtype(dtype, "scipy LinearOperator",
                         hint="declare the LinearOperator's dtype as a floating one, or pass "
                              "aslinearoperator(..., dtype='float64')")
        else:
            dtype = _np_dtype(dtype)
        super().__init__(A.shape, np.dtype(dtype), npx, "cpu")
        self.A = A
        self.symmetric = symmetric
        # an integer LinearOperator returns what its matrix times a float vector gives
        self._out_dtype = None if np.dtype(declared) == self.dtype else self.dtype
        self.product_dtype = _scipy_product_dtype(A, self.dtype)

    def _out(self, y: Any) -> Any:
        y = np.asarray(y)
        return y if self._out_dtype is None else y.astype(self._out_dtype, copy=False)

    def _matvec(self, v: Any) -> Any:
        return self._out(self.A.matvec(v)).reshape(-1)

    def _matmat(self, V: Any) -> Any:
        return self._out(self.A.matmat(V))

    # The transpose's products (through ``.T``, whose checks ``rmatvec`` and ``rmatmat``
    # apply: a symmetric operator's are its own products).
    def _rmatvec(self, v: Any) -> Any:
        return self._out(self.A.rmatvec(v)).reshape(-1)

    def _rmatmat(self, V: Any) -> Any:
        return self._out(self.A.rmatmat(V))

    def _transpose(self) -> LinearOperatorBase:
        if not _scipy_has_adjoint(self.A):
            raise TypeError(
                f"the scipy LinearOperator {type(self.A).__name__} has no rmatvec, so its "
                "transpose is unknown: give it rmatvec=, or declare it symmetric "
                "(aslinearoperator(..., symmetric=True))."
            )
        return super()._transpose()


class CallableOperator(LinearOperatorBase):
    """An operator given by functions: ``matvec`` (and optionally ``matmat``, ``rmatvec``)."""

    def __init__(
        self,
        matvec: Callable[[Any], Any],
        shape: tuple[int, int],
        dtype: Any,
        *,
        matmat: Callable[[Any], Any] | None = None,
        rmatvec: Callable[[Any], Any] | None = None,
        xp: Any = None,
        device: Any = None,
        symmetric: bool | None = None,
    ):
        xp = _resolve_namespace(xp, dtype)
        device = _array.canonical_device(xp, device)
        dt = _library_dtype(xp, dtype)
        _array.check_float64_available(xp, device, dt, "the operator was declared float64")
        super().__init__(shape, dt, xp, device)
        self._f = matvec
        self._fm = matmat
        self._rf = rmatvec  # the transpose's matvec: see _transpose (rmatvec goes there)
        self.symmetric = symmetric

    def _matvec(self, v: Any) -> Any:
        return self._f(v)

    def _matmat(self, V: Any) -> Any:
        if self._fm is not None:
            return self._fm(V)
        return super()._matmat(V)

    def _transpose(self) -> LinearOperatorBase:
        if self._rf is None:
            return super()._transpose()
        return CallableOperator(self._rf, self.shape, self.dtype, rmatvec=self._f, xp=self.xp,
                                device=self.device)


def aslinearoperator(
    obj: Any,
    *,
    shape: tuple[int, int] | None = None,
    dtype: Any = None,
    xp: Any = None,
    device: Any = None,
    symmetric: bool | None = None,
) -> LinearOperatorBase:
    """Turn ``obj`` into a specdens operator (a :class:`LinearOperatorBase`).

    Parameters
    ----------
    obj
        A square 2-D array of numpy or any array-API library (torch, jax, cupy,
        array-api-strict), a scipy sparse matrix or array, a
        ``scipy.sparse.linalg.LinearOperator``, an object with ``shape``, ``dtype`` and
        ``matvec`` (optionally ``matmat``, ``device``, ``xp``), or a callable computing
        ``A @ v`` (then ``shape`` and ``dtype`` are required).
    shape, dtype
        ``shape`` (two non-negative integers) is required for callables, and must match
        otherwise. ``dtype`` is required for callables and declares the dtype of a
        protocol object's vectors (float64 is refused where the library has no float64
        now: JAX without ``jax_enable_x64``, whose vectors would silently be float32).
        It converts matrices: arrays, sparse matrices and the matrix of a
        :class:`DenseOperator` or :class:`SparseOperator` (a float32 one asked for
        float64 becomes a float64 matrix, with float64 products; an integer or boolean
        matrix becomes float64 without it, or float32 where the library has no
        float64). Any other specdens operator, and a scipy ``LinearOperator`` of another
        floating dtype, is wrapped so that its vectors have this dtype (each product
        converts its input to the wrapped operator's dtype and its output back: a
        float32 operator wrapped as float64 still has float32 products, and eigsh's
        default tolerance stays float32's). A scipy ``LinearOperator`` declared with an
        integer or boolean dtype needs ``dtype``: its vectors are of this (floating)
        dtype, never converted to integers, and its products' outputs are converted to
        it.
    xp, device
        Array namespace (module or name: ``"numpy"``, ``"torch"``, ``"jax"``) and device
        of the vectors, for callables and protocol objects that do not say.
    symmetric
        Declares the operator symmetric (``.T`` is then the operator itself), or not
        (``False``). For an operator that is already a specdens one, a shallow copy
        carries the declaration: the operator passed in is never changed.

    Returns
    -------
    LinearOperatorBase
        ``obj`` itself when it is a specdens operator and no keyword changes it.

    Notes
    -----
    The algorithms reuse the memory of the vectors they pass to ``matvec`` and
    ``matmat`` (as scipy's ARPACK-based ``eigsh`` does): a callable or an object of yours
    must neither write into its input nor keep it, or a view of it, past the call.

    The operators also answer scipy's ``LinearOperator`` calls: ``dot``, ``A * x`` for
    an array (the product, as in scipy), ``rmatvec``, ``rmatmat``, ``transpose()``,
    ``.H`` and ``adjoint()`` (the transpose: operators are real) and ``ndim``.
    """
    if isinstance(obj, LinearOperatorBase):
        op = _with_declarations(obj, dtype=dtype, symmetric=symmetric)
    elif isinstance(obj, (list, tuple)):
        raise TypeError(
            f"aslinearoperator got a {type(obj).__name__}; pass an array (e.g. numpy.asarray(obj))"
        )
    elif _is_scipy_sparse(obj):
        op = SparseOperator(obj if dtype is None else obj.astype(_np_dtype(dtype)),
                            symmetric=symmetric)
    elif _is_scipy_linear_operator(obj):
        if dtype is not None and _is_integer_dtype(obj.dtype):
            op = ScipyOperator(obj, symmetric=symmetric, dtype=dtype)
        else:
            op = _with_declarations(ScipyOperator(obj, symmetric=symmetric), dtype=dtype,
                                    symmetric=None)
    elif isinstance(obj, np.matrix):
        return aslinearoperator(np.asarray(obj), shape=shape, dtype=dtype, symmetric=symmetric)
    elif hasattr(obj, "__array_namespace__") or _is_array_api_obj(obj):
        A = obj
        if dtype is not None:
            axp = _array.namespace(A)
            A = axp.astype(A, _library_dtype(axp, dtype))
        op = DenseOperator(A, symmetric=symmetric)
    elif hasattr(obj, "matvec") and hasattr(obj, "shape"):
        op = _from_protocol(obj, dtype=dtype, xp=xp, device=device, symmetric=symmetric)
    elif callable(obj):
        if shape is None or dtype is None:
            raise TypeError(
                "aslinearoperator(callable) needs shape= and dtype=, e.g. "
                "aslinearoperator(f, shape=(n, n), dtype='float64')"
            )
        op = CallableOperator(obj, shape, dtype, xp=xp, device=device, symmetric=symmetric)
    else:
        raise TypeError(
            f"cannot make an operator from {type(obj).__module__}.{type(obj).__name__}: pass an "
            "array, a scipy sparse matrix or LinearOperator, an object with shape and matvec, "
            "or a callable with shape= and dtype="
        )
    if shape is not None and tuple(shape) != tuple(op.shape):
        raise ValueError(f"shape={tuple(shape)} was given but the operator has shape {op.shape}")
    return op


def _with_declarations(op: LinearOperatorBase, *, dtype: Any,
                       symmetric: bool | None) -> LinearOperatorBase:
    """``op`` with another dtype and symmetry declaration where asked for, never changed
    itself: a converting wrapper for the dtype (see :class:`~.compose.CastOperator`), a
    shallow copy for ``symmetric``."""
    if dtype is not None:
        name = _check_dtype(dtype)
        if name != _array.dtype_name(op.dtype):
            dt = _library_dtype(op.xp, name)
            if type(op) is DenseOperator:  # a matrix is converted, as an array is
                op = DenseOperator(op.xp.astype(op.A, dt), symmetric=op.symmetric)
            elif type(op) is SparseOperator:
                op = SparseOperator(op.A.astype(dt), symmetric=op.symmetric)
            else:
                from .compose import CastOperator

                op = CastOperator(op, dt)
    if symmetric is not None and op.symmetric != bool(symmetric):
        op = copy.copy(op)
        op.symmetric = bool(symmetric)
    return op


def _from_protocol(obj: Any, *, dtype: Any, xp: Any, device: Any,
                   symmetric: bool | None) -> LinearOperatorBase:
    shape = tuple(obj.shape)
    dt = getattr(obj, "dtype", None) if dtype is None else dtype
    if dt is None:
        raise TypeError(f"{type(obj).__name__} has no dtype; pass aslinearoperator(obj, dtype=...)")
    xp = xp if xp is not None else getattr(obj, "xp", None)
    device = device if device is not None else getattr(obj, "device", None)
    rm = getattr(obj, "rmatvec", None)
    return CallableOperator(obj.matvec, shape, dt, matmat=getattr(obj, "matmat", None),
                            rmatvec=rm, xp=xp, device=device,
                            symmetric=symmetric if symmetric is not None
                            else getattr(obj, "symmetric", None))


def _is_integer_dtype(dtype: Any) -> bool:
    return dtype is not None and _array.dtype_name(dtype).startswith(("int", "uint", "bool"))


def _scipy_product_dtype(A: Any, dtype: Any) -> Any:
    """The rounding a scipy LinearOperator's products carry: ``dtype``, or the coarser
    ``product_dtype`` it declares (one made by ``to_scipy`` from a float32 operator
    computes in float32 behind its float64 boundary)."""
    declared = getattr(A, "product_dtype", None)
    if declared is None:
        return dtype
    try:
        name = _array.check_supported_dtype(declared, "product_dtype")
    except (TypeError, KeyError):
        return dtype
    if _array.finfo_eps(name) <= _array.finfo_eps(dtype):
        return dtype
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16: numpy has no such dtype; the name serves
        return name


def _np_dtype(dtype: Any) -> np.dtype:
    return np.dtype(_check_dtype(dtype))


def _is_scipy_sparse(obj: Any) -> bool:
    if not type(obj).__module__.startswith("scipy"):
        return False
    import scipy.sparse

    return scipy.sparse.issparse(obj)


def _is_scipy_linear_operator(obj: Any) -> bool:
    if "scipy" not in type(obj).__module__ and not any(
        c.__module__.startswith("scipy.sparse.linalg") for c in type(obj).__mro__
    ):
        return False
    from scipy.sparse.linalg import LinearOperator

    return isinstance(obj, LinearOperator)


def _scipy_has_adjoint(A: Any) -> bool:
    """Whether a scipy LinearOperator defines ``rmatvec`` (scipy fails only on the call).

    scipy's own compositions (``A + B``, ``A @ B``, ``c * A``, ``A ** p``, ``A.T``,
    ``A.H``) define one that calls their parts', so they have an adjoint only when every
    part that is a LinearOperator has one.
    """
    from scipy.sparse.linalg import LinearOperator

    if getattr(A, "_CustomLinearOperator__rmatvec_impl", True) is None:
        return False
    cls = type(A)
    if cls._rmatvec is LinearOperator._rmatvec and cls._adjoint is LinearOperator._adjoint:
        return False
    if cls.__module__.startswith("scipy.sparse.linalg"):
        parts = [p for p in getattr(A, "args", ()) if isinstance(p, LinearOperator)]
        return all(_scipy_has_adjoint(p) for p in parts)
    return True


def _is_array_api_obj(obj: Any) -> bool:
    import array_api_compat

    return array_api_compat.is_array_api_obj(obj) or _array._is_tensorflow(obj)
