"""Exact second derivatives through ``tf.nn.moments``.

``tf.nn.moments`` computes the variance as ``mean(squared_difference(x,
stop_gradient(mean)))``. The ``stop_gradient`` leaves the value and the first derivative
exact (the derivative of the variance along the mean, ``-2 mean(x - mean)``, is zero), but
not the second: autodiff of the gradient misses the ``-2 / N^2`` coupling of the samples
through the mean, so nested ``tf.GradientTape``s (and forward-over-back) give a wrong
Hessian for every layer that normalises by statistics it computes (Keras
``BatchNormalization`` with ``training=True``, ``LayerNormalization``,
``GroupNormalization``: they all call ``tf.nn.moments``). On a 6-sample normalisation the
error is 2 % of the Hessian's largest entry, and the wrong matrix is still symmetric.

:func:`exact_moments` swaps in an implementation without the ``stop_gradient`` while
specdens traces its functions (and only then): the values are the same, the first
derivatives the same up to rounding, the second derivatives exact.

References
----------
TensorFlow, ``tensorflow/python/ops/nn_impl.py`` (``moments``: "stop_gradient does not
change the gradient that gets backpropagated to the mean from the variance calculation,
because that gradient is zero" -- true for the first derivative only).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import tensorflow as tf

_LOCK = threading.RLock()


def moments(x: Any, axes: Any, shift: Any = None, keepdims: bool = False,
            name: str | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """``tf.nn.moments`` with the variance differentiable along the mean too."""
    del shift  # unused by tf.nn.moments as well
    with tf.name_scope(name or "moments"):
        y = tf.cast(x, tf.float32) if x.dtype == tf.float16 else x
        mean = tf.reduce_mean(y, axes, keepdims=True, name="mean")
        variance = tf.reduce_mean(tf.math.squared_difference(y, mean), axes,
                                  keepdims=True, name="variance")
        if not keepdims:
            mean = tf.squeeze(mean, axes)
            variance = tf.squeeze(variance, axes)
        if x.dtype == tf.float16:
            return tf.cast(mean, tf.float16), tf.cast(variance, tf.float16)
        return mean, variance


@contextlib.contextmanager
def exact_moments() -> Iterator[None]:
    """``tf.nn.moments`` is :func:`moments` inside the block (re-entrant; the original is
    back on exit, also after an exception)."""
    with _LOCK:
        original = tf.nn.moments
        tf.nn.moments = moments
        try:
            yield
        finally:
            tf.nn.moments = original
