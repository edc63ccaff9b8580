"""``to_scipy``: a scipy LinearOperator view with float64 numpy at the boundary."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _array, _checks


def to_scipy(op: Any) -> Any:
    """Wrap a specdens operator as a ``scipy.sparse.linalg.LinearOperator``.

    Inputs arrive as numpy arrays, are moved to the operator's array library, device and
    dtype, multiplied there, and come back as float64 numpy arrays. A complex input is
    applied to its real and imaginary parts (in one block product) and comes back as
    complex128: the operator is real, hence linear over the complex numbers,
    ``A (x + i y) = A x + i A y``.

    The LinearOperator's ``product_dtype`` attribute names the dtype whose rounding the
    products carry (``"float32"`` for a float32 operator): ``aslinearoperator`` reads it
    back, so that a round trip keeps the tolerances of the operator's own dtype.
    """
    from scipy.sparse.linalg import LinearOperator

    xp, device, dtype = op.xp, op.device, op.dtype

    def real_matvec(apply: Any, x: np.ndarray) -> np.ndarray:
        v = _array.from_numpy(np.asarray(x).reshape(-1), xp, device, dtype)
        return _array.to_numpy(apply(v))

    def real_matmat(apply: Any, X: np.ndarray) -> np.ndarray:
        V = _array.from_numpy(np.asarray(X), xp, device, dtype)
        return _array.to_numpy(apply(V))

    def product(of: Any, X: Any, vector: bool) -> np.ndarray:
        """``of`` (the operator or its transpose) times ``X``; a complex ``X`` as its real
        and imaginary parts, side by side in one block product."""
        X = np.asarray(X)
        if not np.iscomplexobj(X):
            return real_matvec(of.matvec, X) if vector else real_matmat(of.matmat, X)
        X2 = X.reshape(-1, 1) if vector else X
        k = X2.shape[1]
        Y = real_matmat(of.matmat, np.concatenate([X2.real, X2.imag], axis=1))
        Z = Y[:, :k] + 1j * Y[:, k:]
        return Z[:, 0] if vector else Z

    def matvec(x: np.ndarray) -> np.ndarray:
        return product(op, x, True)

    def matmat(X: np.ndarray) -> np.ndarray:
        return product(op, X, False)

    kwargs: dict[str, Any] = {}
    try:
        opT = op.T
    except TypeError:
        opT = None
    if opT is not None:

        # the adjoint of a real operator is its transpose, also for complex vectors
        def rmatvec(x: np.ndarray) -> np.ndarray:
            return product(opT, x, True)

        def rmatmat(X: np.ndarray) -> np.ndarray:
            return product(opT, X, False)

        kwargs = {"rmatvec": rmatvec, "rmatmat": rmatmat}
    lo = LinearOperator(op.shape, matvec=matvec, matmat=matmat, dtype=np.float64, **kwargs)
    # the rounding the products carry behind the float64 boundary, which
    # aslinearoperator reads back (a float32 operator stays one with float32 rounding)
    lo.product_dtype = _array.dtype_name(_checks.product_dtype(op))
    return lo
