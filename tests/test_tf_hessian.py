"""The TensorFlow Hessian, GGN and gradient against dense references (float64).

References are built independently of the operator: nested ``tf.GradientTape``s
differentiating ``loss(y, model(x))`` with respect to the model's own variables
(``GradientTape.jacobian`` of the flattened gradient), on a clone of the model where the
call would write to it (BatchNorm with ``training=True``). ``tf.nn.moments`` (which Keras
normalisation layers call) has wrong second derivatives (see
``specdens.backends.tf._moments``): references through it are built with the exact
moments and checked against central differences of the exact gradient.

Tolerance: the operator and the reference compute the same float64 sums in different
orders; the rounding of one Hessian entry is a few ulps of its largest terms, so the
relative Frobenius error is ~1e-16 to 1e-15 here. 1e-10 leaves room for the conditioning
of the sums, not for a wrong weight (a mis-weighted batch gives ~1e-1).
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover - another Keras backend
    pytest.skip("Keras is not on its TensorFlow backend", allow_module_level=True)

from specdens.backends.tf import ModelState, ggn, gradient, hessian  # noqa: E402
from specdens.backends.tf._moments import exact_moments  # noqa: E402

import specdens  # noqa: E402

TOL = 1e-10
# for the checks of reviewed bugs: a few hundred float64 ulps of the norm (the same
# sums in another order), far from the errors they had (O(1))
TOL64 = 300 * float(np.finfo(np.float64).eps)
F64 = "float64"


# -- models and data --------------------------------------------------------------------
def mlp(seed=0, din=5, hidden=7, dout=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((din,), dtype=F64),
                             keras.layers.Dense(hidden, activation="tanh", dtype=F64),
                             keras.layers.Dense(dout, dtype=F64)])


def cnn(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5, 5, 2), dtype=F64),
                             keras.layers.Conv2D(2, 3, dtype=F64),
                             keras.layers.BatchNormalization(dtype=F64),
                             keras.layers.Activation("tanh", dtype=F64),
                             keras.layers.Flatten(dtype=F64),
                             keras.layers.Dense(3, dtype=F64)])


def xent(**kw):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64, **kw)


def classification(n=23, d=5, c=3, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, c, n)


def uneven(X, y, sizes):
    out, s = [], 0
    for k in sizes:
        out.append((X[s:s + k], y[s:s + k]))
        s += k
    assert s == len(X)
    return out


def flat(tensors):
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def clone(model):
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def dense_hessian(model, batches, loss, variables=None, training=False):
    """sum_b (n_b / N) Hess(L_b) by nested GradientTape.jacobian, on a clone."""
    twin = clone(model)
    idx = [i for i, v in enumerate(model.trainable_variables)
           if variables is None or any(v is w for w in variables)]
    vs = [twin.trainable_variables[i] for i in idx]
    N = sum(len(x) for x, _ in batches)
    H = 0.0
    for x, y in batches:
        with exact_moments(), tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = loss(y, twin(x, training=training))
            g = flat(inner.gradient(value, vs))
        J = outer.jacobian(g, vs)
        H = H + (len(x) / N) * tf.concat([tf.reshape(j, (g.shape[0], -1)) for j in J], axis=1)
    return H.numpy()


def grad_at(model, theta, x, y, loss, training):
    """The exact gradient at the flat point ``theta`` (writes ``theta`` into ``model``)."""
    vs = model.trainable_variables
    o = 0
    for v in vs:
        k = int(np.prod(v.shape))
        v.assign(theta[o:o + k].reshape(v.shape))
        o += k
    with tf.GradientTape() as tape:
        value = loss(y, model(x, training=training))
    return flat(tape.gradient(value, vs)).numpy()


def check_against_differences(model, batch, loss, training, H, columns):
    """Central differences of the exact gradient match columns of ``H``: the truncation
    (h^2 times the third derivative) and the rounding (eps |g| / h) are both ~1e-10 at
    h = 1e-5."""
    twin = clone(model)
    theta = flat(twin.trainable_variables).numpy()
    h = 1e-5
    for i in columns:
        e = np.zeros_like(theta)
        e[i] = h
        fd = (grad_at(twin, theta + e, *batch, loss, training)
              - grad_at(twin, theta - e, *batch, loss, training)) / (2 * h)
        assert np.linalg.norm(fd - H[:, i]) <= 1e-7 * np.linalg.norm(H), i


def dense_gradient(model, batches, loss):
    vs = model.trainable_variables
    N = sum(len(x) for x, _ in batches)
    g = 0.0
    for x, y in batches:
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=False))
        g = g + (len(x) / N) * flat(tape.gradient(value, vs))
    return g.numpy()


def rel(A, B):
    return float(np.linalg.norm(np.asarray(A) - B) / np.linalg.norm(B))


# -- the Hessian --------------------------------------------------------------------------
@pytest.mark.parametrize("method,block", [("reverse", "loop"), ("reverse", "batched"),
                                          ("forward", "loop"), ("forward", "batched")])
def test_mlp_uneven_batches(method, block):
    model = mlp()
    X, y = classification()
    op = hessian(model, xent(), uneven(X, y, [10, 10, 3]), method=method, block=block)
    n = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert op.shape == (n, n) and op.dtype == tf.float64 and op.num_samples == 23
    assert op.num_batches == 3 and op.device == model.trainable_variables[0].value.device
    # the uneven batching is the full-batch Hessian: compare with one batch of all 23
    H = dense_hessian(model, [(X, y)], xent())
    D = op.to_dense()
    assert isinstance(D, tf.Tensor) and D.dtype == tf.float64
    assert rel(D, H) <= TOL
    v = tf.constant(np.random.default_rng(0).standard_normal(n))
    assert rel(op @ v, H @ v.numpy()) <= TOL


def test_equal_weighting_would_be_wrong():
    """Guard that the test above can fail: the equal-weight average differs by >> TOL."""
    model = mlp()
    X, y = classification()
    batches = uneven(X, y, [10, 10, 3])
    wrong = sum(dense_hessian(model, [b], xent()) for b in batches) / 3
    assert rel(wrong, dense_hessian(model, [(X, y)], xent())) > 1e-3


@pytest.mark.parametrize("batchnorm", ["batch", "population"])
def test_cnn_batchnorm_modes(batchnorm):
    model = cnn()
    rng = np.random.default_rng(3)
    bn = model.layers[1]
    bn.moving_mean.assign(rng.standard_normal(2))  # non-trivial population statistics
    bn.moving_variance.assign(rng.random(2) + 0.5)
    X = rng.standard_normal((13, 5, 5, 2))
    y = rng.integers(0, 3, 13)
    batches = uneven(X, y, [8, 5])
    before = ModelState.capture(model)
    op = hessian(model, xent(), batches, batchnorm=batchnorm)
    H = op.to_dense().numpy()
    training = batchnorm == "batch"
    H_ref = dense_hessian(model, batches, xent(), training=training)
    assert rel(H, H_ref) <= TOL
    # the two modes are different matrices
    assert rel(H, dense_hessian(model, batches, xent(), training=not training)) > 1e-3
    # the reference (and so the operator) against differences of the exact gradient
    H_b = dense_hessian(model, [batches[0]], xent(), training=training)
    check_against_differences(model, batches[0], xent(), training, H_b, (0, 17, 98))
    assert before.differences(model) == []


def test_layer_normalization_and_the_moments_of_tensorflow():
    """LayerNormalization normalises every sample by its own moments (tf.nn.moments):
    the operator's Hessian is exact, and the plain nested-tape Hessian is not (the
    reason for specdens.backends.tf._moments; if TensorFlow fixes tf.nn.moments, the last
    assertion fails and the patch can go)."""
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((5,), dtype=F64), keras.layers.Dense(6, dtype=F64),
                              keras.layers.LayerNormalization(dtype=F64),
                              keras.layers.Activation("tanh", dtype=F64),
                              keras.layers.Dense(3, dtype=F64)])
    X, y = classification(n=11)
    op = hessian(model, xent(), uneven(X, y, [6, 5]))
    H = op.to_dense().numpy()
    H_ref = dense_hessian(model, [(X, y)], xent())
    assert rel(H, H_ref) <= TOL
    check_against_differences(model, (X, y), xent(), False, H_ref, (0, 20, 40, 62))
    twin = clone(model)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = xent()(y, twin(X))
        g = flat(inner.gradient(value, twin.trainable_variables))
    J = outer.jacobian(g, twin.trainable_variables)
    plain = tf.concat([tf.reshape(j, (g.shape[0], -1)) for j in J], axis=1).numpy()
    assert rel(plain, H_ref) > 1e-4


def test_variable_subset_by_glob_and_variable():
    model = mlp()
    X, y = classification()
    last = model.layers[1]
    H_ref = dense_hessian(model, [(X, y)], xent(), variables=[last.kernel, last.bias])
    by_glob = hessian(model, xent(), (X, y), params=f"{last.name}/*")
    by_var = hessian(model, xent(), (X, y), params=[last.bias, last.kernel])
    names = [last.kernel.path, last.bias.path]
    assert by_glob.param_names == names and by_var.param_names == names
    assert by_glob.shape == (7 * 3 + 3,) * 2
    assert rel(by_glob.to_dense(), H_ref) <= TOL
    assert rel(by_var.to_dense(), H_ref) <= TOL
    with pytest.raises(ValueError, match="matches no variable"):
        hessian(model, xent(), (X, y), params="nothing/*")
    with pytest.raises(ValueError, match="is not a variable of"):
        hessian(model, xent(), (X, y), params=[tf.Variable(tf.zeros(3, F64))])


def test_frozen_layers_are_left_out_by_default():
    model = mlp()
    model.layers[0].trainable = False
    X, y = classification()
    op = hessian(model, xent(), (X, y))
    assert op.param_names == [v.path for v in model.layers[1].trainable_variables]
    assert model.layers[0].trainable is False


def test_weight_decay_regularizer_and_gradient():
    model = mlp()
    X, y = classification()
    H_ref = dense_hessian(model, [(X, y)], xent())
    n = H_ref.shape[0]
    wd = 0.3
    op = hessian(model, xent(), (X, y), weight_decay=wd)
    assert rel(op.to_dense(), H_ref + wd * np.eye(n)) <= TOL

    def reg(p):  # a non-quadratic penalty: its Hessian is not a multiple of I
        return 0.01 * tf.add_n([tf.reduce_sum(t ** 4) for t in p.values()])

    theta = flat(model.trainable_variables).numpy()
    op = hessian(model, xent(), (X, y), regularizer=reg)
    assert rel(op.to_dense(), H_ref + np.diag(0.12 * theta ** 2)) <= TOL
    g = gradient(model, xent(), uneven(X, y, [10, 13]), weight_decay=wd, regularizer=reg)
    g_ref = dense_gradient(model, [(X, y)], xent()) + wd * theta + 0.04 * theta ** 3
    assert g.dtype == tf.float64 and tuple(g.shape) == (n,)
    assert rel(g, g_ref) <= TOL
    sub = gradient(model, xent(), (X, y), params=f"{model.layers[1].name}/*")
    np.testing.assert_allclose(sub.numpy(), dense_gradient(model, [(X, y)], xent())[-24:],
                               rtol=0, atol=TOL * np.abs(g_ref).max())


def test_reduction_sum_and_refusals():
    model = mlp()
    X, y = classification()
    H_ref = dense_hessian(model, [(X, y)], xent())
    op = hessian(model, xent(reduction="sum"), uneven(X, y, [10, 13]))
    assert rel(op.to_dense(), H_ref) <= TOL
    with pytest.raises(ValueError, match="reduction=None"):
        hessian(model, xent(reduction=None), (X, y))
    # a float32 Keras loss would round a float64 model's outputs
    with pytest.raises(TypeError, match="computes in float32.*dtype='float64'"):
        hessian(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (X, y))
    # a per-sample loss function is not a scalar
    with pytest.raises(ValueError, match=r"must return a scalar; got shape \(None,\)"):
        hessian(model, keras.losses.sparse_categorical_crossentropy, (X, y))


def test_custom_loss_fn_with_counts_and_batch_size_fn():
    """A token-style loss: loss_fn returns (mean over kept samples, their number), so
    batches weigh by those counts; and a PINN-style residual with batch_size_fn."""
    model = mlp()
    rng = np.random.default_rng(4)
    X = rng.standard_normal((20, 5))
    y = rng.integers(0, 3, 20)
    keep = rng.random(20) < 0.6
    batches = [(X[:12], y[:12], keep[:12]), (X[12:], y[12:], keep[12:])]

    def loss_fn(m, batch):
        x, t, k = batch
        per = keras.losses.sparse_categorical_crossentropy(t, m(x), from_logits=True)
        k = tf.cast(k, per.dtype)
        return tf.reduce_sum(per * k) / tf.reduce_sum(k), tf.reduce_sum(k)

    op = hessian(model, data=batches, loss_fn=loss_fn)
    assert op.num_samples == int(keep.sum())
    assert rel(op.to_dense(), dense_hessian(model, [(X[keep], y[keep])], xent())) <= TOL

    pts = rng.random((17, 5))
    seen = []

    def residual(m, batch, training=None):
        seen.append(training)
        return tf.reduce_mean((m(batch["x"]) - tf.sin(3 * batch["x"][:, :3])) ** 2)

    op = hessian(model, data=[{"x": pts[:9]}, {"x": pts[9:]}], loss_fn=residual,
                 batch_size_fn=lambda b: tf.shape(b["x"])[0])
    assert op.num_samples == 17 and seen and set(seen) == {False}
    twin = clone(model)
    vs = twin.trainable_variables
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = tf.reduce_mean((twin(pts) - tf.sin(3 * pts[:, :3])) ** 2)
        g = flat(inner.gradient(value, vs))
    H_ref = tf.concat([tf.reshape(j, (g.shape[0], -1)) for j in outer.jacobian(g, vs)], 1)
    assert rel(op.to_dense(), H_ref.numpy()) <= TOL


def test_tf_module_is_restored_and_snapshotted():
    """A plain tf.Module (no Keras): the operator writes its snapshot into the variables
    for the duration of a product only, and stays the Hessian at construction."""

    class MLP(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(7)
            self.w1 = tf.Variable(rng.standard_normal((5, 4)), name="w1")
            self.b1 = tf.Variable(rng.standard_normal(4), name="b1")
            self.w2 = tf.Variable(rng.standard_normal((4, 3)), name="w2")

        def __call__(self, x):
            return tf.tanh(x @ self.w1 + self.b1) @ self.w2

    module = MLP()
    X, y = classification()
    op = hessian(module, xent(), uneven(X, y, [10, 13]))
    assert op.param_names == [v.name[:-2] for v in module.trainable_variables]
    vs = module.trainable_variables
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = xent()(y, module(X))
        g = flat(inner.gradient(value, vs))
    H_ref = tf.concat([tf.reshape(j, (g.shape[0], -1)) for j in outer.jacobian(g, vs)], 1)
    before = ModelState.capture(module)
    D = op.to_dense()
    assert rel(D, H_ref.numpy()) <= TOL
    assert before.differences(module) == []
    module.w1.assign_add(tf.ones_like(module.w1))  # the module trains on ...
    moved = ModelState.capture(module)
    assert np.array_equal(op.to_dense().numpy(), D.numpy())  # ... the operator does not
    assert moved.differences(module) == []
    assert gradient(module, xent(), (X, y)).shape == (op.shape[0],)


def module_tape_hessian(module, variables, value_fn):
    """``(H, g)`` of ``value_fn()`` in ``variables`` of ``module`` by nested tapes."""
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = value_fn()
        g = flat(inner.gradient(value, variables))
    J = outer.jacobian(g, variables)
    return (tf.concat([tf.reshape(j, (g.shape[0], -1)) for j in J], 1).numpy(), g.numpy())


def test_tf_module_regularizer_reads_the_snapshot():
    """A tf.Module's regulariser is differentiated at the operator's snapshot, like its
    data term, not at the values the module holds when a product runs."""

    class Lin(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.constant([[0.5], [-1.0], [2.0]], tf.float64), name="w")

        def __call__(self, x):
            return x @ self.w

    def reg(p):  # Hessian diag(12 w^2): depends on where it is taken
        return tf.reduce_sum(p["w"] ** 4)

    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((10, 3)), rng.standard_normal((10, 1))

    def mse(t, p):
        return tf.reduce_mean((t - p) ** 2)

    module = Lin()
    H_ref, g_ref = module_tape_hessian(module, [module.w],
                                       lambda: mse(Y, module(X)) + reg({"w": module.w}))
    op = hessian(module, mse, uneven(X, Y, [6, 4]), regularizer=reg)
    assert rel(op.to_dense(), H_ref) <= TOL
    g = gradient(module, mse, uneven(X, Y, [6, 4]), regularizer=reg)
    assert rel(g, g_ref) <= TOL
    module.w.assign(3.0 * module.w)  # the module trains on ...
    moved = ModelState.capture(module)
    assert rel(op.to_dense(), H_ref) <= TOL  # ... the operator stays at its snapshot
    assert moved.differences(module) == []


def test_tf_module_integer_variables_are_left_out():
    """A tf.Module's integer counter (tf.Variable(0): trainable by default) is not in the
    default selection; selecting it explicitly is a clear TypeError."""

    class Counted(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(np.linspace(-1.0, 1.0, 3).reshape(3, 1), name="w")
            self.step = tf.Variable(0, name="step")

        def __call__(self, x):
            return tf.tanh(x @ self.w)

    module = Counted()
    assert any(v is module.step for v in module.trainable_variables)
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((8, 3)), rng.standard_normal((8, 1))

    def mse(t, p):
        return tf.reduce_mean((t - p) ** 2)

    op = hessian(module, mse, uneven(X, Y, [5, 3]))
    assert op.param_names == ["w"]
    H_ref, g_ref = module_tape_hessian(module, [module.w], lambda: mse(Y, module(X)))
    assert rel(op.to_dense(), H_ref) <= TOL
    assert rel(gradient(module, mse, (X, Y)), g_ref) <= TOL
    for params in (["step"], [module.step], ["w", "step"]):
        with pytest.raises(TypeError, match="not floating-point: 'step' \\(int32\\)"):
            hessian(module, mse, (X, Y), params=params)


def test_tf_module_with_a_replaced_variable_is_not_served_a_stale_trace():
    """A tf.Module attribute given a new tf.Variable between two operators: the traced
    functions of the first captured the old variable, and a kernel cached by the
    selection and the number of variables only gave the new operator the Hessian at the
    old weights. The new operator and gradient are those of the new variable (nested
    tapes, float64: a few ulps apart); the first operator, whose module no longer reads
    its variable, says so (its products were 0)."""

    class Lin(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(np.linspace(-1.0, 1.0, 6).reshape(3, 2), name="w")

        def __call__(self, x):
            return tf.tanh(x @ self.w)

    def mse(t, p):
        return tf.reduce_mean((t - p) ** 2)

    rng = np.random.default_rng(5)
    X, Y = rng.standard_normal((9, 3)), rng.standard_normal((9, 2))
    batches = uneven(X, Y, [5, 4])
    module = Lin()
    H_old, _ = module_tape_hessian(module, [module.w], lambda: mse(Y, module(X)))
    op_old = hessian(module, mse, batches)
    assert rel(op_old.to_dense(), H_old) <= TOL64  # traced with the first variable
    gradient(module, mse, batches)
    module.w = tf.Variable(3.0 * module.w.numpy() + 0.5, name="w")  # a new object
    H_new, g_new = module_tape_hessian(module, [module.w], lambda: mse(Y, module(X)))
    assert rel(H_new, H_old) > 1e-2  # the weights differ
    op_new = hessian(module, mse, batches)
    assert rel(op_new.to_dense(), H_new) <= TOL64
    assert rel(gradient(module, mse, batches), g_new) <= TOL64
    with pytest.raises(RuntimeError, match="were replaced"):  # it reads the new one now
        op_old.to_dense()


def test_gradient_refuses_negative_and_nan_counts_as_the_operators_do():
    """A loss_fn's count of a batch that is negative or NaN: gradient raises the
    ValueError of hessian and ggn (it checked only that the total was > 0, and silently
    dropped the batch while subtracting its count from the total). Valid counts weigh
    the batches: the gradient is the tape gradient of all the data."""
    model = mlp()
    X, y = classification()

    def loss_fn(m, batch):
        x, t, count = batch
        return xent()(t, m(x)), count

    def data(last):
        return [(X[:10], y[:10], np.array(10.0)), (X[10:], y[10:], np.array(last))]

    for bad in (-1.0, np.nan):
        for build in (hessian, gradient):
            with pytest.raises(ValueError, match="finite and >= 0"):
                build(model, loss_fn=loss_fn, data=data(bad))
    g = gradient(model, loss_fn=loss_fn, data=data(13.0))
    assert rel(g, dense_gradient(model, [(X, y)], xent())) <= TOL64


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_policy_is_refused(policy):
    """Layers under a mixed-precision policy compute in 16 bits while their variables are
    float32: the Hessian would carry 16-bit rounding (~1e-3), so it is refused with a
    message that names the policy and shows the float32 copy to use instead."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 5)).astype("float32")
    y = rng.integers(0, 3, 12)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(3, dtype="float32")])
    finally:
        keras.config.set_dtype_policy(previous)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(TypeError, match=f"mixed-precision dtype policy '{policy}'.*"
                                        "clone_model"):
        hessian(model, loss, (X, y))
    with pytest.raises(TypeError, match=policy):
        gradient(model, loss, (X, y))
    # the copy the message suggests computes in float32 and is accepted
    twin = keras.models.clone_model(model, clone_function=lambda layer: layer.__class__
                                    .from_config({**layer.get_config(), "dtype": "float32"}))
    twin.set_weights(model.get_weights())
    assert hessian(twin, loss, (X, y)).dtype == tf.float32


