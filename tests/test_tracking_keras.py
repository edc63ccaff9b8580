"""The Keras callback of SpectrumTracker: records at the scheduled training steps during
``model.fit``, leaves the model unchanged when it records, and stores the data's loss."""

from __future__ import annotations

import numpy as np
import pytest

from specdens.tracker import SpectrumTracker, read_records

pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("specdens.backends.tf.hessian")


def test_keras_callback(tmp_path):
    from sklearn.datasets import load_digits
    from specdens.backends.tf import ModelState
    from specdens.backends.tf.tracking import SpectrumCallback

    d = load_digits()
    X = (d.data[:256] / 16.0).astype("float32")
    y = d.target[:256].astype("int64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(6),
                              keras.layers.BatchNormalization(),
                              keras.layers.Activation("relu"), keras.layers.Dense(10)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    tr = SpectrumTracker(tmp_path / "s.jsonl", steps=[0, 3, 8], k=2, num_steps=12,
                         num_probes=2)
    cb = SpectrumCallback(tr, loss, [(X[:128], y[:128]), (X[128:], y[128:])],
                          batchnorm="population")
    model.fit(X, y, batch_size=64, epochs=2, callbacks=[cb], verbose=0, shuffle=False)
    assert cb.step == 8
    recs = read_records(tmp_path / "s.jsonl")
    assert [r.step for r in recs] == [0, 3, 8]  # the last one at the end of training
    # recording leaves the model as it was, and stores the loss of the data with the
    # moving statistics
    tr2 = SpectrumTracker(tmp_path / "t.jsonl", k=2, num_steps=12, num_probes=2)
    cb2 = SpectrumCallback(tr2, loss, (X, y), batchnorm="population")
    cb2.set_model(model)
    before = ModelState.capture(model)
    cb2.on_train_end()
    assert before.differences(model) == []
    out = model(X, training=False).numpy()
    logp = out - np.log(np.exp(out).sum(1, keepdims=True))
    assert cb2.records[0].loss == pytest.approx(float(-np.mean(logp[np.arange(256), y])),
                                                rel=1e-5)
    assert cb2.records[0].accuracy == pytest.approx(float(np.mean(out.argmax(1) == y)))


def test_evaluate_with_a_sum_reduction_is_the_mean_loss():
    """``evaluate`` (the loss SpectrumCallback records) of a Keras loss with
    ``reduction="sum"`` is the mean over all samples, as with the default reduction and
    as in the Hessian; compared with the float64 mean computed without Keras's loss (a
    few ulps apart: 1e-12 relative)."""
    from specdens.backends.tf.tracking import evaluate

    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((30, 3)), rng.standard_normal((30, 1))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,), dtype="float64"),
                              keras.layers.Dense(1, dtype="float64")])
    W, b = (v.numpy() for v in model.trainable_variables)
    exact = float(np.mean((X @ W + b - Y) ** 2))
    batches = [(X[:20], Y[:20]), (X[20:], Y[20:])]  # uneven: weights 20/30 and 10/30
    for reduction in ("sum_over_batch_size", "sum"):
        loss = keras.losses.MeanSquaredError(reduction=reduction, dtype="float64")
        value, acc = evaluate(model, loss, batches)
        assert value == pytest.approx(exact, rel=1e-12, abs=0), reduction
        assert acc is None
    with pytest.raises(ValueError, match="reduction='none'"):
        evaluate(model, keras.losses.MeanSquaredError(reduction="none"), batches)


