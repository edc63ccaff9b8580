"""The subset of the array API standard that the specdens engine uses, for TensorFlow.

array-api-compat has no TensorFlow namespace, so the engine (``specdens.lanczos``,
``specdens.slq``, ``specdens.eigsh``) reaches this module instead:
:func:`specdens._array.namespace` recognises a TensorFlow tensor by the module of its type
(``tensorflow.python...``) and only then imports it. Arrays stay ``tf.Tensor`` objects on
their device; no array data goes through numpy (only :func:`set_rows` builds its small
integer index on the host).

The functions follow the array API standard (2023.12) for exactly the arguments the
engine passes: ``asarray, zeros, ones, empty, arange, zeros_like, ones_like, astype,
reshape, matmul, matrix_transpose, sum, max, all, any, maximum, minimum, sqrt, abs, where,
stack, concat, isfinite, result_type`` and the dtypes ``bool, float16, bfloat16,
float32, float64, int32, int64``. Slicing, broadcasting and the arithmetic and
comparison operators are TensorFlow's own (``tf.Tensor`` has no in-place operators, so
``w -= x`` rebinds ``w``, as for JAX).
:func:`set_rows` is the write into a preallocated array (``x[index] = value``).

References
----------
Consortium for Python Data API Standards, *Python array API standard*, version 2023.12,
https://data-apis.org/array-api/2023.12/.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

__array_api_version__ = "2023.12"

bool = tf.bool  # noqa: A001 (the standard's name)
float16 = tf.float16
bfloat16 = tf.bfloat16
float32 = tf.float32
float64 = tf.float64
int32 = tf.int32
int64 = tf.int64

_FLOAT_RANK = {tf.float16: 1, tf.bfloat16: 1, tf.float32: 2, tf.float64: 3}


# -- devices ------------------------------------------------------------------------
def device(x: Any) -> str:
    """The full name of the device ``x`` lives on (``/job:localhost/.../device:CPU:0``)."""
    return x.device


def _on(device_name: Any) -> Any:
    """``tf.device(device_name)``, or a no-op context for ``None``."""
    if device_name is None:
        return _Null()
    return tf.device(str(device_name))


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _place(x: tf.Tensor, device_name: Any) -> tf.Tensor:
    """``x`` on ``device_name`` (a copy only when it lives elsewhere)."""
    if device_name is None:
        return x
    with tf.device(str(device_name)):
        return tf.identity(x)


# -- creation -----------------------------------------------------------------------
def _dtype(dtype: Any) -> tf.DType | None:
    return None if dtype is None else tf.as_dtype(dtype)


def asarray(obj: Any, /, *, dtype: Any = None, device: Any = None, copy: Any = None) -> Any:
    """``obj`` (a tensor, numpy array or Python scalar/sequence) as a ``tf.Tensor``."""
    dt = _dtype(dtype)
    if isinstance(obj, (tf.Tensor, tf.Variable)):
        out = obj if dt is None or obj.dtype == dt else tf.cast(obj, dt)
        if copy:
            out = tf.identity(out)
        return _place(out, device) if device is not None else out
    if dt is None and isinstance(obj, builtins.float):
        dt = tf.float64  # the standard's default floating dtype for Python floats here
    with _on(device):
        out = tf.convert_to_tensor(obj, dtype=dt)
    return _place(out, device)


def zeros(shape: int | Sequence[int], *, dtype: Any = None, device: Any = None) -> tf.Tensor:
    """Zeros of ``shape`` (default dtype float64, as numpy)."""
    with _on(device):
        return tf.zeros(_shape(shape), dtype=_dtype(dtype) or tf.float64)


def ones(shape: int | Sequence[int], *, dtype: Any = None, device: Any = None) -> tf.Tensor:
    """Ones of ``shape`` (default dtype float64, as numpy)."""
    with _on(device):
        return tf.ones(_shape(shape), dtype=_dtype(dtype) or tf.float64)


def arange(start: int, /, stop: int | None = None, step: int = 1, *, dtype: Any = None,
           device: Any = None) -> tf.Tensor:
    """``start, start + step, ...`` below ``stop`` (default dtype int64, as numpy)."""
    if stop is None:
        start, stop = 0, start
    with _on(device):
        return tf.range(start, stop, step, dtype=_dtype(dtype) or tf.int64)


def empty(shape: int | Sequence[int], *, dtype: Any = None, device: Any = None) -> tf.Tensor:
    """An array of ``shape`` to be written into (default dtype float64, as numpy): zeros,
    since TensorFlow has no uninitialised tensors."""
    return zeros(shape, dtype=dtype, device=device)


def zeros_like(x: Any, /, *, dtype: Any = None, device: Any = None) -> tf.Tensor:
    with _on(device if device is not None else x.device):
        return tf.zeros(tf.shape(x), dtype=_dtype(dtype) or x.dtype)


def ones_like(x: Any, /, *, dtype: Any = None, device: Any = None) -> tf.Tensor:
    with _on(device if device is not None else x.device):
        return tf.ones(tf.shape(x), dtype=_dtype(dtype) or x.dtype)


def _shape(shape: int | Sequence[int]) -> list[int]:
    return [int(shape)] if isinstance(shape, int) else [int(s) for s in shape]


# -- dtypes -------------------------------------------------------------------------
def astype(x: Any, dtype: Any, /, *, copy: builtins.bool = True, device: Any = None) -> Any:
    """``x`` cast to ``dtype``; with ``copy=False`` the same tensor when nothing changes."""
    dt = tf.as_dtype(dtype)
    if x.dtype == dt:
        out = tf.identity(x) if copy or isinstance(x, tf.Variable) else x
    else:
        out = tf.cast(x, dt)
    return _place(out, device) if device is not None else out


def result_type(*arrays_and_dtypes: Any) -> tf.DType:
    """The promoted dtype of floating dtypes or arrays (the standard's lattice: within one
    kind, the wider type; float16 and bfloat16 promote to float32)."""
    dts = [tf.as_dtype(getattr(a, "dtype", a)) for a in arrays_and_dtypes]
    if not dts:
        raise ValueError("result_type needs at least one array or dtype")
    if len(set(dts)) == 1:
        return dts[0]
    if builtins.all(d in _FLOAT_RANK for d in dts):
        rank = builtins.max(_FLOAT_RANK[d] for d in dts)
        return {1: tf.float32, 2: tf.float32, 3: tf.float64}[rank]
    raise TypeError(f"no promotion rule here for dtypes {sorted(d.name for d in dts)}")


# -- shapes -------------------------------------------------------------------------
def reshape(x: Any, /, shape: Sequence[int], *, copy: Any = None) -> tf.Tensor:
    return tf.reshape(x, [int(s) for s in shape])


def matrix_transpose(x: Any, /) -> tf.Tensor:
    """Swap the last two axes (``tf.transpose`` with an explicit permutation: the fast
    eager path, where ``tf.linalg.matrix_transpose`` takes TensorFlow's slow one)."""
    rank = len(x.shape)
    if rank < 2:
        raise ValueError(f"matrix_transpose needs at least 2 dimensions; got shape "
                         f"{tuple(x.shape)}")
    if rank == 2:
        return tf.transpose(x)
    return tf.transpose(x, [*range(rank - 2), rank - 1, rank - 2])


def stack(arrays: Sequence[Any], /, *, axis: int = 0) -> tf.Tensor:
    return tf.stack(list(arrays), axis=axis)


def concat(arrays: Sequence[Any], /, *, axis: int | None = 0) -> tf.Tensor:
    arrays = list(arrays)
    if axis is None:
        return tf.concat([tf.reshape(a, [-1]) for a in arrays], axis=0)
    return tf.concat(arrays, axis=axis)


# -- linear algebra -----------------------------------------------------------------
def matmul(x1: Any, x2: Any, /) -> tf.Tensor:
    """``x1 @ x2`` with the standard's rules for 1-D operands (a vector is promoted to a
    matrix for the product and the added axis removed) and broadcast batch axes."""
    r1, r2 = len(x1.shape), len(x2.shape)
    if r1 == 0 or r2 == 0:
        raise ValueError("matmul needs operands of at least one dimension; got shapes "
                         f"{tuple(x1.shape)} and {tuple(x2.shape)}")
    if r1 == 1 and r2 == 1:
        return tf.tensordot(x1, x2, axes=1)
    if r1 == 1:
        return tf.linalg.matmul(x1[None, :], x2)[..., 0, :]
    if r2 == 1:
        return tf.linalg.matvec(x1, x2)
    return tf.linalg.matmul(x1, x2)


# -- elementwise and reductions -----------------------------------------------------
def _operand(x: Any, like: Any) -> Any:
    """A Python scalar as a tensor of ``like``'s dtype (the standard's scalar promotion)."""
    if isinstance(x, (builtins.bool, int, builtins.float)):
        return tf.constant(x, dtype=like.dtype)
    return x


def _pair(x1: Any, x2: Any) -> tuple[Any, Any]:
    if isinstance(x1, (builtins.bool, int, builtins.float)):
        return _operand(x1, x2), x2
    return x1, _operand(x2, x1)


def sqrt(x: Any, /) -> tf.Tensor:
    return tf.sqrt(x)


def abs(x: Any, /) -> tf.Tensor:  # noqa: A001 (the standard's name)
    return tf.abs(x)


def isfinite(x: Any, /) -> tf.Tensor:
    return tf.math.is_finite(x)


def maximum(x1: Any, x2: Any, /) -> tf.Tensor:
    return tf.maximum(*_pair(x1, x2))


def minimum(x1: Any, x2: Any, /) -> tf.Tensor:
    return tf.minimum(*_pair(x1, x2))


def where(condition: Any, x1: Any, x2: Any, /) -> tf.Tensor:
    """Elementwise choice with broadcasting; a Python scalar takes the other operand's
    dtype."""
    a, b = _pair(x1, x2)
    return tf.where(condition, a, b)


def sum(x: Any, /, *, axis: int | tuple[int, ...] | None = None, dtype: Any = None,  # noqa: A001
        keepdims: builtins.bool = False) -> tf.Tensor:
    if dtype is not None:
        x = tf.cast(x, tf.as_dtype(dtype))
    return tf.reduce_sum(x, axis=axis, keepdims=keepdims)


def max(x: Any, /, *, axis: int | tuple[int, ...] | None = None,  # noqa: A001
        keepdims: builtins.bool = False) -> tf.Tensor:
    return tf.reduce_max(x, axis=axis, keepdims=keepdims)


def all(x: Any, /, *, axis: int | tuple[int, ...] | None = None,  # noqa: A001
        keepdims: builtins.bool = False) -> tf.Tensor:
    """Whether every element (along ``axis``) is true; numbers count as ``x != 0``."""
    return tf.reduce_all(_as_bool(x), axis=axis, keepdims=keepdims)


def any(x: Any, /, *, axis: int | tuple[int, ...] | None = None,  # noqa: A001
        keepdims: builtins.bool = False) -> tf.Tensor:
    """Whether some element (along ``axis``) is true; numbers count as ``x != 0``."""
    return tf.reduce_any(_as_bool(x), axis=axis, keepdims=keepdims)


def logical_and(x1: Any, x2: Any, /) -> tf.Tensor:
    return tf.logical_and(_as_bool(x1), _as_bool(x2))


def _as_bool(x: Any) -> tf.Tensor:
    x = tf.convert_to_tensor(x)
    return x if x.dtype == tf.bool else tf.not_equal(x, tf.zeros((), x.dtype))


# -- writes -------------------------------------------------------------------------
def set_rows(x: Any, index: tuple[Any, ...], value: Any) -> tf.Tensor:
    """``x[index] = value`` for an index of full slices and one integer (a row along one
    axis), returning a new tensor.

    TensorFlow tensors are immutable, so the write is ``tf.tensor_scatter_nd_update``
    into a copy of ``x`` (indices over the axes up to the row's, so nothing is
    transposed). A ``tf.Variable`` would avoid the copy of the write, but a variable
    written through a strided-slice assignment switches to copy-on-read: every later read
    copies the whole buffer, which costs more than the copy here (measured on a Lanczos
    basis of 10 x 90 x 2410: 1.1 ms per read against 0.8 ms per write).
    """
    if not isinstance(index, tuple):
        index = (index,)
    axes = [i for i, s in enumerate(index) if not _full_slice(s)]
    if (len(axes) != 1 or isinstance(index[axes[0]], slice) or len(index) > len(x.shape)
            or isinstance(index[axes[0]], builtins.bool)):
        raise IndexError(f"set_rows writes one row along one axis (full slices and one "
                         f"integer); got index {index!r} for shape {tuple(x.shape)}")
    axis, row = axes[0], int(index[axes[0]])
    lead = [int(d) for d in x.shape[:axis]]
    size = int(np.prod(lead, dtype=np.int64))
    grids = np.meshgrid(*[np.arange(d) for d in lead], indexing="ij") if lead else []
    idx = np.stack([g.reshape(-1) for g in grids] + [np.full(size, row)], axis=1)
    with tf.device(x.device):
        upd = tf.reshape(tf.cast(value, x.dtype), [size, *[int(d) for d in x.shape[axis + 1:]]])
        return tf.tensor_scatter_nd_update(x, tf.constant(idx, tf.int64), upd)


def _full_slice(s: Any) -> builtins.bool:
    return isinstance(s, slice) and s == slice(None)