def test_float32_layers_inside_a_float64_model_are_refused():
    """A float64 model whose Activation/Flatten layers keep Keras's default float32
    policy: Keras casts their inputs to float32, so the forward pass, and the Hessian,
    carry float32 rounding while the operator claims float64. Refused, naming the layers;
    the same model built under ``set_dtype_policy("float64")`` matches the exact
    Hessian."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 5))
    y = rng.integers(0, 3, 12)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((5,), dtype="float64"),
                                 keras.layers.Dense(4, dtype="float64"),
                                 keras.layers.Activation("tanh"),
                                 keras.layers.Dense(3, dtype="float64")])

    model = build()
    with pytest.raises(TypeError, match=r"activation.*\(float32\).*set_dtype_policy"):
        hessian(model, loss, (X, y))
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        twin = build()
    finally:
        keras.config.set_dtype_policy(previous)
    twin.set_weights(model.get_weights())
    op = hessian(twin, loss, (X, y))
    H_ref = dense_hessian(twin, [(X, y)], loss)
    assert rel(op.to_dense().numpy(), H_ref) <= TOL
    # float32 preprocessing in front of every selected variable rounds the data only,
    # which does not depend on the parameters: accepted, and exact for that model
    keras.utils.set_random_seed(0)
    front = keras.Sequential([keras.Input((5,), dtype="float64"), keras.layers.Rescaling(0.5),
                              keras.layers.Dense(4, activation="tanh", dtype="float64"),
                              keras.layers.Dense(3, dtype="float64")])
    op = hessian(front, loss, (X, y))
    assert rel(op.to_dense().numpy(), dense_hessian(front, [(X, y)], loss)) <= TOL


@pytest.mark.parametrize("method,block", [("reverse", "loop"), ("reverse", "batched"),
                                          ("forward", "loop"), ("forward", "batched")])
def test_embedding_model(method, block):
    """An Embedding's gradient is an IndexedSlices, which a second GradientTape could not
    differentiate ('IndexedSlices' object has no attribute '_id'): the Hessian and the
    gradient of an embedding model (float64, with float32 preprocessing-free integer
    inputs) match the exact ones, and an Embedding in front of the selected variables is
    not taken for a float32 computation."""
    rng = np.random.default_rng(0)
    X = rng.integers(0, 10, (12, 3)).astype("int32")
    y = rng.integers(0, 3, 12)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,), dtype="int32"),
                              keras.layers.Embedding(10, 2, dtype="float64"),
                              keras.layers.Flatten(dtype="float64"),
                              keras.layers.Dense(3, dtype="float64")])
    batches = [(X[:7], y[:7]), (X[7:], y[7:])]
    op = hessian(model, loss, batches, method=method, block=block)
    assert rel(op.to_dense().numpy(), dense_hessian(model, batches, loss)) <= TOL
    g = gradient(model, loss, batches).numpy()
    with tf.GradientTape() as tape:
        value = loss(y, model(X))
    g_ref = tf.concat([tf.reshape(tf.convert_to_tensor(t), [-1])
                       for t in tape.gradient(value, model.trainable_variables)], 0).numpy()
    assert rel(g, g_ref) <= TOL


def test_loss_fn_on_a_list_of_bare_tensors_says_why_it_failed():
    """A list of bare tensors is one batch (the documented rule), so a loss_fn written
    for one tensor fails on ``[X[:20], X[20:]]``: the error says that, and how to pass
    the tensors as batches (``(x,)`` each), which gives the full-data Hessian."""
    model = tf.Module()
    model.w = tf.Variable(np.array([0.3, -0.7, 1.1]), name="w")
    X = np.random.default_rng(0).standard_normal((30, 3))

    def loss_fn(m, x):
        return tf.reduce_mean(tf.math.softplus(tf.linalg.matvec(x, m.w)))

    with pytest.raises(Exception) as info:
        hessian(model, loss_fn=loss_fn, data=[X[:20], X[20:]])
    text = str(info.value) + "".join(getattr(info.value, "__notes__", []))
    assert "one batch that is a list of 2 tensors" in text
    assert "data=[(x,) for x in batches]" in text

    op = hessian(model, loss_fn=lambda m, b: loss_fn(m, b[0]), data=[(X[:20],), (X[20:],)])
    assert op.num_batches == 2 and op.num_samples == 30
    H_ref, _ = module_tape_hessian(model, [model.w], lambda: loss_fn(model, X))
    assert rel(op.to_dense(), H_ref) <= TOL
    # an error of a loss_fn on another kind of batch gets no such note
    with pytest.raises(ZeroDivisionError) as info:
        hessian(model, loss_fn=lambda m, b: 1 / 0, data=(X,))
    assert not getattr(info.value, "__notes__", [])


# -- the model is never changed -----------------------------------------------------------
def test_model_state_unchanged_bit_for_bit():
    """Variables (BatchNorm moving statistics, random-seed states included) and trainable
    flags are identical after every call, in both BatchNorm modes."""
    model = cnn()
    model.layers[0].trainable = False  # a mixed model
    rng = np.random.default_rng(6)
    X = rng.standard_normal((10, 5, 5, 2))
    y = rng.integers(0, 3, 10)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=xent())
    model.fit(X, y, batch_size=10, epochs=1, verbose=0)  # moving statistics moved once
    before = ModelState.capture(model)
    batches = uneven(X, y, [6, 4])
    for bn in ("batch", "population"):
        for method in ("reverse", "forward"):
            op = hessian(model, xent(), batches, batchnorm=bn, method=method)
            specdens.slq(op, num_steps=4, num_probes=2)
        gradient(model, xent(), (X, y), batchnorm=bn)
        ggn(model, xent(), batches, batchnorm=bn).matvec(tf.ones(op.shape[0], F64))
    assert before.differences(model) == []
    # the comparison is not vacuous: one ulp in one entry
    mm = model.layers[1].moving_mean
    vals = mm.numpy().copy()
    vals[0] = np.nextafter(vals[0], np.inf)
    mm.assign(vals)
    assert before.differences(model) == [f"variables[{mm.path}]: values changed"]
    before.restore(model)
    assert before.differences(model) == []


def test_operator_is_a_snapshot():
    model = mlp()
    X, y = classification()
    op = hessian(model, xent(), (X, y))
    v = tf.constant(np.random.default_rng(0).standard_normal(op.shape[0]))
    a = (op @ v).numpy()
    kernel = model.layers[0].kernel
    kernel.assign(kernel * 2.0)
    assert np.array_equal((op @ v).numpy(), a)
    kernel.assign(kernel * 0.5)


def test_traced_once_per_signature_and_not_again_for_new_weights():
    """Uneven batches share one trace (the sample dimension is relaxed), block widths
    share it too, and an operator rebuilt at new weights (a fresh but equal Keras loss)
    reuses the traces: rebuilding each epoch is cheap."""
    model = mlp(seed=11)
    X, y = classification()
    batches = uneven(X, y, [10, 10, 3])
    op = hessian(model, xent(), batches)
    n = op.shape[0]
    rng = np.random.default_rng(2)
    for k in (1, 3, 1, 5):
        op.matmat(tf.constant(rng.standard_normal((n, k))))
    assert op.traces == {"info": 1, "value": 1, "hvp": 1}
    v = tf.constant(rng.standard_normal(n))
    before = (op @ v).numpy()
    opt = keras.optimizers.SGD(0.5)
    with tf.GradientTape() as tape:
        value = xent()(y, model(X))
    opt.apply_gradients(zip(tape.gradient(value, model.trainable_variables),
                            model.trainable_variables, strict=True))
    op2 = hessian(model, xent(), batches)
    after = (op2 @ v).numpy()
    assert op2.traces == {"info": 1, "value": 1, "hvp": 1}
    assert rel(after, before) > 1e-3  # the weights did change ...
    H_new = dense_hessian(model, [(X, y)], xent())
    assert rel(after, H_new @ v.numpy()) <= TOL  # ... and the product follows them


def test_random_layers_with_batch_statistics_are_refused():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,), dtype=F64), keras.layers.Dense(6, dtype=F64),
                              keras.layers.BatchNormalization(dtype=F64),
                              keras.layers.Dropout(0.5, dtype=F64),
                              keras.layers.Dense(3, dtype=F64)])
    X, y = classification()
    with pytest.raises(ValueError, match=r"training=True.*dropout.*Dropout"):
        hessian(model, xent(), (X, y))
    op = hessian(model, xent(), (X, y), batchnorm="population")  # training=False: no dropout
    assert rel(op.to_dense(), dense_hessian(model, [(X, y)], xent())) <= TOL


def test_a_loss_fn_that_switches_dropout_on_is_refused():
    """The products read the snapshot, seed states included, so a loss_fn calling the
    model with training=True drew the same Dropout mask in both evaluations of the
    determinism check (and in every product): accepted, the Hessian of one frozen mask,
    148 % from the model's. The check's second evaluation now moves the seeds on."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((5,), dtype=F64),
                              keras.layers.Dense(6, activation="tanh", dtype=F64),
                              keras.layers.Dropout(0.5, dtype=F64),
                              keras.layers.Dense(3, dtype=F64)])
    X, y = classification()
    before = ModelState.capture(model)

    def with_dropout(m, batch):
        return xent()(batch[1], m(batch[0], training=True))

    def without(m, batch):
        return xent()(batch[1], m(batch[0], training=False))

    with pytest.raises(RuntimeError, match="not deterministic"):
        hessian(model, loss_fn=with_dropout, data=uneven(X, y, [12, 11]))
    op = hessian(model, loss_fn=without, data=uneven(X, y, [12, 11]))
    assert rel(op.to_dense(), dense_hessian(model, uneven(X, y, [12, 11]), xent())) <= TOL
    hessian(model, loss_fn=with_dropout, data=(X, y), check_determinism=False)  # as asked
    assert before.differences(model) == []