def test_callback_weighs_gradient_and_loss_by_batch_size_fn_as_the_hessian(tmp_path):
    """SpectrumCallback(..., batch_size_fn=f): the recorded gradient and loss weigh the
    batches by f, as the Hessian does (they weighed them by their sizes). Here every batch
    counts 1 (batches of 3 and 9 samples): references are the plain means of the batches'
    float64 tape gradients and losses (a few ulps apart: 300 eps64 relative)."""
    import tensorflow as tf
    from specdens.backends.tf.tracking import SpectrumCallback, evaluate

    F64 = "float64"
    tol = 300 * float(np.finfo(np.float64).eps)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,), dtype=F64),
                              keras.layers.Dense(4, activation="tanh", dtype=F64),
                              keras.layers.Dense(2, dtype=F64)])
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((12, 3)), rng.integers(0, 2, 12)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]

    def one(batch):
        return tf.constant(1.0, tf.float64)

    grads, values = [], []
    for x, t in batches:
        with tf.GradientTape() as tape:
            value = loss(t, model(x))
        g = tape.gradient(value, model.trainable_variables)
        grads.append(tf.concat([tf.reshape(v, [-1]) for v in g], 0).numpy())
        values.append(float(value))
    g_ref, loss_ref = np.mean(grads, axis=0), float(np.mean(values))

    tracker = SpectrumTracker(tmp_path / "s.jsonl", steps=[0], k=1, num_steps=4,
                              num_probes=1)
    seen = {}
    record = tracker.record

    def spy(step, op, gradient=None, **kw):
        seen["op"], seen["g"] = op, gradient.numpy()
        return record(step, op, gradient, **kw)

    tracker.record = spy
    cb = SpectrumCallback(tracker, loss, batches, batch_size_fn=one)
    cb.set_model(model)
    cb.on_train_batch_begin(0)
    assert seen["op"].num_samples == 2.0  # the Hessian's counts: 1 per batch
    assert np.linalg.norm(seen["g"] - g_ref) <= tol * np.linalg.norm(g_ref)
    assert abs(cb.records[0].loss - loss_ref) <= tol * abs(loss_ref)
    assert abs(evaluate(model, loss, batches, batch_size_fn=one)[0] - loss_ref) \
        <= tol * abs(loss_ref)
    with pytest.raises(ValueError, match="finite and >= 0"):
        evaluate(model, loss, batches, batch_size_fn=lambda b: -1.0)


def test_callback_counts_optimizer_steps_with_steps_per_execution(tmp_path):
    """With ``compile(steps_per_execution=4)`` Keras calls the callback only every 4 steps
    (and after the shorter last execution of an epoch): the callback's step is the
    number of training batches (it counted executions), and a scheduled step inside an
    execution is recorded at the next boundary under that boundary's true step. 56
    samples, batches of 8, 2 epochs: executions of 4 and 3 steps, boundaries 0, 4, 7, 11,
    14. Reference: ``optimizer.iterations`` when each record is made (plain SGD: one
    optimizer step per batch)."""
    from specdens.backends.tf.tracking import SpectrumCallback

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((56, 3)).astype("float32"), rng.integers(0, 2, 56)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer="sgd", loss=loss, steps_per_execution=4)
    tracker = SpectrumTracker(tmp_path / "s.jsonl", steps=[0, 2, 5, 7, 12, 14], k=1,
                              num_steps=4, num_probes=1)
    iterations = {}
    record = tracker.record

    def spy(step, op, gradient=None, **kw):
        iterations[step] = int(model.optimizer.iterations.numpy())
        return record(step, op, gradient, **kw)

    tracker.record = spy
    cb = SpectrumCallback(tracker, loss, (X, y))
    model.fit(X, y, batch_size=8, epochs=2, callbacks=[cb], verbose=0, shuffle=False)
    assert cb.step == 14 == int(model.optimizer.iterations.numpy())
    assert iterations == {0: 0, 4: 4, 7: 7, 14: 14}
    assert [(r.step, r.extra.get("scheduled_steps")) for r in cb.records] == [
        (0, None), (4, [2]), (7, [5, 7]), (14, [12, 14])]


def test_evaluate_accuracy_of_labels_with_a_trailing_axis():
    """Integer labels of shape ``(N, 1)`` (as ``keras.datasets.cifar10`` gives them) with
    ``(N, classes)`` outputs: the accuracy is Keras's ``SparseCategoricalAccuracy`` (it
    was None); the loss is that of the flat labels. 32 samples: the accuracy is a
    multiple of 1/32, exact in float32."""
    from specdens.backends.tf.tracking import evaluate

    rng = np.random.default_rng(0)
    X = rng.standard_normal((32, 3)).astype("float32")
    y = rng.integers(0, 4, (32, 1)).astype("uint8")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    metric = keras.metrics.SparseCategoricalAccuracy()
    metric.update_state(y, model(X))
    reference = float(metric.result())
    assert 0 < reference < 1
    flat = evaluate(model, loss, [(X[:12], y[:12, 0]), (X[12:], y[12:, 0])])
    assert flat[1] == reference
    assert evaluate(model, loss, [(X[:12], y[:12]), (X[12:], y[12:])]) == flat


