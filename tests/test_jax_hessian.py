"""The JAX Hessian operator and gradient against jax.hessian / jax.grad of the same loss on
all data (float64).

Tolerance: the operator and the reference compute the same sums in float64 in different
orders (batch by batch, forward-over-reverse, against one reverse-over-reverse or
forward-over-reverse Hessian of the whole data); the rounding of one entry is a few ulps of
its largest terms, so the relative Frobenius error is ~1e-16 to 1e-14. 1e-10 leaves room
for the conditioning of the sums, not for a wrong weight: a mis-weighted batch is off by
~1e-1 (``test_equal_weighting_would_be_wrong``).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from specdens.backends.jax import gradient, hessian, slq  # noqa: E402

import specdens  # noqa: E402

TOL = 1e-10


@pytest.fixture(autouse=True)
def x64():
    """float64 for this module's tests only (the config flag is restored afterwards)."""
    with jax.enable_x64(True):
        yield


def mlp_params(seed=0, d=5, h=7, c=3):
    rng = np.random.default_rng(seed)
    return {"layers": [{"w": jnp.asarray(rng.standard_normal((d, h)) / np.sqrt(d)),
                        "b": jnp.asarray(0.1 * rng.standard_normal(h))},
                       {"w": jnp.asarray(rng.standard_normal((h, c)) / np.sqrt(h)),
                        "b": jnp.asarray(0.1 * rng.standard_normal(c))}]}


def mlp_apply(p, x):
    h = jnp.tanh(x @ p["layers"][0]["w"] + p["layers"][0]["b"])
    return h @ p["layers"][1]["w"] + p["layers"][1]["b"]


def cross_entropy(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def mlp_loss(p, batch):
    x, y = batch
    return cross_entropy(mlp_apply(p, x), y)


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


@functools.partial(jax.jit, static_argnums=0)
def _flat_hessian(loss, params, batch):
    """One compiled program per loss and shapes (a module-level loss: shared by the tests)."""
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: loss(unravel(f), batch))(flat)


def reference(loss, params, batch, mask_flags=None):
    """jax.hessian of ``loss(params, batch)`` in the flat vector of (selected) leaves."""
    H = _flat_hessian(loss, params, batch)
    if mask_flags is None:
        return H
    sizes = [int(np.size(x)) for x in jax.tree_util.tree_leaves(params)]
    keep = np.concatenate([np.full(s, f) for s, f in zip(sizes, mask_flags, strict=True)])
    return H[np.ix_(keep, keep)]


def rel(A, B):
    # in numpy (float64): jnp would compile its operations for every new shape
    A, B = np.asarray(A), np.asarray(B)
    return float(np.linalg.norm(A - B) / np.linalg.norm(B))


@pytest.mark.parametrize("arrays", ["numpy", "jax"])
def test_mlp_uneven_batches(arrays):
    params = mlp_params()
    X, y = classification()
    batches = uneven(X, y, [10, 10, 3])
    if arrays == "jax":
        batches = [(jnp.asarray(a), jnp.asarray(b)) for a, b in batches]
    op = hessian(mlp_loss, params, batches)
    n = ravel_pytree(params)[0].size
    assert op.shape == (n, n) and op.dtype == jnp.float64 and op.num_samples == 23
    assert op.param_names == ["layers.0.b", "layers.0.w", "layers.1.b", "layers.1.w"]
    H = op.to_dense()
    assert isinstance(H, jax.Array)
    # the uneven batching is the full-batch Hessian: compare with one batch of all 23
    assert rel(H, reference(mlp_loss, params, (X, y))) <= TOL
    # symmetric to rounding
    assert rel(H, H.T) <= 1e-14


def test_equal_weighting_would_be_wrong():
    """Guard that the test above can fail: the equal-weight average differs by >> TOL."""
    params = mlp_params()
    X, y = classification()
    wrong = sum(reference(mlp_loss, params, b) for b in uneven(X, y, [10, 10, 3])) / 3
    assert rel(wrong, reference(mlp_loss, params, (X, y))) > 1e-3


def cnn_params(seed=2):
    rng = np.random.default_rng(seed)
    return {"conv": jnp.asarray(rng.standard_normal((3, 2, 3, 3)) / 3.0),   # OIHW
            "bias": jnp.asarray(0.1 * rng.standard_normal(3)),
            "dense": jnp.asarray(rng.standard_normal((3 * 4 * 4, 4)) / 7.0)}


def cnn_loss(p, batch):
    x, y = batch                                                          # x: NCHW
    z = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "VALID",
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    z = jnp.tanh(z + p["bias"][None, :, None, None])
    return cross_entropy(z.reshape(z.shape[0], -1) @ p["dense"], y)


