"""The TensorFlow side of ``specdens investigate`` (:mod:`specdens.investigate`): a Keras
``Sequential`` MLP, one SGD step of each of the three runs (a ``tf.function``), and a
record of the spectrum with :func:`specdens.backends.tf.hessian` and
:func:`specdens.backends.tf.gradient`.

Everything follows the PyTorch run (:mod:`specdens._investigate_torch`) step for step:

- ``Dense(-BatchNormalization)-ReLU`` blocks and a ``Dense`` output, every layer in the
  run's dtype; the weights are set from PyTorch's ``(out, in)`` layout (Keras kernels are
  ``(in, out)``), and no Keras initialiser or random generator is used;
- BatchNorm: Keras ``BatchNormalization`` with epsilon 1e-5 normalises the batch by its
  mean and biased variance in training (``training=True``) and by its moving averages
  otherwise, as ``torch.nn.BatchNorm1d`` does; the moving averages are written here as
  torch updates them (momentum 0.1, the *unbiased* batch variance), replacing the update
  Keras makes in a training call (which would use the biased variance);
- ``bn-population``: before each step the moving averages are updated from the
  mini-batch by a forward pass on batch statistics (the update of layer ``l`` sees the
  batch-normalised output of layer ``l - 1``, as in torch's training-mode pass), then the
  loss is computed with ``training=False``, normalising by them as constants;
- SGD as ``torch.optim.SGD`` (Keras's ``SGD`` decouples the weight decay from the
  momentum, torch does not): ``d = g + wd * theta``, ``buf = momentum * buf + d``,
  ``theta -= lr * buf``.

The spectrum is of the same Keras model, through :mod:`specdens.backends.tf` (which
evaluates it at a snapshot of its variables and never writes to it). Its flat vectors
hold the Dense kernels in Keras's ``(in, out)`` layout; :meth:`Run.record` hands the
engine the Hessian and the gradient in PyTorch's order instead (``(out, in)`` kernels:
:class:`TorchOrder`, a fixed permutation of the entries), as the JAX backend's are, so
that the SLQ probes and eigsh's start vectors of a seed are the same vectors on the three
backends and the densities agree, not only the permutation-invariant numbers.

Importing this module imports TensorFlow and Keras, and needs Keras on its TensorFlow
backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

try:
    import keras
except ImportError as exc:  # pragma: no cover - Keras ships with TensorFlow >= 2.16
    raise ImportError(f"Keras 3 is missing ({exc})") from exc

from specdens import LinearOperatorBase, _checks
from specdens.backends.tf import gradient, hessian
from specdens.backends.tf.tracking import evaluate

from .investigate import BATCHNORM_EPS, BATCHNORM_MOMENTUM, hessian_batches, sample_order

if keras.backend.backend() != "tensorflow":
    raise ImportError(f"Keras runs on {keras.backend.backend()!r}; --backend tf needs "
                      "KERAS_BACKEND=tensorflow")

NAME = "tf"
BATCHNORM_TEXT = ("`keras.layers.BatchNormalization` with epsilon 1e-5; its moving "
                  "averages updated as PyTorch's: momentum 0.1, unbiased batch variance")
INIT_TEXT = ("PyTorch's default distribution drawn with numpy "
             "(`specdens.investigate.torch_default_weights`)")
ORDER_TEXT = "a numpy permutation per epoch (`specdens.investigate.sample_order`)"


def versions() -> dict:
    """The frameworks' versions, for ``summary.json``."""
    return {"tensorflow": tf.__version__, "keras": keras.__version__}


@contextlib.contextmanager
def session(config: Any) -> Iterator[dict]:
    """Nothing to scope (dtypes are set per layer and per loss); yields the settings for
    the report."""
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    yield {"threads": intra or "TensorFlow's default",
           "threads_note": "TensorFlow intra-op threads"}


def mlp(width: int, depth: int, batchnorm: bool, classes: int, dtype: str) -> Any:
    """A Keras ``Sequential`` MLP with zero weights (set them with :func:`set_weights`)."""
    dense = dict(kernel_initializer="zeros", bias_initializer="zeros", dtype=dtype)
    layers: list = [keras.Input((64,), dtype=dtype)]
    for _ in range(depth):
        layers.append(keras.layers.Dense(width, **dense))
        if batchnorm:
            layers.append(keras.layers.BatchNormalization(
                momentum=1.0 - BATCHNORM_MOMENTUM, epsilon=BATCHNORM_EPS, dtype=dtype))
        layers.append(keras.layers.ReLU(dtype=dtype))
    layers.append(keras.layers.Dense(classes, **dense))
    return keras.Sequential(layers)


def set_weights(model: Any, weights: list) -> None:
    """Write ``[(W, b), ...]`` in PyTorch's ``(out, in)`` layout into the Dense layers."""
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for layer, (W, b) in zip(dense, weights, strict=True):
        layer.kernel.assign(np.asarray(W).T)
        layer.bias.assign(np.asarray(b))


