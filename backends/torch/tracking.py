"""Record the Hessian spectrum from a plain PyTorch training loop.

:func:`track` is the PyTorch hook of :class:`specdens.tracker.SpectrumTracker`: at the
tracker's scheduled steps it builds the Hessian (:func:`specdens.backends.torch.hessian`)
and the full-data gradient (:func:`specdens.backends.torch.gradient`) of the mean loss
over ``data``, evaluates the loss and the accuracy there, and records; at other steps it
returns at once. The model is left exactly as it was (parameters, buffers, ``.grad``,
``requires_grad`` and training modes; see :class:`~specdens.backends.torch.ModelState`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from specdens.tracker import SpectrumRecord, SpectrumTracker

from ._data import Batches, batch_count
from ._loss import BatchLoss, split_batch
from .distributed import agree_and_sum, join_failed, no_data_error, resolve_group
from .gradient import gradient
from .hessian import hessian

__all__ = ["evaluate", "track"]


def track(
    tracker: SpectrumTracker,
    model: torch.nn.Module,
    criterion: Callable[[Any, Any], torch.Tensor] | None = None,
    data: Any = None,
    *,
    step: int,
    loss_fn: Callable[[torch.nn.Module, Any], Any] | None = None,
    params: Any = None,
    batch_size_fn: Callable[[Any], Any] | None = None,
    batchnorm: str = "batch",
    weight_decay: float = 0.0,
    accuracy: bool | Callable[[Any, Any], Any] | None = None,
    extra: dict | None = None,
    **hessian_options: Any,
) -> SpectrumRecord | None:
    """Record the spectrum of ``model``'s Hessian at ``step`` if the tracker says it is due.

    Parameters
    ----------
    tracker
        The :class:`~specdens.tracker.SpectrumTracker` (its schedule, ``k``, SLQ settings
        and file).
    model, criterion, data, loss_fn, params, batch_size_fn, batchnorm, weight_decay
        As in :func:`specdens.backends.torch.hessian`: the Hessian and the gradient are
        those of the mean loss over all samples of ``data`` (plus ``weight_decay / 2 *
        ||theta||^2``), with BatchNorm on batch (``"batch"``) or running
        (``"population"``) statistics. ``data`` must yield the same batches on every pass
        (no shuffling).
    step
        The training step.
    accuracy
        ``None`` (default): the fraction of samples whose largest output is the target,
        when outputs are ``(batch, classes)`` and targets class indices (with a
        ``criterion``; otherwise not recorded; targets equal to the criterion's
        ``ignore_index`` do not count); ``False``: not recorded; a callable
        ``accuracy(outputs, targets)``: the batch's mean accuracy (weighted by its number
        of samples; needs a ``criterion``).
    extra
        Further JSON values stored with the record.
    **hessian_options
        Passed to :func:`specdens.backends.torch.hessian` (``method``, ``block``,
        ``graph_memory``, ``check_determinism``, ``regularizer``, ``process_group``).

    Returns
    -------
    SpectrumRecord or None
        The record, or None when ``step`` was not due (nothing is computed then).

    Examples
    --------
    The investigation of ``specdens investigate`` on your own model and data: record the
    spectrum at log-spaced steps of your training loop (``fixed_batches``: the data of the
    Hessian, the same batches on every pass), then plot it::

        from specdens.backends.torch.tracking import track
        from specdens.plotting import plot_runs
        from specdens.tracker import SpectrumTracker, log_spaced_steps

        tracker = SpectrumTracker("spectra.jsonl", steps=log_spaced_steps(1000, 10), k=10)
        step = 0
        for epoch in range(epochs):
            for x, y in loader:
                track(tracker, model, criterion, fixed_batches, step=step)  # when due
                optimizer.zero_grad()
                criterion(model(x), y).backward()
                optimizer.step()
                step += 1
        track(tracker, model, criterion, fixed_batches, step=step)
        plot_runs(SpectrumTracker.load("spectra.jsonl")).savefig("spectra.png")

    A restarted training continues the file: steps already recorded are skipped.
    """
    if not isinstance(tracker, SpectrumTracker):
        raise TypeError(f"tracker must be a SpectrumTracker; got {type(tracker).__name__}")
    if not tracker.due(step):
        return None
    common = dict(loss_fn=loss_fn, params=params, batch_size_fn=batch_size_fn,
                  batchnorm=batchnorm, weight_decay=weight_decay)
    op = hessian(model, criterion, data, **common, **hessian_options)
    grad_opts = {k: v for k, v in hessian_options.items() if k in ("regularizer",
                                                                    "process_group")}
    g = gradient(model, criterion, data, **common, **grad_opts)
    loss, acc = evaluate(model, criterion, data, loss_fn=loss_fn, params=params,
                         batch_size_fn=batch_size_fn, batchnorm=batchnorm, accuracy=accuracy,
                         process_group=hessian_options.get("process_group"))
    return tracker.record(step, op, g, loss=loss, accuracy=acc, extra=extra)


def evaluate(
    model: torch.nn.Module,
    criterion: Callable[[Any, Any], torch.Tensor] | None = None,
    data: Any = None,
    *,
    loss_fn: Callable[[torch.nn.Module, Any], Any] | None = None,
    params: Any = None,
    batch_size_fn: Callable[[Any], Any] | None = None,
    batchnorm: str = "batch",
    accuracy: bool | Callable[[Any, Any], Any] | None = None,
    process_group: Any = None,
) -> tuple[float, float | None]:
    """The mean loss over all samples of ``data`` and the accuracy, without changing the
    model (the same weighting and BatchNorm mode as :func:`~specdens.backends.torch.hessian`;
    no regularisation term).

    With ``torch.distributed`` initialised (or a ``process_group``), ``data`` is this
    rank's shard and both values are those of all the ranks' data together, the same on
    every rank (as for the Hessian and the gradient). Every rank must call it with the
    same model, criterion or ``loss_fn``, ``params`` and ``batchnorm``: one small
    collective sums the ranks' values and checks that, as :func:`hessian` does.

    Returns
    -------
    loss : float
        ``sum_b n_b L_b / sum_b n_b``.
    accuracy : float or None
        See :func:`track`; None when not computed.

    Raises
    ------
    FloatingPointError
        When the loss of some batch is NaN or Inf.
    """
    group = resolve_group(process_group)
    try:
        if data is None:
            raise TypeError("evaluate needs data: one (inputs, targets) batch or an iterable "
                            "of batches")
        if accuracy is not None and accuracy is not False and not callable(accuracy):
            raise TypeError("accuracy must be None (automatic), False or a callable(outputs, "
                            "targets)")
        if callable(accuracy) and criterion is None:
            raise TypeError("accuracy=callable(outputs, targets) needs a criterion and "
                            "(inputs, targets) batches; with loss_fn, compute the accuracy in "
                            "your own code and pass it in extra=")
        loss = BatchLoss(model, criterion, loss_fn, batch_size_fn=batch_size_fn,
                         params=params, batchnorm=batchnorm)
        # loss sum, its weight, correct predictions, samples they are counted over
        sums = [0.0, 0.0, 0.0, 0.0]
        acc_ok = accuracy is not False and criterion is not None
        bad = None      # the first batch of this rank whose loss is not finite
        # grad enabled: loss_fn may differentiate with respect to its inputs (a PINN); the
        # parameters are detached, so no graph of them is built
        with torch.enable_grad():
            # with a process group, this rank's shard may be empty (it adds nothing)
            batches = Batches(data, loss.space.device, allow_empty=group is not None)
            for i, batch in enumerate(batches):
                with batches.at(i):
                    value, count = loss(batch, loss.primal)
                    value = float(value.detach())
                    if bad is None and not math.isfinite(value):
                        bad = i
                    sums[0] += value * count
                    sums[1] += count
                    if acc_ok:
                        inputs, targets = split_batch(batch)
                        out = loss.outputs(inputs, loss.primal)
                        if callable(accuracy):
                            samples = batch_count(batch, batch_size_fn)
                            sums[2] += float(accuracy(out, targets)) * samples
                            sums[3] += samples
                        elif _is_classification(out, targets):
                            ignore = getattr(criterion, "ignore_index", None)
                            keep = (targets != ignore) if isinstance(ignore, int) \
                                else torch.ones_like(targets, dtype=torch.bool)
                            sums[2] += float(((out.argmax(dim=1) == targets) & keep).sum())
                            sums[3] += float(keep.sum())
                        else:
                            acc_ok = False
    except Exception:
        join_failed(group)  # the other ranks learn of it, then this one raises
        raise
    # the sums of all ranks (one small collective, which checks that the ranks agree), and
    # on how many ranks the accuracy could not be computed (all must compute it)
    loss_sum, total, correct, counted, not_ok = agree_and_sum(
        group, loss, kind="evaluate", sums=sums + [float(not acc_ok)])
    if total == 0:      # the same on every rank: all raise
        raise no_data_error(group)
    if not math.isfinite(loss_sum):     # the same on every rank: all raise
        where = f" (batch {bad} of this rank's data)" if bad is not None else ""
        raise FloatingPointError(
            f"the mean loss over the data is {loss_sum / total}: the loss of some batch is "
            f"not finite{where}: a NaN or Inf in the data, an overflowing loss, a float16 "
            "model... specdens never returns such values. Check the data and the model")
    has_acc = not not_ok and counted > 0
    return loss_sum / total, (correct / counted if has_acc else None)


def _is_classification(out: Any, targets: Any) -> bool:
    return (isinstance(out, torch.Tensor) and isinstance(targets, torch.Tensor)
            and out.dim() == 2 and targets.dim() == 1 and out.shape[0] == targets.shape[0]
            and not targets.dtype.is_floating_point and not targets.dtype.is_complex)
