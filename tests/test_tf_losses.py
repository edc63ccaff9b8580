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


# -- Keras output masks -------------------------------------------------------------------
T = 5


def masked_sequence_model(seed):
    """Tokens (0 = padding) -> ``Embedding(mask_zero=True)`` -> ``Dense`` layers on each
    timestep -> per-timestep logits, all float64: the outputs carry the Embedding's
    ``(N, T)`` mask (``Dense`` passes it on), and a Keras loss of them divides by its sum.
    (A recurrent layer would carry the mask the same way, at ~4x the test's time.)"""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((T,), dtype="int32"),
        keras.layers.Embedding(6, 2, mask_zero=True, dtype=F64),
        keras.layers.Dense(3, activation="tanh", dtype=F64),
        keras.layers.Dense(3, dtype=F64),
    ])


def padded_tokens(ignore=None, seed=11):
    """12 sequences in 3 batches of 4, padded unevenly: batch 0 keeps 4 of its 20
    timesteps, batch 1 all 20, batch 2 none (every output masked), so weighting the
    batches by their sizes (4 each) instead of their unmasked timesteps is far off. With
    ``ignore``, three targets are ``ignore`` (two at unmasked timesteps)."""
    rng = np.random.default_rng(seed)
    X = rng.integers(1, 6, (12, T)).astype("int32")
    X[0, 1:] = 0
    X[1, 2:] = 0
    X[2, 1:] = 0
    X[3, :] = 0                   # a sequence of padding only
    X[8:] = 0                     # batch 2: every output masked
    y = rng.integers(0, 3, (12, T))
    if ignore is not None:
        y[5, 1] = y[6, 4] = ignore    # ignored targets at unmasked timesteps
        y[0, 3] = ignore              # ... and one under the mask
    batches = [(X[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)]
    return X, y, batches


def flat(tensors):
    return tf.concat([tf.reshape(tf.convert_to_tensor(t), [-1]) for t in tensors], 0)


def masked_reference(model, loss, X, y, ignore):
    """``(H, g, G, value, count)`` of the all-data loss ``loss(y, model(X))`` by nested
    tapes (``H``, ``g``) and the exact GGN ``J^T H_out J`` with the Jacobian of the
    outputs (``tape.jacobian``) and ``H_out`` the Hessian of the masked mean written out:
    the sum of the per-entry losses over the unmasked entries (and, with ``ignore``, the
    targets that are not ignored) divided by their number, checked against Keras's value."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            value = loss(y, model(X))
        g = flat(inner.gradient(value, variables))
    H = tf.concat([tf.reshape(j, (g.shape[0], -1)) for j in outer.jacobian(g, variables)], 1)
    with tf.GradientTape(persistent=True) as tape:
        out = model(X)
    J = tf.concat([tf.reshape(j, (int(tf.size(out)), -1))
                   for j in tape.jacobian(out, variables)], 1).numpy()
    keep = (X != 0) & (y != ignore) if ignore is not None else X != 0
    weights = tf.constant(keep.astype("float64"))
    labels = tf.constant(np.where(keep, y, 0))
    fixed = tf.constant(out.numpy())
    with tf.GradientTape() as t2:
        t2.watch(fixed)
        with tf.GradientTape() as t1:
            t1.watch(fixed)
            per = keras.losses.sparse_categorical_crossentropy(labels, fixed, from_logits=True)
            written = tf.reduce_sum(per * weights) / tf.reduce_sum(weights)
        d = tf.reshape(t1.gradient(written, fixed), [-1])
    H_out = tf.reshape(t2.jacobian(d, fixed), (d.shape[0], -1)).numpy()
    assert float(written) == pytest.approx(float(value), rel=1e-13)  # Keras's own mean
    return H.numpy(), g.numpy(), J.T @ H_out @ J, float(value), float(keep.sum())


@pytest.mark.parametrize("reduction,ignore", [("sum_over_batch_size", None), ("sum", None),
                                              ("sum_over_batch_size", -1)])
def test_keras_output_mask_weighs_batches_by_their_unmasked_entries(reduction, ignore):
    """Outputs that carry a Keras mask (``Embedding(mask_zero=True)`` passed on to
    per-timestep logits) make a Keras loss a mean over the unmasked timesteps (Keras
    divides by the mask's sum, and with ``ignore_class`` by the unmasked targets that are
    not ignored): with the padding spread unevenly over the batches, and one batch fully
    masked, the Hessian, gradient, GGN (with the mask at its split: the output Hessian of
    the masked loss) and ``evaluate`` are those of ``loss(y_all, model(X_all))``; the
    first case also checks the forward-over-back Hessian and the vectorised GGN. Weighting
    the batches by their sizes is off by 0.3 to 1 here (relative), and the GGN whose output
    Hessian drops the mask by 0.8 to 5."""
    from specdens.backends.tf import ggn
    from specdens.backends.tf.tracking import evaluate

    model = masked_sequence_model(seed=2)
    X, y, batches = padded_tokens(ignore)
    kwargs = {} if ignore is None else {"ignore_class": ignore}
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction,
                                                      dtype=F64, **kwargs)
    mean = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64, **kwargs)
    H_ref, g_ref, G_ref, value_ref, count = masked_reference(model, mean, X, y, ignore)
    assert count == (24.0 if ignore is None else 22.0)
    op = hessian(model, loss, batches)
    assert rel(op.to_dense(), H_ref) <= TOL
    assert op.num_samples == count
    assert rel(gradient(model, loss, batches), g_ref) <= TOL
    G = ggn(model, loss, batches)
    assert rel(G.to_dense(), G_ref) <= TOL
    assert G.num_samples == count
    if reduction == "sum_over_batch_size" and ignore is None:
        assert rel(hessian(model, loss, batches, method="forward").to_dense(), H_ref) <= TOL
        assert rel(ggn(model, loss, batches, block="batched").to_dense(), G_ref) <= TOL
    value, acc = evaluate(model, loss, batches)
    assert value == pytest.approx(value_ref, rel=1e-12, abs=0)
    assert acc is None  # (batch, time, classes) outputs: no accuracy


def test_masked_outputs_with_a_loss_whose_denominator_is_unknown_are_refused():
    """A plain callable loss, or a ``loss_fn`` that returns the mean only, of outputs that
    carry a Keras mask would be weighted by the batch size while a Keras loss inside it
    divides by the mask's sum: both are refused with what to do, and the remedies
    (``batch_size_fn``, a ``(mean_loss, count)`` pair) give the exact Hessian."""
    from specdens.backends.tf.tracking import evaluate

    model = masked_sequence_model(seed=2)
    X, y, batches = padded_tokens()
    mean = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    H_ref = hessian(model, mean, batches).to_dense().numpy()

    def plain(t, p):
        return mean(t, p)

    for call in (lambda: hessian(model, plain, batches),
                 lambda: gradient(model, plain, batches),
                 lambda: evaluate(model, plain, batches)):
        with pytest.raises(ValueError, match="carry a Keras mask.*batch_size_fn"):
            call()

    def mean_only(m, batch):
        return mean(batch[1], m(batch[0]))

    with pytest.raises(ValueError, match="mean only.*Keras mask.*\\(mean_loss, count\\)"):
        hessian(model, loss_fn=mean_only, data=batches)

    def with_count(m, batch):
        return mean_only(m, batch), tf.math.count_nonzero(batch[0])

    def unmasked(batch):
        return tf.math.count_nonzero(batch[0])

    assert rel(hessian(model, loss_fn=with_count, data=batches).to_dense(), H_ref) <= TOL
    assert rel(hessian(model, plain, batches, batch_size_fn=unmasked).to_dense(),
               H_ref) <= TOL


def test_masking_layer_weighs_batches_by_their_unmasked_samples():
    """``Masking`` on ``(N, features)`` inputs masks whole samples: the outputs carry an
    ``(N,)`` mask, and a Keras loss of them is the mean over the unmasked samples. Over
    batches masked unevenly (one fully), the Hessian, gradient and GGN are those of the
    plain loss of the unmasked samples, and ``evaluate`` gives its value and their
    accuracy."""
    from specdens.backends.tf import ggn
    from specdens.backends.tf.tracking import evaluate

    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((3,), dtype=F64), keras.layers.Masking(0.0, dtype=F64),
                              keras.layers.Dense(2, dtype=F64)])
    rng = np.random.default_rng(5)
    X = rng.standard_normal((18, 3))
    y = rng.integers(0, 2, 18)
    X[[0, 1, 2, 3, 4, 9]] = 0.0               # 5 of batch 0 masked, 1 of batch 1
    X[14:] = 0.0                              # batch 2: every sample masked
    batches = [(X[:7], y[:7]), (X[7:14], y[7:14]), (X[14:], y[14:])]
    keep = np.any(X != 0, axis=1)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    H_ref, g_ref = exact(model, X[keep], y[keep], lambda t, p: loss(t, p))
    op = hessian(model, loss, batches)
    assert rel(op.to_dense(), H_ref) <= TOL
    assert op.num_samples == float(keep.sum())
    assert rel(gradient(model, loss, batches), g_ref) <= TOL
    assert rel(ggn(model, loss, batches).to_dense(), H_ref) <= TOL  # linear: GGN = Hessian
    value, acc = evaluate(model, loss, batches)
    out = model(X[keep]).numpy()
    assert value == pytest.approx(float(loss(y[keep], out)), rel=1e-12, abs=0)
    assert acc == pytest.approx(float(np.mean(out.argmax(1) == y[keep])))


def test_subclassed_model_whose_mask_is_consumed_warns_and_is_exact():
    """A subclassed model's outputs cannot be inspected before it runs: with a mask-making
    layer (``Embedding(mask_zero=True)``) and a ``loss_fn`` that returns a mean, specdens
    warns rather than refuses, since the mask may be consumed on the way. Here a
    mask-aware pooling consumes it, the outputs carry no mask, and weighing uneven
    batches by their sizes gives the Hessian of all the data in one batch."""

    class Pooled(keras.Model):
        def __init__(self):
            super().__init__(dtype=F64)
            self.embed = keras.layers.Embedding(6, 2, mask_zero=True, dtype=F64)
            self.pool = keras.layers.GlobalAveragePooling1D(dtype=F64)
            self.out = keras.layers.Dense(3, dtype=F64)

        def call(self, x):
            e = self.embed(x)
            return self.out(self.pool(e, mask=self.embed.compute_mask(x)))

    keras.utils.set_random_seed(7)
    model = Pooled()
    rng = np.random.default_rng(8)
    X = rng.integers(1, 6, (10, T)).astype("int32")
    X[0, 2:] = 0
    X[5, 1:] = 0                                 # uneven padding, no empty sequence
    y = rng.integers(0, 3, 10)
    model(X[:1])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)

    def mean_only(m, batch):
        return loss(batch[1], m(batch[0]))

    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    with pytest.warns(UserWarning, match="layers that make a Keras mask.*may reach"):
        op = hessian(model, loss_fn=mean_only, data=batches)
    H_ref = hessian(model, loss, [(X, y)]).to_dense().numpy()
    assert op.num_samples == 10
    assert rel(op.to_dense(), H_ref) <= TOL
