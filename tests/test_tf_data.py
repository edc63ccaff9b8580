"""Data the TensorFlow backend takes or refuses: multi-input batches ``([x1, x2], y)``,
ragged and sparse batches, infinite datasets, and a gradient that is not finite.

References are exact float64 Hessians and gradients of the loss of all the data at once
(nested ``tf.GradientTape`` jacobians, written without specdens); the operators compute
the same float64 sums in another order (over batches), a few ulps of the largest terms
(~1e-16 relative). ``TOL64`` = 300 float64 ulps leaves room for the conditioning of the
sums, not for a mis-parsed batch or a wrong weight (errors of order 1).
"""

from __future__ import annotations

import signal

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


def dense(op):
    return op.matmat(tf.eye(op.shape[0], dtype=op.dtype)).numpy()


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.fixture
def alarm():
    """Fail, rather than hang, when the code under test does not return in 30 s."""
    def expire(*_):
        raise TimeoutError("still running after 30 s: it would never end")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# -- multi-input batches ------------------------------------------------------------
def two_input_model():
    keras.utils.set_random_seed(0)
    a, b = keras.Input((3,), dtype=F64), keras.Input((2,), dtype=F64)
    h = keras.layers.Concatenate(dtype=F64)([a, b])
    h = keras.layers.Dense(4, activation="tanh", dtype=F64)(h)
    return keras.Model([a, b], keras.layers.Dense(1, dtype=F64)(h))


def two_inputs(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3)), rng.standard_normal((n, 2)), rng.standard_normal((n, 1))


@pytest.mark.parametrize("wrap", [lambda x1, x2, y: ([x1, x2], y),
                                  lambda x1, x2, y: ((x1, x2), y),
                                  lambda x1, x2, y: [[x1, x2], y],
                                  lambda x1, x2, y: ((tf.constant(x1), tf.constant(x2)),
                                                     tf.constant(y))],
                         ids=["tuple_of_list", "tuple_of_tuple", "list_of_list", "tensors"])
def test_one_multi_input_batch(wrap):
    """``([x1, x2], y)`` (Keras's convention for a model of two inputs) is one batch:
    the Hessian, the GGN and the gradient are those of all the data (it was read as a
    list of two batches, and Keras raised a misleading error)."""
    model = two_input_model()
    loss = keras.losses.MeanSquaredError(dtype=F64)
    x1, x2, y = two_inputs()
    H_ref, g_ref = exact(lambda: loss(y, model([x1, x2])), model.trainable_variables)
    data = wrap(x1, x2, y)
    assert rel(dense(hessian(model, loss, data)), H_ref) <= TOL64
    assert rel(gradient(model, loss, data), g_ref) <= TOL64
    op = ggn(model, loss, data)
    assert op.num_samples == 24.0 and op.num_batches == 1


def test_a_list_of_multi_input_batches_still_works():
    model = two_input_model()
    loss = keras.losses.MeanSquaredError(dtype=F64)
    x1, x2, y = two_inputs()
    H_ref, _ = exact(lambda: loss(y, model([x1, x2])), model.trainable_variables)
    batches = [((x1[:10], x2[:10]), y[:10]), ((x1[10:], x2[10:]), y[10:])]
    op = hessian(model, loss, batches)
    assert op.num_batches == 2
    assert rel(dense(op), H_ref) <= TOL64


def test_a_multi_input_batch_whose_sample_counts_differ_explains_both_readings():
    model = two_input_model()
    loss = keras.losses.MeanSquaredError(dtype=F64)
    x1, x2, y = two_inputs()
    with pytest.raises(ValueError, match="leading") as info:
        hessian(model, loss, ([x1, x2[:20]], y))
    message = str(info.value)
    assert "multi-input batch" in message and "list of batches" in message


