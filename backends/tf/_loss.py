"""The loss of one batch as a function of the selected variables, inside a traced function.

:class:`BatchLoss` holds what the traced functions need: the model adapter (how to call
the model at given values), the loss, which variables are selected, and their flat space.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from ._data import as_count, count_of
from ._params import ParamSpace, select_variables
from ._state import ModelAdapter, _sublayers

MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight", "auto")


class BatchLoss:
    """Mean loss of one batch, and its sample count, at given values of the variables.

    Parameters
    ----------
    model, loss, loss_fn, batch_size_fn, params, batchnorm
        As in :func:`specdens.backends.tf.hessian`.
    """

    def __init__(self, model: Any, loss: Any, loss_fn: Any, *, batch_size_fn: Any,
                 params: Any, batchnorm: str):
        if (loss is None) == (loss_fn is None):
            raise TypeError("pass exactly one of loss (called as loss(targets, model(inputs)), "
                            "the Keras order) and loss_fn=lambda model, batch: ...")
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError("batch_size_fn must be a callable(batch) -> number of samples")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
        self.adapter = ModelAdapter(model, batchnorm)
        self.model = model
        self.loss = loss
        self.loss_fn = loss_fn
        self.batch_size_fn = batch_size_fn
        self.reduction = "mean"
        if loss is not None:
            if not callable(loss):
                raise TypeError(f"loss must be a Keras loss or a callable(y_true, y_pred); got "
                                f"{type(loss).__name__}")
            self.reduction = _reduction(loss)
        self.selected = select_variables(self.adapter.variables, self.adapter.trainable,
                                         params, self.adapter.owner,
                                         prefix=f"{getattr(model, 'name', '')}/")
        names = [self.adapter.names[i] for i in self.selected]
        self.space = ParamSpace(names, [self.adapter.variables[i] for i in self.selected])
        _check_compute_dtype(self.adapter, self.space.dtype,
                             [self.adapter.variables[i] for i in self.selected])
        if loss is not None:
            _check_loss_dtype(loss, self.space.dtype)
        # the model's own losses (model.losses: weight regularisers, activity regularisers,
        # add_loss) are part of the objective of a `loss` (what model.fit minimises); a
        # loss_fn writes its objective itself
        self.model_losses = self.adapter.keras and loss is not None
        self.has_weight_penalty = self.model_losses and bool(weight_regularized(model))
        self.ignore_class = ignore_class_of(loss)
        self.reads_mask = reads_output_mask(loss)
        self._fn_takes_training = loss_fn is not None and _takes_training(loss_fn)
        if loss_fn is not None and not self._fn_takes_training and self.adapter.training:
            # its calls of the model cannot receive the flag: Keras runs them in
            # inference mode, on the moving statistics, and the operator built for
            # batchnorm="batch" was silently the population-statistics Hessian
            raise ValueError(
                "batchnorm='batch' (the default) puts the model's BatchNormalization layers "
                "on the statistics of each batch by calling it with training=True, but "
                "loss_fn takes no `training` keyword to receive that flag, so its calls of "
                "the model would normalise by the moving statistics. Add the keyword and "
                "pass it on (def loss_fn(model, batch, training): ... model(x, "
                "training=training)), or pass batchnorm='population' for the moving "
                "statistics")
        # why a loss_fn's bare mean is over masked outputs (None: it is not): refused
        # where the model's outputs are known to carry a mask; a subclassed model whose
        # mask-making layers may or may not reach its outputs gets a warning instead
        # (a mask consumed on the way, by an RNN or a pooling layer, changes nothing)
        self._masked_outputs = None
        reason = masked_outputs_reason(model) if loss_fn is not None else None
        if reason is not None and batch_size_fn is None:
            if reason.startswith(MAYBE_MASKED):
                warnings.warn(
                    f"{reason}. If they do and loss_fn applies a Keras loss object to "
                    "them, its mean is over the unmasked entries, not the batch's samples: "
                    "return (mean_loss, count) from loss_fn with that count, or pass "
                    "batch_size_fn, or the batches would be weighed wrongly", UserWarning,
                    stacklevel=4)
            else:
                self._masked_outputs = reason

    # -- identity of the traced computation ---------------------------------------------
    def key(self) -> tuple:
        """What a traced function of this loss depends on besides its tensor arguments:
        among others the identities (``id``) of the model's variables, which a traced
        function captures (a ``tf.Module`` attribute given a new ``tf.Variable`` needs a
        new trace). An ``id`` can be reused once its variable is gone: the kernel keeps
        weak references to the variables it was traced with and is rebuilt when they are
        not the current ones (:func:`specdens.backends.tf._kernel.kernel_for`)."""
        return (self.adapter.keras, self.adapter.training, tuple(self.selected),
                tuple(id(v) for v in self.adapter.variables), _callable_key(self.loss),
                _callable_key(self.loss_fn), _callable_key(self.batch_size_fn),
                self.reduction, self.model_losses,
                _penalties_key(self.adapter) if self.model_losses else None)

    # -- the loss (inside traced functions) ---------------------------------------------
    def handles(self, values: list[Any]) -> list[Any]:
        """The differentiable stand-ins of the selected variables: the value tensors for
        Keras models, the variables themselves for a ``tf.Module``."""
        if self.adapter.keras:
            return [values[i] for i in self.selected]
        return [self.adapter.variables[i] for i in self.selected]

    def mapping(self, values: list[Any], handles: list[Any]) -> list[Any]:
        """``values`` with the selected entries replaced by ``handles``."""
        if not self.adapter.keras:
            return values
        out = list(values)
        for i, h in zip(self.selected, handles, strict=True):
            out[i] = h
        return out

    def __call__(self, values: list[Any], handles: list[Any], batch: Any) -> tuple[Any, Any]:
        """``(mean loss, count)`` of ``batch`` with the selected variables at ``handles``
        and the others at ``values``; both float64 count and a scalar loss.

        With a ``loss``, the mean loss includes the losses the Keras model adds while it is
        called on the batch (activity regularisers, ``add_loss``), as in ``model.fit``;
        its weight regularisers are added once per pass instead
        (:meth:`weight_penalty`)."""
        with self.adapter.scope(self.mapping(values, handles)) as scope:
            if self.loss_fn is not None:
                return self._custom(batch)
            inputs, targets = split_batch(batch)
            outputs = self.adapter.call(inputs)
            count = self.loss_count(batch, inputs, targets, outputs)
            value = self.output_loss(targets, outputs, count)
            if self.model_losses and scope is not None and scope.losses:
                value = value + self._added_losses(scope.losses, outputs, value.dtype)
            return value, count

    def _added_losses(self, losses: list[Any], outputs: Any, dtype: tf.DType) -> tf.Tensor:
        """The sum of the losses the model added during its call on a batch (each summed
        over its entries, as Keras's ``compute_loss`` does), in ``dtype``. They are weighted
        with the batch's count like the loss; Keras divides an activity regulariser by the
        batch's sample count, so that weighting makes the penalty of all the data at once
        only where the count is the number of samples: a count of unmasked entries or of
        targets that are not ``ignore_class`` raises a ValueError."""
        if self.batch_size_fn is None and (output_mask(outputs) is not None
                                           or self.ignore_class is not None):
            what = ("carry a Keras mask (each batch counts its unmasked entries)"
                    if output_mask(outputs) is not None else
                    f"go to a loss with ignore_class={self.ignore_class!r} (each batch counts "
                    "its targets that are not ignored)")
            raise ValueError(
                f"the model adds losses while it is called ({len(losses)}: activity "
                "regularisers or add_loss), which Keras averages over the batch's samples, "
                f"but its outputs {what}: weighted by that count they would not add up to "
                "the penalty of the whole data, and one batch has one weight. Write the "
                "objective and its weighting yourself, loss_fn=lambda model, batch: "
                "(loss(y, model(x)) + tf.add_n(model.losses), count), or pass a "
                "batch_size_fn that counts what both should be weighted by, or use a copy "
                "of the model without these losses (activity_regularizer=None)")
        return tf.add_n([tf.reduce_sum(tf.cast(x, dtype)) for x in losses])

    def weight_penalty(self, values: list[Any], handles: list[Any]) -> tf.Tensor | None:
        """The sum of the Keras model's weight-regularisation losses (``kernel_regularizer``
        and the like: ``model.losses`` outside a call) with the selected variables at
        ``handles`` and the others at ``values``, in the variables' dtype; None when it has
        none. Added once per pass, not per batch (it does not depend on the data)."""
        if not self.has_weight_penalty:
            return None
        with self.adapter.scope(self.mapping(values, handles)):
            losses = list(self.model.losses)  # no call in this scope: weights' only
        if not losses:
            return None
        dtype = self.space.dtype
        return tf.add_n([tf.reduce_sum(tf.cast(x, dtype)) for x in losses])

    def loss_count(self, batch: Any, inputs: Any, targets: Any, outputs: Any) -> tf.Tensor:
        """The count of an ``(inputs, targets)`` batch of a ``loss`` (float64), the
        denominator of the loss's mean: ``batch_size_fn(batch)`` when given; else, when
        ``outputs`` (the model's, at trace time) carry a Keras mask, the Keras loss's own
        denominator, the mask's entries that count (:func:`masked_count`; a plain callable
        loss of masked outputs raises a ValueError, since its denominator is unknown);
        else, for a Keras loss with ``ignore_class``, the targets that are not ignored
        (:func:`kept_count`); else the leading dimension of the inputs."""
        if self.batch_size_fn is not None:
            return count_of(batch, inputs, self.batch_size_fn)
        mask = output_mask(outputs)
        if mask is not None:
            if not self.reads_mask:
                raise ValueError(_plain_loss_of_masked_outputs(self.loss))
            return masked_count(mask, targets, outputs, self.loss)
        if self.ignore_class is not None:
            return kept_count(targets, self.ignore_class, self.loss.dtype)
        return count_of(batch, inputs, None)

    def output_loss(self, targets: Any, outputs: Any, count: Any) -> tf.Tensor:
        """The batch-mean loss of ``outputs`` (``loss(targets, outputs)``, divided by
        ``count`` for ``reduction='sum'``).

        Under a ``tf.distribute`` strategy Keras divides the mean of a loss object by the
        number of replicas (its convention, so that gradients sum over replicas); specdens
        weights every share by its own sample count, and traces its functions inside
        :func:`unscaled_keras_losses`, where Keras does not divide (also for a Keras loss
        called inside a plain callable ``loss`` or a ``loss_fn``).
        """
        value = _scalar(self.loss(targets, outputs), "the loss")
        if self.reduction == "sum":
            value = value / tf.cast(count, value.dtype)
        return value

    def _custom(self, batch: Any) -> tuple[Any, Any]:
        if self._fn_takes_training:
            out = self.loss_fn(self.model, batch, training=self.adapter.training)
        else:
            out = self.loss_fn(self.model, batch)
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise ValueError(f"loss_fn returned a {type(out).__name__} of length {len(out)}; "
                                 "return the batch's mean loss, or (mean_loss, count)")
            return _scalar(out[0], "loss_fn"), as_count(out[1], "loss_fn")
        if self.batch_size_fn is None and self._masked_outputs is not None:
            raise ValueError(
                f"loss_fn returned the batch's mean only, but {self._masked_outputs}: a Keras "
                "loss of masked outputs is a mean over their unmasked entries (Keras divides "
                "by the mask's sum), not over the batch's samples, and specdens cannot see "
                "inside loss_fn what the mean divided by. Return (mean_loss, count) from "
                "loss_fn with count that denominator (for Embedding(mask_zero=True) on "
                "tokens x: tf.math.count_nonzero(x)), or pass batch_size_fn=lambda batch: "
                "..., or pass the Keras loss object as loss= (batches (inputs, targets)): "
                "specdens then counts the mask as Keras does"
            )
        inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        return _scalar(out, "loss_fn"), count_of(batch, inputs, self.batch_size_fn)

    def outputs(self, values: list[Any], handles: list[Any], inputs: Any, *,
                refuse_added_losses: bool = False) -> Any:
        """``model(inputs)`` with the selected variables at ``handles``; with
        ``refuse_added_losses`` (the GGN), a ValueError if the call adds losses
        (``add_loss``), which the GGN's split into outputs and a loss of them cannot
        place."""
        with self.adapter.scope(self.mapping(values, handles)) as scope:
            out = self.adapter.call(inputs)
            if refuse_added_losses and self.model_losses and scope is not None \
                    and scope.losses:
                raise ValueError(_ggn_added_losses(f"{len(scope.losses)} loss(es) added by "
                                                   "add_loss in its call"))
            return out

    def count(self, values: list[Any], batch: Any) -> Any:
        """Samples in ``batch`` (float64). With a ``loss`` and no ``batch_size_fn``, the
        model is called to see whether its outputs carry a Keras mask (whose sum is then
        the count): in the traced function only the operations the count depends on run
        (the mask's, or none), the rest of the forward pass is pruned."""
        if self.loss is not None:
            inputs, targets = split_batch(batch)
            outputs = None
            if self.batch_size_fn is None:
                outputs = self.outputs(values, self.handles(values), inputs)
            return self.loss_count(batch, inputs, targets, outputs)
        if self.batch_size_fn is not None:
            return count_of(batch, None, self.batch_size_fn)
        return self(values, self.handles(values), batch)[1]

    def explain(self, err: Exception, batch: Any) -> Exception:
        """``err``, raised while tracing or running a function of a ``loss_fn`` on
        ``batch``, with a hint of the likely cause when ``batch`` is a list or tuple of
        tensors (see :func:`list_of_tensors_hint`): the same exception with a note
        (Python >= 3.11), else a ValueError that quotes it."""
        hint = list_of_tensors_hint(batch) if self.loss_fn is not None else None
        if hint is None:
            return err
        if hasattr(err, "add_note"):
            err.add_note(hint)
            return err
        return ValueError(f"loss_fn failed with {type(err).__name__}: {err}\n{hint}")


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch for a ``loss``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    length = f" of length {len(batch)}" if hasattr(batch, "__len__") else ""
    raise ValueError(
        f"with a loss every batch must be (inputs, targets); got a {type(batch).__name__}"
        f"{length}. For other batches (sample weights, masks) use loss_fn=lambda model, "
        "batch: ..."
    )


def list_of_tensors_hint(batch: Any) -> str | None:
    """For a batch that is a list or tuple of tensors (one batch by the rule of
    :func:`~specdens.backends.tf._data.is_single_batch`: ``[x, y]``), the likely cause of
    a ``loss_fn`` that fails on it: a list of bare-tensor batches (``[X[:20], X[20:]]``)
    meant as several batches. None for other batches."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 \
            or not all(isinstance(t, (tf.Tensor, tf.Variable)) for t in batch):
        return None
    return (
        f"(specdens: loss_fn received one batch that is a {type(batch).__name__} of "
        f"{len(batch)} tensors: data that is a list or tuple whose first item is a tensor "
        "or an array is one batch, such as (inputs, targets). If these tensors are separate "
        "batches, wrap each in a tuple, data=[(x,) for x in batches], and read batch[0] in "
        "loss_fn, or pass a tf.data.Dataset of batches.)"
    )


def _scalar(value: Any, what: str) -> tf.Tensor:
    value = tf.convert_to_tensor(value)
    if value.shape.num_elements() != 1:
        raise ValueError(
            f"{what} must return a scalar; got shape {tuple(value.shape)}. Use a Keras loss "
            "object with its default reduction (keras.losses.MeanSquaredError()), or return "
            "the batch mean from loss_fn"
        )
    if not value.dtype.is_floating:
        raise TypeError(f"{what} returned dtype {value.dtype.name}; a loss must be floating")
    return tf.reshape(value, [])


def _reduction(loss: Any) -> str:
    red = getattr(loss, "reduction", "sum_over_batch_size")
    if red in MEAN_REDUCTIONS:
        return "mean"
    if red == "sum":
        return "sum"
    raise ValueError(
        f"the loss has reduction={red!r}; specdens needs a scalar loss: use reduction="
        "'sum_over_batch_size' (the default: the batch mean) or 'sum' (divided by the batch "
        "size here)"
    )


_RANK = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}


def _check_loss_dtype(loss: Any, dtype: tf.DType) -> None:
    """A Keras loss casts its inputs to its own dtype (the float type at its creation,
    float32 by default): refuse one that would round a float64 model's outputs to float32."""
    ldt = getattr(loss, "dtype", None)
    if ldt is None:
        return
    name = tf.as_dtype(ldt).name
    if _RANK.get(name, 3) < _RANK.get(dtype.name, 0):
        raise TypeError(
            f"the loss {type(loss).__name__} computes in {name} (Keras losses cast their "
            f"inputs to their dtype) but the selected variables are {dtype.name}: the "
            f"Hessian would carry {name} rounding. Create the loss with dtype='{dtype.name}' "
            "(or after keras.config.set_floatx(...))"
        )


def _check_compute_dtype(adapter: ModelAdapter, dtype: tf.DType,
                         selected: list[Any] | None = None) -> None:
    """Refuse a Keras model with layers under a mixed-precision dtype policy
    (``"mixed_float16"``, ``"mixed_bfloat16"``: variables in float32, computations in a
    16-bit type) that compute in a less precise type than the selected variables: the
    products would carry the rounding of the compute dtype (relative errors ~1e-3, and an
    asymmetric operator) while the engine assumes the rounding of the variables' dtype."""
    if not adapter.keras:
        return
    mixed: dict[str, list[str]] = {}
    for layer in adapter.layers():
        policy = getattr(layer, "dtype_policy", None)
        compute = getattr(policy, "compute_dtype", None)
        variable = getattr(policy, "variable_dtype", None)
        if compute is None or compute == variable:
            continue
        if _RANK.get(tf.as_dtype(compute).name, 3) < _RANK.get(dtype.name, 0):
            mixed.setdefault(f"{getattr(policy, 'name', compute)}", []).append(layer.name)
    if not mixed:
        _check_autocast_layers(adapter, dtype, selected)
    if mixed:
        where = "; ".join(f"dtype policy {name!r} (layers {', '.join(layers[:6])}"
                          f"{', ...' if len(layers) > 6 else ''})"
                          for name, layers in mixed.items())
        raise TypeError(
            f"the model computes in lower precision than its {dtype.name} variables under "
            f"the Keras mixed-precision {where}: the Hessian would carry that rounding "
            f"(~1e-3 relative, and not symmetric). Compute it on a {dtype.name} copy: "
            f"twin = keras.models.clone_model(model, clone_function=lambda layer: "
            f"layer.__class__.from_config({{**layer.get_config(), 'dtype': "
            f"'{dtype.name}'}})); twin.set_weights(model.get_weights())"
        )


def _check_autocast_layers(adapter: ModelAdapter, dtype: tf.DType,
                           selected: list[Any] | None = None) -> None:
    """Refuse a Keras model whose layers without a dtype of their own (Keras's default
    float32 policy) sit among variables of a more precise dtype: Keras casts their
    floating inputs to float32 (``Activation``, ``Flatten``, ``Dropout``, ``Add``...), so a
    float64 model built with ``Dense(..., dtype="float64")`` but a plain
    ``Activation("tanh")`` computes part of its forward pass in float32, and its Hessian
    carries float32 rounding while the engine assumes float64's.

    Containers count too: a subclassed ``keras.Layer`` or ``keras.Model`` block casts its
    inputs to its own policy's type before its float64 sublayers see them. A functional
    model does not cast its inputs (``_convert_input_args`` is off), and a ``Sequential``
    casts them to the dtype of its ``Input`` (its ``input_dtype``), which is what is read
    here.

    Layers before the first one that holds a ``selected`` variable (in the model's layer
    order: each layer before its sublayers, which follow in their order, and Keras keeps
    a functional model's layers topological) are left alone: preprocessing such as
    ``Rescaling`` or ``Normalization`` rounds the data, which does not depend on the
    parameters, and the Hessian stays exact. So is the model itself, whose cast of its
    inputs rounds the data only."""
    import keras

    wanted = {id(v) for v in selected} if selected is not None else None
    started = wanted is None
    low = []
    for layer in _preorder(adapter.model):
        if not started:
            own = getattr(layer, "_trainable_variables", None)
            own = list(own) if own is not None else []
            own += list(getattr(layer, "_non_trainable_variables", None) or [])
            started = any(id(v) in wanted or id(getattr(v, "value", v)) in wanted
                          for v in own)
            if not started:
                continue
        if layer is adapter.model or isinstance(layer, keras.layers.InputLayer):
            continue
        lower = [d for d in _input_casts(layer)
                 if _RANK.get(d.name, 3) < _RANK.get(dtype.name, 0)]
        if lower:
            kind = "" if not _children(layer) else f", a {type(layer).__name__} block"
            low.append(f"{layer.name} ({lower[0].name}{kind})")
    if low:
        raise TypeError(
            f"layers {', '.join(low[:6])}{', ...' if len(low) > 6 else ''} compute in lower "
            f"precision than the model's {dtype.name} variables: Keras casts their inputs to "
            f"their dtype policy's type (a functional or Sequential block: to its Input's "
            f"dtype), so the Hessian would carry that rounding. Build them with "
            f"dtype='{dtype.name}' (a block that subclasses keras.Layer or keras.Model: pass "
            f"dtype='{dtype.name}' to its super().__init__; a functional or Sequential block: "
            f"keras.Input(..., dtype='{dtype.name}')), or call keras.config.set_dtype_policy("
            f"'{dtype.name}') before building the model"
        )


def _input_casts(layer: Any) -> list[tf.DType]:
    """The floating dtypes a Keras layer casts its floating inputs to when it is called:
    its ``input_dtype`` (its policy's compute dtype; a ``Sequential``'s ``Input``'s) where
    ``Layer.__call__`` converts its inputs (``autocast`` and ``_convert_input_args``), and,
    for a functional model or a ``Sequential`` (whose ``call`` converts each input to the
    dtype of its ``Input``), the floating dtypes of its symbolic inputs."""
    out = []
    if getattr(layer, "autocast", False) and getattr(layer, "_convert_input_args", False):
        try:
            cast_to = getattr(layer, "input_dtype", None)
        except Exception:  # noqa: BLE001 - a property that fails: use the compute dtype
            cast_to = None
        cast_to = cast_to if cast_to is not None else getattr(layer, "compute_dtype", None)
        if cast_to is not None and tf.as_dtype(cast_to).is_floating:
            out.append(tf.as_dtype(cast_to))
    if _children(layer):
        try:
            inputs = layer.inputs
        except Exception:  # noqa: BLE001 - not a functional model (subclassed, unbuilt)
            inputs = None
        for t in tf.nest.flatten(inputs) if inputs is not None else []:
            d = getattr(t, "dtype", None)
            if d is not None and tf.as_dtype(d).is_floating:
                out.append(tf.as_dtype(d))
    return out


def _children(layer: Any) -> list[Any]:
    """The direct sublayers of a Keras layer, in its order."""
    flat = getattr(layer, "_flatten_layers", None)
    return list(flat(include_self=False, recursive=False)) if flat is not None else []


def _preorder(model: Any) -> list[Any]:
    """The model and its nested layers, each layer before its sublayers and these in
    their order (Keras's ``_flatten_layers`` visits a layer's sublayers in reverse)."""
    out, seen, stack = [], set(), [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        out.append(layer)
        stack.extend(reversed(_children(layer)))
    return out


def weight_regularized(model: Any) -> list[Any]:
    """The trainable variables of a Keras model that carry a weight regulariser
    (``kernel_regularizer=``...): those whose penalties Keras's ``model.losses`` adds,
    the regulariser of each applied to its variable's value."""
    return [v for v in getattr(model, "trainable_weights", [])
            if getattr(v, "regularizer", None) is not None]


def activity_regularized(adapter: ModelAdapter) -> list[str]:
    """The names of the Keras model's layers with an ``activity_regularizer``."""
    if not adapter.keras:
        return []
    return [layer.name for layer in adapter.layers()
            if getattr(layer, "activity_regularizer", None) is not None]


def _penalties_key(adapter: ModelAdapter) -> tuple:
    """What the traced functions read of the model's own losses: the weight regularisers
    of its variables and the activity regularisers of its layers (by value, as Keras loss
    objects are), so that changing one after an operator was built retraces."""
    weights = tuple((id(v), _callable_key(v.regularizer))
                    for v in weight_regularized(adapter.model))
    activity = tuple((id(layer), _callable_key(getattr(layer, "activity_regularizer", None)))
                     for layer in adapter.layers()
                     if getattr(layer, "activity_regularizer", None) is not None)
    return weights, activity


def _ggn_added_losses(what: str) -> str:
    return (
        f"the model adds losses while it is called ({what}): functions of its inner "
        "activations, not of its outputs, which the GGN (J^T H_out J of a loss of the "
        "outputs) has no place for. Use hessian(), which includes them as model.fit does, "
        "or ggn() on a copy of the model without them (activity_regularizer=None). Weight "
        "regularisers (kernel_regularizer=...) are fine: their Hessian is added to the GGN"
    )


_SCALE_LOCK = threading.RLock()


def _not_scaled(value: Any) -> Any:
    return value


@contextlib.contextmanager
def unscaled_keras_losses() -> Iterator[None]:
    """Inside the block, Keras does not divide the mean of a loss object by the number of
    ``tf.distribute`` replicas (re-entrant; Keras's own function is back on exit, also
    after an exception).

    Keras 3's ``Loss.__call__`` reduces through ``keras.src.losses.loss.reduce_values``,
    which multiplies a mean by ``ops.cast(1 / num_replicas, dtype)`` through the module's
    ``scale_loss_for_distribution`` (so that the gradients of ``model.fit`` sum over
    replicas). specdens weights every replica's share by its own sample count, so it needs
    the plain mean of the share, whichever way the Keras loss is reached: a loss object
    as ``loss``, inside a plain callable ``loss`` or inside a ``loss_fn``. The function is
    swapped for the identity while specdens traces its functions (the replica functions
    of ``strategy.run`` included), as ``exact_moments`` swaps ``tf.nn.moments``; a
    division that a callable writes itself is left alone. Nothing is done where Keras is
    not imported or has no such function."""
    keras_loss = None
    if sys.modules.get("keras") is not None:
        try:
            from keras.src.losses import loss as keras_loss
        except ImportError:  # pragma: no cover - a Keras without this module
            keras_loss = None
    if keras_loss is None or not hasattr(keras_loss, "scale_loss_for_distribution"):
        yield
        return
    with _SCALE_LOCK:
        original = keras_loss.scale_loss_for_distribution
        keras_loss.scale_loss_for_distribution = _not_scaled
        try:
            yield
        finally:
            keras_loss.scale_loss_for_distribution = original


def ignore_class_of(loss: Any) -> Any:
    """The ``ignore_class`` of a Keras loss object that sets one
    (``keras.losses.SparseCategoricalCrossentropy(ignore_class=-1)``, or a
    ``LossFunctionWrapper`` that passes one to its function), else None."""
    keras = sys.modules.get("keras")
    if loss is None or keras is None or not isinstance(loss, keras.losses.Loss):
        return None
    kwargs = getattr(loss, "_fn_kwargs", None)
    return kwargs.get("ignore_class") if isinstance(kwargs, dict) else None


def kept_count(targets: Any, ignore_class: Any, dtype: Any) -> tf.Tensor:
    """The denominator of a Keras loss with ``ignore_class``: the number of target entries
    that are not ``ignore_class`` (float64).

    Keras masks the ignored targets out of the loss and divides the sum over the others
    by their number (``reduce_weighted_values``: with the mask, the ``sum_over_batch_size``,
    ``mean`` and ``mean_with_sample_weight`` reductions all divide by the mask's sum), over
    every target entry, so a sequence loss with ``(N, T)`` targets counts tokens. Weighting
    batches by it makes the data set's loss ``loss(y_all, model(X_all))`` whatever the
    batching; a batch whose targets are all ignored counts 0 (Keras's loss of it is 0) and
    contributes nothing. The targets are compared in the loss's ``dtype``, as Keras does.
    """
    dtype = tf.as_dtype(dtype)
    y = tf.cast(tf.convert_to_tensor(targets), dtype)
    keep = tf.not_equal(y, tf.cast(ignore_class, dtype))
    return tf.reduce_sum(tf.cast(keep, tf.float64))


def output_mask(outputs: Any) -> Any:
    """The Keras mask attached to ``outputs`` (``Embedding(mask_zero=True)`` or
    ``Masking`` propagated to them by the layers after it), else None: what a Keras loss
    reads with ``backend.get_keras_mask(y_pred)`` in ``Loss.__call__`` (for one tensor
    of outputs; a list or dict of them carries none)."""
    if outputs is None or sys.modules.get("keras") is None:
        return None
    try:
        from keras.src.backend import get_keras_mask
    except ImportError:  # pragma: no cover - a Keras that keeps masks elsewhere
        return getattr(outputs, "_keras_mask", None)
    return get_keras_mask(outputs)


def with_mask(tensor: Any, mask: Any) -> Any:
    """``tensor`` with the Keras mask ``mask`` attached (``tf.stop_gradient`` and other
    ops return tensors without one); ``tensor`` unchanged when ``mask`` is None."""
    if mask is None:
        return tensor
    try:
        from keras.src.backend import set_keras_mask
    except ImportError:  # pragma: no cover
        tensor._keras_mask = mask
        return tensor
    set_keras_mask(tensor, mask)
    return tensor


def reads_output_mask(loss: Any) -> bool:
    """Whether ``loss`` applies a Keras mask of its ``y_pred``: a Keras loss object whose
    ``__call__`` is ``keras.losses.Loss.__call__`` (every loss of Keras; a subclass that
    overrides ``__call__`` may not)."""
    keras = sys.modules.get("keras")
    if loss is None or keras is None or not isinstance(loss, keras.losses.Loss):
        return False
    return type(loss).__call__ is keras.losses.Loss.__call__


def masked_count(mask: Any, targets: Any, outputs: Any, loss: Any) -> tf.Tensor:
    """The denominator of a Keras loss of outputs that carry the Keras mask ``mask``: the
    sum of the mask (float64), and with ``ignore_class`` of the mask's entries whose
    target is not ignored.

    Keras's ``Loss.__call__`` takes the mask of ``y_pred`` (``get_keras_mask``), ands it
    with the mask its ``call`` attaches to the per-entry losses (``ignore_class``: the
    targets that are not ignored, shaped as the outputs without the class axis), and
    ``reduce_weighted_values`` -> ``apply_mask`` weighs the unmasked losses by
    ``total / valid`` (``valid = sum(mask)``, ``divide_no_nan``) before the mean over all
    ``total`` entries: the ``sum_over_batch_size`` and ``mean`` reductions are the sum of
    the unmasked losses over ``valid``, ``mean_with_sample_weight`` divides that sum by
    the sum of the 0/1 mask too, and ``sum`` is the sum (divided by this count here). So
    a sequence model with ``(N, T)`` masked outputs counts its unmasked timesteps, and a
    fully masked batch counts 0 (Keras's loss of it is 0). The mask is summed in the
    loss's dtype, as Keras does."""
    dtype = tf.as_dtype(loss.dtype)
    m = tf.convert_to_tensor(mask)
    ignore = ignore_class_of(loss)
    if ignore is not None:
        kwargs = getattr(loss, "_fn_kwargs", {}) or {}
        out_shape = tf.shape(outputs)
        rank = outputs.shape.rank
        axis = kwargs.get("axis", -1)
        axis = axis + rank if axis < 0 else axis
        res_shape = tf.concat([out_shape[:axis], out_shape[axis + 1:]], 0)
        y = tf.cast(tf.convert_to_tensor(targets), dtype)
        kept = tf.reshape(tf.not_equal(y, tf.cast(ignore, dtype)), res_shape)
        m = tf.logical_and(tf.cast(m, tf.bool), kept)  # Keras: in_mask & out_mask
    return tf.cast(tf.reduce_sum(tf.cast(m, dtype)), tf.float64)


MAYBE_MASKED = "the model has layers that make a Keras mask"


def masked_outputs_reason(model: Any) -> str | None:
    """Why a Keras model's outputs may carry a Keras mask (a phrase), or None: a model
    with symbolic outputs (functional, ``Sequential``) by their masks; another (a
    subclassed model) by its mask-making layers (``Embedding(mask_zero=True)``,
    ``Masking``)."""
    keras = sys.modules.get("keras")
    if keras is None or not isinstance(model, keras.Layer):
        return None
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        outputs = None
    if outputs is not None:
        flat = tf.nest.flatten(outputs)
        if any(output_mask(o) is not None for o in flat):
            return "the model's outputs carry a Keras mask"
        return None
    makers = [layer.name for layer in _sublayers(model)
              if isinstance(layer, keras.layers.Masking) or getattr(layer, "mask_zero", False)]
    if makers:
        return (f"{MAYBE_MASKED} ({', '.join(makers[:6])}), which may reach its outputs")
    return None


def _plain_loss_of_masked_outputs(loss: Any) -> str:
    return (
        f"the model's outputs carry a Keras mask (Embedding(mask_zero=True), Masking...), and "
        f"a Keras loss object divides by the mask's sum, but the loss {loss!r} is not a "
        "keras.losses.Loss that applies it (a plain callable, or a subclass with its own "
        "__call__), so specdens cannot tell what its mean divides by. Pass a Keras loss "
        "object (each batch then counts its unmasked entries), or batch_size_fn=lambda "
        "batch: <the count the loss divides by>, or loss_fn returning (mean_loss, count)"
    )


def _takes_training(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "training" in params


def _callable_key(obj: Any) -> Any:
    """What a traced function computes with when it calls ``obj``.

    A Keras loss object (a class of Keras itself) is keyed by its class and the values of
    *all* its attributes (``fn``, ``_fn_kwargs``, ``reduction``, the dtype policy...), so
    that a fresh but equal loss reuses the traced functions, and two losses that compute
    different things never share them (``get_config()`` is not enough: ``Huber`` leaves
    out ``delta``, ``CosineSimilarity`` ``axis``). Other callables, and Keras losses with
    an attribute that is not a plain value, are keyed by identity."""
    if obj is None:
        return None
    if type(obj).__module__.startswith("keras") and hasattr(obj, "__dict__"):
        try:
            return (type(obj), _value_key(vars(obj), 0))
        except _NotAValue:
            pass
    return _Identity(obj)


class _NotAValue(Exception):
    """An attribute that :func:`_value_key` cannot key by value."""


class _Identity:
    """A key equal only to a key of the same object (``is``), for objects that are not hashable or
    whose equality is not identity. The key holds the object, so its ``id`` stays unique
    as long as the key exists."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __repr__(self) -> str:
        return f"_Identity({self.obj!r})"


_MAX_DEPTH = 8


def _value_key(value: Any, depth: int) -> Any:
    """A hashable key equal for equal values: plain values by value (type included, so
    ``1`` and ``1.0`` differ), containers and Keras objects (dtype policies) item by item,
    arrays and constant tensors by dtype, shape and bytes, functions and variables by
    identity (a variable is read when the traced function runs). Raises
    :class:`_NotAValue` for anything else."""
    if depth > _MAX_DEPTH:
        raise _NotAValue
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return (type(value), repr(value))
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_value_key(v, depth + 1) for v in value))
    if isinstance(value, dict):
        items = [(_value_key(k, depth + 1), _value_key(v, depth + 1))
                 for k, v in value.items()]
        return (dict, tuple(sorted(items, key=repr)))
    if isinstance(value, tf.Variable) or inspect.isroutine(value):
        return _Identity(value)
    if isinstance(value, (np.ndarray, np.generic)) or (isinstance(value, tf.Tensor)
                                                       and hasattr(value, "numpy")):
        arr = np.asarray(value)
        return (type(value), arr.dtype.str, arr.shape, arr.tobytes())
    if type(value).__module__.startswith("keras") and hasattr(value, "__dict__") \
            and not callable(value):
        return (type(value), _value_key(vars(value), depth + 1))
    raise _NotAValue
