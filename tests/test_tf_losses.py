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


def test_ignore_class_weighs_batches_by_their_kept_targets():
    """A Keras loss with ``ignore_class`` is a mean over the targets that are not ignored
    (Keras divides by their number, not by the batch size): with the ignored targets
    spread unevenly over the batches, and one batch of ignored targets only, the Hessian,
    gradient and GGN are those of ``loss(y_all, model(X_all))`` (nested tapes on all the
    data at once), and ``evaluate`` gives its value. Weighting batches by their size is
    off by ~0.3 here; the linear model's GGN is its Hessian."""
    from specdens.backends.tf import ggn
    from specdens.backends.tf.tracking import evaluate

    model = dense_model(seed=3)
    rng = np.random.default_rng(7)
    X = rng.standard_normal((24, 3))
    y = rng.integers(0, 2, 24)
    y[[0, 1, 2, 3, 5, 8, 13]] = -1           # 6 of batch 0, 1 of batch 1
    y[20:] = -1                               # batch 2: nothing counts
    batches = [(X[:10], y[:10]), (X[10:20], y[10:20]), (X[20:], y[20:])]
    for reduction in ("sum_over_batch_size", "sum"):
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=-1, reduction=reduction, dtype=F64)
        mean = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1,
                                                          dtype=F64)
        H_ref, g_ref = exact(model, X, y, lambda t, p, mean=mean: mean(t, p))
        op = hessian(model, loss, batches)
        assert rel(op.to_dense(), H_ref) <= TOL, reduction
        assert op.num_samples == 13.0, reduction  # 4 + 9 + 0 kept
        assert rel(gradient(model, loss, batches), g_ref) <= TOL, reduction
        assert rel(ggn(model, loss, batches).to_dense(), H_ref) <= TOL, reduction
        value, acc = evaluate(model, loss, batches)
        out = model(X).numpy()
        assert value == pytest.approx(float(mean(y, out)), rel=1e-12, abs=0), reduction
        keep = y != -1
        assert acc == pytest.approx(float(np.mean(out[keep].argmax(1) == y[keep])))
    # the reference is the mean over the kept samples
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    H_kept, _ = exact(model, X[keep], y[keep], lambda t, p: plain(t, p))
    assert rel(H_ref, H_kept) <= TOL
