"""Operators built from others: sums, products, scalings, shifts and transposes."""

from __future__ import annotations

from typing import Any

from .. import _array, _checks
from .base import LinearOperatorBase, own_method


def _coarsest_products(*ops: LinearOperatorBase) -> Any:
    """The product dtype (:func:`specdens._checks.product_dtype`) of the least precise
    part: a float32 operator plus a float64 one computes in float64, but its products
    still carry float32 rounding, which the engine's rounding allowances must know."""
    return max((_checks.product_dtype(op) for op in ops), key=_array.finfo_eps)


def _check_compatible(a: LinearOperatorBase, b: LinearOperatorBase, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"cannot {what} operators of shapes {a.shape} and {b.shape}")
    if a.array_library != b.array_library:
        raise TypeError(
            f"cannot {what} an operator on {a.array_library} arrays with one on "
            f"{b.array_library} arrays; convert one of them first"
        )
    if not _array.same_device(a.device, b.device):
        raise ValueError(
            f"cannot {what} an operator on device {a.device} with one on device {b.device}"
        )


def _result_dtype(a: LinearOperatorBase, b: LinearOperatorBase) -> Any:
    xp = a.xp
    try:
        return xp.result_type(a.dtype, b.dtype)
    except Exception:  # libraries without result_type for their dtype objects
        return a.dtype


def _apply(parent: LinearOperatorBase, child: LinearOperatorBase, method: str, V: Any) -> Any:
    """``child.method(V)``; in a mixed-dtype composition (a float32 term in a float64 sum)
    the input is cast to the child's dtype and the output back to the parent's, since
    torch will not multiply arrays of different dtypes."""
    if _array.dtype_name(child.dtype) == _array.dtype_name(parent.dtype):
        return getattr(child, method)(V)
    xp = parent.xp
    return xp.astype(getattr(child, method)(xp.astype(V, child.dtype)), parent.dtype)


class SumOperator(LinearOperatorBase):
    """``A + B``."""

    def __init__(self, a: LinearOperatorBase, b: LinearOperatorBase):
        _check_compatible(a, b, "add")
        super().__init__(a.shape, _result_dtype(a, b), a.xp, a.device)
        self.a, self.b = a, b
        self.symmetric = True if (a.symmetric and b.symmetric) else None
        self.product_dtype = _coarsest_products(a, b)

    def _matmat(self, V: Any) -> Any:
        return _apply(self, self.a, "matmat", V) + _apply(self, self.b, "matmat", V)

    def _matvec(self, v: Any) -> Any:
        return _apply(self, self.a, "matvec", v) + _apply(self, self.b, "matvec", v)

    def parts(self) -> tuple[LinearOperatorBase, ...]:
        return (self.a, self.b)

    def _transpose(self) -> LinearOperatorBase:
        return SumOperator(self.a.T, self.b.T)


class ProductOperator(LinearOperatorBase):
    """``A @ B``."""

    def __init__(self, a: LinearOperatorBase, b: LinearOperatorBase):
        _check_compatible(a, b, "multiply")
        super().__init__(a.shape, _result_dtype(a, b), a.xp, a.device)
        self.a, self.b = a, b
        self.product_dtype = _coarsest_products(a, b)

    def _matmat(self, V: Any) -> Any:
        return _apply(self, self.a, "matmat", _apply(self, self.b, "matmat", V))

    def _matvec(self, v: Any) -> Any:
        return _apply(self, self.a, "matvec", _apply(self, self.b, "matvec", v))

    def parts(self) -> tuple[LinearOperatorBase, ...]:
        return (self.a, self.b)

    def _transpose(self) -> LinearOperatorBase:
        return ProductOperator(self.b.T, self.a.T)


