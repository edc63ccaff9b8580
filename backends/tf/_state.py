"""The model's state: its variables, snapshots of their values, how a traced function
evaluates the model at given values without writing to it, and a bit-for-bit check that
nothing changed.

Keras 3 models are evaluated inside a ``keras.StatelessScope`` that maps every variable of
the model to a tensor: reads return the mapped value, and writes (the moving statistics
that ``BatchNormalization`` updates when called with ``training=True``, the state of
random-seed generators) are recorded in the scope and dropped, so the model is never
written to. A plain ``tf.Module`` has no such scope: its variables are read directly, and
the operator writes its snapshot into them for the duration of a product and writes the
values it found back afterwards (:meth:`ModelAdapter.bound`), bit for bit.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from ._params import unique_names

BATCHNORM_MODES = ("batch", "population")

_RANDOM_HINT = ("Dropout", "Noise", "Random")


def keras_module() -> Any:
    """The imported ``keras`` package, or None (specdens never imports Keras itself)."""
    return sys.modules.get("keras")


def is_keras_layer(model: Any) -> bool:
    keras = keras_module()
    return keras is not None and isinstance(model, keras.Layer)


def _sublayers(model: Any) -> list[Any]:
    flat = getattr(model, "_flatten_layers", None)
    if flat is not None:
        return list(flat(include_self=True, recursive=True))
    return [model]


def _backing(var: Any) -> Any:
    """The ``tf.Variable`` behind a Keras variable (the variable itself otherwise)."""
    inner = getattr(var, "value", var) if hasattr(var, "path") else var
    return inner


class ModelAdapter:
    """How specdens evaluates a Keras model or a ``tf.Module`` at given variable values.

    Parameters
    ----------
    model
        A Keras 3 layer or model (TensorFlow backend), or a ``tf.Module``.
    batchnorm
        ``"batch"`` or ``"population"`` (see :func:`specdens.backends.tf.hessian`).
    """

    def __init__(self, model: Any, batchnorm: str):
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm={batchnorm!r}; choose 'batch' (batch statistics, as "
                             "in Ghorbani et al. 2019) or 'population' (moving statistics)")
        self.keras = is_keras_layer(model)
        if not self.keras and not isinstance(model, tf.Module):
            raise TypeError(f"model must be a Keras 3 model or layer (TensorFlow backend) or a "
                            f"tf.Module; got {type(model).__module__}.{type(model).__name__}")
        if self.keras:
            from keras import backend as kb

            if kb.backend() != "tensorflow":
                raise TypeError(f"the Keras backend is {kb.backend()!r}; specdens.backends.tf "
                                "needs KERAS_BACKEND=tensorflow (for JAX or torch use their "
                                "own specdens backends)")
        self.model = model
        self.owner = type(model).__name__
        self.variables = list(model.variables)
        self.trainable = list(model.trainable_variables)
        self.names = unique_names(self.variables)
        self.batchnorm = batchnorm
        self.training = self._training_flag()

    def layers(self) -> list[Any]:
        """The model and all its nested layers (Keras), or ``[model]``."""
        return _sublayers(self.model)

    # -- the training flag ----------------------------------------------------------
    def _training_flag(self) -> bool:
        """``training=`` for Keras calls: True only for BatchNormalization layers on batch
        statistics (Keras has one flag for every layer, so random layers must be absent)."""
        if not self.keras:
            return False
        import keras

        layers = _sublayers(self.model)
        has_bn = any(isinstance(layer, keras.layers.BatchNormalization) for layer in layers)
        if not has_bn or self.batchnorm == "population":
            return False
        random = [f"{layer.name} ({type(layer).__name__})" for layer in layers
                  if getattr(layer, "_seed_generators", None)
                  or any(h in type(layer).__name__ for h in _RANDOM_HINT)]
        if random:
            raise ValueError(
                "batchnorm='batch' calls the model with training=True, the only way to put "
                "Keras BatchNormalization layers on batch statistics, and that also switches "
                f"on its random layers: {', '.join(random)}. A Hessian needs a fixed function: "
                "use batchnorm='population', or a loss_fn that calls the layers itself"
            )
        return True

    def reseeded(self, values: list[tf.Tensor]) -> list[tf.Tensor] | None:
        """``values`` with the states of the Keras random layers' seed generators moved on
        (None when the model has none): what a second, independent draw of their
        randomness reads."""
        states = {id(sg.state) for layer in self.layers()
                  for sg in (getattr(layer, "_seed_generators", None) or [])
                  if getattr(sg, "state", None) is not None}
        if not states:
            return None
        return [val + tf.ones_like(val) if id(var) in states else val
                for var, val in zip(self.variables, values, strict=True)]

    # -- values ---------------------------------------------------------------------
    def snapshot(self) -> list[tf.Tensor]:
        """Copies of the values of every variable (``model.variables`` order)."""
        out = []
        for v in self.variables:
            inner = _backing(v)
            with tf.device(inner.device or None):
                out.append(tf.identity(inner.read_value() if hasattr(inner, "read_value")
                                       else tf.convert_to_tensor(inner)))
        return out

    @contextlib.contextmanager
    def scope(self, values: list[Any]) -> Iterator[Any]:
        """Inside a traced function: the context in which the model reads ``values``; it
        yields a ``keras.StatelessScope`` for Keras (None for a ``tf.Module``).

        The scope collects the losses the model adds while it is called (activity
        regularisers, ``add_loss``: its ``losses`` list, also what ``model.losses`` reads
        inside it). Keras clears every layer's eager losses at the start of an outermost
        call and records the ids of the collected ones in the layers: the layers' loss
        bookkeeping is restored on exit, so ``model.losses`` after specdens is what it was
        before."""
        if not self.keras:
            yield None
            return
        import keras

        saved = []
        for layer in self.layers():
            losses, ids = getattr(layer, "_losses", None), getattr(layer, "_loss_ids", None)
            if isinstance(losses, list) and isinstance(ids, set):
                saved.append((losses, list(losses), ids, set(ids)))
        try:
            with keras.StatelessScope(state_mapping=list(zip(self.variables, values,
                                                             strict=True)),
                                      collect_losses=True) as scope:
                yield scope
        finally:
            for losses, kept, ids, kept_ids in saved:
                losses[:] = kept
                ids.clear()
                ids.update(kept_ids)

    @contextlib.contextmanager
    def bound(self, values: list[tf.Tensor]) -> Iterator[None]:
        """For a ``tf.Module``: its variables hold ``values`` inside the block and their
        previous values, bit for bit, after it (also after an exception). Keras models
        need nothing (they read ``values`` through :meth:`scope`)."""
        if self.keras:
            yield
            return
        saved = self.snapshot()
        try:
            for var, val in zip(self.variables, values, strict=True):
                var.assign(val)
            yield
        finally:
            for var, val in zip(self.variables, saved, strict=True):
                var.assign(val)

    def call(self, inputs: Any) -> Any:
        """``model(inputs)``, with ``training=`` for Keras models."""
        if self.keras:
            return self.model(inputs, training=self.training)
        return self.model(inputs)


@dataclass
class ModelState:
    """Copies of everything specdens promises not to change.

    Attributes
    ----------
    values : dict[str, numpy.ndarray]
        The value of every variable (``model.variables``, by name: Keras ``path``), moving
        statistics and random-seed states included.
    trainable : dict[str, bool]
        ``trainable`` of every variable and, for Keras models, of every layer.
    """

    values: dict
    trainable: dict

    @classmethod
    def capture(cls, model: Any) -> ModelState:
        """Snapshot ``model`` (copies, so later writes do not reach them)."""
        variables = list(model.variables)
        names = unique_names(variables)
        values = {n: np.array(_backing(v).numpy(), copy=True) for n, v in zip(names, variables,
                                                                              strict=True)}
        trainable = {"variable:" + n: bool(v.trainable) for n, v in zip(names, variables,
                                                                         strict=True)}
        if is_keras_layer(model):
            for i, layer in enumerate(_sublayers(model)):
                trainable[f"layer:{i}:{layer.name}"] = bool(layer.trainable)
        return cls(values=values, trainable=trainable)

    def differences(self, model: Any) -> list[str]:
        """What differs, bit for bit, between this snapshot and ``model`` now (empty: none)."""
        now = ModelState.capture(model)
        out = []
        if self.values.keys() != now.values.keys():
            out.append("variables: names changed")
        else:
            for name, a in self.values.items():
                b = now.values[name]
                if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
                    out.append(f"variables[{name}]: values changed")
        if self.trainable != now.trainable:
            out.append("trainable changed")
        return out

    def restore(self, model: Any) -> None:
        """Write the snapshot's values back into ``model``'s variables."""
        variables = list(model.variables)
        for n, v in zip(unique_names(variables), variables, strict=True):
            v.assign(self.values[n])
