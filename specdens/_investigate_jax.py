"""The JAX side of ``specdens investigate`` (:mod:`specdens.investigate`): the MLP with
BatchNorm written out, one SGD step of each of the three runs (compiled), and a record of
the spectrum with :func:`specdens.backends.jax.hessian` and
:func:`specdens.backends.jax.gradient`.

Everything follows the PyTorch run (:mod:`specdens._investigate_torch`) step for step:

- parameters ``{"weights": [[W, b(, gamma, beta)], ..., [W, b]], "stats": [[mean,
  var], ...]}`` with ``W`` in PyTorch's ``(out, in)`` layout, so that the flat vectors of
  the Hessian are ordered as torch's (``W``, ``b``, ``gamma``, ``beta`` per layer) and the
  SLQ probes of a seed are the same vectors; the running statistics are leaves of the
  pytree that the Hessian holds fixed (``mask``);
- BatchNorm as ``torch.nn.BatchNorm1d``: in training, normalisation by the batch mean and
  the biased batch variance with epsilon 1e-5, and the running averages updated with
  momentum 0.1 from the batch mean and the *unbiased* batch variance; in evaluation, and in
  the ``bn-population`` run's loss, normalisation by the running averages;
- ``bn-population``: before each step the running averages are updated from the
  mini-batch by a forward pass on batch statistics (the update of layer ``l`` sees the
  batch-normalised output of layer ``l - 1``, as in torch's training-mode pass), then the
  loss normalises by them, as constants;
- SGD as ``torch.optim.SGD``: ``d = g + wd * theta``, ``buf = momentum * buf + d`` (the
  buffer starts at 0, so the first step's buffer is ``d``), ``theta -= lr * buf``.

float64 runs inside ``jax.enable_x64(True)`` (:func:`session`), which is restored
afterwards. Importing this module imports jax.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from specdens.backends.jax import gradient, hessian
from specdens.backends.jax.tracking import evaluate

from .investigate import BATCHNORM_EPS, BATCHNORM_MOMENTUM, hessian_batches, sample_order

NAME = "jax"
BATCHNORM_TEXT = ("written out in the JAX model with PyTorch's semantics: epsilon 1e-5, "
                  "running averages with momentum 0.1 and the unbiased batch variance")
INIT_TEXT = ("PyTorch's default distribution drawn with numpy "
             "(`specdens.investigate.torch_default_weights`)")
ORDER_TEXT = "a numpy permutation per epoch (`specdens.investigate.sample_order`)"

MASK = {"weights": True, "stats": False}
"""The Hessian's leaves: the weights; the running statistics are held fixed."""


def versions() -> dict:
    """The framework's versions, for ``summary.json``."""
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}


@contextlib.contextmanager
def session(config: Any) -> Iterator[dict]:
    """``jax.enable_x64`` on for float64 (off for float32) around the investigation, and
    as it was afterwards; yields the settings for the report."""
    with jax.enable_x64(config.dtype == "float64"):
        yield {"threads": "XLA's default", "threads_note": "threads",
               "x64": config.dtype == "float64", "device": str(jax.devices()[0])}


# -- the model ---------------------------------------------------------------------------
def apply(weights: list, stats: list, x: Any, mode: str | None) -> tuple[Any, list]:
    """The MLP's outputs, and the batch statistics of its BatchNorm layers.

    Parameters
    ----------
    weights
        ``[[W, b(, gamma, beta)], ..., [W, b]]`` (``W`` of shape ``(out, in)``).
    stats
        ``[[running_mean, running_var], ...]`` per BatchNorm layer.
    x
        Inputs ``(n, 64)``.
    mode
        None (no BatchNorm), ``"batch"`` (batch statistics: the mean and the biased
        variance of ``x``'s batch) or ``"population"`` (the running averages ``stats``).

    Returns
    -------
    logits : jax.Array
    batch_stats : list
        ``[(mean, biased variance), ...]`` per BatchNorm layer in ``"batch"`` mode (empty
        otherwise).
    """
    h = x
    batch_stats = []
    for i, layer in enumerate(weights[:-1]):
        h = h @ layer[0].T + layer[1]
        if mode is not None:
            if mode == "batch":
                mean = jnp.mean(h, axis=0)
                var = jnp.mean(jnp.square(h - mean), axis=0)
                batch_stats.append((mean, var))
            else:
                mean, var = stats[i]
            h = (h - mean) / jnp.sqrt(var + BATCHNORM_EPS) * layer[2] + layer[3]
        h = jax.nn.relu(h)
    W, b = weights[-1]
    return h @ W.T + b, batch_stats