def test_batch_statistics_need_a_loss_fn_that_passes_training_on():
    """A loss_fn without a training keyword calls the model in inference mode: on a model
    with BatchNormalization the default batchnorm="batch" silently gave the moving-
    statistics Hessian. It is refused; with the keyword, or with "population", each mode
    is the reference's."""
    model = cnn()
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((13, 5, 5, 2)), rng.integers(0, 3, 13)
    batches = uneven(X, y, [8, 5])

    def plain(m, batch):
        return xent()(batch[1], m(batch[0]))

    def passing(m, batch, training):
        return xent()(batch[1], m(batch[0], training=training))

    with pytest.raises(ValueError, match="loss_fn takes no `training` keyword"):
        hessian(model, loss_fn=plain, data=batches)
    with pytest.raises(ValueError, match="loss_fn takes no `training` keyword"):
        gradient(model, loss_fn=plain, data=batches)
    for mode, fn in (("population", plain), ("batch", passing)):
        op = hessian(model, loss_fn=fn, data=batches, batchnorm=mode)
        ref = dense_hessian(model, batches, xent(), training=mode == "batch")
        assert rel(op.to_dense(), ref) <= TOL, mode


def test_a_nan_is_never_averaged_in():
    model = mlp()
    X, y = classification()
    Xn = X.copy()
    Xn[15, 2] = np.nan
    with pytest.raises(FloatingPointError, match="loss of the first batch is not finite"):
        hessian(model, xent(), [(Xn[10:], y[10:]), (X[:10], y[:10])])
    op = hessian(model, xent(), [(X[:10], y[:10]), (Xn[10:], y[10:])])
    with pytest.raises(FloatingPointError, match="NaN or Inf at Lanczos step 1"):
        specdens.lanczos(op, 4, num_probes=2)
    # not dropped: the gradient raises (it returned the NaN vector silently)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        gradient(model, xent(), [(X[:10], y[:10]), (Xn[10:], y[10:])])


