"""The JAX helper of SpectrumTracker: records at due steps only, with the loss of the data
and the concentration of the backend's Hessian and gradient."""

from __future__ import annotations

import numpy as np
import pytest

from specdens.analysis import gradient_concentration
from specdens.tracker import SpectrumTracker, read_records

jax = pytest.importorskip("jax")
pytest.importorskip("specdens.backends.jax.hessian")
jnp = jax.numpy


def test_jax_track(tmp_path):
    from specdens.backends.jax import gradient, hessian
    from specdens.backends.jax.tracking import evaluate, track

    rng = np.random.default_rng(0)
    X = rng.standard_normal((96, 6)).astype(np.float32)
    y = rng.integers(0, 3, 96)
    params = {"w": jnp.asarray(0.3 * rng.standard_normal((6, 3)), dtype=jnp.float32),
              "b": jnp.zeros(3, dtype=jnp.float32)}

    def loss_fn(p, batch):
        x, t = batch
        logp = jax.nn.log_softmax(x @ p["w"] + p["b"])
        return -jnp.mean(jnp.take_along_axis(logp, t[:, None], axis=1))

    def accuracy_fn(p, batch):
        x, t = batch
        return jnp.mean(jnp.argmax(x @ p["w"] + p["b"], axis=1) == t)

    data = [(X[:64], y[:64]), (X[64:], y[64:])]  # uneven batches, weighted by size
    tr = SpectrumTracker(tmp_path / "s.jsonl", steps=[0, 2], k=2, num_steps=12, num_probes=2)
    assert track(tr, loss_fn, params, None, step=1) is None  # not due: nothing computed
    rec = track(tr, loss_fn, params, data, step=0, accuracy_fn=accuracy_fn,
                weight_decay=1e-3)
    logits = X @ np.asarray(params["w"]) + np.asarray(params["b"])
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    loss = float(-np.mean(logp[np.arange(96), y]))
    assert rec.loss == pytest.approx(loss, rel=1e-5)  # float32 arithmetic
    assert rec.accuracy == pytest.approx(float(np.mean(logits.argmax(1) == y)), abs=1e-6)
    assert evaluate(loss_fn, params, data)[1] is None
    H = hessian(loss_fn, params, data, weight_decay=1e-3)
    g = gradient(loss_fn, params, data, weight_decay=1e-3)
    ref = gradient_concentration(H, g, 2)
    assert rec.concentration.fraction == pytest.approx(ref.fraction, abs=1e-5)
    assert [r.step for r in read_records(tmp_path / "s.jsonl")] == [0]
