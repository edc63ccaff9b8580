"""``LinearOperatorBase``: arithmetic, dense and scipy views for any operator."""

from __future__ import annotations

import numbers
import operator
from typing import Any

import numpy as np

from .. import _array, _checks


class LinearOperatorBase:
    """Base class giving operators ``@``, ``+``, ``-``, scalar ``*``, ``shift``, ``.T``,
    ``to_dense`` and ``to_scipy``, and scipy's ``LinearOperator`` names: ``dot``, ``A * x``
    (``matvec``/``matmat`` for an array, as scipy), ``rmatvec``, ``rmatmat``,
    ``transpose()``, ``.H`` and ``adjoint()`` (the transpose: operators are real) and
    ``ndim`` (2).

    Subclasses set ``shape``, ``dtype``, ``xp`` (the array namespace of their vectors)
    and ``device``, and implement ``_matvec`` or ``_matmat`` (or both). ``symmetric``
    is ``True`` when the operator is known to be symmetric (``.T`` is then the operator
    itself), ``False`` when it is not, ``None`` when unknown. A subclass that knows its
    transpose's products defines ``rmatvec`` (and optionally ``rmatmat``) itself, or
    the private hooks ``_rmatvec``/``_rmatmat``, as the wrappers do: the public
    ``rmatvec``/``rmatmat`` then go through ``.T`` and its checks (the operator's own
    products when it is symmetric).

    ``matvec`` and ``matmat`` check the shape of what the products return (a ``(1, n)``
    row for a vector is an error naming both shapes, not a silent broadcast later).
    """

    shape: tuple[int, int]
    dtype: Any
    xp: Any
    device: Any = "cpu"
    symmetric: bool | None = None

    __array_ufunc__ = None  # numpy defers ``ndarray @ op`` and ``ndarray * op`` to us

    ndim = 2
    """Always 2, as ``scipy.sparse.linalg.LinearOperator.ndim``."""

    def __init__(self, shape: tuple[int, int], dtype: Any, xp: Any, device: Any = "cpu"):
        shape = _check_shape(shape)
        if shape[0] != shape[1]:
            raise ValueError(
                f"specdens needs a square operator; got shape {shape}. "
                "For a rectangular J, wrap J^T J or J J^T."
            )
        self.shape = shape
        self.dtype = dtype
        self.xp = xp
        self.device = device

    # -- products ---------------------------------------------------------------
    def _matvec(self, v: Any) -> Any:
        return self._matmat(self.xp.reshape(v, (-1, 1)))[:, 0]

    def _matmat(self, V: Any) -> Any:
        if V.shape[1] == 0:
            return self._empty_block()
        n = self.shape[0]
        cols = [self._checked(self._matvec(V[:, i]), (n,), V[:, i], "matvec")
                for i in range(V.shape[1])]
        return self.xp.stack(cols, axis=1)

    def _empty_block(self) -> Any:
        """The product with an ``(n, 0)`` block: an ``(n, 0)`` array of the operator's."""
        return self.xp.zeros((self.shape[0], 0), dtype=self.dtype,
                             device=_array.creation_device(self))

    def matvec(self, v: Any) -> Any:
        """``A @ v`` for ``v`` of shape ``(n,)`` (or ``(n, 1)``, kept as such)."""
        n = self.shape[1]
        v = self._as_input(v, "matvec")
        self._check_input(v, "matvec")
        if tuple(v.shape) == (n, 1):
            return self.matmat(v)
        if tuple(v.shape) != (n,):
            raise ValueError(f"matvec: operator has shape {self.shape}, vector has shape "
                             f"{tuple(v.shape)}; expected ({n},)")
        return self._checked(self._product(self._matvec, v, "matvec"), (self.shape[0],),
                             v, "matvec")

    def matmat(self, V: Any) -> Any:
        """``A @ V`` for a block ``V`` of shape ``(n, k)`` (``k = 0`` included)."""
        V = self._as_input(V, "matmat")
        self._check_input(V, "matmat")
        if len(V.shape) != 2 or V.shape[0] != self.shape[1]:
            raise ValueError(f"matmat: operator has shape {self.shape}, block has shape "
                             f"{tuple(V.shape)}; expected ({self.shape[1]}, k)")
        if V.shape[1] == 0:
            return self._empty_block()
        return self._checked(self._product(self._matmat, V, "matmat"),
                             (self.shape[0], V.shape[1]), V, "matmat")

    @staticmethod
    def _checked(y: Any, expected: tuple[int, ...], x: Any, what: str) -> Any:
        """``y`` when its shape is ``expected`` (unknown dimensions, as TensorFlow's inside
        a traced function, pass), else a ``ValueError`` naming both shapes."""
        got = getattr(y, "shape", None)
        got = tuple(got) if got is not None else None
        if got is None or len(got) != len(expected) or any(
                g is not None and int(g) != e for g, e in zip(got, expected, strict=True)):
            desc = f"shape {got}" if got is not None else f"a {type(y).__name__}"
            raise ValueError(
                f"{what}: the operator returned {desc} for an input of shape "
                f"{tuple(x.shape)}; expected {expected}. Check the product function "
                "(e.g. a numpy.matrix or a (1, n) row instead of a vector)."
            )
        return y

    def dot(self, x: Any) -> Any:
        """scipy's ``A.dot(x)``: ``A @ x`` for an operator or an array (a vector of shape
        ``(n,)`` or ``(n, 1)`` goes to :meth:`matvec`, a block to :meth:`matmat`), ``x * A``
        for a real scalar."""
        if _is_real_scalar(x):
            return self * x
        if isinstance(x, LinearOperatorBase) or _looks_like_operator(x):
            return self @ x
        x = self._as_input(x, "dot")
        ndim = len(getattr(x, "shape", (None, None, None)))
        if ndim == 1:
            return self.matvec(x)
        if ndim == 2:
            return self.matmat(x)
        raise ValueError(
            f"dot: expected a scalar, an operator, or an array of shape ({self.shape[1]},) "
            f"or ({self.shape[1]}, k); got {type(x).__name__}"
            + (f" of shape {tuple(x.shape)}" if hasattr(x, "shape") else "")
        )

    def rmatvec(self, v: Any) -> Any:
        """``A^T v`` (scipy's name): the transpose's :meth:`matvec`, with its checks (the
        operator's own :meth:`matvec` when it is symmetric); a ``TypeError`` where the
        transpose is unknown."""
        return self.T.matvec(v)

    def rmatmat(self, V: Any) -> Any:
        """``A^T V`` (scipy's name): the transpose's :meth:`matmat`."""
        return self.T.matmat(V)

    def _as_input(self, x: Any, what: str) -> Any:
        """A list or tuple as a numpy array for an operator on numpy vectors (as scipy
        takes them); a ``TypeError`` asking for an array for the other libraries."""
        if not isinstance(x, (list, tuple)):
            return x
        if self.array_library == "numpy":
            return np.asarray(x)
        raise TypeError(
            f"{what}: got a {type(x).__name__}; this operator works on {self.array_library} "
            f"arrays on device {self.device}: pass an array"
        )

    def _product(self, fn: Any, v: Any, what: str) -> Any:
        """``fn(v)``; a failure with a vector of another dtype becomes an error naming both
        dtypes (torch, for one, refuses to multiply float32 by float64)."""
        try:
            return fn(v)
        except Exception as exc:  # TypeError, ValueError, RuntimeError, TF's own errors
            vdt, odt = _array.dtype_name(v.dtype), _array.dtype_name(self.dtype)
            if vdt != odt:
                raise TypeError(
                    f"{what}: operator has dtype {odt}, the input has dtype {vdt} ({exc}). "
                    "Cast the input to the operator's dtype."
                ) from exc
            raise

    def _check_input(self, v: Any, what: str) -> None:
        lib = _array.library_name(v)
        if lib != self.array_library:
            raise TypeError(
                f"{what}: this operator works on {self.array_library} arrays on device "
                f"{self.device}; got a {lib} array. Convert the vector, or use op.to_scipy() "
                "for numpy float64 at the boundary (for a callable or an object with matvec, "
                "name its library: aslinearoperator(..., xp=...))."
            )
        dev = _array.device_of(v)
        # A JAX tracer (a vector inside jax.jit or jax.vmap: the compiled Lanczos loop
        # running a composite operator) has no device yet, and array_api_compat reports
        # None: its placement is the compiled program's, so there is nothing to check.
        if dev is not None and not _array.same_device(dev, self.device):
            raise ValueError(
                f"{what}: this operator's vectors live on device {self.device}; got one on {dev}"
            )

    # -- runs -------------------------------------------------------------------
    def parts(self) -> tuple[Any, ...]:
        """The operators this one applies in its products (composites: their terms and
        factors); ``()`` for an operator of its own."""
        return ()

    def agree_on_run(self, what: str, settings: dict[str, Any]) -> None:
        """Called by every estimator before its first product, with its name and the
        settings that fix how many products it makes (:func:`specdens._checks.agree_on_run`).
        Operators whose products are collectives across processes check that every
        process starts the same run; this one passes it to its :meth:`parts`."""
        for part in self.parts():
            _checks.agree_on_run(part, what, **settings)

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperatorBase) or _looks_like_operator(other):
            from .compose import ProductOperator

            return ProductOperator(self, _as_base(other))
        if isinstance(other, (list, tuple)):
            return self.dot(other)
        if len(getattr(other, "shape", ())) == 1:
            return self.matvec(other)
        if len(getattr(other, "shape", ())) == 2:
            return self.matmat(other)
        return NotImplemented

    def __rmatmul__(self, other: Any) -> Any:
        if _looks_like_operator(other):
            from .compose import ProductOperator

            return ProductOperator(_as_base(other), self)
        # ``x @ A`` for an array (numpy defers here through ``__array_ufunc__ = None``):
        # ``A^T x`` for a vector, ``(A^T X^T)^T`` for a block of rows, as in scipy.
        ndim = len(getattr(other, "shape", ()))
        if ndim not in (1, 2):
            return NotImplemented
        self._check_input(other, "x @ op")
        if ndim == 1:
            return self.T.matvec(other)
        return self.xp.matrix_transpose(self.T.matmat(self.xp.matrix_transpose(other)))

    # -- arithmetic -------------------------------------------------------------
    def __add__(self, other: Any) -> LinearOperatorBase:
        if isinstance(other, LinearOperatorBase) or _looks_like_operator(other):
            from .compose import SumOperator

            return SumOperator(self, _as_base(other))
        return NotImplemented

    def __radd__(self, other: Any) -> LinearOperatorBase:
        if _looks_like_operator(other):
            return _as_base(other) + self
        return NotImplemented

    def __neg__(self) -> LinearOperatorBase:
        return self * -1.0

    def __sub__(self, other: Any) -> LinearOperatorBase:
        if isinstance(other, LinearOperatorBase) or _looks_like_operator(other):
            return self + (-_as_base(other))
        return NotImplemented

    def __rsub__(self, other: Any) -> LinearOperatorBase:
        if _looks_like_operator(other):
            return _as_base(other) - self
        return NotImplemented

    def __mul__(self, other: Any) -> Any:
        """``c * A`` for a real scalar; ``A * x`` for an array is ``A.dot(x)``, the product
        (as scipy's LinearOperator), never an elementwise one."""
        if _is_real_scalar(other):
            from .compose import ScaledOperator

            return ScaledOperator(self, float(other))
        if isinstance(other, LinearOperatorBase) or _looks_like_operator(other):
            raise TypeError("A * B of two operators is ambiguous; write A @ B for their "
                            "product")
        if isinstance(other, (list, tuple)) or len(getattr(other, "shape", ())) in (1, 2):
            return self.dot(other)
        if getattr(other, "shape", None) == ():
            raise TypeError(f"A * c needs a real scalar c; got {other!r}")
        return NotImplemented

    def __rmul__(self, other: Any) -> Any:
        if _is_real_scalar(other):
            return self * other
        if len(getattr(other, "shape", ())) in (1, 2) and not _looks_like_operator(other):
            raise TypeError(
                "x * A with an array x is not defined for specdens operators (it is no "
                "elementwise product); write x @ A for the row-vector product, or A @ x"
            )
        return NotImplemented

    def __truediv__(self, scalar: Any) -> LinearOperatorBase:
        if _is_real_scalar(scalar):
            return self * (1.0 / float(scalar))
        return NotImplemented

    def shift(self, s: float) -> LinearOperatorBase:
        """The operator ``A + s I`` for a real scalar ``s``."""
        from .compose import ShiftedOperator

        if not _is_real_scalar(s):
            raise TypeError(f"shift needs a real scalar s (A + s I); got {s!r}")
        return ShiftedOperator(self, float(s))

    @property
    def T(self) -> LinearOperatorBase:  # noqa: N802 (scipy's name)
        """The transpose. The operator itself when it is known to be symmetric."""
        if self.symmetric:
            return self
        return self._transpose()

    def transpose(self) -> LinearOperatorBase:
        """The transpose (scipy's name for :attr:`T`)."""
        return self.T

    @property
    def H(self) -> LinearOperatorBase:  # noqa: N802 (scipy's name)
        """The adjoint: the transpose, since operators are real (scipy's ``.H``)."""
        return self.T

    def adjoint(self) -> LinearOperatorBase:
        """The adjoint: the transpose, since operators are real (scipy's name)."""
        return self.T

    def _transpose(self) -> LinearOperatorBase:
        from .compose import TransposedOperator

        if own_method(self, "rmatvec") is not None or hasattr(self, "_rmatvec"):
            return TransposedOperator(self)
        raise TypeError(
            f"{type(self).__name__} does not know its transpose: give it an rmatvec, or declare "
            "it symmetric (aslinearoperator(..., symmetric=True))."
        )

    # -- conversions ------------------------------------------------------------
    def to_dense(self, *, block_size: int = 256) -> Any:
        """The dense matrix, built from identity blocks of ``block_size`` columns (a
        positive integer) through ``matmat``, in the operator's own array library and
        dtype: a new array."""
        block_size = _checks.positive_int(block_size, "block_size")
        xp, n = self.xp, self.shape[0]
        dtype = self.dtype
        cols = []
        for start in range(0, n, block_size):
            stop = min(start + block_size, n)
            block = np.zeros((n, stop - start))
            block[np.arange(start, stop), np.arange(stop - start)] = 1.0
            cols.append(self.matmat(_array.from_numpy(block, xp, self.device, dtype)))
        if not cols:
            return _array.from_numpy(np.zeros((0, 0)), xp, self.device, dtype)
        return xp.concat(cols, axis=1)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` with float64 numpy at its boundary.

        Products run in the operator's own array library, dtype and device; only the
        input and output vectors cross to the host. ``scipy.sparse.linalg.eigsh`` and
        ``lobpcg`` accept it.
        """
        from .scipy_bridge import to_scipy

        return to_scipy(self)

    # -- description ------------------------------------------------------------
    @property
    def array_library(self) -> str:
        return _array.library_name(self.xp)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} shape={self.shape} dtype={_array.dtype_name(self.dtype)} "
            f"device={self.device} library={self.array_library}>"
        )


def _check_shape(shape: Any) -> tuple[int, int]:
    """``shape`` as a pair of Python ints, refusing anything but two non-negative integers
    (``(2.5, 2.5)`` is not truncated to ``(2, 2)``)."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"an operator's shape must be (n, n); got {shape!r}") from None
    if len(dims) != 2:
        raise ValueError(f"an operator's shape must be (n, n); got {dims}")
    out = []
    for d in dims:
        if isinstance(d, (bool, np.bool_)):
            raise ValueError(f"an operator's shape must be two integers; got {dims}")
        try:
            out.append(operator.index(d))
        except TypeError:
            raise ValueError(
                f"an operator's shape must be two integers (n, n); got {dims}"
            ) from None
    if out[0] < 0 or out[1] < 0:
        raise ValueError(f"an operator's shape must be non-negative; got {tuple(out)}")
    return out[0], out[1]


def _is_real_scalar(x: Any) -> bool:
    """A real number: a Python or numpy scalar, or a 0-d real array of any library (a
    ``torch.tensor(2.0)``, a ``np.array(2.0)``)."""
    if isinstance(x, numbers.Real) or (isinstance(x, np.generic) and np.isrealobj(x)):
        return True
    if tuple(getattr(x, "shape", (1,))) != () or isinstance(x, LinearOperatorBase):
        return False
    try:
        value = complex(x)
    except (TypeError, ValueError):
        return False
    return value.imag == 0


def own_method(obj: Any, name: str) -> Any:
    """``obj.name`` when ``obj`` defines it itself (an attribute of the instance, or a
    method of a subclass), ``None`` when it is :class:`LinearOperatorBase`'s generic one
    (which goes through the transpose) or missing."""
    if name in getattr(obj, "__dict__", {}):
        return obj.__dict__[name]
    impl = getattr(type(obj), name, None)
    if impl is None or impl is getattr(LinearOperatorBase, name, None):
        return None
    return getattr(obj, name)


def _looks_like_operator(obj: Any) -> bool:
    """A specdens-compatible operator that is not an array: shape plus matvec."""
    return (hasattr(obj, "matvec") and hasattr(obj, "shape")
            and not hasattr(obj, "__array_namespace__"))


def _as_base(obj: Any) -> LinearOperatorBase:
    if isinstance(obj, LinearOperatorBase):
        return obj
    from .wrappers import aslinearoperator

    return aslinearoperator(obj)