def test_data_that_changes_between_passes_is_detected():
    model = mlp()
    X, y = classification()
    batches = uneven(X, y, [10, 13])
    op = hessian(model, xent(), batches)
    v = tf.ones(op.shape[0], F64)
    op @ v
    batches.reverse()  # what a shuffling pipeline does
    with pytest.raises(RuntimeError, match="different batches"):
        op @ v
    batches.pop()
    with pytest.raises(RuntimeError, match="yielded 1 batches"):
        op @ v
    shuffled = tf.data.Dataset.from_tensor_slices((X, y)).shuffle(23, seed=0).batch(10)
    op = hessian(model, xent(), shuffled)
    with pytest.raises(RuntimeError, match="different batches"):
        for _ in range(5):  # a reshuffle that keeps every batch's sum is unlikely 5 times
            op @ v
    # the same entries in another order: features flipped, samples permuted in a batch
    batches = uneven(X, y, [10, 13])
    op = hessian(model, xent(), batches)
    op @ v
    for changed in ((X[:10, ::-1], y[:10]), (X[9::-1], y[9::-1])):
        batches[0] = changed
        with pytest.raises(RuntimeError, match="different batches"):
            op @ v
    # a random flip in the pipeline (each sample's features reversed with probability 1/2;
    # a generator whose state carries over between passes, as an unseeded op's does)
    gen = tf.random.Generator.from_seed(1)
    flip = (tf.data.Dataset.from_tensor_slices((X, y)).batch(10)
            .map(lambda x, t: (tf.where(gen.uniform([tf.shape(x)[0], 1]) < 0.5,
                                        tf.reverse(x, [1]), x), t)))
    op = hessian(model, xent(), flip)
    with pytest.raises(RuntimeError, match="different batches"):
        for _ in range(5):  # 23 samples flipped alike on every pass: (1/2)^23 per pass
            op @ v