def torch_order(shapes: list) -> np.ndarray:
    """The permutation from the flat vectors of Keras variables of ``shapes`` (Dense
    kernels ``(in, out)``, biases and BatchNorm vectors 1-D) to PyTorch's: entry ``i`` of
    the torch-ordered vector is entry ``perm[i]`` of the Keras-ordered one (a kernel
    ``K`` of shape ``(in, out)`` is flattened as ``K.T``, torch's ``(out, in)`` weight).
    """
    parts = []
    start = 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        idx = np.arange(start, start + size, dtype=np.int64)
        if len(shape) == 2:
            idx = idx.reshape(shape).T.reshape(-1)
        elif len(shape) != 1:
            raise ValueError(f"unexpected variable shape {shape} in the MLP")
        parts.append(idx)
        start += size
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class TorchOrder(LinearOperatorBase):
    """``op`` seen in PyTorch's parameter order: ``P op P^T`` for the permutation ``P``
    of :func:`torch_order` (``(P v)[i] = v[perm[i]]``). Each product is ``op``'s product
    between two gathers of the block's rows, on the operator's own namespace and device
    (the same products, the same rounding). :meth:`to_torch` permutes a vector (the
    gradient) alike."""

    def __init__(self, op: Any, perm: np.ndarray):
        super().__init__(op.shape, op.dtype, op.xp, op.device)
        perm = np.asarray(perm, dtype=np.int64)
        if perm.shape != (op.shape[0],) or not np.array_equal(np.sort(perm),
                                                              np.arange(op.shape[0])):
            raise ValueError("perm must be a permutation of the operator's indices")
        self.op = op
        self.symmetric = op.symmetric
        self.product_dtype = _checks.product_dtype(op)
        self._perm = op.xp.asarray(perm, device=op.device)
        self._inverse = op.xp.asarray(np.argsort(perm), device=op.device)

    def to_torch(self, v: Any) -> Any:
        """A flat vector in Keras's order as PyTorch's."""
        return tf.gather(v, self._perm, axis=0)

    def _matmat(self, V: Any) -> Any:
        return tf.gather(self.op.matmat(tf.gather(V, self._inverse, axis=0)), self._perm,
                         axis=0)

    def _matvec(self, v: Any) -> Any:
        return tf.gather(self.op.matvec(tf.gather(v, self._inverse, axis=0)), self._perm,
                         axis=0)

    def parts(self) -> tuple[Any, ...]:
        return (self.op,)

    def _transpose(self) -> LinearOperatorBase:  # (a Hessian is its own: not called)
        return TorchOrder(self.op.T, self._perm.numpy())


