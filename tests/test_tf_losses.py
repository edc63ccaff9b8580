"""Keras loss objects and the cache of traced functions (TensorFlow backend).

Traced functions are shared by operators of the same model and configuration: a fresh but
equal Keras loss reuses them, and two losses that compute different things never do. The
keys must see every attribute a loss computes with: ``get_config()`` leaves out
``Huber``'s ``delta`` and ``CosineSimilarity``'s ``axis``.

References are exact float64 Hessians and gradients of the mean loss (nested
``tf.GradientTape`` jacobians), written without the model; the operator computes the
same float64 sums in another order, so agreement is a few ulps (1e-10 relative leaves room
for the conditioning of the sums, not for a loss of another configuration, which differs
by ~1).
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover - another Keras backend
    pytest.skip("Keras is not on its TensorFlow backend", allow_module_level=True)

from specdens.backends.tf import gradient, hessian  # noqa: E402

TOL = 1e-10
F64 = "float64"


def dense_model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((3,), dtype=F64), keras.layers.Dense(2, dtype=F64)])


def regression(seed=0, n=20):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3)), 1.5 * rng.standard_normal((n, 2))


def exact(model, X, Y, fn):
    """``(H, g)`` of ``mean(fn(Y, X @ W + b))`` at the model's ``(W, b)``, by nested tapes
    on a flat float64 vector (the operator's variable order: kernel, then bias)."""
    W, b = (v.numpy() for v in model.trainable_variables)
    theta = tf.constant(np.concatenate([W.ravel(), b]))
    with tf.GradientTape() as outer:
        outer.watch(theta)
        with tf.GradientTape() as inner:
            inner.watch(theta)
            out = X @ tf.reshape(theta[:6], (3, 2)) + theta[6:]
            value = tf.reduce_mean(fn(tf.constant(Y), out))
        g = inner.gradient(value, theta)
    return outer.jacobian(g, theta).numpy(), g.numpy()


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


CASES = {
    # name: (loss of one setting, the same loss function, the two settings)
    "huber_delta": (lambda s: keras.losses.Huber(delta=s, dtype=F64),
                    lambda s: lambda y, p: keras.losses.huber(y, p, delta=s), (1.0, 5.0)),
    "cosine_axis": (lambda s: keras.losses.CosineSimilarity(axis=s, dtype=F64),
                    lambda s: lambda y, p: keras.losses.cosine_similarity(y, p, axis=s),
                    (-1, 0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_losses_that_differ_outside_get_config_do_not_share_traces(case):
    """Two operators on one model whose Keras losses differ only in a setting that
    ``get_config()`` omits: the second is the Hessian (and the gradient) of its own loss,
    not the first one's traced again."""
    make, fn, (first, second) = CASES[case]
    model = dense_model(seed=5)
    X, Y = regression()
    H_first, g_first = exact(model, X, Y, fn(first))
    H_second, g_second = exact(model, X, Y, fn(second))
    assert rel(H_second, H_first) > 1e-2  # the two settings are different matrices
    assert rel(hessian(model, make(first), (X, Y)).to_dense(), H_first) <= TOL
    assert rel(gradient(model, make(first), (X, Y)), g_first) <= TOL
    op = hessian(model, make(second), (X, Y))
    assert rel(op.to_dense(), H_second) <= TOL
    assert rel(gradient(model, make(second), (X, Y)), g_second) <= TOL
    # a fresh loss equal to the second one shares its traced functions
    again = hessian(model, make(second), (X, Y))
    assert again.kernel is op.kernel
    assert rel(again.to_dense(), H_second) <= TOL