def test_small_cnn():
    params = cnn_params()
    rng = np.random.default_rng(3)
    X = rng.standard_normal((13, 2, 6, 6))
    y = rng.integers(0, 4, 13)
    op = hessian(cnn_loss, params, uneven(X, y, [8, 5]))
    assert op.shape[0] == 3 * 2 * 9 + 3 + 48 * 4
    assert rel(op.to_dense(), reference(cnn_loss, params, (X, y))) <= TOL


def test_parameter_subset_by_mask_glob_and_callable():
    params = mlp_params()
    X, y = classification()
    flags = [False, False, True, True]                      # tree_leaves order: layer 1 only
    H_ref = reference(mlp_loss, params, (X, y), flags)
    tree_mask = {"layers": [False, True]}                   # a prefix of params' structure
    by_tree = hessian(mlp_loss, params, (X, y), mask=tree_mask)
    by_glob = hessian(mlp_loss, params, (X, y), mask="layers.1.*")
    by_call = hessian(mlp_loss, params, (X, y), mask=lambda name, leaf: name.startswith("layers.1"))
    for op in (by_tree, by_glob, by_call):
        assert op.param_names == ["layers.1.b", "layers.1.w"] and op.shape == (24, 24)
        assert rel(op.to_dense(), H_ref) <= TOL
    # the vector space of the subset: unflatten/as_params round trip
    v = jnp.arange(24.0)
    assert by_glob.unflatten(v)["layers.1.w"].shape == (7, 3)
    tree = by_glob.as_params(v)
    assert jnp.array_equal(tree["layers"][0]["w"], params["layers"][0]["w"])
    assert jnp.array_equal(by_glob.flatten(tree), v)
    with pytest.raises(ValueError, match="matches no leaf"):
        hessian(mlp_loss, params, (X, y), mask="layers.5.*")
    with pytest.raises(ValueError, match="selects no leaf"):
        hessian(mlp_loss, params, (X, y), mask=lambda name, leaf: False)


def test_non_float_leaves_are_constants():
    params = {"w": jnp.ones((5, 3)) * 0.1, "step": jnp.asarray(3), "act": jnp.tanh}
    X, y = classification()

    def loss(p, batch):
        x, t = batch
        return cross_entropy(p["act"](x @ p["w"]) * p["step"], t)

    op = hessian(loss, params, (X, y))
    assert op.param_names == ["w"]
    H_ref = jax.jit(jax.hessian(lambda w: loss({**params, "w": w}, (X, y))))(
        params["w"]).reshape(15, 15)
    assert rel(op.to_dense(), H_ref) <= TOL
    with pytest.raises(TypeError, match="not floating-point arrays"):
        hessian(loss, params, (X, y), mask="step")


def test_weight_decay_and_regularizer_and_gradient():
    params = mlp_params()
    X, y = classification()
    batches = uneven(X, y, [10, 10, 3])
    H_ref = reference(mlp_loss, params, (X, y))
    n = H_ref.shape[0]
    wd = 0.3

    def reg(p):  # a non-quadratic penalty: its Hessian is not a multiple of I
        return 0.01 * sum(jnp.sum(t ** 4) for t in jax.tree_util.tree_leaves(p))

    flat, unravel = ravel_pytree(params)
    H_reg = jax.jit(jax.hessian(lambda f: reg(unravel(f))))(flat)
    op = hessian(mlp_loss, params, batches, weight_decay=wd, regularizer=reg)
    assert rel(op.to_dense(), H_ref + wd * jnp.eye(n) + H_reg) <= TOL
    g = gradient(mlp_loss, params, batches, weight_decay=wd, regularizer=reg)
    g0 = jax.jit(jax.grad(lambda f: mlp_loss(unravel(f), (X, y))))(flat)
    g_ref = g0 + wd * flat + 0.04 * flat ** 3
    assert g.shape == (n,) and g.dtype == jnp.float64
    assert float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref)) <= TOL
    sub = gradient(mlp_loss, params, batches, mask="layers.1.*")
    assert float(jnp.max(jnp.abs(sub - g0[-24:]))) <= TOL * float(jnp.linalg.norm(g0))


def test_nan_in_the_data_raises():
    params = mlp_params()
    X, y = classification()
    X = X.copy()
    X[4, 0] = np.nan
    with pytest.raises(FloatingPointError, match="NaN or Inf entries"):
        gradient(mlp_loss, params, uneven(X, y, [10, 13]))
    # the Hessian's products carry the NaN to the engine, which refuses it
    op = hessian(mlp_loss, params, uneven(X, y, [10, 13]))
    with pytest.raises(FloatingPointError, match="NaN or Inf at Lanczos step 1"):
        specdens.lanczos(op, 3)


