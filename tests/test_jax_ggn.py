"""The JAX GGN operator against J^T H_out J built densely (float64).

J by jax.jacfwd of the flattened outputs in the flat parameters, H_out by jax.hessian of
the criterion in the outputs; the tolerance is that of the Hessian tests (the same sums in
other orders: ~1e-15 expected, 1e-10 asserted).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from specdens.backends.jax import ggn, hessian  # noqa: E402

TOL = 1e-10


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def params_(seed=0):
    rng = np.random.default_rng(seed)
    return {"w1": jnp.asarray(rng.standard_normal((4, 6)) / 2), "b1": jnp.zeros(6) + 0.1,
            "w2": jnp.asarray(rng.standard_normal((6, 3)) / 2), "b2": jnp.zeros(3)}


def model(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def cross_entropy(out, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], axis=1))


def mse(out, y):
    return jnp.mean((out - y) ** 2)


def dense_ggn(params, x, y, crit):
    """J^T H_out J of one batch holding all the data (for a per-sample mean loss this is
    sum_b (n_b / N) J_b^T H_b J_b of any batching), compiled as one program."""
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def build(flat, x, y):
        out0 = model(unravel(flat), x)
        J = jax.jacfwd(lambda f: model(unravel(f), x).reshape(-1))(flat)
        H_out = jax.hessian(lambda o: crit(o.reshape(out0.shape), y))(out0.reshape(-1))
        return J.T @ H_out @ J

    return build(flat, x, y)


def rel(A, B):
    # in numpy (float64): jnp would compile its operations for every new shape
    A, B = np.asarray(A), np.asarray(B)
    return float(np.linalg.norm(A - B) / np.linalg.norm(B))


@pytest.mark.parametrize("crit", [cross_entropy, mse], ids=["cross_entropy", "mse"])
def test_ggn_mlp_uneven_batches(crit):
    params = params_()
    rng = np.random.default_rng(1)
    X = rng.standard_normal((19, 4))
    y = rng.integers(0, 3, 19) if crit is cross_entropy else rng.standard_normal((19, 3))
    batches = [(X[:8], y[:8]), (X[8:16], y[8:16]), (X[16:], y[16:])]
    op = ggn(model, crit, params, batches)
    G = op.to_dense()
    G_ref = dense_ggn(params, X, y, crit)
    assert rel(G, G_ref) <= TOL
    lam = np.linalg.eigvalsh(np.asarray(G))
    assert lam[0] >= -1e-12 * lam[-1]  # PSD: convex criterion
    # it is not the Hessian (the network's second-order terms are dropped)
    H = hessian(lambda p, b: crit(model(p, b[0]), b[1]), params, batches).to_dense()
    assert rel(H, G_ref) > 1e-3


def test_ggn_subset_weight_decay_and_errors():
    params = params_(2)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((12, 4))
    y = rng.integers(0, 3, 12)
    batches = [(X[:7], y[:7]), (X[7:], y[7:])]
    G_ref = dense_ggn(params, X, y, cross_entropy)
    n = G_ref.shape[0]
    op = ggn(model, cross_entropy, params, batches, weight_decay=0.1)
    assert rel(op.to_dense(), G_ref + 0.1 * jnp.eye(n)) <= TOL
    sub = ggn(model, cross_entropy, params, batches, mask=["w2", "b2"])
    assert sub.param_names == ["b2", "w2"]            # tree_leaves order: keys sorted
    # flat order of ravel_pytree: b1, b2, w1, w2
    idx = np.r_[6:9, 9 + 24:n]
    assert rel(sub.to_dense(), G_ref[np.ix_(idx, idx)]) <= TOL
    with pytest.raises(ValueError, match=r"\(inputs, targets\)"):
        ggn(model, cross_entropy, params, [(X, y, y)])
    with pytest.raises(TypeError, match="criterion must be a callable"):
        ggn(model, None, params, batches)