def _fit_steps(tmp_path, model, epochs=1):
    """The steps SpectrumCallback records and counts for steps [0, 2, 5, 8, 13] while
    ``model`` is fitted on 64 samples in batches of 8 (8 batches an epoch)."""
    from specdens.backends.tf.tracking import SpectrumCallback

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 4)).astype("float32"), rng.integers(0, 3, 64)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    tracker = SpectrumTracker(tmp_path / "s.jsonl", steps=[0, 2, 5, 8, 13], k=1,
                              num_steps=4, num_probes=1)
    cb = SpectrumCallback(tracker, loss, (X[:16], y[:16]))
    for _ in range(epochs):  # one fit call per epoch: counted across fit calls
        model.fit(X, y, batch_size=8, epochs=1, callbacks=[cb], verbose=0, shuffle=False)
    return [r.step for r in cb.records], cb.step


def test_callback_counts_batches_of_a_custom_train_step(tmp_path):
    """A model whose ``train_step`` applies its own optimizer (compiled without one, as a
    GAN's) leaves ``model.optimizer.iterations`` at 0: the callback counts its training
    batches (it recorded step 0 only); two fit calls of 8 batches: steps 0 to 16, the
    end of the first fit (8) recorded once."""
    import tensorflow as tf

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    class Custom(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)
            self.own = keras.optimizers.SGD(0.01)

        def call(self, x):
            return self.dense(x)

        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                value = loss(y, self(x))
            grads = tape.gradient(value, self.trainable_variables)
            self.own.apply_gradients(zip(grads, self.trainable_variables, strict=True))
            return {"loss": value}

    keras.utils.set_random_seed(0)
    model = Custom()
    model(np.zeros((1, 4), "float32"))
    model.compile()
    assert _fit_steps(tmp_path, model, epochs=2) == ([0, 2, 5, 8, 13], 16)
    assert int(model.own.iterations.numpy()) == 16


def test_callback_counts_batches_with_gradient_accumulation(tmp_path):
    """``SGD(gradient_accumulation_steps=2)`` updates the weights every 2 batches, and its
    ``iterations`` count the updates: 8 batches are still 8 steps (they counted 4, so
    steps 5 and 8 were never recorded)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(0.01, gradient_accumulation_steps=2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert _fit_steps(tmp_path, model) == ([0, 2, 5, 8], 8)
    assert int(model.optimizer.iterations.numpy()) == 4


def test_evaluate_has_no_accuracy_for_one_output():
    """A one-output binary classifier (``Dense(1)`` logits, ``BinaryCrossentropy``) with
    integer labels ``(N, 1)`` or ``(N,)``: no automatic accuracy (the argmax of one
    column is always 0, so it was the fraction of label 0: 18/32 here, for a perfect
    classifier); two outputs keep theirs."""
    from specdens.backends.tf.tracking import evaluate

    rng = np.random.default_rng(0)
    X = rng.standard_normal((32, 4)).astype("float32")
    y = (X[:, 0] > 0).astype("int64")
    assert 0 < np.mean(y == 0) < 1
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.set_weights([np.array([[5.0], [0], [0], [0]], "float32"), np.zeros(1, "float32")])
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    for labels in (y[:, None], y):
        value, acc = evaluate(model, loss, (X, labels))
        assert acc is None, labels.shape
        assert 0 < value < 0.5
    two = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    two.set_weights([np.array([[-5.0, 5.0], [0, 0], [0, 0], [0, 0]], "float32"),
                     np.zeros(2, "float32")])
    sparse = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert evaluate(two, sparse, (X, y[:, None]))[1] == 1.0
    assert evaluate(two, sparse, (X, y))[1] == 1.0