# -- ragged and sparse batches ------------------------------------------------------
class Bag(tf.Module):
    """A bag of token embeddings: ragged token ids -> mean embedding -> logits."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.emb = tf.Variable(rng.standard_normal((6, 3)))
        self.w = tf.Variable(rng.standard_normal((3, 2)))

    def __call__(self, ids):
        e = tf.ragged.map_flat_values(tf.gather, self.emb, ids)
        return tf.tanh(tf.reduce_mean(e, axis=1)) @ self.w


def bag_loss(model, batch):
    x, t = batch
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(t, model(x)))


def ragged_data(n=10):
    rng = np.random.default_rng(1)
    rows = [list(rng.integers(0, 6, rng.integers(1, 5))) for _ in range(n)]
    return tf.ragged.constant(rows, dtype=tf.int64), tf.constant(rng.integers(0, 2, n))


@pytest.mark.parametrize("kind", ["one", "list", "dataset"])
def test_ragged_batches(kind):
    """Batches of ``tf.RaggedTensor`` token ids through a ``loss_fn``: one batch, a list
    of uneven batches and a ``tf.data`` pipeline give the Hessian and the gradient of all
    the data (each raised "object of type 'RaggedTensor' has no len()")."""
    model = Bag()
    ids, t = ragged_data()
    H_ref, g_ref = exact(lambda: bag_loss(model, (ids, t)), [model.emb, model.w])
    data = {"one": (ids, t),
            "list": [(ids[:6], t[:6]), (ids[6:], t[6:])],
            "dataset": tf.data.Dataset.from_tensor_slices((ids, t)).batch(4)}[kind]
    op = hessian(model, loss_fn=bag_loss, data=data)
    assert op.num_samples == 10.0
    assert rel(dense(op), H_ref) <= TOL64
    assert rel(gradient(model, loss_fn=bag_loss, data=data), g_ref) <= TOL64


def test_ragged_data_that_changes_between_passes_is_detected():
    model = Bag()
    ids, t = ragged_data()
    batches = [(ids[:6], t[:6]), (ids[6:], t[6:])]
    op = hessian(model, loss_fn=bag_loss, data=batches)
    rows = ids.to_list()
    rows[0] = [5, 5, 5] if rows[0] != [5, 5, 5] else [0]
    batches[0] = (tf.ragged.constant(rows[:6], dtype=tf.int64), t[:6])
    with pytest.raises(RuntimeError, match="different batches"):
        op.matvec(tf.ones(op.shape[0], tf.float64))


def test_sparse_batches():
    """A ``tf.SparseTensor`` of inputs, batched by ``tf.data``, through a ``loss_fn``."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((12, 5)) * (rng.random((12, 5)) < 0.4)
    y = rng.standard_normal((12, 2))
    W = tf.Variable(rng.standard_normal((5, 2)))
    module = tf.Module()
    module.W = W

    def loss_fn(model, batch):
        x, t = batch
        out = tf.tanh(tf.sparse.sparse_dense_matmul(x, model.W))
        return tf.reduce_mean(tf.reduce_sum((out - t) ** 2, axis=1))

    sparse = tf.sparse.from_dense(tf.constant(X))
    H_ref, g_ref = exact(lambda: loss_fn(module, (sparse, tf.constant(y))), [W])
    ds = tf.data.Dataset.from_tensor_slices((sparse, y)).batch(5)
    op = hessian(module, loss_fn=loss_fn, data=ds)
    assert op.num_samples == 12.0
    assert rel(dense(op), H_ref) <= TOL64
    assert rel(gradient(module, loss_fn=loss_fn, data=ds), g_ref) <= TOL64


# -- data without an end --------------------------------------------------------------
def small_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,), dtype=F64), keras.layers.Dense(3, dtype=F64)])


def xent():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)


@pytest.mark.parametrize("build", [hessian, ggn, gradient])
def test_an_infinite_dataset_is_refused(alarm, build):
    """``dataset.repeat()`` (infinite cardinality): a ValueError saying what to do, at
    once (the construction pass hung)."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((20, 4)), rng.integers(0, 3, 20)
    ds = tf.data.Dataset.from_tensor_slices((X, y)).batch(8).repeat()
    with pytest.raises(ValueError, match=r"infinite tf\.data\.Dataset") as info:
        build(small_model(), xent(), ds)
    assert ".take(n)" in str(info.value)


def test_a_py_dataset_without_an_end_is_refused(alarm):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((16, 4)), rng.integers(0, 3, 16)

    class Endless(keras.utils.PyDataset):
        @property
        def num_batches(self):
            return None

        def __getitem__(self, i):
            i = i % 2
            return X[8 * i:8 * (i + 1)], y[8 * i:8 * (i + 1)]

    with pytest.raises(ValueError, match="PyDataset"):
        hessian(small_model(), xent(), Endless())


def test_a_finite_dataset_and_a_taken_repeat_still_work():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((16, 4)), rng.integers(0, 3, 16)
    model, loss = small_model(), xent()
    H_ref, _ = exact(lambda: loss(y, model(X)), model.trainable_variables)
    ds = tf.data.Dataset.from_tensor_slices((X, y)).batch(8)
    assert rel(dense(hessian(model, loss, ds)), H_ref) <= TOL64
    # two passes over the data: the same average
    assert rel(dense(hessian(model, loss, ds.repeat().take(4))), H_ref) <= TOL64


# -- a gradient that is not finite ------------------------------------------------------
def test_a_gradient_that_is_not_finite_raises_and_names_its_variables():
    """A NaN in the data that reaches only one variable's gradient: a FloatingPointError
    that names it and not the finite one (the NaN vector was returned silently)."""
    module = tf.Module()
    module.a = tf.Variable(np.ones(3), name="slope_vector")
    module.b = tf.Variable(np.ones(2), name="offset_pair")

    def loss_fn(model, batch):
        x = batch[0]
        return tf.reduce_mean(tf.reduce_sum(x * model.a, axis=1)) \
            + tf.reduce_sum(model.b ** 2)

    X = np.ones((4, 3))
    names = hessian(module, loss_fn=loss_fn, data=[(X,)]).param_names
    assert [n.split(":")[0] for n in names] == ["slope_vector", "offset_pair"], names
    g_ref = exact(lambda: loss_fn(module, (tf.constant(X),)), [module.a, module.b])[1]
    g = gradient(module, loss_fn=loss_fn, data=[(X[:2],), (X[2:],)])
    assert rel(g, g_ref) <= TOL64  # finite data: unchanged
    X[3, 1] = np.nan  # d/da_1 = mean(x[:, 1]) is NaN; d/db is finite
    with pytest.raises(FloatingPointError, match="NaN or Inf in 1 of its 5") as info:
        gradient(module, loss_fn=loss_fn, data=[(X[:2],), (X[2:],)])
    message = str(info.value)
    assert names[0] in message and names[1] not in message, message
