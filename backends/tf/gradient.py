"""The gradient of a model's mean training loss over the whole data set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from specdens import _checks

from ._data import Batches, checked_total
from ._kernel import kernel_for
from ._loss import BatchLoss
from .distributed import distribute, resolve_strategy


def gradient(
    model: Any,
    loss: Callable[[Any, Any], Any] | None = None,
    data: Any = None,
    *,
    loss_fn: Callable[..., Any] | None = None,
    params: Any = None,
    batch_size_fn: Callable[[Any], Any] | None = None,
    batchnorm: str = "batch",
    weight_decay: float = 0.0,
    regularizer: Callable[[dict], Any] | None = None,
    strategy: Any = None,
) -> tf.Tensor:
    """The full-data gradient ``g = sum_b (n_b / N) grad L_b + grad P + weight_decay *
    theta + grad R`` as a flat vector in the space of :func:`hessian` called with the same
    options (with a ``loss``, ``L_b`` includes the losses a Keras model adds while it is
    called and ``P`` is the sum of its weight regularisers: ``model.losses``, as in
    :func:`hessian`).

    Parameters
    ----------
    model, loss, data, loss_fn, params, batch_size_fn, batchnorm, weight_decay,
    regularizer, strategy
        As in :func:`specdens.backends.tf.hessian` (same weighting of uneven batches,
        same variable order, same reduction over ``tf.distribute`` replicas). The model is
        not modified.

    Returns
    -------
    tf.Tensor
        Shape ``(n,)``, the variables' dtype, on their device.

    Raises
    ------
    FloatingPointError
        When the gradient has a NaN or Inf entry (checked once, on the final vector); the
        message names the variables concerned.

    References
    ----------
    B. Ghorbani, S. Krishnan, Y. Xiao (2019), An Investigation into Neural Net Optimization
    via Hessian Eigenvalue Density, ICML (section 4: the gradient and the outlier
    eigenspace).
    """
    if data is None:
        raise TypeError("gradient needs data: one (inputs, targets) batch, a tf.data.Dataset "
                        "or an iterable of batches")
    weight_decay = _checks.finite_number(weight_decay, "weight_decay")
    if regularizer is not None and not callable(regularizer):
        raise TypeError("regularizer must be a callable(params: dict[str, Tensor]) -> scalar")
    batch_loss = BatchLoss(model, loss, loss_fn, batch_size_fn=batch_size_fn, params=params,
                           batchnorm=batchnorm)
    space = batch_loss.space
    adapter = batch_loss.adapter
    strategy = resolve_strategy(strategy, adapter.variables)
    kernel = kernel_for(batch_loss, method="reverse", block="loop", strategy=strategy,
                        regularizer=regularizer)
    values = adapter.snapshot()
    batches = Batches(data)
    dist = distribute(strategy, batches.as_dataset()) if strategy is not None else None
    spec = dist.element_spec if dist is not None else None
    acc, total, reg, counts = None, None, None, []
    with adapter.bound(values):
        for batch in (dist if dist is not None else batches):
            g, count, _ = kernel("grad", values, batch, batch_spec=spec)
            acc = g if acc is None else acc + g
            total = count if total is None else total + count
            counts.append(count)
        if regularizer is not None or batch_loss.has_weight_penalty:
            # inside the block: a tf.Module's regulariser reads its variables (the values
            # of the snapshot only here; the same values in a gradient's single pass)
            reg = kernel("reg_grad", values, None)
    checked_total(counts)  # (as the operators check them)
    out = acc / tf.cast(total, acc.dtype)
    if weight_decay:
        theta = space.flatten([values[i] for i in batch_loss.selected])
        out = out + tf.constant(float(weight_decay), dtype=out.dtype) * theta
    if reg is not None:
        out = out + reg
    _check_finite(out, space)
    with tf.device(space.device):
        return tf.identity(out)


def _check_finite(g: tf.Tensor, space: Any) -> None:
    """Raise a FloatingPointError naming the variables whose gradient has a NaN or Inf
    entry (one read-back of a flag; the per-variable counts only when it is raised)."""
    if bool(tf.reduce_all(tf.math.is_finite(g)).numpy()):
        return
    parts = space.split(g)
    bad = [(name, int(tf.reduce_sum(tf.cast(~tf.math.is_finite(p), tf.int64)).numpy()),
            int(tf.size(p).numpy())) for name, p in zip(space.names, parts, strict=True)]
    bad = [b for b in bad if b[1]]
    total = sum(b[1] for b in bad)
    where = ", ".join(f"{name} ({k} of {size})" for name, k, size in bad[:8])
    more = f" and {len(bad) - 8} more variables" if len(bad) > 8 else ""
    raise FloatingPointError(
        f"the gradient has NaN or Inf in {total} of its {int(tf.size(g).numpy())} entries, "
        f"in the variables {where}{more}: the loss of some batch is not finite (a NaN or "
        "Inf in the data, an overflowing loss, a float16 model); specdens never returns "
        "such values. Check the data and the model")
