"""Record the Hessian spectrum during Keras ``model.fit``: :class:`SpectrumCallback`.

The callback counts training batches (train steps) across epochs (and across ``fit``
calls); at every step the tracker has scheduled it builds the Hessian
(:func:`specdens.backends.tf.hessian`) and the full-data gradient
(:func:`specdens.backends.tf.gradient`) of the mean loss over fixed data at the current
weights, evaluates the loss and the accuracy there, and records. Step ``s`` is the model
after ``s`` training batches (train steps): recorded before batch ``s`` is trained on,
and the last one at the end of training. The steps are counted on the host from the
batch indices Keras passes to the callback, whatever the train step does with its
batches (a custom ``train_step``, an optimizer with ``gradient_accumulation_steps``): no
value is read from the device. With ``compile(steps_per_execution=m)``, ``m > 1``, Keras
calls the callback only between executions of ``m`` steps, so a scheduled step inside an
execution is recorded at the first execution boundary after it, under that boundary's
true step number (see :class:`SpectrumCallback`). The model is not changed: the
operators work on copies of the variables, and the loss is evaluated inside a
``keras.StatelessScope`` (BatchNorm moving statistics are not updated).

Importing this module imports TensorFlow and Keras.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from specdens.tracker import SpectrumRecord, SpectrumTracker

from ._data import as_count, as_tensors, is_single_batch
from ._loss import (
    _plain_loss_of_masked_outputs,
    _reduction,
    ignore_class_of,
    kept_count,
    masked_count,
    output_mask,
    reads_output_mask,
    unscaled_keras_losses,
)
from .gradient import gradient
from .hessian import hessian

__all__ = ["SpectrumCallback", "evaluate"]


class SpectrumCallback(keras.callbacks.Callback):
    """A Keras callback that records the Hessian spectrum at the tracker's steps.

    Parameters
    ----------
    tracker
        The :class:`~specdens.tracker.SpectrumTracker` (schedule, settings, file).
    loss
        The Keras loss (called ``loss(y_true, y_pred)``), usually the one given to
        ``compile``.
    data
        The data of the Hessian: one ``(inputs, targets)`` batch or a list of them (or a
        ``tf.data.Dataset`` without shuffling): the same batches on every pass.
    batchnorm, weight_decay, params
        As in :func:`specdens.backends.tf.hessian`.
    initial_step
        The step count at the first batch (e.g. when continuing a restarted training).
        Steps are counted from there: one per training batch of each ``fit`` (the batch
        indices Keras passes to the callback, not the optimizer's ``iterations``, which
        a custom ``train_step`` with its own optimizer leaves at 0 and gradient
        accumulation advances once per update).
    accuracy
        ``None`` (default): the fraction of samples whose largest output is the integer
        target, when outputs are ``(batch, classes)`` with ``classes > 1`` and integer
        targets ``(batch,)`` or ``(batch, 1)`` (as ``keras.datasets`` gives them; Keras's
        ``SparseCategoricalAccuracy``); otherwise none (``None``), e.g. for the single
        output of a binary classifier, whose threshold the callback cannot know;
        ``False``: no accuracy.
    **hessian_options
        Passed to :func:`specdens.backends.tf.hessian` (``method``, ``block``,
        ``check_determinism``, ``strategy``, ``batch_size_fn``...). ``regularizer``,
        ``strategy`` and ``batch_size_fn`` also go to :func:`~specdens.backends.tf.gradient`,
        and ``batch_size_fn`` to :func:`evaluate`, so that the recorded gradient and loss
        weight the batches as the Hessian does.

    Notes
    -----
    Keras runs ``compile(steps_per_execution=m)`` steps per call of its train function
    and calls the callback only between these calls, where the model is after a multiple
    of ``m`` steps (and after the shorter last execution of an epoch): Keras passes the
    execution's first batch index to ``on_train_batch_begin`` and its last one (as if it
    were complete) to ``on_train_batch_end``; the last execution of an epoch is counted
    up to the epoch's number of batches as Keras reports it (``params["steps"]``). Where
    that is not what runs, the count of such an epoch is off by less than ``m``: data of
    unknown length (a ``tf.data.Dataset`` of unknown cardinality without
    ``steps_per_epoch``) gives no number, so a shorter last execution counts as ``m``
    steps; and with ``steps_per_epoch`` not a multiple of ``m`` on repeated data, Keras
    runs whole executions (8 batches an epoch for ``steps_per_epoch=7``, ``m = 4``)
    where ``steps_per_epoch`` are counted. A scheduled step that falls inside an
    execution cannot be recorded at its exact weights: it is recorded at the first
    boundary after it, under the boundary's step (the number of training batches the
    recorded model has taken, never the scheduled number), with
    ``extra["scheduled_steps"]``: the scheduled steps that record stands for (several
    scheduled steps within one execution give one record). With ``m = 1`` every
    scheduled step is recorded exactly. To record exactly at the schedule, compile with
    ``steps_per_execution=1`` or choose scheduled steps on the boundaries.

    Attributes
    ----------
    step : int
        Training batches (train steps) counted so far.
    records : list of SpectrumRecord
        What this callback recorded.

    Examples
    --------
    >>> tracker = SpectrumTracker("spectra.jsonl", steps=log_spaced_steps(1000, 10))
    ...                                                            # doctest: +SKIP
    >>> cb = SpectrumCallback(tracker, loss, (x_train[:2048], y_train[:2048]))
    ...                                                            # doctest: +SKIP
    >>> model.fit(x_train, y_train, batch_size=128, epochs=10, callbacks=[cb])
    ...                                                            # doctest: +SKIP
    """

    def __init__(self, tracker: SpectrumTracker, loss: Callable[[Any, Any], Any], data: Any,
                 *, batchnorm: str = "batch", weight_decay: float = 0.0, params: Any = None,
                 initial_step: int = 0, accuracy: bool | None = None,
                 **hessian_options: Any):
        super().__init__()
        if not isinstance(tracker, SpectrumTracker):
            raise TypeError(f"tracker must be a SpectrumTracker; got {type(tracker).__name__}")
        if data is None:
            raise TypeError("SpectrumCallback needs data: one (inputs, targets) batch or a "
                            "list of them")
        if accuracy not in (None, False):
            raise TypeError("accuracy must be None (automatic) or False")
        if isinstance(initial_step, bool) or not isinstance(initial_step, int) \
                or initial_step < 0:
            raise ValueError(f"initial_step must be an integer >= 0; got {initial_step!r}")
        self.tracker = tracker
        self.loss = loss
        self.data = data
        self.batchnorm = batchnorm
        self.weight_decay = weight_decay
        self.variables = params  # not self.params: Keras sets that to the fit settings
        self.accuracy = accuracy
        self.hessian_options = hessian_options
        self.step = initial_step
        self.records: list[SpectrumRecord] = []
        self._epoch_start: int | None = None  # self.step at the epoch's start, in fit
        self._checked: int | None = None  # the last step whose schedule was looked at

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._epoch_start = self.step

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = self.step

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self._epoch_start is not None:  # batch: the execution's first batch index
            self.step = self._epoch_start + int(batch)
        self._maybe_record()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._epoch_start is None:  # called outside fit: one step per batch
            self.step += 1
            return
        # batch: the execution's last batch index, as if the execution were complete
        # (steps_per_execution > 1); the last execution of an epoch stops at its end
        done = int(batch) + 1
        steps = (self.params or {}).get("steps")
        if steps:
            done = min(done, int(steps))
        self.step = self._epoch_start + done

    def on_train_end(self, logs: dict | None = None) -> None:
        self._maybe_record()
        self._epoch_start = None

    def _scheduled(self, step: int) -> list[int]:
        """The scheduled steps, not yet recorded, that the model at ``step`` stands for:
        ``step`` itself and those since the last step looked at (inside an execution of
        ``steps_per_execution > 1`` steps, where the callback is not called)."""
        low = step if self._checked is None or self._checked >= step else self._checked + 1
        self._checked = step
        schedule = self.tracker.schedule
        if schedule is None or low == step:
            return [step] if self.tracker.due(step) else []
        return sorted(t for t in schedule if low <= t <= step and self.tracker.due(t))

    def _maybe_record(self) -> None:
        scheduled = self._scheduled(self.step)
        if not scheduled or self.step in self.tracker.recorded_steps:
            return
        extra = {"epoch_step": self.step}
        if scheduled != [self.step]:
            extra["scheduled_steps"] = scheduled
        common = dict(params=self.variables, batchnorm=self.batchnorm,
                      weight_decay=self.weight_decay)
        op = hessian(self.model, self.loss, self.data, **common, **self.hessian_options)
        grad_opts = {k: v for k, v in self.hessian_options.items()
                     if k in ("regularizer", "strategy", "batch_size_fn")}
        g = gradient(self.model, self.loss, self.data, **common, **grad_opts)
        loss, acc = evaluate(self.model, self.loss, self.data, batchnorm=self.batchnorm,
                             accuracy=self.accuracy,
                             batch_size_fn=self.hessian_options.get("batch_size_fn"))
        self.records.append(self.tracker.record(self.step, op, g, loss=loss, accuracy=acc,
                                                extra=extra))


def evaluate(model: Any, loss: Callable[[Any, Any], Any], data: Any, *,
             batchnorm: str = "batch", accuracy: bool | None = None,
             batch_size_fn: Callable[[Any], Any] | None = None
             ) -> tuple[float, float | None]:
    """The mean loss over all samples of ``data`` (batches weighted by size) and the
    accuracy, with BatchNorm on batch statistics (``training=True``, inside a
    ``keras.StatelessScope`` so that no moving statistic changes) or on its moving
    statistics (``training=False``); the model is not changed.

    Batches are weighted as in :func:`specdens.backends.tf.hessian`: a Keras loss with
    ``reduction="sum"`` gives each batch's total, which counts as is (the mean over the
    data is the same as with the default reduction); ``reduction="none"`` raises a
    ValueError. A Keras loss with ``ignore_class`` averages over the targets that are not
    ``ignore_class`` (and so does the accuracy); a batch whose targets are all ignored
    counts for nothing. So does a Keras loss of outputs that carry a Keras mask
    (``Embedding(mask_zero=True)``, ``Masking``): each batch counts the mask's sum (with
    ``ignore_class``, its entries whose target is not ignored), as Keras divides by it,
    and a fully masked batch counts for nothing (the accuracy of ``(batch, classes)``
    outputs with a ``(batch,)`` mask counts the unmasked samples); a plain callable loss
    of masked outputs raises a ValueError. ``batch_size_fn(batch) -> count``, as in
    :func:`specdens.backends.tf.hessian`, overrides all these counts (a batch of count 0
    counts for nothing; a negative or non-finite count raises a ValueError). Inside a
    ``tf.distribute`` strategy's scope, Keras divides a mean loss by the number of
    replicas (unless its ``call`` returns a scalar); the loss is evaluated where it does
    not, so the value is the data's mean loss in or out of a scope. The model's own losses
    (``model.losses``, which :func:`specdens.backends.tf.hessian` includes) are left
    out: the value is the data term alone."""
    if batchnorm not in ("batch", "population"):
        raise ValueError(f"batchnorm={batchnorm!r}; choose 'batch' or 'population'")
    if batch_size_fn is not None and not callable(batch_size_fn):
        raise TypeError("batch_size_fn must be a callable(batch) -> number of samples")
    has_bn = any(isinstance(layer, keras.layers.BatchNormalization)
                 for layer in getattr(model, "_flatten_layers", lambda: [])())
    training = batchnorm == "batch" and has_bn
    reduction = _reduction(loss)  # "mean" or "sum" (the batch's total, divided by n)
    ignore = ignore_class_of(loss)
    batches = [data] if is_single_batch(data) else data
    total = loss_sum = correct = samples = 0.0
    acc_ok = accuracy is None
    for batch in batches:
        x, y = batch[0], batch[1]
        with keras.StatelessScope():
            out = model(x, training=training)
        mask = output_mask(out)  # the loss's own denominator, as BatchLoss.loss_count
        if batch_size_fn is not None:
            n = float(as_count(batch_size_fn(as_tensors(batch)), "batch_size_fn").numpy())
            if not (np.isfinite(n) and n >= 0):
                raise ValueError(f"batch_size_fn returned {n} for a batch; sample counts "
                                 "must be finite and >= 0")
        elif mask is not None:
            if not reads_output_mask(loss):
                raise ValueError(_plain_loss_of_masked_outputs(loss))
            n = float(masked_count(mask, y, out, loss).numpy())
        elif ignore is None:
            n = float(tf.shape(out)[0].numpy())
        else:
            n = float(kept_count(y, ignore, loss.dtype).numpy())
        if n == 0:
            continue  # no sample (every target ignored, every output masked): counts nothing
        with unscaled_keras_losses():  # the share's plain mean, as in BatchLoss
            value = float(loss(y, out))
        loss_sum += value if reduction == "sum" else value * n  # as BatchLoss.output_loss
        total += n
        if acc_ok:
            yv = np.asarray(y)
            ov = np.asarray(out)
            classes = ov.ndim == 2 and ov.shape[1] > 1  # one output: no argmax class
            if classes and yv.ndim == 2 and yv.shape[1] == 1:
                yv = yv[:, 0]  # (batch, 1) labels (keras.datasets), as Keras's accuracy
            if classes and yv.ndim == 1 and yv.dtype.kind in "iu":
                keep = yv != ignore if ignore is not None else np.ones(yv.shape, bool)
                if mask is not None:
                    mv = np.asarray(mask)
                    if mv.shape != yv.shape:
                        acc_ok = False
                        continue
                    keep &= mv.astype(bool)
                correct += float(np.sum((np.argmax(ov, axis=1) == yv) & keep))
                samples += float(np.sum(keep))
            else:
                acc_ok = False
    if total <= 0:
        raise ValueError("data yielded no samples (every batch is empty, or all its targets "
                         "are the loss's ignore_class)")
    return loss_sum / total, (correct / samples if acc_ok and samples > 0 else None)
