"""tf.distribute: a MirroredStrategy over three logical CPU devices gives the one-device
operator of all data.

The logical devices must be configured before TensorFlow initialises, so the check runs
in a subprocess. Three replicas, not a power of two: Keras scales mean losses by
``fl32(1/3)``, which an unscaling by 3 left off by 3e-8. Each replica sums
``n_r * H_r v`` over its share of every batch (uneven splits, and empty shares for the
one-sample batch); the all-reduced sums equal
the one-device ones up to the order of the float64 sums (relative ~1e-16 per product),
which Lanczos amplifies by at most the conditioning of the recurrence over 20 steps: far
below the asserted 1e-10. ``tracking.evaluate`` (the loss ``SpectrumCallback`` records)
inside ``strategy.scope()`` is the data's mean loss (a few ulps from the one-device value
of all the data at once), not a third of it.
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

# three logical CPU devices, Keras on TensorFlow (else a "skip" line), float64
PRELUDE = textwrap.dedent('''
    import json, os
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(3)])
    import keras

    if keras.backend.backend() != "tensorflow":
        print(json.dumps({"skip": "Keras is not on its TensorFlow backend"}))
        raise SystemExit(0)
    F64 = "float64"
''')

MIRRORED = textwrap.dedent('''
    import specdens
    from specdens.backends.tf import ModelState, ggn, gradient, hessian

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((5,), dtype=F64),
                                 keras.layers.Dense(6, activation="tanh", dtype=F64),
                                 keras.layers.Dense(3, dtype=F64)])

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((38, 5)), rng.integers(0, 3, 38)
    cuts = [0, 10, 20, 30, 37, 38]  # the last batch has one sample: one replica gets none
    batches = [(X[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1", "/cpu:2"])
    with strategy.scope():
        model_d = build()
    model_1 = build()
    model_1.set_weights(model_d.get_weights())
    before = ModelState.capture(model_d)

    op_1 = hessian(model_1, loss, batches)
    op_d = hessian(model_d, loss, batches)  # the strategy of the model's variables
    op_s = hessian(model_d, loss, tf.data.Dataset.from_tensor_slices((X, y)).batch(10),
                   strategy=strategy)
    single = specdens.lanczos(op_1, 20, num_probes=3, seed=0)
    out = {"replicas": [op_d.num_replicas, op_s.num_replicas, op_1.num_replicas],
           "samples": [op_d.num_samples, op_s.num_samples]}
    scale = float(np.abs(single.alpha).max())
    for name, op in (("list", op_d), ("dataset", op_s)):
        r = specdens.lanczos(op, 20, num_probes=3, seed=0)
        out[name + "_alpha"] = float(np.abs(r.alpha - single.alpha).max()) / scale
        out[name + "_beta"] = float(np.abs(r.beta - single.beta).max()) / scale
    D1 = op_1.to_dense().numpy()
    out["dense"] = float(np.linalg.norm(op_d.to_dense().numpy() - D1) / np.linalg.norm(D1))
    g1 = gradient(model_1, loss, batches).numpy()
    gd = gradient(model_d, loss, batches, strategy=strategy).numpy()
    out["grad"] = float(np.abs(gd - g1).max() / np.abs(g1).max())
    G1 = ggn(model_1, loss, batches).to_dense().numpy()
    Gd = ggn(model_d, loss, batches).to_dense().numpy()
    out["ggn"] = float(np.linalg.norm(Gd - G1) / np.linalg.norm(G1))
    # the loss SpectrumCallback records, evaluated inside the scope (where Keras divides
    # mean losses by the number of replicas): the mean over all samples all the same
    from specdens.backends.tf.tracking import evaluate
    with strategy.scope():
        scoped = evaluate(model_d, loss, batches)[0]
    mean = float(loss(y, model_1(X)))
    out["evaluate"] = abs(scoped - mean) / mean
    out["unchanged"] = before.differences(model_d) == []
    print("RESULT " + json.dumps({"mirrored": out}), flush=True)
''')


def test_mirrored_strategy_three_logical_cpus_match_one_device(results):
    out, log = results
    assert "mirrored" in out, log
    out = out["mirrored"]
    assert out["replicas"] == [3, 3, 1]  # the reduction really ran over three replicas
    assert out["samples"] == [38.0, 38.0]
    for key in ("list_alpha", "list_beta", "dataset_alpha", "dataset_beta", "dense", "ggn"):
        assert out[key] <= 1e-10, (key, out)
    assert out["grad"] <= 1e-12, out
    assert out["evaluate"] <= 1e-12, out  # not 1/3 of it
    assert out["unchanged"]


# -- reviewed bugs under a strategy: each part prints its own RESULT line as it ends, so
# that a part that hangs (the deadlock of synchronised BatchNorm) leaves the others' ------
REVIEW = textwrap.dedent('''
    from specdens.backends.tf import ggn, gradient, hessian
    from specdens.backends.tf.tracking import evaluate

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1", "/cpu:2"])

    def rel(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    def report(name, out):
        print("RESULT " + json.dumps({name: out}), flush=True)

    def twins(make):
        keras.utils.set_random_seed(0)
        one = make()
        with strategy.scope():
            keras.utils.set_random_seed(0)
            dist = make()
        dist.set_weights(one.get_weights())
        return one, dist

    def catch(fn):
        try:
            return "ok", fn()
        except Exception as err:  # the type and the start of the message
            return f"{type(err).__name__}: {str(err)[:1000]}", None

    rng = np.random.default_rng(1)

    # 1. a Keras Loss subclass whose call() returns the batch mean: Keras does not divide
    # a scalar by the number of replicas, so specdens must not multiply it back
    class MeanCE(keras.losses.Loss):
        def call(self, y_true, y_pred):
            y_true = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
            return tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(y_true, y_pred))

    def mlp():
        return keras.Sequential([keras.Input((4,), dtype=F64),
                                 keras.layers.Dense(5, activation="tanh", dtype=F64),
                                 keras.layers.Dense(3, dtype=F64)])

    m1, md = twins(mlp)
    X, y = rng.standard_normal((23, 4)), rng.integers(0, 3, 23)
    batches = [(X[:10], y[:10]), (X[10:22], y[10:22]), (X[22:], y[22:])]  # 1: empty shares
    loss = MeanCE(dtype=F64)
    out = {}
    out["hessian"] = rel(hessian(md, loss, batches).to_dense(),
                         hessian(m1, loss, batches).to_dense())
    out["gradient"] = rel(gradient(md, loss, batches), gradient(m1, loss, batches))
    out["ggn"] = rel(ggn(md, loss, batches).to_dense(), ggn(m1, loss, batches).to_dense())
    with strategy.scope():
        scoped = evaluate(md, loss, batches)[0]
    mean = float(loss(y, m1(X)))  # one device, all the data at once
    out["evaluate"] = abs(scoped - mean) / mean
    report("scalar_loss", out)

    # 4. list data whose batches differ in a non-leading dimension (sequence lengths)
    def seq():
        return keras.Sequential([keras.Input((None, 2), dtype=F64),
                                 keras.layers.Dense(3, activation="tanh", dtype=F64),
                                 keras.layers.GlobalAveragePooling1D(dtype=F64),
                                 keras.layers.Dense(2, dtype=F64)])

    s1, sd = twins(seq)
    sb = [(rng.standard_normal((5, 4, 2)), rng.integers(0, 2, 5)),
          (rng.standard_normal((4, 7, 2)), rng.integers(0, 2, 4))]
    xe = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    out = {}
    status, H = catch(lambda: hessian(sd, xe, sb).to_dense())
    out["hessian_status"] = status
    if H is not None:
        out["hessian"] = rel(H, hessian(s1, xe, sb).to_dense())
    status, g = catch(lambda: gradient(sd, xe, sb))
    out["gradient_status"] = status
    if g is not None:
        out["gradient"] = rel(g, gradient(s1, xe, sb))
    report("varlen", out)

    # 2. BatchNormalization(synchronized=True) on batch statistics: a clear error up front
    # for the operators (the graph loop raised a RuntimeError, the batched block hung);
    # the gradient and the moving statistics still work
    def bn(sync):
        return lambda: keras.Sequential([
            keras.Input((3,), dtype=F64), keras.layers.Dense(4, dtype=F64),
            keras.layers.BatchNormalization(dtype=F64, synchronized=sync),
            keras.layers.Activation("tanh", dtype=F64), keras.layers.Dense(2, dtype=F64)])

    keras.utils.set_random_seed(0)
    ref = bn(False)()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        msync = bn(True)()
    msync.set_weights(ref.get_weights())
    Xb, yb = rng.standard_normal((21, 3)), rng.integers(0, 2, 21)
    data = [(Xb, yb)]
    xe2 = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    out = {"gradient": rel(gradient(msync, xe2, data), gradient(ref, xe2, data)),
           "population": rel(hessian(msync, xe2, data, batchnorm="population").to_dense(),
                             hessian(ref, xe2, data, batchnorm="population").to_dense())}
    out["layer"] = msync.layers[1].name
    for name, build in (("hessian", hessian), ("ggn", ggn)):
        out[name + "_loop"] = catch(
            lambda: build(msync, xe2, data, block="loop").to_dense())[0]
    report("syncbn", out)
    out = {name + "_batched": catch(
        lambda: build(msync, xe2, data, block="batched").to_dense())[0]
        for name, build in (("hessian", hessian), ("ggn", ggn))}
    report("syncbn_batched", out)
''')

EPS64 = float(np.finfo(np.float64).eps)
# The operators under three replicas and on one device compute the same float64 sums in
# another order: ~1e-16 relative; a few hundred eps leaves room for the conditioning of
# the sums, not for a factor (the bugs gave 3x, or an error).
TOL64 = 300 * EPS64


# One TensorFlow process runs both checks (each in its own namespace), the reviewed bugs
# last: a hang there leaves the first check's result.
SCRIPT = PRELUDE + textwrap.dedent(f"""
    for body in {[MIRRORED, REVIEW]!r}:
        exec(body, dict(globals()))
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True,
                              text=True, env=env, cwd=tmp_path_factory.mktemp("review"),
                              timeout=300)
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:  # a hang: keep the parts that finished
        def text(b):
            return b.decode() if isinstance(b, bytes) else (b or "")
        stdout, stderr = text(err.stdout), text(err.stderr) + "\n(timed out)"
    if stdout.lstrip().startswith("{"):
        pytest.skip(json.loads(stdout.strip().splitlines()[0])["skip"])
    out = {}
    for ln in stdout.splitlines():
        if ln.startswith("RESULT "):
            out.update(json.loads(ln[len("RESULT "):]))
    return out, stdout[-3000:] + stderr[-3000:]