class Run:
    """One of the three trainings on TensorFlow/Keras (see :mod:`specdens.investigate`).

    Parameters
    ----------
    name
        ``"no-bn"``, ``"bn-batch"`` or ``"bn-population"``.
    config
        The :class:`~specdens.investigate.InvestigationConfig`.
    data
        The digits (:func:`specdens.investigate._digits`).
    weights
        ``[(W, b), ...]`` per linear layer in PyTorch's layout (see
        :func:`specdens.investigate.torch_default_weights`).
    """

    def __init__(self, name: str, config: Any, data: dict, weights: list):
        self.name = name
        self.config = config
        dtype = config.dtype
        batchnorm = name != "no-bn"
        self.Xtr = tf.constant(np.asarray(data["x_train"], dtype=dtype))
        self.ytr = tf.constant(np.asarray(data["y_train"]))
        self.Xte = tf.constant(np.asarray(data["x_test"], dtype=dtype))
        self.yte = np.asarray(data["y_test"])
        self._xtr_host = np.asarray(data["x_train"], dtype=dtype)
        self._ytr_host = np.asarray(data["y_train"])
        self.n_train = int(self._xtr_host.shape[0])
        self.model = mlp(config.width, config.depth, batchnorm, data["classes"], dtype)
        set_weights(self.model, weights)
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype)
        bs = config.batch_size
        if name == "bn-batch":
            # Batch statistics depend on the batching: the Hessian's batches are fixed ones
            # of the training batch size, the same on every backend (hessian_batches).
            self.hess_data = [(self.Xtr[a:b], self.ytr[a:b])
                              for a, b in hessian_batches(self.n_train, bs)]
            self.bn_mode = "batch"
        else:
            self.hess_data = (self.Xtr, self.ytr)  # one batch: the same mean loss
            self.bn_mode = "population" if name == "bn-population" else "batch"
        self.batchnorm = self.bn_mode if batchnorm else None
        self.hessian_batches = len(self.hess_data) if name == "bn-batch" else 1
        self.trainable = list(self.model.trainable_variables)
        self.parameters = int(sum(np.prod(v.shape) for v in self.trainable))
        self._bufs = [tf.Variable(tf.zeros(v.shape, dtype=dtype), trainable=False)
                      for v in self.trainable]
        self._bn = [layer for layer in self.model.layers
                    if isinstance(layer, keras.layers.BatchNormalization)]
        self._rng = sample_order(config.seed)
        self._step = tf.function(self._sgd_step)

    def permutation(self) -> np.ndarray:
        """The next epoch's order of the training samples."""
        return self._rng.permutation(self.n_train)

    # -- training ------------------------------------------------------------------------
    def _forward(self, x: Any, training: bool) -> tuple[Any, list]:
        """The model's outputs, and the inputs of its BatchNormalization layers."""
        h = x
        bn_inputs = []
        for layer in self.model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                bn_inputs.append(h)
            h = layer(h, training=training)
        return h, bn_inputs

    def _set_running(self, old: list, bn_inputs: list) -> None:
        """Moving averages as ``torch.nn.BatchNorm1d`` updates them from a batch."""
        m = BATCHNORM_MOMENTUM
        for layer, (mean_old, var_old), h in zip(self._bn, old, bn_inputs, strict=True):
            h = tf.stop_gradient(h)
            n = tf.cast(tf.shape(h)[0], h.dtype)
            mean = tf.reduce_mean(h, axis=0)
            var = tf.reduce_mean(tf.square(h - mean), axis=0) * (n / (n - 1))
            layer.moving_mean.assign((1 - m) * mean_old + m * mean)
            layer.moving_variance.assign((1 - m) * var_old + m * var)

    def _sgd_step(self, x: Any, y: Any) -> Any:
        # the moving averages before any training call changes them
        old = [(tf.identity(layer.moving_mean.value), tf.identity(layer.moving_variance.value))
               for layer in self._bn]
        if self.name == "bn-population":
            # update the running (population) statistics from this batch ...
            self._set_running(old, self._forward(x, training=True)[1])
        # ... and normalise by them, as constants (training=False); or by the batch's
        with tf.GradientTape() as tape:
            out, bn_inputs = self._forward(x, training=self.name == "bn-batch")
            loss = self.loss(y, out)
        grads = tape.gradient(loss, self.trainable)
        if self.name == "bn-batch":
            # the training-mode pass updates the running averages (used in evaluation)
            self._set_running(old, bn_inputs)
        c = self.config
        for v, g, buf in zip(self.trainable, grads, self._bufs, strict=True):
            d = g + c.weight_decay * v.value
            buf.assign(c.momentum * buf + d)
            v.assign(v.value - c.lr * buf)
        return loss

    def train_step(self, idx: Any) -> float:
        """One SGD step on the samples ``idx``; returns the mini-batch loss before it (the
        run stops at a non-finite loss)."""
        idx = np.asarray(idx)
        return float(self._step(tf.constant(self._xtr_host[idx]),
                                tf.constant(self._ytr_host[idx])))

    # -- records ---------------------------------------------------------------------------
    def finite(self) -> bool:
        """Whether the weights, the BatchNorm moving averages and the loss on the Hessian's
        data (as :meth:`record` evaluates it) are all finite; False: the run has diverged
        and cannot be recorded."""
        if not all(bool(np.all(np.isfinite(v.numpy()))) for v in self.model.weights):
            return False
        loss, _ = evaluate(self.model, self.loss, self.hess_data, batchnorm=self.bn_mode)
        return bool(np.isfinite(loss))

    def record(self, tracker: Any, step: int, extra: dict) -> None:
        """Record the spectrum at ``step`` (with the gradient's data and weight-decay
        parts, the parameter norm and the test accuracy in ``extra``).

        The Hessian and the gradient go to the tracker in PyTorch's parameter order
        (:class:`TorchOrder`), so that a seed's probes are the vectors torch and JAX use."""
        wd = self.config.weight_decay
        keras_op = hessian(self.model, self.loss, self.hess_data, batchnorm=self.bn_mode,
                           weight_decay=wd)
        op = TorchOrder(keras_op, torch_order(keras_op.param_shapes))
        g = op.to_torch(gradient(self.model, self.loss, self.hess_data,
                                 batchnorm=self.bn_mode, weight_decay=wd))
        g_data = gradient(self.model, self.loss, self.hess_data, batchnorm=self.bn_mode)
        loss, acc = evaluate(self.model, self.loss, self.hess_data, batchnorm=self.bn_mode)
        pnorm = float(np.sqrt(sum(np.sum(np.square(np.asarray(v.numpy(), dtype=np.float64)))
                                  for v in self.trainable)))
        tracker.record(step, op, g, loss=loss, accuracy=acc,
                       extra={"test_accuracy": self._test_accuracy(), **extra,
                              "data_gradient_norm": float(tf.norm(g_data)),
                              "weight_decay_gradient_norm": wd * pnorm,
                              "param_norm": pnorm})

    def _test_accuracy(self) -> float:
        """Accuracy on the test split in evaluation mode (BatchNorm on moving averages)."""
        out = self.model(self.Xte, training=False).numpy()
        return float(np.mean(np.argmax(out, axis=1) == self.yte))
