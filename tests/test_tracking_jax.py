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


def test_evaluate_weights_counts_and_refuses_batches_with_no_samples():
    """``evaluate`` (the loss ``track`` records) weights each batch by its count from
    ``loss_fn`` (here the non-padding samples): the value is the mean loss of the real
    samples (float64, a few ulps: 1e-12 relative). A batch whose count is 0 (all padding:
    its masked mean loss is 0/0) is refused with a ValueError naming it, as the operators
    and the torch backend refuse it."""
    from specdens.backends.jax.tracking import evaluate

    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((23, 3)), rng.integers(0, 2, 23)
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}

    def per_sample(p, x, t):
        logp = jax.nn.log_softmax(jnp.tanh(x @ p["w"] + p["b"]) * 3)
        return -jnp.take_along_axis(logp, t[:, None], axis=1)[:, 0]

    def loss_fn(p, batch):  # (mean over the kept samples, their number)
        x, t, keep = batch
        count = jnp.sum(keep)
        return jnp.sum(per_sample(p, x, t) * keep) / count, count

    def accuracy_fn(p, batch):
        x, t, keep = batch
        hit = jnp.argmax(x @ p["w"] + p["b"], axis=1) == t
        return jnp.sum(hit * keep) / jnp.sum(keep)

    with jax.enable_x64(True):
        params = {k: jnp.asarray(v) for k, v in params.items()}
        keep = np.ones(23)
        keep[12:20] = 0.0                                # padding in the second batch
        data = [(X[:10], y[:10], keep[:10]), (X[10:], y[10:], keep[10:])]
        real = keep > 0
        exact = float(jnp.mean(per_sample(params, jnp.asarray(X[real]), jnp.asarray(y[real]))))
        hits = np.argmax(X @ np.asarray(params["w"]) + np.asarray(params["b"]), 1) == y
        value, acc = evaluate(loss_fn, params, data, accuracy_fn=accuracy_fn)
        assert value == pytest.approx(exact, rel=1e-12, abs=0)
        assert acc == pytest.approx(float(np.mean(hits[real])), rel=1e-12)
        empty = (X[10:], y[10:], np.zeros(13))
        with pytest.raises(ValueError, match="batch 1 of the data: it holds no samples"):
            evaluate(loss_fn, params, [data[0], empty])
        with pytest.raises(ValueError, match="batch 0 of the data: it holds no samples"):
            evaluate(loss_fn, params, [empty])
