"""The gradient of a mean training loss over the whole data set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._data import LOSS_ADVICE, Batches, explain_one_batch
from ._loss import BatchLoss
from ._operator import check_weight_decay, placement, positive_total
from ._params import ParamSpace
from ._pass import WeightedPass, total


def gradient(
    loss_fn: Callable[[Any, Any], Any],
    params: Any,
    data: Any,
    *,
    mask: Any = None,
    batch_size_fn: Callable[[Any], Any] | None = None,
    weight_decay: float = 0.0,
    regularizer: Callable[[Any], Any] | None = None,
    mesh: Any = None,
    data_axis: str | tuple[str, ...] | None = None,
) -> Any:
    """The full-data gradient ``g = sum_b (n_b / N) grad L_b + weight_decay * theta +
    grad R`` as a flat vector in the space of :func:`hessian` called with the same options.

    Parameters
    ----------
    loss_fn, params, data, mask, batch_size_fn, weight_decay, regularizer, mesh, data_axis
        As in :func:`specdens.backends.jax.hessian` (same weighting of uneven batches,
        same leaf order, same sharding over a mesh).

    Returns
    -------
    jax.Array
        Shape ``(n,)``, the params' dtype, on their device (replicated with a mesh).

    Raises
    ------
    FloatingPointError
        When the gradient has NaN or Inf entries (named by leaf); they are never returned
        silently.
    ValueError
        When a sample count is negative or not finite, or all of them are 0.

    References
    ----------
    B. Ghorbani, S. Krishnan, Y. Xiao (2019), An Investigation into Neural Net Optimization
    via Hessian Eigenvalue Density, ICML (section 4: the gradient and the outlier
    eigenspace).
    """
    space = ParamSpace(params, mask)
    loss = BatchLoss(loss_fn, batch_size_fn)
    wd = check_weight_decay(weight_decay)
    if regularizer is not None and not callable(regularizer):
        raise TypeError("regularizer must be a callable(params) -> scalar")
    mesh, axes, sharding, _ = placement(space, mesh, data_axis)
    consts = space.place(sharding)
    dtype = space.dtype

    def kernel(consts: Any, batch: Any, _: Any) -> tuple[Any, Any]:
        x0, frozen = consts
        g, count = jax.grad(lambda x: loss(space.combine(x, frozen), batch, dtype),
                            has_aux=True)(x0)
        # a trailing 1: its weighted sum is the sum of the positive counts (checked)
        return jnp.concatenate([g, jnp.ones((1,), dtype)]), count

    batches = Batches(data, check=False)
    with explain_one_batch(batches.one_batch_hint(LOSS_ADVICE), loss.what):
        parts = WeightedPass(kernel, mesh, axes, lambda: None).run(
            consts, batches, None, (space.n + 1,), dtype, sharding)

    def finish(consts: Any, parts: Any) -> Any:
        x0, frozen = consts
        acc, tot = total(parts)
        g = acc[:-1] / tot
        if wd:
            g = g + wd * x0
        if regularizer is not None:
            g = g + jax.grad(lambda x: jnp.reshape(regularizer(space.combine(x, frozen)), ()))(x0)
        return g, acc[-1], tot

    rep = sharding if mesh is not None else None
    g, positive, tot = jax.jit(finish, out_shardings=rep)(consts, parts)
    positive_total([float(tot)], positive)
    finite = np.asarray(jnp.isfinite(g))
    if not finite.all():
        bad = sorted({name for name, piece in zip(space.names, np.split(
            finite, np.cumsum(space.sizes)[:-1]), strict=True) if not piece.all()})
        raise FloatingPointError(f"the gradient has NaN or Inf entries in {bad}; check the loss "
                                 "(an overflow, a log of 0) and the data")
    return g


__all__ = ["gradient"]