class ScaledOperator(LinearOperatorBase):
    """``c * A`` for a real scalar ``c``."""

    def __init__(self, a: LinearOperatorBase, c: float):
        super().__init__(a.shape, a.dtype, a.xp, a.device)
        self.a, self.c = a, c
        self.symmetric = a.symmetric
        self.product_dtype = _checks.product_dtype(a)

    def _matmat(self, V: Any) -> Any:
        return self.c * self.a.matmat(V)

    def _matvec(self, v: Any) -> Any:
        return self.c * self.a.matvec(v)

    def parts(self) -> tuple[LinearOperatorBase, ...]:
        return (self.a,)

    def _transpose(self) -> LinearOperatorBase:
        return ScaledOperator(self.a.T, self.c)


class ShiftedOperator(LinearOperatorBase):
    """``A + s I``."""

    def __init__(self, a: LinearOperatorBase, s: float):
        super().__init__(a.shape, a.dtype, a.xp, a.device)
        self.a, self.s = a, s
        self.symmetric = a.symmetric
        self.product_dtype = _checks.product_dtype(a)

    def _matmat(self, V: Any) -> Any:
        return self.a.matmat(V) + self.s * V

    def _matvec(self, v: Any) -> Any:
        return self.a.matvec(v) + self.s * v

    def parts(self) -> tuple[LinearOperatorBase, ...]:
        return (self.a,)

    def _transpose(self) -> LinearOperatorBase:
        return ShiftedOperator(self.a.T, self.s)


class CastOperator(LinearOperatorBase):
    """An operator seen with vectors of another dtype: each product converts its input
    to the wrapped operator's dtype and its output back (``aslinearoperator(op,
    dtype=...)`` for an operator that is not a matrix). The products keep the rounding
    of the coarser of the two dtypes (``product_dtype``)."""

    def __init__(self, a: LinearOperatorBase, dtype: Any):
        _array.check_float64_available(a.xp, a.device, dtype,
                                       "a float64 view of the operator was asked for")
        super().__init__(a.shape, dtype, a.xp, a.device)
        self.a = a
        self.symmetric = a.symmetric
        self.product_dtype = max((_checks.product_dtype(a), dtype), key=_array.finfo_eps)

    def _matmat(self, V: Any) -> Any:
        return _apply(self, self.a, "matmat", V)

    def _matvec(self, v: Any) -> Any:
        return _apply(self, self.a, "matvec", v)

    def parts(self) -> tuple[LinearOperatorBase, ...]:
        return (self.a,)

    def _transpose(self) -> LinearOperatorBase:
        return CastOperator(self.a.T, self.dtype)


class TransposedOperator(LinearOperatorBase):
    """``A^T`` through the wrapped operator's own ``rmatvec``/``rmatmat`` (methods of a
    subclass), or its private ``_rmatvec``/``_rmatmat`` hooks (the wrappers')."""

    def __init__(self, a: LinearOperatorBase):
        super().__init__(a.shape, a.dtype, a.xp, a.device)
        self.a = a
        self.product_dtype = _checks.product_dtype(a)

    def _matvec(self, v: Any) -> Any:
        return self._adjoint("rmatvec")(v)

    def _matmat(self, V: Any) -> Any:
        rmatmat = self._adjoint("rmatmat")
        if rmatmat is not None:
            return rmatmat(V)
        if V.shape[1] == 0:
            return self._empty_block()
        rmatvec = self._adjoint("rmatvec")
        n = self.shape[0]
        return self.xp.stack([self._checked(rmatvec(V[:, i]), (n,), V[:, i], "rmatvec")
                              for i in range(V.shape[1])], axis=1)

    def _adjoint(self, name: str) -> Any:
        """The wrapped operator's own ``rmatvec``/``rmatmat`` (not the generic one, which
        would come back here through the transpose), else its ``_rmatvec``/``_rmatmat``
        hook; ``None`` for a missing ``rmatmat``."""
        own = own_method(self.a, name)
        return own if own is not None else getattr(self.a, "_" + name, None)

    def parts(self) -> tuple[LinearOperatorBase, ...]:
        return (self.a,)

    def _transpose(self) -> LinearOperatorBase:
        return self.a

    def __repr__(self) -> str:
        return f"<TransposedOperator of {self.a!r} dtype={_array.dtype_name(self.dtype)}>"
