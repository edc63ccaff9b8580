"""The Keras model's own losses (``model.losses``: weight and activity regularisers) in
the TensorFlow Hessian, GGN and gradient of a ``loss``, as ``model.fit`` minimises them.

References are exact float64 derivatives of the objective of all the data at once,
``loss(y, model(X)) + sum(model.losses)`` (Keras divides an activity regulariser by the
batch's samples, so on all the data it is the penalty's mean over all samples), by nested
``tf.GradientTape`` jacobians on the model's own variables, written without specdens.
The operators compute the same float64 sums in another order (over uneven batches and the
regulariser once per pass): the difference is a few ulps of the largest terms, relative
Frobenius ~1e-16 here; ``TOL64`` = 300 float64 ulps leaves room for the conditioning of
the sums, not for a left-out or double-counted penalty (relative 1e-1 and more).
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover - another Keras backend
    pytest.skip("Keras is not on its TensorFlow backend", allow_module_level=True)

from conftest import tf_exact_hessian as exact  # noqa: E402
from specdens.backends.tf import ggn, gradient, hessian  # noqa: E402

TOL64 = 300 * float(np.finfo(np.float64).eps)
F64 = "float64"
ZERO = tf.UnconnectedGradients.ZERO


def regularized(seed=0, activity=True):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((5,), dtype=F64),
        keras.layers.Dense(4, activation="tanh", dtype=F64,
                           kernel_regularizer=keras.regularizers.L2(0.5),
                           bias_regularizer=keras.regularizers.L2(0.25)),
        keras.layers.Dense(3, dtype=F64,
                           activity_regularizer=keras.regularizers.L2(0.1) if activity
                           else None)])


def xent():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)


def data(n=32, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 5)), rng.integers(0, 3, n)


def batches(X, y, cuts=(0, 10, 23, 32)):
    return [(X[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def flat(tensors):
    return tf.concat([tf.reshape(tf.convert_to_tensor(t), [-1]) for t in tensors], 0)


def training_objective(model, loss, X, y):
    """What ``model.fit`` minimises on the batch ``(X, y)``: the loss plus every entry of
    ``model.losses`` of this call (its activity losses and its weight penalties)."""
    def fn():
        out = model(X, training=False)
        return loss(y, out) + tf.add_n([tf.reduce_sum(t) for t in model.losses])
    return fn


def dense(op):
    return op.matmat(tf.eye(op.shape[0], dtype=op.dtype)).numpy()


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_weight_and_activity_regularisers_are_in_the_hessian_and_the_gradient(method):
    """A model with kernel, bias and activity regularisers over three uneven batches: the
    Hessian and the gradient are those of ``loss + sum(model.losses)`` on all the data
    (they were those of the loss alone: 0.885 of max|H| off, top eigenvalue 0.525
    instead of 1.402 on the reviewer's model). The weight penalties count once, not once
    per batch; each batch's activity loss is weighted by its samples."""
    model, loss = regularized(), xent()
    X, y = data()
    H_ref, g_ref = exact(training_objective(model, loss, X, y), model.trainable_variables)
    H = dense(hessian(model, loss, batches(X, y), method=method))
    g = gradient(model, loss, batches(X, y)).numpy()
    assert rel(H, H_ref) <= TOL64, rel(H, H_ref)
    assert rel(g, g_ref) <= TOL64, rel(g, g_ref)


def test_model_losses_with_weight_decay_and_a_regularizer_are_counted_once_each():
    """``weight_decay`` and ``regularizer`` add to the model's own penalties, each once."""
    model, loss = regularized(activity=False), xent()
    X, y = data()
    wd = 0.03
    bias = model.layers[1].bias

    def extra(params):
        return 0.2 * tf.reduce_sum(params[bias.path] ** 4)

    def objective():
        base = training_objective(model, loss, X, y)()
        theta = flat(model.trainable_variables)
        return base + 0.5 * wd * tf.reduce_sum(theta ** 2) + 0.2 * tf.reduce_sum(bias ** 4)

    H_ref, g_ref = exact(objective, model.trainable_variables)
    op = hessian(model, loss, batches(X, y), weight_decay=wd, regularizer=extra)
    assert bias.path in op.param_names, op.param_names
    g = gradient(model, loss, batches(X, y), weight_decay=wd, regularizer=extra).numpy()
    assert rel(dense(op), H_ref) <= TOL64
    assert rel(g, g_ref) <= TOL64


def test_ggn_adds_the_hessian_of_the_weight_penalties():
    """The GGN of a model with weight regularisers is ``J^T H_out J`` of the loss plus
    the exact Hessian of the penalties (as ``weight_decay`` adds ``weight_decay * I``)."""
    model, loss = regularized(activity=False), xent()
    X, y = data()
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        out = model(X, training=False)
    J = tape.jacobian(out, variables, unconnected_gradients=ZERO, experimental_use_pfor=False)
    J = np.concatenate([tf.reshape(j, (out.shape[0] * out.shape[1], -1)).numpy() for j in J],
                       axis=1)
    fixed = tf.constant(out.numpy())
    with tf.GradientTape(persistent=True) as t2:
        t2.watch(fixed)
        with tf.GradientTape() as t1:
            t1.watch(fixed)
            value = loss(y, fixed)
        d = tf.reshape(t1.gradient(value, fixed), [-1])
    H_out = tf.reshape(t2.jacobian(d, fixed, experimental_use_pfor=False),
                       (d.shape[0], d.shape[0])).numpy()

    def penalties():
        return tf.add_n([tf.reduce_sum(t) for t in model.losses])  # weights only: no call

    H_pen, _ = exact(penalties, variables)
    G_ref = J.T @ H_out @ J + H_pen
    G = dense(ggn(model, loss, batches(X, y)))
    assert rel(G, G_ref) <= TOL64, rel(G, G_ref)


def test_ggn_refuses_activity_regularisers():
    """An activity regulariser is a function of inner activations, which the GGN cannot
    place: a ValueError that names the layer and the ways out, before any product."""
    model = regularized()
    X, y = data()
    with pytest.raises(ValueError, match="activity_regularizer on ") as info:
        ggn(model, xent(), batches(X, y))
    assert model.layers[1].name in str(info.value) and "hessian()" in str(info.value)


def test_a_loss_fn_writes_its_objective_and_can_add_model_losses():
    """With ``loss_fn`` nothing is added: ``loss_fn`` returning the loss alone gives the
    Hessian of the loss alone, and adding ``tf.add_n(model.losses)`` inside it (the
    losses of its own call, activity ones included, and the weight penalties at the
    operator's point) gives the Hessian of ``loss=`` (the activity loss was missing)."""
    model, loss = regularized(), xent()
    X, y = data()

    def plain(m, batch):
        return loss(batch[1], m(batch[0]))

    def with_losses(m, batch):
        return loss(batch[1], m(batch[0])) + tf.add_n(m.losses)

    H_all, _ = exact(training_objective(model, loss, X, y), model.trainable_variables)
    H_plain, _ = exact(lambda: loss(y, model(X)), model.trainable_variables)
    assert rel(dense(hessian(model, loss_fn=with_losses, data=batches(X, y))),
               H_all) <= TOL64
    assert rel(dense(hessian(model, loss_fn=plain, data=batches(X, y))), H_plain) <= TOL64


def test_added_losses_with_a_count_that_is_not_the_samples_are_refused():
    """An activity regulariser (a mean over the batch's samples) with outputs that carry a
    Keras mask (each batch then counts its unmasked entries): a ValueError that says why
    and what to do, rather than a penalty weighted by token counts."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(9, 3, mask_zero=True, dtype=F64),
        keras.layers.Dense(2, dtype=F64, activity_regularizer=keras.regularizers.L2(0.1))])
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 9, (8, 6))
    tokens[:, 4:] = 0
    tags = rng.integers(0, 2, (8, 6))
    with pytest.raises(ValueError, match="adds losses while it is called") as info:
        hessian(model, xent(), (tokens, tags))
    assert "batch_size_fn" in str(info.value) and "Keras mask" in str(info.value)


def test_the_models_own_loss_list_is_left_as_it_was():
    """Keras clears a model's eager ``losses`` when it is called: the operators restore
    them (``model.losses`` after an eager call kept its activity loss)."""
    model, loss = regularized(), xent()
    X, y = data()
    model(X[:4])
    before = [float(t) for t in model.losses]
    assert len(before) == 3  # the activity loss of that call and two weight penalties
    op = hessian(model, loss, batches(X, y))
    dense(op)
    gradient(model, loss, batches(X, y))
    assert [float(t) for t in model.losses] == before


def test_a_changed_regulariser_is_seen_by_a_new_operator():
    """Traced functions are shared by operators of the same configuration: a regulariser
    set on a variable after an operator was built is part of the configuration."""
    model, loss = regularized(activity=False), xent()
    X, y = data()
    dense(hessian(model, loss, batches(X, y)))
    model.layers[0].kernel.regularizer = keras.regularizers.L2(2.0)
    H_ref, _ = exact(training_objective(model, loss, X, y), model.trainable_variables)
    assert rel(dense(hessian(model, loss, batches(X, y))), H_ref) <= TOL64


class Penalised(keras.layers.Layer):
    """A layer whose call adds a loss: the mean squared activation of its batch."""

    def __init__(self, **kwargs):
        super().__init__(dtype=F64, **kwargs)
        self.dense = keras.layers.Dense(4, activation="tanh", dtype=F64)

    def call(self, x):
        h = self.dense(x)
        self.add_loss(0.05 * tf.reduce_mean(tf.reduce_sum(tf.square(h), axis=1)))
        return h


def test_a_loss_added_in_call_is_in_the_hessian_and_refused_by_the_ggn():
    """``add_loss`` in a layer's call (a mean over the batch's samples): the Hessian is
    that of ``loss + sum(model.losses)`` on all the data; the GGN, which has no place for
    a function of inner activations, raises a ValueError at its first product."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,), dtype=F64), Penalised(),
                              keras.layers.Dense(3, dtype=F64)])
    loss = xent()
    X, y = data()
    H_ref, g_ref = exact(training_objective(model, loss, X, y), model.trainable_variables)
    assert rel(dense(hessian(model, loss, batches(X, y))), H_ref) <= TOL64
    assert rel(gradient(model, loss, batches(X, y)).numpy(), g_ref) <= TOL64
    op = ggn(model, loss, batches(X, y))
    with pytest.raises(ValueError, match="add_loss"):
        op.matvec(tf.ones(op.shape[0], F64))
