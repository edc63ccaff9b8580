"""``to_scipy``: a scipy LinearOperator view with float64 numpy at the boundary."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _array


def to_scipy(op: Any) -> Any:
    """Wrap a specdens operator as a ``scipy.sparse.linalg.LinearOperator``.

    Inputs arrive as numpy arrays, are moved to the operator's array library, device and
    dtype, multiplied there, and come back as float64 numpy arrays.
    """
    from scipy.sparse.linalg import LinearOperator

    xp, device, dtype = op.xp, op.device, op.dtype

    def matvec(x: np.ndarray) -> np.ndarray:
        v = _array.from_numpy(np.asarray(x).reshape(-1), xp, device, dtype)
        return _array.to_numpy(op.matvec(v))

    def matmat(X: np.ndarray) -> np.ndarray:
        V = _array.from_numpy(np.asarray(X), xp, device, dtype)
        return _array.to_numpy(op.matmat(V))

    kwargs: dict[str, Any] = {}
    try:
        opT = op.T
    except TypeError:
        opT = None
    if opT is not None:

        def rmatvec(x: np.ndarray) -> np.ndarray:
            v = _array.from_numpy(np.asarray(x).reshape(-1), xp, device, dtype)
            return _array.to_numpy(opT.matvec(v))

        def rmatmat(X: np.ndarray) -> np.ndarray:
            V = _array.from_numpy(np.asarray(X), xp, device, dtype)
            return _array.to_numpy(opT.matmat(V))

        kwargs = {"rmatvec": rmatvec, "rmatmat": rmatmat}
    return LinearOperator(op.shape, matvec=matvec, matmat=matmat, dtype=np.float64, **kwargs)
