"""Data sharded over 4 CPU devices gives the single-device Hessian, gradient and Lanczos
coefficients (float64), with every vector replicated on every device.

Runs in a subprocess: the device count (``XLA_FLAGS=--xla_force_host_platform_device_count
=4``) is fixed when jax initialises its backend. The sharded products sum the same
float64 terms in another order (per device, then across devices): relative differences
~1e-16 per product, which 20 Lanczos steps with full reorthogonalisation amplify by at
most the conditioning of the recurrence -- far below the asserted 1e-10. A wrong weight or a shard
counted twice is off by O(1): differentiating inside ``shard_map`` with respect to
replicated parameters sums the derivative over the devices by itself, which, before the
parameters were marked as varying, made every product 4x too large here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    import specdens
    from specdens.backends.jax import gradient, hessian, lanczos
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 4, jax.devices()

    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((5, 8)) / 2, "b1": np.full(8, 0.1),
              "w2": rng.standard_normal((8, 3)) / 2, "b2": np.zeros(3)}
    X, y = rng.standard_normal((30, 5)), rng.integers(0, 3, 30)
    keep = rng.random(30) < 0.7

    def loss(p, batch):
        x, t, m = batch
        out = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        logp = jnp.take_along_axis(jax.nn.log_softmax(out), t[:, None], axis=1)[:, 0]
        return -jnp.sum(jnp.where(m, logp, 0.0)) / jnp.sum(m), jnp.sum(m)

    # uneven batches: on 4 shards 12 and 8 split evenly and 10 leaves 2 samples for the
    # replicated remainder (on 2 shards, none); per-shard counts come from the masks
    sizes, batches, s = [12, 10, 8], [], 0
    for k in sizes:
        batches.append((X[s:s + k], y[s:s + k], keep[s:s + k]))
        s += k
    single = hessian(loss, params, batches)
    # the references: the single-device Hessian as a matrix, and the core engine on it in
    # numpy (the same probes as on jax arrays; no eager jax operations to compile)
    Hs = np.asarray(single.to_dense())
    r1 = specdens.lanczos(Hs, 20, num_probes=3, seed=0)
    g1 = np.asarray(gradient(loss, params, batches))
    t = np.abs(r1.alpha).max() + 2 * np.abs(r1.beta).max()

    r1p = specdens.lanczos(Hs, 20, num_probes=3, seed=0, reorth="partial")

    def check_lanczos(r4, name, ref=r1):
        da, db = np.abs(r4.alpha - ref.alpha).max(), np.abs(r4.beta - ref.beta).max()
        assert max(da, db) <= 1e-10 * t, (name, da, db)

    # a list of devices: a one-axis mesh "data" over the 4 of them
    op = hessian(loss, params, batches, mesh=jax.devices())
    assert op.num_samples == single.num_samples == keep.sum()
    v = jnp.asarray(rng.standard_normal(op.shape[0]))
    Hv = op @ jax.device_put(v, op.device)
    assert len(Hv.sharding.device_set) == 4 and Hv.sharding.is_fully_replicated
    Hv1 = Hs @ np.asarray(v)
    assert np.abs(np.asarray(Hv) - Hv1).max() <= 1e-10 * np.abs(Hv1).max()
    check_lanczos(specdens.lanczos(op, 20, num_probes=3, seed=0), "eager engine")
    check_lanczos(lanczos(op, 20, num_probes=3, seed=0), "compiled loop")
    check_lanczos(lanczos(op, 20, num_probes=3, seed=0, reorth="partial"),
                  "compiled loop, partial reorthogonalisation", r1p)
    g4 = gradient(loss, params, batches, mesh=jax.devices())
    assert g4.sharding.is_fully_replicated
    assert np.abs(np.asarray(g4) - g1).max() <= 1e-10 * np.abs(g1).max()
    print("ok devices", op.num_traces)
    # a 2x2 mesh (explicit axis types, jax.make_mesh's default) sharded over one axis
    op = hessian(loss, params, batches, mesh=jax.make_mesh((2, 2), ("a", "b")), data_axis="a")
    Hv = op @ jax.device_put(v, op.device)
    assert len(Hv.sharding.device_set) == 4 and Hv.sharding.is_fully_replicated
    assert np.abs(np.asarray(Hv) - Hv1).max() <= 1e-10 * np.abs(Hv1).max()
    print("ok 2x2 mesh", op.num_traces)
    # the first shard (3 of 12 samples on 4 devices) of batch 0 is all padding: its masked
    # mean is 0/0, and so are its derivatives with a float mask by multiplication
    # (0 * 1/0; XLA may turn a converted boolean mask into a select, which hides it),
    # which contribute nothing, as in jax.hessian of the mean over real samples (float64:
    # the same terms in another order, a few ulps; 64 eps leaves a margin)
    from jax.flatten_util import ravel_pytree

    def loss(p, batch):
        x, t, m = batch
        out = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        logp = jnp.take_along_axis(jax.nn.log_softmax(out), t[:, None], axis=1)[:, 0]
        m = m.astype(logp.dtype)
        return -jnp.sum(logp * m) / jnp.sum(m), jnp.sum(m)

    keep0 = keep.copy()
    keep0[:3] = False
    mask0 = keep0.astype(np.float64)
    batches0 = [(x, t, mask0[i:i + len(x)]) for (x, t, _), i in zip(batches, (0, 12, 22))]
    flat, unravel = ravel_pytree(params)
    real = (X[keep0], y[keep0], np.ones(keep0.sum()))
    # one compiled program (eager, jax.hessian's operations compile one by one: ~10 s)
    H_ref, g_ref = (np.asarray(a) for a in jax.jit(lambda f: (
        jax.hessian(lambda f: loss(unravel(f), real)[0])(f),
        jax.grad(lambda f: loss(unravel(f), real)[0])(f)))(flat))
    bound = 64 * np.finfo(np.float64).eps
    op = hessian(loss, params, batches0, mesh=jax.devices())
    assert op.num_samples == keep0.sum()
    assert np.abs(np.asarray(op.to_dense()) - H_ref).max() <= bound * np.abs(H_ref).max()
    g4 = np.asarray(gradient(loss, params, batches0, mesh=jax.devices()))
    assert np.abs(g4 - g_ref).max() <= bound * np.abs(g_ref).max()
    ref0 = specdens.lanczos(H_ref, 20, num_probes=3, seed=0)
    check_lanczos(lanczos(op, 20, num_probes=3, seed=0), "empty shard, compiled loop", ref0)
    print("ok empty shard", op.num_traces)
    print("ALL OK")
''')


def test_four_cpu_devices_match_one():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL OK" in proc.stdout
    assert proc.stdout.count("ok ") == 3


BACKLOG = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    import specdens
    from specdens.backends.jax import hessian
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(64, 256)) / 8),
              "w2": jnp.asarray(rng.normal(size=(256,)) / 16)}
    X, y = rng.normal(size=(2048, 64)), rng.normal(size=2048)

    def loss(p, b):
        return jnp.mean((jnp.tanh(b[0] @ p["w1"]) @ p["w2"] - b[1]) ** 2)

    H = hessian(loss, params, [(X, y)], mesh=jax.devices())
    V = jax.device_put(rng.normal(size=(H.shape[0], 4)), H.sharding)
    outs = [H.matmat(V) for _ in range(60)]     # nothing read back in between
    spread = max(float(jnp.abs(o - outs[0]).max()) for o in jax.block_until_ready(outs))
    assert spread == 0.0, spread
    d = specdens.slq(H, num_steps=40, num_probes=2, seed=0)
    assert np.isfinite(d.nodes).all()
    print("ALL OK")
''')


def test_products_on_a_small_cpu_pool_do_not_deadlock():
    """A backlog of un-awaited products on 4 CPU devices with the 4-thread pool of a
    2-core machine (``PJRT_NPROC=1``: XLA sizes the pool as max(cores, devices)).

    Before the pass waited for its reduction on CPU meshes, 60 products dispatched in a
    row (or an eager SLQ run outpacing the devices) left more than 32 programs per device
    queued behind a cross-device reduction, and XLA aborted the process when the
    rendezvous timed out (here after 10 s instead of the default 40 s)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PJRT_NPROC="1")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
                        " --xla_cpu_collective_call_terminate_timeout_seconds=10").strip()
    proc = subprocess.run([sys.executable, "-c", BACKLOG], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "ALL OK" in proc.stdout
