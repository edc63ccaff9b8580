"""The gradient of a mean training loss over the whole data set."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._data import LOSS_ADVICE, Batches, count_source, explain_one_batch
from ._loss import BatchLoss
from ._operator import check_weight_decay, pass_counts, placement
from ._params import ParamSpace
from ._pass import WeightedPass, acc_dtype, total


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
        When a sample count is negative or not finite, or a batch holds no samples (named).

    Notes
    -----
    The compiled steps are shared by later calls with the same ``loss_fn`` and
    ``batch_size_fn`` objects, parameter structure, selection, ``weight_decay``,
    ``regularizer`` and mesh (the 8 most recent such groups): a tracker's records trace
    nothing again. Functions are keyed by identity, as :func:`jax.jit` keys them: what
    ``loss_fn`` reads from outside its arguments (a closure's captured values, a global,
    a bound method's ``self``, a dict changed in place) is fixed at its first trace, and
    calling again with the same function object after such a value changed returns the
    gradient for the old value, as the Hessian's products do. Pass values that change
    through ``params`` (a leaf left out by ``mask``) or the batch (example in
    :func:`specdens.backends.jax.hessian`, Notes), or build a new function for each.

    Sample counts come out of the gradient pass itself (one pass over the data besides
    the one that reads it when called) and are checked after it.

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
    mesh, axes, sharding, device = placement(space, mesh, data_axis)
    consts = space.place(sharding)
    batches = Batches(data, check=False, device=device if mesh is None else None)
    compiled = _compiled(space, loss, wd, regularizer, mesh, axes, sharding)
    hint = batches.one_batch_hint(LOSS_ADVICE)
    with explain_one_batch(hint, loss.what):
        if compiled.pair is None:   # (traced once, not compiled)
            out = jax.eval_shape(lambda c, b: loss_fn(space.combine(*c), b), consts,
                                 batches.first())
            compiled.pair = isinstance(out, (tuple, list))
        # the counts come out of the gradient pass itself and are checked after it (a batch
        # with no samples weighs 0 in the sums, then is refused, named, before finishing)
        counts: list[list[Any]] = []
        parts = compiled.grads.run(consts, batches, None, (space.n,), compiled.acc, sharding,
                                   counts=counts)
    pass_counts(counts, count_source(compiled.pair, batch_size_fn))
    g = compiled.finish(consts, parts)
    finite = np.asarray(jnp.isfinite(g))
    if not finite.all():
        bad = sorted({name for name, piece in zip(space.names, np.split(
            finite, np.cumsum(space.sizes)[:-1]), strict=True) if not piece.all()})
        raise FloatingPointError(f"the gradient has NaN or Inf entries in {bad}; check the loss "
                                 "(an overflow, a log of 0) and the data")
    return g


class _Compiled:
    """The compiled per-batch step of a gradient (the gradient and the count of a batch)
    and its final step, for one loss, parameter structure and set of options: shared by
    every later call with the same ones (the 8 most recent), which then trace nothing."""

    def __init__(self, space: ParamSpace, loss: BatchLoss, wd: float, regularizer: Any,
                 mesh: Any, axes: tuple, sharding: Any):
        space = space.structure()       # no arrays are kept
        dtype = space.dtype
        self.acc = acc = acc_dtype(dtype)
        self.num_traces = 0
        self.pair: bool | None = None     # whether loss_fn returns (mean_loss, count)

        def traced() -> None:
            self.num_traces += 1

        def kernel(consts: Any, batch: Any, _: Any) -> tuple[Any, Any]:
            x0, frozen = consts
            return jax.grad(lambda x: loss(space.combine(x, frozen), batch, acc),
                            has_aux=True)(x0)

        def finish(consts: Any, parts: Any) -> Any:
            x0, frozen = consts
            total_g, tot = total(parts)
            g = total_g / tot
            if wd:
                g = g + wd * x0
            if regularizer is not None:
                g = g + jax.grad(lambda x: jnp.reshape(
                    regularizer(space.combine(x, frozen)), ()))(x0)
            return g.astype(dtype)

        self.grads = WeightedPass(kernel, mesh, axes, traced)
        self.finish = jax.jit(finish, out_shardings=sharding if mesh is not None else None)


_CACHE: OrderedDict[tuple, _Compiled] = OrderedDict()
CACHE_SIZE = 8


def _compiled(space: ParamSpace, loss: BatchLoss, wd: float, regularizer: Any, mesh: Any,
              axes: tuple, sharding: Any) -> _Compiled:
    """The :class:`_Compiled` steps for these settings, from the cache when it has them
    (keyed as the Hessian's shared products: functions by identity; not cached when the
    key is not hashable, a static leaf of params say)."""
    key = (space.trace_key(), loss.loss_fn, loss.batch_size_fn, wd, regularizer, mesh, axes,
           sharding if mesh is not None else None)
    try:
        hash(key)
    except TypeError:
        return _Compiled(space, loss, wd, regularizer, mesh, axes, sharding)
    out = _CACHE.get(key)
    if out is None:
        out = _CACHE[key] = _Compiled(space, loss, wd, regularizer, mesh, axes, sharding)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return out


__all__ = ["gradient"]