def test_custom_counts_token_style():
    """loss_fn returns (mean over valid samples, their number): batches weigh by that count,
    not by their length."""
    params = mlp_params()
    X, y = classification(n=20)
    keep = np.random.default_rng(4).random(20) < 0.6
    batches = [(X[:12], y[:12], keep[:12]), (X[12:], y[12:], keep[12:])]

    def loss(p, batch):
        x, t, m = batch
        logp = jnp.take_along_axis(jax.nn.log_softmax(mlp_apply(p, x)), t[:, None], 1)[:, 0]
        count = jnp.sum(m)
        return -jnp.sum(jnp.where(m, logp, 0.0)) / count, count

    op = hessian(loss, params, batches)
    assert op.num_samples == int(keep.sum())
    assert rel(op.to_dense(), reference(mlp_loss, params, (X[keep], y[keep]))) <= TOL


def test_batch_size_fn_and_dict_batches():
    """A PINN-style residual loss on collocation points: dict batches, count from
    batch_size_fn (traced) or the default rule (leading dimension of the first leaf)."""
    params = mlp_params(d=1, h=6, c=1)
    pts = np.random.default_rng(5).random((17, 1))

    def loss(p, batch):
        x = batch["x"]
        return jnp.mean((mlp_apply(p, x) - jnp.sin(3 * x)) ** 2)

    batches = [{"x": pts[:9]}, {"x": pts[9:]}]
    H_ref = reference(loss, params, {"x": pts})
    op1 = hessian(loss, params, batches)
    op2 = hessian(loss, params, batches, batch_size_fn=lambda b: b["x"].shape[0])
    assert rel(op1.to_dense(), H_ref) <= TOL
    assert rel(op2.to_dense(), H_ref) <= TOL


def test_data_that_changes_between_passes_is_detected():
    params = mlp_params()
    X, y = classification()
    batches = [(jnp.asarray(a), jnp.asarray(b)) for a, b in uneven(X, y, [10, 13])]
    op = hessian(mlp_loss, params, batches)
    v = jnp.ones(op.shape[0])
    op @ v
    batches.reverse()                       # what a shuffling loader does
    with pytest.raises(RuntimeError, match="different batch at position 0"):
        op @ v
    batches.reverse()
    batches.pop()
    with pytest.raises(RuntimeError, match="yielded 1 batches"):
        op @ v
    # new objects with the same values are accepted (checksum)
    batches[:] = [(jnp.asarray(a), jnp.asarray(b)) for a, b in uneven(X, y, [10, 13])]
    assert rel(op @ v, hessian(mlp_loss, params, batches) @ v) == 0.0


def test_loader_yielding_fresh_arrays_is_checked_by_checksum():
    """A re-iterable loader that makes new arrays on every pass (as data loaders do): the
    same values pass, a shuffled order raises."""
    from specdens.backends.jax._data import Batches

    X, y = classification()

    class Loader:
        def __init__(self):
            self.order = [0, 1]

        def __iter__(self):
            parts = uneven(X, y, [10, 13])
            return iter([tuple(np.copy(a) for a in parts[i]) for i in self.order])

    loader = Loader()
    batches = Batches(loader)
    assert batches.num_batches == 2
    assert [len(b[0]) for b in batches] == [10, 13]     # fresh copies, same values: fine
    loader.order = [1, 0]
    with pytest.raises(RuntimeError, match="different batch at position 0"):
        list(batches)


@pytest.mark.parametrize("arrays", ["numpy", "jax"])
def test_loader_that_reorders_entries_is_detected(arrays):
    """The checksum sees the order of the entries: a loader whose batches hold the same
    values in another order (uint8 images flipped left-right, samples permuted within a
    batch) on a later pass raises, for fresh numpy arrays (hashed) and fresh jax arrays
    (sums on the device); the unchanged batches pass."""
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(16, 4, 4)).astype(np.uint8)
    y = rng.integers(0, 3, 16)
    put = np.copy if arrays == "numpy" else jnp.asarray

    class Loader:
        def __init__(self):
            self.change = None

        def __iter__(self):
            for i in (0, 8):
                x, t = images[i:i + 8], y[i:i + 8]
                if i == 8 and self.change == "flip":
                    x = x[:, :, ::-1]
                elif i == 8 and self.change == "permute":
                    x, t = x[::-1], t[::-1]
                yield put(x), put(t)

    params = {"w": jnp.asarray(rng.standard_normal((16, 3)))}

    def loss(p, batch):
        x, t = batch
        logits = (jnp.reshape(x, (x.shape[0], -1)) / 255.0) @ p["w"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, None], 1))

    loader = Loader()
    op = hessian(loss, params, loader)
    v = jnp.ones(op.shape[0])
    op @ v                                         # fresh arrays, same batches: fine
    for change in ("flip", "permute"):
        loader.change = change
        with pytest.raises(RuntimeError, match="different batch at position 1"):
            op @ v


