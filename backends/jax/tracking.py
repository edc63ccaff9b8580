"""Record the Hessian spectrum from a JAX training loop.

:func:`track` is the JAX helper of :class:`specdens.tracker.SpectrumTracker`: at the
tracker's scheduled steps it builds the Hessian (:func:`specdens.backends.jax.hessian`)
and the full-data gradient (:func:`specdens.backends.jax.gradient`) of the mean loss at
``params``, evaluates the loss (and an accuracy, if asked) over the same data, and
records; at other steps it returns at once. ``params`` are not changed (JAX arrays are
immutable).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from specdens.tracker import SpectrumRecord, SpectrumTracker

from ._data import count_source, default_count, empty_batch_error, iterate, source
from .gradient import gradient
from .hessian import hessian

__all__ = ["evaluate", "track"]


def track(
    tracker: SpectrumTracker,
    loss_fn: Callable[[Any, Any], Any],
    params: Any,
    data: Any,
    *,
    step: int,
    mask: Any = None,
    batch_size_fn: Callable[[Any], Any] | None = None,
    weight_decay: float = 0.0,
    accuracy_fn: Callable[[Any, Any], Any] | None = None,
    extra: dict | None = None,
    **hessian_options: Any,
) -> SpectrumRecord | None:
    """Record the spectrum of the Hessian at ``params`` if ``step`` is due.

    Parameters
    ----------
    tracker
        The :class:`~specdens.tracker.SpectrumTracker`.
    loss_fn, params, data, mask, batch_size_fn, weight_decay
        As in :func:`specdens.backends.jax.hessian` (``loss_fn(params, batch)`` returns
        the batch's mean loss, or ``(mean_loss, count)``). ``data`` must yield the same
        batches on every pass. ``loss_fn`` is keyed by identity, as :func:`jax.jit`
        keys functions: the Hessian and the gradient of every record after the first
        reuse the products compiled for the first, so whatever ``loss_fn`` reads from
        outside its arguments stays as it was then (only the loss, evaluated eagerly,
        would see a change). State that training updates -- flax ``batch_stats``, a loss
        scale -- goes into ``params`` (left out by ``mask``) or the batch, never into a
        closure or a global::

            def loss_fn(p, batch):
                logits = model.apply({"params": p["params"],
                                      "batch_stats": p["batch_stats"]}, batch[0])
                return cross_entropy(logits, batch[1])

            track(tracker, loss_fn, {"params": params, "batch_stats": batch_stats},
                  fixed, step=step, mask=["params.*"])
    step
        The training step.
    accuracy_fn
        ``accuracy_fn(params, batch) -> mean accuracy of the batch`` (weighted by the
        batch's sample count); default: no accuracy.
    extra
        Further JSON values stored with the record.
    **hessian_options
        Passed to :func:`specdens.backends.jax.hessian` (``regularizer``, ``mesh``,
        ``data_axis``, ``check_data``); ``regularizer``, ``mesh`` and ``data_axis`` also
        to the gradient.

    Returns
    -------
    SpectrumRecord or None
        The record, or None when ``step`` was not due (nothing is computed then).

    Examples
    --------
    >>> tracker = SpectrumTracker("spectra.jsonl", steps=log_spaced_steps(1000, 10))
    ...                                                            # doctest: +SKIP
    >>> for step in range(1001):                                   # doctest: +SKIP
    ...     track(tracker, loss_fn, params, fixed_batches, step=step)
    ...     params, opt_state = train_step(params, opt_state, next(batches))
    """
    if not isinstance(tracker, SpectrumTracker):
        raise TypeError(f"tracker must be a SpectrumTracker; got {type(tracker).__name__}")
    if not tracker.due(step):
        return None
    # the loss first: one forward pass over the data, which refuses what the operators
    # would (a batch with no samples, a NaN loss) before anything is built
    loss, acc = evaluate(loss_fn, params, data, batch_size_fn=batch_size_fn,
                         accuracy_fn=accuracy_fn)
    common = dict(mask=mask, batch_size_fn=batch_size_fn, weight_decay=weight_decay)
    op = hessian(loss_fn, params, data, **common, **hessian_options)
    grad_opts = {k: v for k, v in hessian_options.items()
                 if k in ("regularizer", "mesh", "data_axis")}
    g = gradient(loss_fn, params, data, **common, **grad_opts)
    return tracker.record(step, op, g, loss=loss, accuracy=acc, extra=extra)


def evaluate(loss_fn: Callable[[Any, Any], Any], params: Any, data: Any, *,
             batch_size_fn: Callable[[Any], Any] | None = None,
             accuracy_fn: Callable[[Any, Any], Any] | None = None
             ) -> tuple[float, float | None]:
    """The mean loss over all samples of ``data`` (batches weighted by their counts, as
    the Hessian weights them; no regularisation term) and the mean accuracy
    (``accuracy_fn``, or None).

    ``loss_fn`` sees the batches the operators see (array-like leaves, such as the
    tensors of a torch ``DataLoader``, as numpy arrays). As in the Hessian, every batch
    must hold samples: a batch whose count is 0 raises a ValueError naming it; counts
    must be finite and non-negative.

    Raises
    ------
    FloatingPointError
        When the loss of a batch is NaN or Inf (named); such a value is never returned.
    ValueError
        When a batch holds no samples or a count is negative or not finite (named).
    """
    if data is None:
        raise TypeError("evaluate needs data: one batch or a re-iterable of batches")
    _, batches = source(data)
    total = loss_sum = acc_sum = 0.0
    for i, batch in enumerate(iterate(batches)):
        out = loss_fn(params, batch)
        pair = isinstance(out, (tuple, list))
        if pair:
            value, count = out
            count = float(np.asarray(jax.device_get(count)))
        else:
            value = out
            count = float(batch_size_fn(batch) if batch_size_fn is not None
                          else default_count(batch))
        if not (math.isfinite(count) and count >= 0):
            raise ValueError(f"batch {i} of the data: sample count {count}: counts must be "
                             "finite and non-negative (check loss_fn's count or "
                             "batch_size_fn)")
        if count == 0:
            raise empty_batch_error(i, count_source(pair, batch_size_fn))
        value = float(np.asarray(jax.device_get(value)))
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the loss of batch {i} of the data is {value}: a NaN or Inf in the data, an "
                "overflowing loss, a float16 model... specdens never returns such values. "
                "Check the data and the model")
        loss_sum += value * count
        total += count
        if accuracy_fn is not None:
            acc_sum += float(np.asarray(jax.device_get(accuracy_fn(params, batch)))) * count
    loss = loss_sum / total
    if not math.isfinite(loss):
        raise FloatingPointError(f"the mean loss over the data is {loss} (an overflow of the "
                                 "sum of the batches' losses); check the data and the model")
    return loss, (acc_sum / total if accuracy_fn is not None else None)