def test_dataset_and_clear_errors():
    model = mlp()
    X, y = classification()
    ds = tf.data.Dataset.from_tensor_slices((X, y)).batch(10)  # 10, 10, 3
    op = hessian(model, xent(), ds)
    assert op.num_batches == 3
    H_ref = dense_hessian(model, [(X, y)], xent())
    assert rel(op.to_dense(), H_ref) <= TOL

    class Batched(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return (X[:13], y[:13]) if i == 0 else (X[13:], y[13:])

    op = hessian(model, xent(), Batched())
    assert op.num_batches == 2 and rel(op.to_dense(), H_ref) <= TOL
    with pytest.raises(TypeError, match="one-shot iterator"):
        hessian(model, xent(), (b for b in uneven(X, y, [10, 13])))
    with pytest.raises(TypeError, match="exactly one of loss"):
        hessian(model, xent(), (X, y), loss_fn=lambda m, b: 0.0)
    with pytest.raises(TypeError, match="needs data"):
        hessian(model, xent())
    with pytest.raises(ValueError, match=r"\(inputs, targets\)"):
        hessian(model, xent(), [(X, y, y)])
    with pytest.raises(TypeError, match="dtype float64.*float32"):
        op @ tf.ones(op.shape[0], tf.float32)
    with pytest.raises(ValueError, match="shape"):
        op @ tf.ones(op.shape[0] + 1, F64)
    with pytest.raises(ValueError, match="cannot tell how many samples"):
        hessian(model, data=[(np.float64(1.0), X)], loss_fn=lambda m, b: tf.reduce_mean(
            m(b[1]) ** 2))
    with pytest.raises(ValueError, match="batchnorm="):
        hessian(model, xent(), (X, y), batchnorm="eval")
    with pytest.raises(TypeError, match="Keras 3 model or layer"):
        hessian(object(), xent(), (X, y))
    with pytest.raises(ValueError, match="method="):
        hessian(model, xent(), (X, y), method="graph")
    op = hessian(model, data=X, loss_fn=lambda m, b: tf.reduce_mean(m(b) ** 2))  # bare array
    assert op.num_samples == 23


def test_float32_model_gives_float32_vectors_and_slq_runs():
    model64 = mlp()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh"),
                              keras.layers.Dense(3)])
    model.set_weights([w.astype(np.float32) for w in model64.get_weights()])
    X, y = classification()
    loss32 = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    op = hessian(model, loss32, (X.astype(np.float32), y))
    assert op.dtype == tf.float32
    assert (op @ tf.ones(op.shape[0])).dtype == tf.float32
    H64 = dense_hessian(model64, [(X, y)], xent())
    # float32 rounding of the weights (eps 6e-8) and of the products (eps 1.2e-7)
    assert rel(op.to_dense().numpy().astype(np.float64), H64) <= 1e-5
    density = specdens.slq(op, num_steps=10, num_probes=2)
    assert density.n == op.shape[0]