def test_clear_errors():
    params = mlp_params()
    X, y = classification()
    with pytest.raises(TypeError, match="one-shot iterator"):
        hessian(mlp_loss, params, (b for b in uneven(X, y, [10, 13])))
    with pytest.raises(ValueError, match="got shape \\(23,\\)"):
        hessian(lambda p, b: jnp.sum(mlp_apply(p, b[0]), axis=1), params, (X, y))
    with pytest.raises(ValueError, match="yielded no batches"):
        hessian(mlp_loss, params, [])
    with pytest.raises(TypeError, match="different dtypes"):
        hessian(mlp_loss, {**params, "extra": jnp.ones(2, jnp.float32)}, (X, y))
    with pytest.raises(ValueError, match="cannot tell how many samples"):
        hessian(lambda p, b: jnp.sum(p["layers"][0]["w"]) ** 2 * b["s"], params,
                [{"s": 2.0}])
    op = hessian(mlp_loss, params, (X, y))
    with pytest.raises(TypeError, match="dtype float64"):
        op @ jnp.ones(op.shape[0], jnp.float32)
    with pytest.raises(ValueError, match="shape"):
        op @ jnp.ones(op.shape[0] + 1)
    with pytest.raises(TypeError, match="works on jax arrays"):
        op @ np.ones(op.shape[0])
    with pytest.raises(TypeError, match="weight_decay"):
        hessian(mlp_loss, params, (X, y), weight_decay="0.1")


def test_float64_params_without_x64_raise():
    params = jax.tree_util.tree_map(np.asarray, mlp_params())
    X, y = classification()
    with jax.enable_x64(False):
        with pytest.raises(TypeError, match="jax_enable_x64"):
            hessian(mlp_loss, params, (X, y))


def test_float32_operator_and_slq():
    params32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), mlp_params())
    X, y = classification()
    op = hessian(mlp_loss, params32, (X.astype(np.float32), y))
    assert op.dtype == jnp.float32
    assert (op @ jnp.ones(op.shape[0], jnp.float32)).dtype == jnp.float32
    H64 = reference(mlp_loss, mlp_params(), (X, y))
    # float32 rounding (eps 1.2e-7) of sums over a few dozen terms
    assert rel(op.to_dense().astype(jnp.float64), H64) <= 1e-5
    density = slq(op, num_steps=10, num_probes=2)         # the compiled loop, float32
    assert density.n == op.shape[0] and np.all(np.isfinite(density.nodes))


def test_equinox_model():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(5, 3, 6, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0),
                       dtype=jnp.float64)
    X, y = classification()
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p, batch):
        m = eqx.combine(p, static)
        return cross_entropy(jax.vmap(m)(batch[0]), batch[1])

    # the whole module as params: its non-array leaves (the activation) are constants
    op = hessian(lambda m, b: cross_entropy(jax.vmap(m)(b[0]), b[1]), model,
                 uneven(X, y, [10, 13]))
    H_ref = reference(loss, params, (X, y))
    assert op.shape == H_ref.shape == (6 * 5 + 6 + 3 * 6 + 3,) * 2
    assert rel(op.to_dense(), H_ref) <= TOL


def test_one_device_mesh_runs_like_no_mesh():
    """A mesh of one device gives arrays placed on that device; the operator's placement
    (a one-device sharding) must accept them, and the results match the mesh-free ones."""
    from jax.sharding import Mesh

    X, y = classification()
    params = mlp_params()
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    plain = hessian(mlp_loss, params, (X, y))
    meshed = hessian(mlp_loss, params, (X, y), mesh=mesh)
    v = jnp.asarray(np.random.default_rng(0).standard_normal(plain.shape[0]))
    assert rel(np.asarray(meshed.matvec(v)), np.asarray(plain.matvec(v))) <= TOL
    # the mesh-free result: the core engine on the exact Hessian (jax.hessian, which the
    # mesh-free operator matches: test_mlp_uneven_batches) in numpy -- the same probes, and
    # no eager jax operations to compile for mesh-free arrays besides the meshed ones
    a = specdens.slq(np.asarray(reference(mlp_loss, params, (X, y))), num_steps=6,
                     num_probes=2, seed=1)
    for run in (specdens.slq, slq):
        b = run(meshed, num_steps=6, num_probes=2, seed=1)
        np.testing.assert_allclose(b.nodes, a.nodes, rtol=0, atol=TOL * np.abs(a.nodes).max())
