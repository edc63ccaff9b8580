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

from ._data import default_count, is_single_batch
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
        batches on every pass.
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
    common = dict(mask=mask, batch_size_fn=batch_size_fn, weight_decay=weight_decay)
    op = hessian(loss_fn, params, data, **common, **hessian_options)
    grad_opts = {k: v for k, v in hessian_options.items()
                 if k in ("regularizer", "mesh", "data_axis")}
    g = gradient(loss_fn, params, data, **common, **grad_opts)
    loss, acc = evaluate(loss_fn, params, data, batch_size_fn=batch_size_fn,
                         accuracy_fn=accuracy_fn)
    return tracker.record(step, op, g, loss=loss, accuracy=acc, extra=extra)


def evaluate(loss_fn: Callable[[Any, Any], Any], params: Any, data: Any, *,
             batch_size_fn: Callable[[Any], Any] | None = None,
             accuracy_fn: Callable[[Any, Any], Any] | None = None
             ) -> tuple[float, float | None]:
    """The mean loss over all samples of ``data`` (batches weighted by their counts, as
    the Hessian weights them; no regularisation term) and the mean accuracy
    (``accuracy_fn``, or None).

    As in the Hessian, a batch whose count is 0 (all padding, with ``loss_fn`` returning
    ``(mean_loss, count)``) counts for nothing, although its mean loss is 0/0; counts
    must be finite and non-negative, and their total positive (a ValueError otherwise).
    """
    if data is None:
        raise TypeError("evaluate needs data: one batch or a re-iterable of batches")
    batches = [data] if is_single_batch(data) else data
    total = loss_sum = acc_sum = 0.0
    for batch in batches:
        out = loss_fn(params, batch)
        if isinstance(out, (tuple, list)):
            value, count = out
            count = float(np.asarray(jax.device_get(count)))
        else:
            value = out
            count = float(batch_size_fn(batch) if batch_size_fn is not None
                          else default_count(batch))
        if not (math.isfinite(count) and count >= 0):
            raise ValueError(f"a batch has a sample count of {count}; counts must be finite "
                             "and >= 0")
        if count == 0:
            continue  # an empty batch: its 0/0 mean loss does not count, as in _pass.weighted
        loss_sum += float(np.asarray(jax.device_get(value))) * count
        total += count
        if accuracy_fn is not None:
            acc_sum += float(np.asarray(jax.device_get(accuracy_fn(params, batch)))) * count
    if total <= 0:
        raise ValueError("data yielded no samples (every batch has a count of 0): the mean "
                         "loss is undefined")
    return loss_sum / total, (acc_sum / total if accuracy_fn is not None else None)
