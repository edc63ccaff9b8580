"""The generalised Gauss-Newton matrix ``G = sum_b (n_b / N) J_b^T H_b J_b``.

``J_b`` is the Jacobian of the model's outputs on batch ``b`` with respect to the selected
leaves and ``H_b`` the Hessian of the criterion with respect to those outputs. ``G`` is
the Hessian with the second-derivative terms of the network dropped: positive
semi-definite whenever the criterion is convex in the outputs (cross-entropy, squared
error).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from ._data import count_source, default_count, explain_one_batch
from ._loss import BatchLoss, _scalar, host_count
from ._operator import DataOperator
from ._params import ParamSpace


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch for a model and a criterion."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    length = f" of length {len(batch)}" if hasattr(batch, "__len__") else ""
    raise ValueError(f"ggn needs every batch to be (inputs, targets); got a "
                     f"{type(batch).__name__}{length}")


class GGNOperator(DataOperator):
    """``G v`` by ``J v`` (:func:`jax.linearize` of the model), ``H_out`` (forward-over-
    reverse on the criterion) and ``J^T`` (:func:`jax.linear_transpose`): one forward pass
    of the model per batch and block, the three linear maps vectorised over the block."""

    def __init__(self, model_fn: Callable[[Any, Any], Any], criterion: Callable[[Any, Any], Any],
                 space: ParamSpace, data: Any, *, batch_size_fn: Any, **kw: Any):
        if not callable(model_fn):
            raise TypeError(f"model_fn must be a callable(params, inputs) -> outputs; got "
                            f"{type(model_fn).__name__}")
        if not callable(criterion):
            raise TypeError(f"criterion must be a callable(outputs, targets) -> mean loss; got "
                            f"{type(criterion).__name__}")
        self.model_fn = model_fn
        self.criterion = criterion
        self.counter = BatchLoss(lambda p, b: None, batch_size_fn)
        super().__init__(space, data, **kw)

    _TRACE_ATTRS = ("model_fn", "criterion", "counter")

    def _kernel_key(self) -> tuple:
        return (self.model_fn, self.criterion, self.counter.batch_size_fn)

    def _outputs_fn(self, frozen: Any, inputs: Any) -> Callable[[Any], Any]:
        return lambda x: self.model_fn(self.space.combine(x, frozen), inputs)

    def _crit(self, targets: Any) -> Callable[[Any], Any]:
        return lambda out: _scalar(self.criterion(out, targets), "criterion")

    def _kernel(self, consts: Any, batch: Any, V: Any) -> tuple[Any, Any]:
        x0, frozen = consts
        inputs, targets = split_batch(batch)
        out, jvp = jax.linearize(self._outputs_fn(frozen, inputs), x0)
        vjp = jax.linear_transpose(jvp, x0)
        grad_out = jax.grad(self._crit(targets))

        def one(v: Any) -> Any:
            jv = jvp(v)
            _, hjv = jax.jvp(grad_out, (out,), (jv,))
            return vjp(hjv)[0]

        return jax.vmap(one)(V.T), self.counter.count(batch, self.acc_dtype)

    def _count_kernel(self, consts: Any, batch: Any, _: Any) -> tuple[Any, Any]:
        return None, self.counter.count(batch, self.acc_dtype)

    def _count_source(self) -> str:
        return count_source(False, self.counter.batch_size_fn)

    def _host_count(self, batch: Any) -> float | None:
        return host_count(self.counter.batch_size_fn, batch)

    def _check_loss(self) -> None:
        batch = self.batches.first()
        inputs, targets = split_batch(batch)
        if self.counter.batch_size_fn is None:
            default_count(batch)

        def f(consts: Any, inputs: Any, targets: Any) -> Any:
            out = self._outputs_fn(consts[1], inputs)(consts[0])
            return self._crit(targets)(out)

        hint = self.batches.one_batch_hint(
            "if it is a list of batches, make every batch a pair (inputs, targets)")
        with explain_one_batch(hint, "model_fn or criterion"):
            jax.eval_shape(f, self.consts, inputs, targets)


def ggn(
    model_fn: Callable[[Any, Any], Any],
    criterion: Callable[[Any, Any], Any],
    params: Any,
    data: Any,
    *,
    mask: Any = None,
    batch_size_fn: Callable[[Any], Any] | None = None,
    weight_decay: float = 0.0,
    mesh: Any = None,
    data_axis: str | tuple[str, ...] | None = None,
    check_data: bool = True,
) -> GGNOperator:
    """The generalised Gauss-Newton matrix of the mean loss as a specdens operator.

    ``G = sum_b (n_b / N) J_b^T H_b J_b + weight_decay * I`` with ``J_b`` the Jacobian of
    ``model_fn(params, inputs_b)`` (all outputs of the batch) in the selected leaves and
    ``H_b`` the Hessian of ``criterion(outputs, targets_b)`` in the outputs. The loss is
    ``criterion(model_fn(params, inputs), targets)``: the split the GGN needs, as the
    torch backend's ``ggn(model, criterion, data)``.

    Parameters
    ----------
    model_fn
        ``model_fn(params, inputs) -> outputs`` (an array or any pytree of arrays), e.g.
        ``model.apply`` for flax.
    criterion
        ``criterion(outputs, targets)`` returning the batch's *mean* loss (a scalar).
    params, data, mask, batch_size_fn, weight_decay, mesh, data_axis, check_data
        As in :func:`specdens.backends.jax.hessian` (what ``check_data`` does not see --
        arrays of a list of batches changed in place -- and the copy of the data
        that the compiled loop keeps too; a batch with no samples raises a ValueError
        naming it); every batch is a pair ``(inputs, targets)``. A ``regularizer`` is not
        part of a GGN (its Hessian is not of the form ``J^T H J``); add it to the operator
        yourself if you want it.

    Returns
    -------
    GGNOperator
        Same vector space as ``hessian(...)`` with the same params and mask.

    Notes
    -----
    ``model_fn``, ``criterion`` and ``batch_size_fn`` are keyed by identity, as
    :func:`jax.jit` keys functions (see :func:`specdens.backends.jax.hessian`, Notes):
    later operators built from the same function objects reuse the compiled products, and
    what those functions read from outside their arguments (captured values, globals, a
    bound method's ``self``, state changed in place) is fixed at the first trace. Pass
    values that change through ``params`` (a leaf left out by ``mask``) or the batch.

    References
    ----------
    N. N. Schraudolph (2002), Fast curvature matrix-vector products for second-order
    gradient descent, Neural Computation 14(7). J. Martens (2020), New insights and
    perspectives on the natural gradient method, JMLR 21.
    """
    space = ParamSpace(params, mask)
    return GGNOperator(model_fn, criterion, space, data, batch_size_fn=batch_size_fn,
                       weight_decay=weight_decay, regularizer=None, mesh=mesh,
                       data_axis=data_axis, check_data=check_data)


__all__ = ["GGNOperator", "ggn"]