def test_core_trace_estimators_on_the_tf_hessian():
    """``specdens.trace`` on the TensorFlow operator (the engine through the TF array
    namespace: ``xp.all``, ``xp.empty``...): the exact trace (``num_matvecs >= n``) is
    the dense reference's, and each randomised estimator gives what it gives on the
    dense reference as a numpy matrix with the same seed (the same probes; the products
    differ by rounding, 1e-10 relative)."""
    model = mlp()
    X, y = classification()
    op = hessian(model, xent(), uneven(X, y, [10, 13]))
    H = dense_hessian(model, [(X, y)], xent())
    n = H.shape[0]
    exact = specdens.trace(op, num_matvecs=n)
    assert exact.method == "exact"
    assert abs(exact.value - np.trace(H)) <= TOL * np.abs(H).sum()
    for method in ("hutchinson", "hutch++", "xtrace"):
        got = specdens.trace(op, num_matvecs=21, method=method, seed=3)
        want = specdens.trace(H, num_matvecs=21, method=method, seed=3)
        assert got.matvecs == want.matvecs, method
        assert abs(got.value - want.value) <= TOL * np.abs(H).sum(), method
        assert abs(got.stderr - want.stderr) <= TOL * want.stderr, method


# -- GGN ----------------------------------------------------------------------------------
def dense_ggn(model, batches, loss, training=False):
    """sum_b (n_b / N) J_b^T H_b J_b with J_b = jacobian of the flattened outputs and
    H_b the Hessian of the loss in the outputs, both by GradientTape.jacobian."""
    twin = clone(model)
    vs = twin.trainable_variables
    N = sum(len(x) for x, _ in batches)
    G = 0.0
    for x, y in batches:
        with tf.GradientTape() as tape:
            out = twin(x, training=training)
            out_flat = tf.reshape(out, [-1])
        J = tape.jacobian(out_flat, vs)
        J = tf.concat([tf.reshape(j, (out_flat.shape[0], -1)) for j in J], axis=1)
        o = tf.Variable(out)
        with tf.GradientTape() as t2:
            with tf.GradientTape() as t1:
                value = loss(y, o)
            g = tf.reshape(t1.gradient(value, o), [-1])
        H_out = tf.reshape(t2.jacobian(g, o), (g.shape[0], -1))
        G = G + (len(x) / N) * (tf.transpose(J) @ H_out @ J)
    return G.numpy()


