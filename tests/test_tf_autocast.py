"""Float64 Keras models with a nested block left at Keras's default float32 dtype policy.

A block that subclasses ``keras.Layer`` or ``keras.Model`` casts its floating inputs to
its policy's type (float32) before its float64 sublayers see them, and a nested
functional model or ``Sequential`` casts them to its ``Input``'s dtype: in the middle of
a float64 model either rounds parameter-dependent activations to float32 (relative
errors ~2e-8 and an asymmetric operator), which ``hessian`` refuses with a TypeError.
A nested ``Sequential`` built on float64 inputs does not cast, and a cast at the model's
entrance rounds the data only: both stay exact.

References are exact float64 Hessians (nested ``tf.GradientTape`` jacobians) of the
model itself, or of an all-float64 twin; the operator computes the same float64 sums in
another order, so they agree to a few ulps of the largest terms (~1e-16 relative);
``TOL64`` = 300 float64 ulps leaves room for the conditioning of the sums, not for
float32 rounding (1e-8).
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover - another Keras backend
    pytest.skip("Keras is not on its TensorFlow backend", allow_module_level=True)

from conftest import tf_exact_hessian as exact  # noqa: E402
from specdens.backends.tf import hessian  # noqa: E402

TOL64 = 300 * float(np.finfo(np.float64).eps)
F64 = "float64"
ZERO = tf.UnconnectedGradients.ZERO


class Block(keras.layers.Layer):
    """A subclassed block at the default (float32) policy with a float64 layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(5, activation="tanh", dtype=F64)

    def call(self, x):
        return self.inner(x)


class SubModel(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(5, activation="tanh", dtype=F64)

    def call(self, x):
        return self.inner(x)


class Outer(keras.Model):
    """A whole subclassed model at the default policy: it casts its inputs (the data)."""

    def __init__(self):
        super().__init__()
        self.a = keras.layers.Dense(5, activation="tanh", dtype=F64)
        self.b = keras.layers.Dense(3, dtype=F64)

    def call(self, x):
        return self.b(self.a(x))


def around(block):
    """A float64 functional model with ``block`` between two float64 Dense layers."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,), dtype=F64)
    h = keras.layers.Dense(5, activation="tanh", dtype=F64)(inp)
    return keras.Model(inp, keras.layers.Dense(3, dtype=F64)(block(h)))


def functional_block(dtype):
    i = keras.Input((5,), dtype=dtype)
    return keras.Model(i, keras.layers.Dense(5, activation="tanh", dtype=F64)(i))


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4)), rng.integers(0, 3, n)


def xent():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)


def exact_hessian(model, loss, X, y):
    return exact(lambda: loss(y, model(X)), model.trainable_variables)[0]


def dense(op):
    return op.matmat(tf.eye(op.shape[0], dtype=op.dtype)).numpy()


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("make", [lambda: Block(name="blk"), lambda: SubModel(name="blk"),
                                  lambda: functional_block("float32")],
                         ids=["Layer", "Model", "functional_float32_input"])
def test_a_nested_block_that_casts_to_float32_is_refused(make):
    """A nested subclassed Layer or Model at the default policy, or a nested functional
    model with a float32 Input, between float64 layers: a TypeError naming the block and
    what to do (the Hessian had a relative error of 2e-8 and was not symmetric)."""
    block = make()
    model = around(block)
    X, y = data()
    with pytest.raises(TypeError, match="compute in lower precision") as info:
        hessian(model, xent(), (X, y))
    assert block.name in str(info.value) and "block" in str(info.value)


@pytest.mark.parametrize("make", [
    lambda: keras.Sequential([keras.layers.Dense(5, activation="tanh", dtype=F64)]),
    lambda: keras.Sequential([keras.Input((5,), dtype=F64),
                              keras.layers.Dense(5, activation="tanh", dtype=F64)]),
    lambda: Block(dtype=F64),
    lambda: functional_block(F64),
], ids=["Sequential", "Sequential_float64_input", "Layer_float64", "functional_float64"])
def test_nested_blocks_that_do_not_cast_stay_exact(make):
    """A nested ``Sequential`` (its inputs float64, so no cast), a subclassed block built
    with ``dtype="float64"`` and a functional block with a float64 Input: accepted, and
    the Hessian is the exact one of the model."""
    model = around(make())
    X, y = data()
    H = dense(hessian(model, xent(), (X, y)))
    assert rel(H, exact_hessian(model, xent(), X, y)) <= TOL64


def test_a_cast_at_the_models_entrance_rounds_the_data_only():
    """A subclassed model at the default policy casts its inputs, the data, to float32:
    that does not depend on the parameters, so it is accepted and the Hessian is the
    exact one of the model as it computes (symmetric to rounding)."""
    model = Outer()
    X, y = data()
    model(X[:1])
    H = dense(hessian(model, xent(), (X, y)))
    assert rel(H, exact_hessian(model, xent(), X, y)) <= TOL64
    assert rel(H, H.T) <= TOL64
