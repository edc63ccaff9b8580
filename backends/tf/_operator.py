"""A specdens operator whose product is a sample-weighted pass over the data.

:class:`DataOperator` snapshots the model's variables, makes one pass over the data at
construction (sample counts and fingerprints, and a determinism check of the loss), and
computes every product as one pass of a traced per-batch function (see ``_kernel``) over
the data, reduced over ``tf.distribute`` replicas, divided by the total sample count, plus
the weight decay and the regulariser.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from specdens import LinearOperatorBase, _checks

from . import _namespace
from ._data import Batches, checked_total
from ._kernel import Kernel, kernel_for
from ._loss import BatchLoss
from .distributed import distribute, num_replicas, resolve_strategy


class DataOperator(LinearOperatorBase):
    """Base class of :class:`HessianOperator` and :class:`GGNOperator`.

    Attributes
    ----------
    param_names, param_shapes : list
        The selected variables (Keras ``path`` names), in the order of the flat vectors.
    num_samples : float
        Samples over all batches (and all replicas).
    num_batches : int
        Batches per pass.
    strategy : tf.distribute.Strategy or None
        The strategy products are reduced over (``None``: one device).
    """

    symmetric = True
    _product_name = "hvp"

    def __init__(self, loss: BatchLoss, data: Any, *, method: str, block: str,
                 weight_decay: float, regularizer: Callable[[dict], Any] | None,
                 check_determinism: bool, strategy: Any):
        space = loss.space
        super().__init__((space.n, space.n), space.dtype, _namespace, space.device)
        weight_decay = _checks.finite_number(weight_decay, "weight_decay")
        if regularizer is not None and not callable(regularizer):
            raise TypeError("regularizer must be a callable(params: dict[str, Tensor]) -> "
                            "scalar tensor")
        self.loss = loss
        self.space = space
        self.param_names = list(space.names)
        self.param_shapes = list(space.shapes)
        self.weight_decay = float(weight_decay)
        self.regularizer = regularizer
        # the regulariser and the Keras model's weight penalties (model.losses), added
        # once per product
        self._penalized = regularizer is not None or loss.has_weight_penalty
        self.strategy = resolve_strategy(strategy, loss.adapter.variables)
        _check_synchronized_batchnorm(loss, self.strategy)
        self.kernel: Kernel = kernel_for(loss, method=method, block=block,
                                         strategy=self.strategy, regularizer=regularizer)
        self.method, self.block = method, block
        self._values = loss.adapter.snapshot()
        self.batches = Batches(data)
        self._dist = (distribute(self.strategy, self.batches.as_dataset())
                      if self.strategy is not None else None)
        self._setup(check_determinism)

    # -- construction: one pass ------------------------------------------------------
    def _setup(self, check_determinism: bool) -> None:
        counts, fps = [], []
        with self.loss.adapter.bound(self._values):
            for i, batch in enumerate(self._iter()):
                if i == 0 and check_determinism:
                    self._check_deterministic(batch)
                count, fp = self._call("info", batch)
                counts.append(count)
                fps.append(fp)
        self.num_samples = checked_total(counts)
        self._fingerprints = tf.stack(fps)
        self.num_batches = len(fps)

    def _check_deterministic(self, batch: Any) -> None:
        """Evaluate the loss of ``batch`` twice and raise when it is not finite or the two
        values differ.

        The operator's products read the snapshot, Keras random layers' seed states
        included, so every call of a Dropout layer switched on (a ``loss_fn`` that calls
        the model with ``training=True``) draws the same mask: two plain evaluations
        agree, and the Hessian was that of one frozen mask. The second evaluation runs
        with the seed states moved on, so such a layer shows as random, as it is."""
        reseeded = self.loss.adapter.reseeded(self._values)
        a, b = (float(s.numpy()) / max(float(c.numpy()), 1e-300)
                for s, c in (self._call("value", batch),
                             self._call("value", batch, values=reseeded)))
        if not (math.isfinite(a) and math.isfinite(b)):
            raise FloatingPointError(f"the loss of the first batch is not finite ({a})")
        tol = math.sqrt(np.finfo(self.space.dtype.as_numpy_dtype).eps) * max(abs(a), abs(b),
                                                                               1e-30)
        if abs(a - b) > tol:
            raise RuntimeError(
                f"the model is not deterministic: two evaluations of the loss on the first "
                f"batch gave {a!r} and {b!r}. A Hessian needs a fixed function: switch off the "
                "random layers, or pass check_determinism=False if the randomness is intended"
            )

    # -- products ----------------------------------------------------------------------
    def _iter(self) -> Iterator[Any]:
        return iter(self._dist) if self._dist is not None else iter(self.batches)

    def _call(self, name: str, batch: Any, *rest: Any, values: Any = None) -> Any:
        """Kernel function ``name`` on ``batch`` at the snapshot (or at ``values``)."""
        spec = self._dist.element_spec if self._dist is not None else None
        return self.kernel(name, self._values if values is None else values, batch, *rest,
                           batch_spec=spec)

    def _matvec(self, v: tf.Tensor) -> tf.Tensor:
        return self._matmat(tf.reshape(v, (-1, 1)))[:, 0]

    def _matmat(self, V: tf.Tensor) -> tf.Tensor:
        self._check_block(V)
        self._check_variables()
        self.kernel.bind(self.loss)
        acc, total, fps, reg = None, None, [], None
        with self.loss.adapter.bound(self._values):
            for batch in self._iter():
                contrib, count, fp = self._call(self._product_name, batch, V)
                acc = contrib if acc is None else acc + contrib
                total = count if total is None else total + count
                fps.append(fp)
            if self._penalized:
                # inside the block: a tf.Module's regulariser reads its variables, which
                # hold the snapshot only here
                reg = self.kernel("reg_hvp", self._values, None, V)
        self._check_pass(total, fps)
        out = acc / tf.cast(total, acc.dtype)
        if self.weight_decay:
            out = out + tf.constant(self.weight_decay, dtype=out.dtype) * V
        if reg is not None:
            out = out + reg
        if out.device != self.device:
            with tf.device(self.device):
                out = tf.identity(out)
        return out

    def _check_block(self, V: tf.Tensor) -> None:
        if not isinstance(V, (tf.Tensor, tf.Variable)):
            raise TypeError(f"this operator works on TensorFlow tensors; got "
                            f"{type(V).__name__}")
        if V.dtype != self.dtype:
            raise TypeError(f"the operator has dtype {self.dtype.name} (the model's); got a "
                            f"vector of dtype {V.dtype.name}. Cast it: tf.cast(v, "
                            f"tf.{self.dtype.name})")

    def _check_variables(self) -> None:
        """A ``tf.Module`` reads its variables through its attributes: one given a new
        ``tf.Variable`` after the operator was built no longer computes with the
        variables of the snapshot (the derivatives in them would be 0). Keras models are
        evaluated at the snapshot by variable objects and need no check."""
        adapter = self.loss.adapter
        if adapter.keras:
            return
        now = list(adapter.model.variables)
        if len(now) != len(adapter.variables) or any(
                a is not b for a, b in zip(now, adapter.variables, strict=True)):
            raise RuntimeError(
                f"the variables of the {adapter.owner} were replaced (an attribute given a "
                "new tf.Variable) after this operator was built, so the module no longer "
                "computes with the variables of its snapshot: build a new operator (assign "
                "new values with variable.assign(...) to keep the variables)")

    def _check_pass(self, total: Any, fps: list[Any]) -> None:
        """One read-back per product: the number of batches, their fingerprints."""
        if len(fps) != self.num_batches:
            raise RuntimeError(f"the data yielded {len(fps)} batches in this pass and "
                               f"{self.num_batches} when the operator was built; it must yield "
                               "the same batches on every pass")
        now = tf.stack(fps)
        tol = 1e-12 * tf.maximum(tf.abs(self._fingerprints), 1.0)
        changed = tf.reduce_any(tf.abs(now - self._fingerprints) > tol)
        if bool(changed.numpy()):
            raise RuntimeError(
                "the data yielded different batches in this pass than when the operator was "
                "built (a shuffling dataset or random augmentation?); products need the same "
                "batches on every pass: drop shuffle() and random maps from the pipeline"
            )

    # -- vectors <-> variables -----------------------------------------------------------
    def unflatten(self, v: tf.Tensor) -> dict[str, tf.Tensor]:
        """A flat vector as a dict of variable-shaped tensors, by variable name."""
        return dict(zip(self.space.names, self.space.split(v), strict=True))

    def flatten(self, tensors: dict[str, Any]) -> tf.Tensor:
        """A dict of variable-shaped tensors (by name) as a flat vector."""
        missing = [n for n in self.space.names if n not in tensors]
        if missing:
            raise KeyError(f"missing variables {missing}")
        return self.space.flatten([tf.convert_to_tensor(tensors[n], self.dtype)
                                   for n in self.space.names])

    @property
    def num_replicas(self) -> int:
        """Replicas products are reduced over (1 without a strategy)."""
        return num_replicas(self.strategy)

    @property
    def traces(self) -> dict[str, int]:
        """How many times each traced function of this operator's (shared) kernel was
        traced: new weights never add one; a new relaxed batch signature or block width
        does."""
        return dict(self.kernel.traces)


def _check_synchronized_batchnorm(loss: BatchLoss, strategy: Any) -> None:
    """Refuse, before anything is traced, a Keras model with
    ``BatchNormalization(synchronized=True)`` layers on batch statistics under a strategy
    of several replicas: their statistics are all-reduced across replicas (a cross-replica
    ``merge_call``), which TensorFlow cannot differentiate twice inside the per-replica
    function of a product (a RuntimeError in the graph loop of ``block="loop"``, a
    deadlock of the vectorised ``block="batched"``). The gradient is unaffected."""
    adapter = loss.adapter
    if strategy is None or num_replicas(strategy) <= 1 or not adapter.keras \
            or not adapter.training:
        return
    import keras

    synced = [layer.name for layer in adapter.layers()
              if isinstance(layer, keras.layers.BatchNormalization)
              and getattr(layer, "synchronized", False) and layer.trainable]
    if synced:
        raise ValueError(
            f"the model has BatchNormalization(synchronized=True) layers "
            f"({', '.join(synced[:6])}{', ...' if len(synced) > 6 else ''}) on batch "
            f"statistics under a tf.distribute strategy of {num_replicas(strategy)} "
            "replicas: their statistics are all-reduced across replicas, which TensorFlow "
            "cannot differentiate twice inside a replica (Hessian and GGN products would "
            "fail or hang). Use batchnorm='population' (moving statistics), or a copy of "
            "the model with synchronized=False (each replica's share then normalises by its "
            "own statistics), or compute it without the strategy, on a copy of the model "
            "built outside its scope (twin = keras.models.clone_model(model); "
            "twin.set_weights(model.get_weights())), which normalises by each whole batch"
        )