@pytest.mark.parametrize("kind", ["xent", "mse"])
def test_ggn_mlp_uneven_batches(kind):
    model = mlp()
    X, y = classification(n=19)
    if kind == "mse":
        y = np.random.default_rng(5).standard_normal((19, 3))
        loss = keras.losses.MeanSquaredError(dtype=F64)
    else:
        loss = xent()
    batches = uneven(X, y, [8, 8, 3])
    before = ModelState.capture(model)
    G_ref = dense_ggn(model, [(X, y)], loss)
    for block in ("loop", "batched"):
        G = ggn(model, loss, batches, block=block).to_dense().numpy()
        assert rel(G, G_ref) <= TOL
    lam = np.linalg.eigvalsh(G)
    assert lam[0] >= -1e-12 * lam[-1]  # PSD: convex loss
    assert rel(hessian(model, loss, batches).to_dense(), G_ref) > 1e-3  # not the Hessian
    assert before.differences(model) == []


def test_ggn_batchnorm_subset_weight_decay():
    model = cnn(seed=2)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((12, 5, 5, 2))
    y = rng.integers(0, 3, 12)
    batches = uneven(X, y, [7, 5])
    last = model.layers[-1]
    for bn in ("batch", "population"):
        G_ref = dense_ggn(model, batches, xent(), training=bn == "batch")
        n = G_ref.shape[0]
        op = ggn(model, xent(), batches, batchnorm=bn, weight_decay=0.1)
        assert rel(op.to_dense(), G_ref + 0.1 * np.eye(n)) <= TOL
        sub = ggn(model, xent(), batches, batchnorm=bn, params=f"{last.name}/*")
        assert sub.param_names == [last.kernel.path, last.bias.path]
        assert rel(sub.to_dense(), G_ref[-57:, -57:]) <= TOL
    with pytest.raises(TypeError, match="needs a loss"):
        ggn(model, None, batches)