def test_a_loss_whose_call_returns_the_batch_mean_is_not_multiplied_by_the_replicas(
        results):
    """A keras.losses.Loss subclass whose call() returns a scalar: Keras's reduce_values
    leaves a scalar unscaled, so the Hessian, the GGN, the gradient and the recorded loss
    under three replicas equal the one-device ones (they were 3x as large)."""
    out, log = results
    assert "scalar_loss" in out, log
    res = out["scalar_loss"]
    for key in ("hessian", "gradient", "ggn", "evaluate"):
        assert res[key] <= TOL64, (key, res)


def test_list_batches_that_differ_beyond_the_sample_dimension_under_a_strategy(
        results):
    """Sequence batches of lengths 4 and 7 under three replicas (the dataset's signature
    was the first batch's): the operator and the gradient equal the one-device ones."""
    out, log = results
    assert "varlen" in out, log
    res = out["varlen"]
    assert res["hessian_status"] == "ok" and res["gradient_status"] == "ok", res
    assert res["hessian"] <= TOL64 and res["gradient"] <= TOL64, res


def test_synchronized_batchnorm_under_a_strategy_is_refused_clearly(results):
    """BatchNormalization(synchronized=True) on batch statistics under three replicas:
    hessian and ggn raise a ValueError that names the layer and the ways out, for both
    blocks (the graph loop raised an obscure RuntimeError, the batched block hung); the
    gradient (global statistics, as one device on the whole batch) and the operator on
    moving statistics equal the one-device ones."""
    out, log = results
    assert "syncbn" in out, log
    res = out["syncbn"]
    assert res["gradient"] <= TOL64 and res["population"] <= TOL64, res
    for key in ("hessian_loop", "ggn_loop"):
        assert res[key].startswith("ValueError:"), (key, res[key])
        assert "synchronized=True" in res[key] and "batchnorm='population'" in res[key]
        assert res["layer"] in res[key]
    assert "syncbn_batched" in out, log  # no hang
    for key, msg in out["syncbn_batched"].items():
        assert msg.startswith("ValueError:") and "synchronized=True" in msg, (key, msg)
