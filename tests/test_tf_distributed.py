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

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

SCRIPT = textwrap.dedent('''
    import json, os
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(3)])
    import keras
    import specdens
    from specdens.backends.tf import ModelState, ggn, gradient, hessian

    if keras.backend.backend() != "tensorflow":
        print(json.dumps({"skip": "Keras is not on its TensorFlow backend"}))
        raise SystemExit(0)
    F64 = "float64"

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
    print("RESULT " + json.dumps(out))
''')


def test_mirrored_strategy_three_logical_cpus_match_one_device(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(("RESULT", "{"))),
                None)
    assert line is not None, proc.stdout + proc.stderr
    if line.startswith("{"):
        pytest.skip(json.loads(line)["skip"])
    out = json.loads(line[len("RESULT "):])
    assert out["replicas"] == [3, 3, 1]  # the reduction really ran over three replicas
    assert out["samples"] == [38.0, 38.0]
    for key in ("list_alpha", "list_beta", "dataset_alpha", "dataset_beta", "dense", "ggn"):
        assert out[key] <= 1e-10, (key, out)
    assert out["grad"] <= 1e-12, out
    assert out["evaluate"] <= 1e-12, out  # not 1/3 of it
    assert out["unchanged"]
