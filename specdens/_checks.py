"""Argument and result checks shared by the algorithms."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _array


def operator_of(op: Any) -> tuple[Any, int]:
    """``aslinearoperator(op)`` and its size, refusing an empty operator."""
    from .operators import aslinearoperator

    op = aslinearoperator(op)
    n = int(op.shape[0])
    if n == 0:
        raise ValueError("the operator has size 0 (shape (0, 0)); there is no spectrum to compute")
    return op, n


def vector_1d(values: Any, name: str, what: str) -> np.ndarray:
    """``values`` as a 1-D float64 host array, or an error naming ``name`` and ``what`` it
    should be: a matrix passed as a spectrum was flattened into n^2 "eigenvalues", and a
    string read as the number it spells."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a 1-D array of numbers, {what}; got {values!r}")
    try:
        out = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a 1-D array of numbers, {what}; got "
                        f"{type(values).__name__} ({exc})") from None
    if out.ndim != 1:
        raise ValueError(f"{name} must be 1-D, {what}; got shape {out.shape}")
    return out


def nonnegative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    return int(value)


def finite_number(value: Any, name: str) -> float:
    """``value`` as a float; a ``TypeError`` naming ``name`` unless it is a finite real
    number (not a bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                       np.floating)) \
            or not np.isfinite(value):
        raise TypeError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1; got {value}")
    return int(value)


def float_dtype_name(dtype: Any, what: str, default: str) -> str:
    if dtype is None:
        return default
    name = _array.dtype_name(dtype)
    if name not in ("float32", "float64"):
        raise TypeError(f"{what}={name} is not supported; Lanczos vectors are float32 or float64")
    return name


def work_dtype(dtype: Any, op: Any, *, also: Any = None) -> str:
    """The dtype name of the Lanczos arithmetic: ``dtype`` checked, or float64 where the
    operator's library and device hold it and float32 elsewhere (JAX without
    ``jax_enable_x64``, MPS); a float64 request (``dtype``, or ``also``: e.g. a basis
    dtype) where float64 is missing raises a ``TypeError`` that says what to do."""
    has64 = _array.supports_float64(op.xp, op.device)
    work = float_dtype_name(dtype, "dtype", default="float64" if has64 else "float32")
    if not has64 and "float64" in (work, _array.dtype_name(also or work)):
        raise TypeError(
            f"float64 Lanczos arithmetic was asked for, but {op.array_library} on "
            f"{op.device} has no float64 now (for JAX, enable jax_enable_x64); use "
            "dtype='float32'"
        )
    return work


def check_product(op: Any, Aq: Any, k: int) -> None:
    """Validate the first block product: library, device and shape."""
    lib = _array.library_name(Aq)
    if lib != op.array_library:
        raise TypeError(
            f"the operator returned a {lib} array but its vectors are {op.array_library} arrays; "
            "declare the right array library (aslinearoperator(..., xp=...)) or fix matvec"
        )
    if tuple(Aq.shape) != (op.shape[0], k):
        raise ValueError(
            f"the operator returned shape {tuple(Aq.shape)} for a block of shape "
            f"({op.shape[0]}, {k}); expected ({op.shape[0]}, {k})"
        )
    dev = _array.device_of(Aq)
    if not _array.same_device(dev, op.device):
        raise ValueError(f"the operator returned an array on device {dev}, expected {op.device}")
    _array.check_supported_dtype(Aq.dtype, "the operator's output")


def product_dtype(op: Any) -> Any:
    """The dtype whose rounding an operator's products carry: its own, unless it wraps a
    lower-precision operator and says so (``op.product_dtype``, as deflation does)."""
    return getattr(op, "product_dtype", op.dtype)


def agree_on_run(op: Any, what: str, **settings: Any) -> None:
    """Tell ``op``, before an estimator's first product, which run starts: ``what`` (the
    estimator) and the settings that fix how many products it makes and of which block
    sizes.

    Operators whose products are collectives across processes (a torch operator built with
    a process group) check there that every process starts the same run, and raise on
    every process when one differs: ranks that would make different numbers of products
    would otherwise wait for each other in a product until the group's timeout. Other
    operators do nothing; composite ones pass it to their parts
    (:meth:`~specdens.operators.LinearOperatorBase.agree_on_run`).
    """
    hook = getattr(op, "agree_on_run", None)
    if callable(hook):
        hook(what, settings)
