"""The JAX backend on the inputs a training loop hands it: loaders of device arrays inside
the compiled loop, batches with PRNG keys, torch loaders in ``track``/``evaluate``, empty
batches, NaN losses, float16/bfloat16 params, in-place changes, float64 outside
``jax.enable_x64``, a one-entry change of a large batch, and the gradient's compiled steps.

References are exact: ``jax.hessian`` / ``jax.grad`` of the full mean loss in float64, or
the core engine on the dense reference. Tolerances (float64): the operator and the
reference add the same few dozen terms in another order, each entry off by a few ulps of
its largest terms: ``64 * eps64 * scale`` leaves a factor ~10 of margin, while a wrong
weight or a NaN is off by O(1). The float16 tolerance is derived in its test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from specdens.backends.jax import ggn, gradient, hessian, lanczos  # noqa: E402
from specdens.backends.jax._data import Batches, checksum  # noqa: E402
from specdens.backends.jax.tracking import evaluate, track  # noqa: E402

import specdens  # noqa: E402

EPS64 = float(np.finfo(np.float64).eps)


def close(A, B):
    A, B = np.asarray(A), np.asarray(B)
    return np.abs(A - B).max() <= 64 * EPS64 * np.abs(B).max()


def tanh_loss(p, b):
    x, y = b
    return jnp.mean((jnp.tanh(x @ p["w"]) - y) ** 2)


# the exact references, each compiled as one program (eager, jax.hessian's operations
# compile one by one); shared by the tests (the same shapes: compiled once)
@jax.jit
def tanh_hessian(w, X, Y):
    """``jax.hessian`` of the mean loss over all of ``(X, Y)`` in ``w``."""
    return jax.hessian(lambda w: tanh_loss({"w": w}, (X, Y)))(w)


@jax.jit
def tanh_grad(w, X, Y):
    """``jax.grad`` of the mean loss over all of ``(X, Y)`` in ``w``."""
    return jax.grad(lambda w: tanh_loss({"w": w}, (X, Y)))(w)


def problem(n=10):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 3)), rng.standard_normal(n), {"w": rng.standard_normal(3)}


def same_alpha(r, ref):
    tol = 64 * EPS64 * (np.abs(ref.alpha).max() + 2 * np.abs(ref.beta).max())
    return np.abs(r.alpha - ref.alpha).max() <= tol


# -- 1. the compiled loop on a combined operator over a loader of jax arrays -------------
class Loader:
    """A re-iterable loader (not a list) that slices device arrays on every pass."""

    def __init__(self, X, Y):
        self.X, self.Y, self.changed = X, Y, False

    def __iter__(self):
        for i in (0, 5):
            x = self.X[i:i + 5]
            if self.changed and i == 5:
                x = x.at[0, 0].add(1.0)
            yield (x, self.Y[i:i + 5])


def test_compiled_loop_on_a_combined_operator_over_a_loader_with_the_data_check():
    with jax.enable_x64(True):
        X, Y, p = problem()
        loader = Loader(jnp.asarray(X), jnp.asarray(Y))
        H = hessian(tanh_loss, {"w": jnp.asarray(p["w"])}, loader)     # check_data=True
        H_ref = np.asarray(tanh_hessian(p["w"], X, Y))
        for op, dense in ((2 * H, 2 * H_ref), (H.shift(1.0), H_ref + np.eye(3))):
            r = lanczos(op, 3, seed=0)
            ref = specdens.lanczos(specdens.aslinearoperator(dense), 3, seed=0)
            assert same_alpha(r, ref)
        loader.changed = True        # the check still runs (while the loop is traced)
        with pytest.raises(RuntimeError, match="different batch at position 1"):
            lanczos(3 * H, 3, seed=0)


# -- 2. batches holding new-style PRNG keys ----------------------------------------------
def key_loss(p, b):
    x, y, key = b
    return jnp.mean((jnp.tanh(x @ p["w"]) + 0.3 * jax.random.normal(key, y.shape) - y) ** 2)


def test_batches_with_typed_prng_keys():
    with jax.enable_x64(True):
        X, Y, p = problem()
        k0, k1 = jax.random.key(0), jax.random.key(1)
        data = [(X[:4], Y[:4], k0), (X[4:], Y[4:], k1)]
        params = {"w": jnp.asarray(p["w"])}

        def full(w):
            return (4 * key_loss({"w": w}, data[0]) + 6 * key_loss({"w": w}, data[1])) / 10

        H_ref, g_ref = jax.jit(lambda w: (jax.hessian(full)(w), jax.grad(full)(w)))(
            params["w"])
        op = hessian(key_loss, params, data)
        assert close(op.to_dense(), H_ref)
        assert close(gradient(key_loss, params, data), g_ref)
        r = lanczos(op, 3, seed=0)
        assert same_alpha(r, specdens.lanczos(specdens.aslinearoperator(np.asarray(H_ref)), 3,
                                              seed=0))
        assert close(hessian(key_loss, params, data[0]).to_dense(),
                     jax.jit(jax.hessian(lambda w: key_loss({"w": w}, data[0])))(
                         params["w"]))
        # the data check sees the key: a loader that draws another key is caught
        keys = [k0]
        batches = Batches(_Gen(lambda: [(X, Y, keys[0])]))
        keys[0] = k1
        with pytest.raises(RuntimeError, match="different batch"):
            list(batches)


class _Gen:
    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())


# -- 3. track and evaluate on a torch DataLoader -----------------------------------------
def test_track_and_evaluate_on_a_torch_loader(tmp_path):
    torch = pytest.importorskip("torch")
    from specdens.tracker import SpectrumTracker

    X, Y, p = problem()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y)),
        batch_size=4)                                                   # 4, 4, 2
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(p["w"])}
        exact = float(tanh_loss(params, (X, Y)))
        value, acc = evaluate(tanh_loss, params, loader)
        assert value == pytest.approx(exact, rel=64 * EPS64) and acc is None
        tr = SpectrumTracker(tmp_path / "s.jsonl", steps=[0], k=1, num_steps=3, num_probes=1)
        rec = track(tr, tanh_loss, params, loader, step=0)
        assert rec.loss == pytest.approx(exact, rel=64 * EPS64)


def test_track_refuses_a_nan_loss_before_building_anything(tmp_path, monkeypatch):
    from specdens.backends.jax import tracking

    from specdens.tracker import SpectrumTracker

    X, Y, p = problem()
    X[7, 0] = np.nan
    built = []
    monkeypatch.setattr(tracking, "hessian", lambda *a, **k: built.append(a))
    monkeypatch.setattr(tracking, "gradient", lambda *a, **k: built.append(a))
    tr = SpectrumTracker(tmp_path / "s.jsonl", steps=[0], k=1, num_steps=3, num_probes=1)
    with jax.enable_x64(True), pytest.raises(FloatingPointError, match="batch 1 of the data"):
        track(tr, tanh_loss, {"w": jnp.asarray(p["w"])}, [(X[:5], Y[:5]), (X[5:], Y[5:])],
              step=0)
    assert built == []


# -- 4. and 5. batches with no samples; a NaN loss in evaluate --------------------------
def test_a_batch_with_no_samples_is_refused_everywhere():
    with jax.enable_x64(True):
        X, Y, p = problem()
        data = [(X[:5], Y[:5]), (X[:0], Y[:0]), (X[5:], Y[5:])]
        match = (r"batch 1 of the data: it holds no samples \(the leading dimension of its "
                 "first array leaf is 0\\)")
        with pytest.raises(ValueError, match=match):
            hessian(tanh_loss, p, data)
        with pytest.raises(ValueError, match=match):
            gradient(tanh_loss, p, data)
        with pytest.raises(ValueError, match=match):
            evaluate(tanh_loss, p, data)
        with pytest.raises(ValueError, match=match):
            ggn(lambda q, x: jnp.tanh(x @ q["w"]), lambda o, y: jnp.mean((o - y) ** 2), p, data)


def test_evaluate_raises_on_a_nan_loss_naming_the_batch():
    with jax.enable_x64(True):
        X, Y, p = problem()
        X[7, 0] = np.nan
        with pytest.raises(FloatingPointError, match="loss of batch 1 of the data is nan"):
            evaluate(tanh_loss, p, [(X[:5], Y[:5]), (X[5:], Y[5:])])


# -- 6. counts of float16 / bfloat16 params ----------------------------------------------
def lin_loss(p, b):
    """Squared error whose count (from loss_fn) stands for many samples."""
    x, y, n = b
    return jnp.mean((x @ p["w"] - y) ** 2), n


def test_counts_of_half_precision_params_are_exact():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 2)).astype(np.float16)
    Y = rng.standard_normal(8).astype(np.float16)
    counts = (30000.0, 40000.0)      # 70,000 samples: beyond float16's largest, 65504
    data = [(X[:4], Y[:4], counts[0]), (X[4:], Y[4:], counts[1])]
    p = {"w": jnp.ones(2, jnp.float16)}
    v = np.ones(2)
    with jax.enable_x64(True):       # the reference in float64 on the float16 data
        x, y, w = X.astype(np.float64), Y.astype(np.float64), np.ones(2)
        Hb = [2 * x[s].T @ x[s] / 4 for s in (slice(0, 4), slice(4, 8))]
        gb = [2 * x[s].T @ (x[s] @ w - y[s]) / 4 for s in (slice(0, 4), slice(4, 8))]
        H_ref = (counts[0] * Hb[0] + counts[1] * Hb[1]) / sum(counts)
        g_ref = (counts[0] * gb[0] + counts[1] * gb[1]) / sum(counts)
        # a product of a batch of 4 samples in float16: each entry a sum of 4 products
        # times 2/4 and the final cast, each rounding by at most eps16/2 of the sum of the
        # absolute terms: 8 * eps16 * that sum bounds them with margin; counts in float32
        # are exact and their 7/3 weights add ~1e-7
        eps16 = float(np.finfo(np.float16).eps)
        absx = np.abs(x)
        scale_H = max(np.abs(2 * absx[s].T @ absx[s] / 4 @ v).max()
                      for s in (slice(0, 4), slice(4, 8)))
        scale_g = max(np.abs(2 * absx[s].T @ np.abs(x[s] @ w - y[s]) / 4).max()
                      for s in (slice(0, 4), slice(4, 8)))
    H = hessian(lin_loss, p, data)
    assert H.num_samples == 70000.0
    Hv = np.asarray(H.matvec(jnp.ones(2, jnp.float16)), dtype=np.float64)
    assert np.abs(Hv - H_ref @ v).max() <= 8 * eps16 * scale_H
    g = np.asarray(gradient(lin_loss, p, data), dtype=np.float64)
    assert np.abs(g - g_ref).max() <= 8 * eps16 * scale_g
    # bfloat16 rounds 401 to 400 (and 701 to 700): counts are summed in float32
    pb = {"w": jnp.ones(2, jnp.bfloat16)}
    datab = [(X[:4].astype(jnp.bfloat16), Y[:4].astype(jnp.bfloat16), 300.0),
             (X[4:].astype(jnp.bfloat16), Y[4:].astype(jnp.bfloat16), 401.0)]
    assert hessian(lin_loss, pb, datab).num_samples == 701.0


# -- 7. in-place changes of a list of batches: documented ----------------------------------
def test_in_place_changes_are_not_detected_and_documented():
    X, Y = np.ones((4, 2), np.float32), np.zeros(4, np.float32)

    def loss(p, b):
        x, y = b
        return jnp.mean((x @ p["w"] - y) ** 2)

    H = hessian(loss, {"w": jnp.ones(2)}, [(X, Y)])
    v = jnp.asarray([1.0, 0.0])
    lanczos(H, 1, probes=v)          # the compiled loop keeps a copy of the data
    X[:] *= 3                        # not detected by check_data
    assert np.asarray(H.matvec(v)).tolist() == [18.0, 18.0]             # the new data
    assert lanczos(H, 1, probes=v).alpha[0, 0] == 2.0                   # the copy
    for doc in (hessian.__doc__, ggn.__doc__):
        assert "in place" in doc and "copy of the data" in doc
    assert "in place" in H.jax_operand.__doc__


# -- 8. a float64 operator used outside jax.enable_x64 -----------------------------------
def test_a_float64_operator_outside_enable_x64_raises():
    X, Y, p = problem()
    with jax.enable_x64(True):
        H = hessian(tanh_loss, p, (X, Y))
        v = jnp.ones(3, jnp.float64)
    with jax.enable_x64(False):
        for run in (lambda: H.matvec(v), lambda: lanczos(H, 3), lambda: H.to_dense()):
            with pytest.raises(TypeError, match="jax_enable_x64 is off.*enable_x64"):
                run()


# -- 9. the data check sees one entry changed by one unit ----------------------------------
def test_checksum_sees_a_one_unit_change_of_one_pixel():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 255, size=(256, 3, 32, 32)).round(), jnp.float32)
    y = x.at[17, 1, 5, 9].add(1.0)
    assert checksum(y) != checksum(x)
    swap = x.at[0, 0, 0, 0].set(x[0, 0, 0, 1]).at[0, 0, 0, 1].set(x[0, 0, 0, 0])
    assert x[0, 0, 0, 0] != x[0, 0, 0, 1] and checksum(swap) != checksum(x)
    nan = x.at[3, 0, 0, 0].set(jnp.nan)
    assert checksum(nan) == checksum(jnp.array(nan))      # the same data, bit for bit
    for a, b in ((jnp.arange(6, dtype=jnp.int8), jnp.arange(6, dtype=jnp.int8).at[1].set(2)),
                 (jnp.ones(3, jnp.bfloat16), jnp.ones(3, jnp.bfloat16).at[1].set(2)),
                 (jnp.asarray([True, False]), jnp.asarray([True, True]))):
        assert checksum(a) != checksum(b)
    batches = [x]
    data = Batches(_Gen(lambda: [batches[0]]))
    batches[0] = y
    with pytest.raises(RuntimeError, match="different batch at position 0"):
        list(data)


# -- 10. data committed to another device than the params ---------------------------------
DEVICES = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from specdens.backends.jax import gradient, hessian
    d0, d1 = jax.devices()
    X, Y = np.ones((4, 3), np.float32), np.ones(4, np.float32)
    def loss(p, b):
        x, y = b
        return jnp.mean((jnp.tanh(x @ p["w"]) - y) ** 2)
    p1 = {"w": jax.device_put(jnp.ones(3), d1)}
    ref = hessian(loss, p1, (X, Y)).matvec(jax.device_put(jnp.ones(3), d1))
    for build in (hessian, gradient):
        try:
            build(loss, p1, jax.device_put((X, Y), d0))
        except ValueError as exc:
            msg = str(exc)
            assert "cpu:0" in msg and "cpu:1" in msg and "jax.device_put" in msg, msg
        else:
            raise AssertionError("no error")
    H = hessian(loss, p1, jax.device_put((X, Y), d1))
    out = H.matvec(jax.device_put(jnp.ones(3), d1))
    assert (out == ref).all() and out.devices() == {d1}
    print("ok")
''')


def test_data_on_another_device_than_the_params_is_refused_when_building():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", DEVICES], capture_output=True, text=True,
                         env=env, cwd=root, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# -- 11. the gradient's compiled steps are shared between calls ----------------------------
def test_gradient_traces_once_per_setup():
    X, Y, p = problem()
    traces = []

    def loss(q, b):
        traces.append(1)             # a Python side effect: runs only when traced
        return tanh_loss(q, b)

    def loss2(q, b):
        traces.append(2)
        return tanh_loss(q, b)

    data = [(X[:5], Y[:5]), (X[5:], Y[5:])]
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(p["w"])}
        g_ref = tanh_grad(params["w"], X, Y)
        assert close(gradient(loss, params, data), g_ref)
        first = len(traces)
        assert first > 0
        params2 = {"w": params["w"] + 0.5}
        g2 = gradient(loss, params2, data)                  # same setup, new values
        assert len(traces) == first
        assert close(g2, tanh_grad(params2["w"], X, Y))
        g3 = gradient(loss, params, data, weight_decay=0.1)           # retraced
        assert len(traces) > first
        assert close(g3, g_ref + 0.1 * params["w"])
        n = len(traces)
        gradient(loss2, params, data)                                  # another loss_fn
        assert traces[n:] and set(traces[n:]) == {2}


# -- 12. functions are keyed by identity, as jax.jit keys them (documented) ----------------
def test_functions_are_keyed_by_identity_as_documented():
    X, Y, p = problem()
    data = [(X[:5], Y[:5]), (X[5:], Y[5:])]
    state = {"scale": 1.0}

    def closure_loss(q, b):             # reads a value from outside its arguments
        return state["scale"] * tanh_loss(q, b)

    def scaled_loss(q, b):              # the same value passed through params
        return q["scale"] * tanh_loss({"w": q["w"]}, b)

    def batch_loss(q, b):               # ... or through the batch
        x, y, s = b
        return s * tanh_loss(q, (x, y))

    def make(s):                        # ... or a new function object per value
        return lambda q, b: s * tanh_loss(q, b)

    with jax.enable_x64(True):
        params = {"w": jnp.asarray(p["w"])}
        v = jnp.ones(3)
        g_ref = tanh_grad(params["w"], X, Y)
        Hv_ref = tanh_hessian(params["w"], X, Y) @ v

        def both(loss_fn, q, d, **kw):
            return gradient(loss_fn, q, d, **kw), hessian(loss_fn, q, d, **kw).matvec(v)

        # the same function object after its captured value changed: the first trace's
        # results, for the gradient and the Hessian alike, as jax.jit gives
        jitted = jax.jit(closure_loss)
        first = jitted(params, data[0])
        g1, h1 = both(closure_loss, params, data)
        state["scale"] = 3.0
        g3, h3 = both(closure_loss, params, data)
        assert jitted(params, data[0]) == first
        assert close(g1, g_ref) and close(h1, Hv_ref)
        assert close(g3, g_ref) and close(h3, Hv_ref)
        # values that change come in through params, the batch or a new function
        for s in (1.0, 3.0):
            q = {"w": params["w"], "scale": jnp.asarray(s)}
            g, h = both(scaled_loss, q, data, mask=["w"])
            assert close(g, s * g_ref) and close(h, s * Hv_ref)
            g, h = both(batch_loss, params, [(x, y, jnp.asarray(s)) for x, y in data])
            assert close(g, s * g_ref) and close(h, s * Hv_ref)
            g, h = both(make(s), params, data)
            assert close(g, s * g_ref) and close(h, s * Hv_ref)

    # and the public docstrings and the how-to say so
    for f in (hessian, ggn, gradient, track):
        doc = " ".join(f.__doc__.split())
        assert "keyed by identity" in doc and "jax.jit" in doc, f.__name__
        assert "params" in doc and "batch" in doc and "mask" in doc, f.__name__
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "how-to", "jax.md"), encoding="utf-8") as fh:
        page = " ".join(fh.read().split())
    assert "### What `loss_fn` may read" in page and "keyed by identity" in page.replace(
        "key their compiled code by the identity", "keyed by identity")


# -- 13. sub-byte dtypes in a loader's batches (the data check) ------------------------------
def test_sub_byte_leaves_in_a_loader_are_checked():
    X, Y, p = problem()
    q = jnp.asarray([-8, -1, 0, 1, 7, 3, -3, 2, 5, -5], jnp.int4)
    for a in (q, jnp.asarray([-2, -1, 0, 1], jnp.int2), jnp.asarray([0, 1, 2, 3], jnp.uint4),
              jnp.asarray([0, 1, 3], jnp.uint2),
              jnp.asarray([0.0, -0.0, 1.5, 6.0], jnp.float4_e2m1fn)):
        assert checksum(a) == checksum(jnp.array(a))          # the same data, bit for bit
        b = a.at[1].set(a[2])                               # one entry changed
        assert a[1] != a[2] and checksum(b) != checksum(a), a.dtype
    zero = jnp.zeros(2, jnp.float4_e2m1fn)
    assert checksum(zero) != checksum(zero.at[0].set(-0.0))    # -0 apart from +0
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(p["w"])}
        Xj, Yj = jnp.asarray(X), jnp.asarray(Y)
        leaf = [q]

        def batches():
            return [(Xj[:5], Yj[:5], leaf[0][:5]), (Xj[5:], Yj[5:], leaf[0][5:])]

        def loss(w, b):
            return tanh_loss(w, b[:2])

        op = hessian(loss, params, _Gen(batches))
        H_ref = tanh_hessian(params["w"], X, Y)
        assert close(op.to_dense(), H_ref)
        assert close(gradient(loss, params, _Gen(batches)), tanh_grad(params["w"], X, Y))
        leaf[0] = q.at[7].set(jnp.asarray(-7, jnp.int4))     # one int4 entry changed
        with pytest.raises(RuntimeError, match="different batch at position 1"):
            op.matvec(jnp.ones(3))


# -- 14. the gradient makes one pass over a loader besides the one that reads it -----------
def test_gradient_passes_over_a_loader_and_checks_counts_after():
    X, Y, p = problem()

    class Counting:
        def __init__(self, batches):
            self.batches, self.passes = batches, 0

        def __iter__(self):
            self.passes += 1
            return iter(self.batches)

    def mean_loss(q, b):
        return tanh_loss(q, b)

    def pair_loss(q, b):
        return tanh_loss(q, b), jnp.asarray(b[0].shape[0], b[0].dtype)

    with jax.enable_x64(True):
        params = {"w": jnp.asarray(p["w"])}
        g_ref = tanh_grad(params["w"], X, Y)
        for loss in (mean_loss, pair_loss):
            loader = Counting([(X[:4], Y[:4]), (X[4:], Y[4:])])
            assert close(gradient(loss, params, loader), g_ref)     # compiles
            before = loader.passes
            assert close(gradient(loss, params, loader), g_ref)
            assert loader.passes - before == 2, loss.__name__

        # a count of 0 from loss_fn is still refused, naming the batch, after the pass
        def zero_second(q, b):
            return tanh_loss(q, b), jnp.where(b[0].shape[0] == 6, 0.0, 4.0)

        loader = Counting([(X[:4], Y[:4]), (X[4:], Y[4:])])
        with pytest.raises(ValueError, match=r"batch 1 of the data: it holds no samples "
                                             r"\(loss_fn returned a count of 0\)"):
            gradient(zero_second, params, loader)

        def negative(q, b):
            return tanh_loss(q, b), jnp.asarray(-1.0)

        with pytest.raises(ValueError, match="batch 0 of the data: sample count -1"):
            gradient(negative, params, [(X[:4], Y[:4])])


def test_a_model_of_several_inputs_takes_one_batch_and_dict_pairs_are_explained():
    """([x1, x2], y) was read as two batches ([x1, x2] and y), and ({"x": X}, {"y": Y}) is
    (documented) two dict batches: both failed with the loss's bare unpacking error. The
    first is one batch now, as in the torch and TF backends; the second's error says how
    it was read and how to write one batch."""
    with jax.enable_x64(True):
        X, Y, p = problem()
        X2 = np.cos(X)

        def two_inputs(p, batch):
            (x1, x2), y = batch
            return tanh_loss(p, (x1 + x2, y))

        H = hessian(two_inputs, p, ([X, X2], Y))
        assert H.num_batches == 1
        assert close(H.matmat(jnp.eye(3)), tanh_hessian(p["w"], X + X2, Y))

        def dicts(p, batch):
            inputs, targets = batch
            return tanh_loss(p, (inputs["x"], targets["y"]))

        with pytest.raises(ValueError, match=r"(?s)read as 2 BATCHES.*data = \[\(inputs, "
                                             r"targets\)\]"):
            hessian(dicts, p, ({"x": X}, {"y": Y}))
        H = hessian(dicts, p, [({"x": X}, {"y": Y})])
        assert close(H.matmat(jnp.eye(3)), tanh_hessian(p["w"], X, Y))
