"""JAX operators built from the same functions, parameter structure and settings share
their compiled products (a tracker builds one operator per record): a later operator
traces nothing, computes with its own parameters and data, and the shared traces keep
no arrays alive.

Tolerance: as in ``test_jax_hessian.py``, the operator and ``jax.hessian`` compute the
same float64 sums in different orders (relative error ~1e-16 to 1e-14); 1e-10 leaves
room for conditioning, not for another operator's parameters or data (off by O(1)).
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from specdens.backends.jax import compiled, ggn, hessian  # noqa: E402

import specdens  # noqa: E402

TOL = 1e-10


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def params_(seed, d=4, h=5, c=3, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"w1": jnp.asarray(rng.standard_normal((d, h)) / np.sqrt(d)),
            "b1": jnp.asarray(0.1 * rng.standard_normal(h)),
            "w2": jnp.asarray(scale * rng.standard_normal((h, c)) / np.sqrt(h)),
            "act": "tanh"}  # a static leaf: part of the trace


def model(p, x):
    act = {"tanh": jnp.tanh, "sin": jnp.sin}[p["act"]]
    return act(x @ p["w1"] + p["b1"]) @ p["w2"]


def cross_entropy(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def loss(p, batch):
    return cross_entropy(model(p, batch[0]), batch[1])


def data_(seed, sizes=(7, 5), d=4, c=3):
    rng = np.random.default_rng(seed)
    return [(jnp.asarray(rng.standard_normal((s, d))), jnp.asarray(rng.integers(0, c, s)))
            for s in sizes]


def dense_hessian(p, data, weight_decay=0.0):
    arrays = {k: v for k, v in p.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in p.items() if k not in arrays}
    flat, unravel = ravel_pytree(arrays)
    x = jnp.concatenate([b[0] for b in data])
    y = jnp.concatenate([b[1] for b in data])
    # one compiled program (eager, jax.hessian's operations compile one by one)
    H = np.asarray(jax.jit(jax.hessian(lambda v: loss(dict(unravel(v), **static), (x, y))))(
        flat))
    return H + weight_decay * np.eye(len(flat))


def dense(op):
    return np.asarray(op.matmat(jnp.eye(op.shape[0], dtype=op.dtype)))


def rel(A, B):
    return np.linalg.norm(A - B) / np.linalg.norm(B)


def test_later_operator_traces_nothing_and_uses_its_own_params_and_data():
    first = hessian(loss, params_(0), data_(0))
    H0 = dense(first)
    assert first.num_traces >= 1
    p1, d1 = params_(1, scale=3.0), data_(1)
    later = hessian(loss, p1, d1)
    H1 = dense(later)
    assert later.num_traces == 0
    assert rel(H0, dense_hessian(params_(0), data_(0))) < TOL
    assert rel(H1, dense_hessian(p1, d1)) < TOL
    assert rel(H1, H0) > 1e-2  # (another Hessian: the check above is not vacuous)


def test_compiled_loop_is_traced_once_for_all_operators_sharing_products():
    ops = [hessian(loss, params_(s), data_(s)) for s in (2, 3)]
    results = [compiled.lanczos(op, 12, num_probes=2, seed=0) for op in ops]
    assert ops[1].num_traces == 0
    for s, r in zip((2, 3), results, strict=True):
        # the core engine on each operator's jax.hessian (numpy: the same probes)
        ref = specdens.lanczos(dense_hessian(params_(s), data_(s)), 12, num_probes=2, seed=0)
        np.testing.assert_allclose(r.alpha, ref.alpha, rtol=0, atol=1e-10)
        np.testing.assert_allclose(r.beta, ref.beta, rtol=0, atol=1e-10)
    assert not np.allclose(results[0].alpha, results[1].alpha)


def test_different_settings_or_structure_trace_again():
    base = hessian(loss, params_(4), data_(4))
    dense(base)
    cases = [
        (dict(weight_decay=0.5), params_(4), 0.5),
        (dict(mask=["w1", "w2"]), params_(4), 0.0),
        ({}, dict(params_(4), act="sin"), 0.0),  # another static leaf
        ({}, params_(4, h=6), 0.0),  # other shapes
    ]
    for kw, p, wd in cases:
        op = hessian(loss, p, data_(4), **kw)
        H = dense(op)
        assert op.num_traces >= 1, kw
        ref = dense_hessian(p, data_(4), weight_decay=wd)
        if "mask" in kw:
            keep = np.ones(ref.shape[0], bool)
            # the flat order of ravel_pytree (sorted keys: b1, w1, w2): drop b1's 5 entries
            keep[:5] = False
            ref = ref[np.ix_(keep, keep)]
        assert rel(H, ref) < TOL, kw


def test_unhashable_static_leaf_is_traced_per_operator():
    """A set is a pytree leaf (not a node) and not hashable: no trace key, so each operator
    traces its own products, and they are right."""
    for s in (5, 6):
        p = dict(params_(s), tag={"unhashable"})
        op = hessian(loss, p, data_(s))
        H = dense(op)
        assert op.num_traces >= 1
        assert rel(H, dense_hessian(p, data_(s))) < TOL


def test_shared_traces_keep_no_arrays_alive():
    p, data = params_(7), data_(7)
    op = hessian(loss, p, data)
    dense(op)
    refs = [weakref.ref(op), weakref.ref(op.consts[0]), weakref.ref(data[0][0])]
    del op, p, data
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    # and the traces still serve the next operator
    later = hessian(loss, params_(8), data_(8))
    H = dense(later)
    assert later.num_traces == 0
    assert rel(H, dense_hessian(params_(8), data_(8))) < TOL


def test_ggn_operators_share_products():
    def crit(out, y):
        return cross_entropy(out, y)

    def dense_ggn(p, data):
        arrays = {k: v for k, v in p.items() if isinstance(v, jax.Array)}
        flat, unravel = ravel_pytree(arrays)
        x = jnp.concatenate([b[0] for b in data])
        y = jnp.concatenate([b[1] for b in data])

        @jax.jit     # one program (eager, the operations compile one by one)
        def build(flat, x, y):
            def outputs(v):
                return model(dict(unravel(v), act=p["act"]), x).ravel()

            out = outputs(flat)
            J = jax.jacfwd(outputs)(flat)
            H_out = jax.hessian(lambda o: crit(o.reshape(len(y), -1), y))(out)
            return J, H_out

        J, H_out = (np.asarray(a) for a in build(flat, x, y))
        return J.T @ H_out @ J

    first = ggn(model, crit, params_(9), data_(9))
    G0 = dense(first)
    later = ggn(model, crit, params_(10), data_(10))
    G1 = dense(later)
    assert later.num_traces == 0 and first.num_traces >= 1
    assert rel(G0, dense_ggn(params_(9), data_(9))) < TOL
    assert rel(G1, dense_ggn(params_(10), data_(10))) < TOL
    assert rel(G1, G0) > 1e-2


def test_static_leaves_of_other_types_trace_apart():
    """1, 1.0 and True are equal in Python but are different constants in a trace."""
    ops = [hessian(loss, dict(params_(11), extra=v), data_(11)) for v in (1, 1.0, True)]
    for op in ops:
        H = dense(op)
        assert op.num_traces >= 1
        assert rel(H, dense_hessian(dict(params_(11), extra=1), data_(11))) < TOL