def cross_entropy(logits: Any, y: Any) -> Any:
    """Mean cross-entropy of integer targets (``torch.nn.CrossEntropyLoss``)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def update_stats(stats: list, batch_stats: list, n: int) -> list:
    """Running averages after one batch of ``n`` samples (``torch.nn.BatchNorm1d``):
    ``(1 - m) * running + m * batch`` with the unbiased variance."""
    m = BATCHNORM_MOMENTUM
    return [[(1 - m) * rm + m * mean, (1 - m) * rv + m * var * (n / (n - 1))]
            for (rm, rv), (mean, var) in zip(stats, batch_stats, strict=True)]


class Run:
    """One of the three trainings on JAX (see :mod:`specdens.investigate`).

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
        dtype = jnp.dtype(config.dtype)
        if dtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise RuntimeError("float64 needs jax_enable_x64: build the run inside "
                               "session(config)")
        self.dtype = dtype
        batchnorm = name != "no-bn"
        self.mode = None if not batchnorm else ("population" if name == "bn-population"
                                                else "batch")
        self.Xtr = jnp.asarray(data["x_train"], dtype=dtype)
        self.ytr = jnp.asarray(data["y_train"])
        self.Xte = jnp.asarray(data["x_test"], dtype=dtype)
        self.yte = jnp.asarray(data["y_test"])
        self._xtr_host = np.asarray(data["x_train"], dtype=dtype)
        self._ytr_host = np.asarray(data["y_train"])
        self.n_train = int(self.Xtr.shape[0])
        layers = []
        stats = []
        for j, (W, b) in enumerate(weights):
            layer = [jnp.asarray(W, dtype=dtype), jnp.asarray(b, dtype=dtype)]
            if batchnorm and j < len(weights) - 1:
                width = int(np.shape(b)[0])
                layer += [jnp.ones(width, dtype), jnp.zeros(width, dtype)]
                stats.append([jnp.zeros(width, dtype), jnp.ones(width, dtype)])
            layers.append(layer)
        self.params = {"weights": layers, "stats": stats}
        self._buf = jax.tree_util.tree_map(jnp.zeros_like, layers)
        bs = config.batch_size
        if name == "bn-batch":
            # Batch statistics depend on the batching: the Hessian's batches are fixed ones
            # of the training batch size, the same on every backend (hessian_batches).
            self.hess_data = [(self.Xtr[a:b], self.ytr[a:b])
                              for a, b in hessian_batches(self.n_train, bs)]
        else:
            self.hess_data = (self.Xtr, self.ytr)  # one batch: the same mean loss
        self.batchnorm = self.mode
        self.parameters = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(layers)))
        self.hessian_batches = len(self.hess_data) if name == "bn-batch" else 1
        self._rng = sample_order(config.seed)
        self._step = jax.jit(self._sgd_step)
        mode = self.mode

        def loss_fn(params: dict, batch: Any) -> Any:
            x, y = batch
            return cross_entropy(apply(params["weights"], params["stats"], x, mode)[0], y)

        def accuracy_fn(params: dict, batch: Any) -> Any:
            x, y = batch
            out = apply(params["weights"], params["stats"], x, mode)[0]
            return jnp.mean((jnp.argmax(out, axis=1) == y).astype(out.dtype))

        self.loss_fn = loss_fn
        self.accuracy_fn = accuracy_fn

    def permutation(self) -> np.ndarray:
        """The next epoch's order of the training samples."""
        return self._rng.permutation(self.n_train)

    def _sgd_step(self, params: dict, buf: list, x: Any, y: Any) -> tuple[dict, list, Any]:
        weights, stats = params["weights"], params["stats"]
        n = x.shape[0]
        if self.name == "bn-population":
            # update the running (population) statistics from this batch ...
            batch_stats = apply(weights, stats, x, "batch")[1]
            stats = jax.lax.stop_gradient(update_stats(stats, batch_stats, n))
            # ... and normalise by them, as constants
            loss, g = jax.value_and_grad(
                lambda w: cross_entropy(apply(w, stats, x, "population")[0], y))(weights)
        elif self.name == "bn-batch":
            def f(w: list) -> tuple[Any, list]:
                logits, bst = apply(w, stats, x, "batch")
                return cross_entropy(logits, y), bst

            (loss, batch_stats), g = jax.value_and_grad(f, has_aux=True)(weights)
            # the training-mode pass updates the running averages (used in evaluation)
            stats = update_stats(stats, jax.lax.stop_gradient(batch_stats), n)
        else:
            loss, g = jax.value_and_grad(
                lambda w: cross_entropy(apply(w, stats, x, None)[0], y))(weights)
        c = self.config
        d = jax.tree_util.tree_map(lambda gi, p: gi + c.weight_decay * p, g, weights)
        buf = jax.tree_util.tree_map(lambda b, di: c.momentum * b + di, buf, d)
        weights = jax.tree_util.tree_map(lambda p, b: p - c.lr * b, weights, buf)
        return {"weights": weights, "stats": stats}, buf, loss

    def train_step(self, idx: Any) -> float:
        """One SGD step on the samples ``idx``; returns the mini-batch loss before it (a
        non-finite loss is returned without stepping)."""
        idx = np.asarray(idx)
        params, buf, loss = self._step(self.params, self._buf, self._xtr_host[idx],
                                       self._ytr_host[idx])
        value = float(loss)
        if np.isfinite(value):
            self.params, self._buf = params, buf
        return value

    def finite(self) -> bool:
        """Whether the parameters, the BatchNorm statistics and the loss on the Hessian's
        data (as :meth:`record` evaluates it) are all finite; False: the run has diverged
        and cannot be recorded."""
        if not all(bool(np.all(np.isfinite(np.asarray(x))))
                   for x in jax.tree_util.tree_leaves(self.params)):
            return False
        try:
            loss, _ = evaluate(self.loss_fn, self.params, self.hess_data)
        except FloatingPointError:  # (evaluate refuses a non-finite loss)
            return False
        return bool(np.isfinite(loss))

    def record(self, tracker: Any, step: int, extra: dict) -> None:
        """Record the spectrum at ``step`` (with the gradient's data and weight-decay
        parts, the parameter norm and the test accuracy in ``extra``).

        What :func:`specdens.backends.jax.tracking.track` does, with one gradient pass
        instead of two: the data gradient ``g_data`` (stored as a norm) plus ``wd * theta``
        is the gradient that ``gradient(..., weight_decay=wd)`` returns (the same sum in
        the same order), and every pass costs a compilation here, since the backend
        compiles its kernels per operator."""
        wd = self.config.weight_decay
        op = hessian(self.loss_fn, self.params, self.hess_data, mask=MASK, weight_decay=wd)
        g_data = gradient(self.loss_fn, self.params, self.hess_data, mask=MASK)
        g = g_data + wd * op.flatten(self.params) if wd else g_data
        loss, acc = evaluate(self.loss_fn, self.params, self.hess_data,
                             accuracy_fn=self.accuracy_fn)
        pnorm = float(np.sqrt(sum(np.sum(np.square(np.asarray(p, dtype=np.float64)))
                                  for p in jax.tree_util.tree_leaves(self.params["weights"]))))
        tracker.record(step, op, g, loss=loss, accuracy=acc,
                       extra={"test_accuracy": self._test_accuracy(), **extra,
                              "data_gradient_norm": float(jnp.linalg.norm(g_data)),
                              "weight_decay_gradient_norm": wd * pnorm,
                              "param_norm": pnorm})

    def _test_accuracy(self) -> float:
        """Accuracy on the test split in evaluation mode (BatchNorm on running
        statistics)."""
        mode = None if self.mode is None else "population"
        out = apply(self.params["weights"], self.params["stats"], self.Xte, mode)[0]
        return float(np.mean(np.asarray(jnp.argmax(out, axis=1)) == np.asarray(self.yte)))
