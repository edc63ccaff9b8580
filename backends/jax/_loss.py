"""The loss of one batch and its sample count, as a traceable function of the parameters.

See :mod:`specdens.backends.jax._data` for the counting rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._data import default_count


def _scalar(value: Any, what: str) -> Any:
    shape = getattr(value, "shape", None)
    if shape is None:
        raise TypeError(f"{what} must return a scalar array; got {type(value).__name__}")
    if tuple(shape) not in ((), (1,)):
        raise ValueError(f"{what} must return a scalar (the batch's mean loss); got shape "
                         f"{tuple(shape)}. Return loss.mean()")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f"{what} returned dtype {value.dtype}; the loss must be floating-point")
    return jnp.reshape(value, ())


class BatchLoss:
    """``(mean loss, count)`` of a batch from ``loss_fn`` and ``batch_size_fn``.

    Parameters
    ----------
    loss_fn
        ``loss_fn(params, batch)`` returning the batch's mean loss, or a pair
        ``(mean_loss, count)``.
    batch_size_fn
        ``batch_size_fn(batch) -> count`` (traceable), or None for the leading dimension
        of the batch's first array leaf.
    """

    def __init__(self, loss_fn: Callable[..., Any], batch_size_fn: Callable[[Any], Any] | None,
                 what: str = "loss_fn"):
        if not callable(loss_fn):
            raise TypeError(f"{what} must be a callable(params, batch) -> mean loss; got "
                            f"{type(loss_fn).__name__}")
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError("batch_size_fn must be a callable(batch) -> number of samples")
        self.loss_fn = loss_fn
        self.batch_size_fn = batch_size_fn
        self.what = what

    def count(self, batch: Any, dtype: Any) -> Any:
        """The sample count from ``batch_size_fn`` or the default rule, as a 0-d array."""
        if self.batch_size_fn is None:
            return jnp.asarray(default_count(batch), dtype=dtype)
        try:
            c = self.batch_size_fn(batch)
        except jax.errors.ConcretizationTypeError as exc:
            raise TypeError(
                "batch_size_fn is called inside the compiled product, on the batch (or its "
                "shard) as traced arrays: compute the count with shapes or jnp functions, "
                f"not float() or numpy ({exc.__class__.__name__})") from None
        return _count_array(c, "batch_size_fn", dtype)

    def __call__(self, params: Any, batch: Any, dtype: Any) -> tuple[Any, Any]:
        """``(mean loss, count)``; the count is a 0-d array of ``dtype``."""
        out = self.loss_fn(params, batch)
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise ValueError(f"{self.what} returned a {type(out).__name__} of length "
                                 f"{len(out)}; return the batch's mean loss, or "
                                 "(mean_loss, count)")
            return _scalar(out[0], self.what), _count_array(out[1], self.what, dtype)
        return _scalar(out, self.what), self.count(batch, dtype)


def _count_array(c: Any, what: str, dtype: Any) -> Any:
    shape = getattr(c, "shape", ())
    if tuple(shape) not in ((), (1,)):
        raise ValueError(f"{what} returned a count of shape {tuple(shape)}; expected a number")
    try:
        return jnp.reshape(jnp.asarray(c, dtype=dtype), ())
    except TypeError:
        raise TypeError(f"{what} returned {type(c).__name__} as a sample count; expected a "
                        "number") from None


def host_count(batch_size_fn: Callable[[Any], Any] | None, batch: Any) -> float | None:
    """The count of a whole batch evaluated outside any trace (for ``num_samples``), or
    None when ``batch_size_fn`` needs tracing."""
    if batch_size_fn is None:
        return float(default_count(batch))
    try:
        return float(batch_size_fn(batch))
    except Exception:  # a traced-only function: counted by a compiled pass instead
        return None
