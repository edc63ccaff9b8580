"""tf.distribute: a Keras loss reached in any way (a loss object, a plain callable that
calls one, a ``loss_fn`` that calls one) gives the one-device operators under a
``MirroredStrategy`` of two logical CPU devices, and so do the model's own losses.

Keras divides the mean of a loss object by the number of replicas under a strategy; a
Keras loss inside a lambda or a ``loss_fn`` gave half the Hessian on two replicas. The
references are exact float64 derivatives of the loss of all the data at once on one
device (nested ``tf.GradientTape`` jacobians of a twin model outside the strategy). The
replicas sum the same float64 terms in another order: relative ~1e-16; ``TOL64`` = 300
float64 ulps leaves room for the conditioning of the sums, not for a factor (0.5).
The logical devices must be configured before TensorFlow initialises: the checks run in
a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

TOL64 = 300 * float(np.finfo(np.float64).eps)

SCRIPT = textwrap.dedent('''
    import json
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(2)])
    import keras

    if keras.backend.backend() != "tensorflow":
        print(json.dumps({"skip": "Keras is not on its TensorFlow backend"}))
        raise SystemExit(0)
    from specdens.backends.tf import ggn, gradient, hessian
    from specdens.backends.tf.tracking import evaluate

    F64 = "float64"
    ZERO = tf.UnconnectedGradients.ZERO
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def make(regularised=False):
        keras.utils.set_random_seed(0)
        reg = dict(kernel_regularizer=keras.regularizers.L2(0.3)) if regularised else {}
        act = dict(activity_regularizer=keras.regularizers.L2(0.2)) if regularised else {}
        return keras.Sequential([keras.Input((4,), dtype=F64),
                                 keras.layers.Dense(5, activation="tanh", dtype=F64, **reg),
                                 keras.layers.Dense(3, dtype=F64, **act)])

    def twins(regularised=False):
        one = make(regularised)
        with strategy.scope():
            dist = make(regularised)
        dist.set_weights(one.get_weights())
        return one, dist

    def flat(ts):
        return tf.concat([tf.reshape(tf.convert_to_tensor(t), [-1]) for t in ts], 0)

    def exact(fn, variables):
        variables = [v.value for v in variables]
        with tf.GradientTape(persistent=True) as outer:
            with tf.GradientTape() as inner:
                value = fn()
            g = flat(inner.gradient(value, variables, unconnected_gradients=ZERO))
        rows = outer.jacobian(g, variables, unconnected_gradients=ZERO,
                              experimental_use_pfor=False)
        n = int(g.shape[0])
        return (np.concatenate([tf.reshape(r, (n, -1)).numpy() for r in rows], axis=1),
                g.numpy())

    def dense(op):
        return op.matmat(tf.eye(op.shape[0], dtype=op.dtype)).numpy()

    def rel(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((25, 4)), rng.integers(0, 3, 25)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    one, dist = twins()
    H_ref, g_ref = exact(lambda: ce(y, one(X)), one.trainable_variables)
    # uneven global batches (10, 10, 5: shares 5/5, 5/5, 3/2) and a one-sample batch
    # (one replica gets none)
    data = {"dataset": tf.data.Dataset.from_tensor_slices((X, y)).batch(10),
            "list": [(X[:10], y[:10]), (X[10:24], y[10:24]), (X[24:], y[24:])]}
    cases = {
        "loss_object": dict(loss=ce),
        "lambda": dict(loss=lambda t, p: ce(t, p)),
        "loss_fn": dict(loss_fn=lambda m, b: ce(b[1], m(b[0]))),
        "loss_fn_count": dict(loss_fn=lambda m, b: (ce(b[1], m(b[0])), tf.shape(b[0])[0])),
    }
    out = {"replicas": hessian(dist, ce, data["list"]).num_replicas}
    for cname, kw in cases.items():
        out[f"hessian/{cname}"] = rel(dense(hessian(dist, data=data["dataset"], **kw)), H_ref)
        out[f"gradient/{cname}"] = rel(gradient(dist, data=data["list"], **kw), g_ref)
    out["ggn/lambda"] = rel(dense(ggn(dist, lambda t, p: ce(t, p), data["list"])),
                            dense(ggn(one, ce, [(X, y)])))
    # a division the loss_fn writes itself is the user's: left alone
    halved = hessian(dist, loss_fn=lambda m, b: ce(b[1], m(b[0])) / 2.0, data=data["list"])
    out["user_division"] = rel(dense(halved), 0.5 * H_ref)
    # the loss SpectrumCallback records, inside the scope, with a plain callable loss
    with strategy.scope():
        scoped = evaluate(dist, lambda t, p: ce(t, p), data["list"])[0]
    mean = float(ce(y, one(X)))
    out["evaluate/lambda"] = abs(scoped - mean) / mean
    # the model's own losses (a weight and an activity regulariser) under the strategy
    one_r, dist_r = twins(regularised=True)

    def objective():
        value = ce(y, one_r(X))
        return value + tf.add_n([tf.reduce_sum(t) for t in one_r.losses])

    Hr_ref, gr_ref = exact(objective, one_r.trainable_variables)
    out["hessian/model_losses"] = rel(dense(hessian(dist_r, ce, data["list"])), Hr_ref)
    out["gradient/model_losses"] = rel(gradient(dist_r, ce, data["list"]), gr_ref)
    print("RESULT " + json.dumps(out), flush=True)
''')


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=tmp_path_factory.mktemp("dist_losses"), timeout=300)
    lines = proc.stdout.splitlines()
    if lines and lines[0].lstrip().startswith("{"):
        pytest.skip(json.loads(lines[0])["skip"])
    line = next((ln for ln in lines if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def test_two_replicas_really_ran(results):
    assert results["replicas"] == 2


@pytest.mark.parametrize("kind", ["hessian", "gradient"])
@pytest.mark.parametrize("case", ["loss_object", "lambda", "loss_fn", "loss_fn_count"])
def test_a_keras_loss_reached_any_way_is_not_divided_by_the_replicas(results, kind, case):
    """A Keras loss object, a lambda that calls it, a ``loss_fn`` that calls it (with or
    without its count), the Hessian over a dataset and the gradient over a list of
    batches: the one-device operator of all the data (the lambda and the ``loss_fn`` gave
    half of it on two replicas)."""
    key = f"{kind}/{case}"
    assert results[key] <= TOL64, (key, results[key])


def test_the_ggn_of_a_callable_loss_is_not_divided_by_the_replicas(results):
    assert results["ggn/lambda"] <= TOL64, results["ggn/lambda"]


def test_a_division_written_in_the_loss_fn_is_kept(results):
    """Only Keras's own scaling is neutralised: ``loss_fn`` returning half the loss gives
    half the Hessian."""
    assert results["user_division"] <= TOL64, results["user_division"]


def test_the_recorded_loss_of_a_callable_loss_is_the_data_mean(results):
    assert results["evaluate/lambda"] <= TOL64, results["evaluate/lambda"]


@pytest.mark.parametrize("kind", ["hessian", "gradient"])
def test_model_losses_under_a_strategy(results, kind):
    """Weight penalties once, activity losses per replica share (each a batch of its
    own): the one-device operator of ``loss + sum(model.losses)`` on all the data."""
    key = f"{kind}/model_losses"
    assert results[key] <= TOL64, (key, results[key])
