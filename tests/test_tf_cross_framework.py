"""One MLP, one set of weights, one data set: TensorFlow, PyTorch and JAX agree.

The same tanh MLP with the same float64 weights and the same cross-entropy over the same
23 samples (in uneven batches for the two backends) is built in Keras, in torch and, as a
loss written directly with jax.numpy, in JAX (jax.hessian of the flat parameters). The
top eigenvalues that specdens.eigsh finds on the TensorFlow operator, the torch operator
and the JAX Hessian agree to 1e-8 relative: the three are the same matrix up to a
permutation of the parameters and the rounding of float64 sums (~1e-15), and eigsh at
tol=1e-12 resolves well-separated eigenvalues to far below 1e-8.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
if keras.backend.backend() != "tensorflow":  # pragma: no cover - another Keras backend
    pytest.skip("Keras is not on its TensorFlow backend", allow_module_level=True)

from specdens.backends import tf as stf  # noqa: E402
from specdens.backends import torch as storch  # noqa: E402

import specdens  # noqa: E402

K = 4
SIZES = [10, 10, 3]


@contextlib.contextmanager
def jax_x64():
    """float64 in jax for this block only (as in tests/test_operators.py)."""
    try:
        from jax.experimental import enable_x64 as _enable
    except ImportError:
        def _enable():
            return jax.enable_x64(True)
    with _enable():
        yield


def problem():
    rng = np.random.default_rng(8)
    W1, b1 = rng.standard_normal((5, 7)) / 2, rng.standard_normal(7) / 2
    W2, b2 = rng.standard_normal((7, 3)), rng.standard_normal(3) / 2
    X, y = rng.standard_normal((23, 5)), rng.integers(0, 3, 23)
    return (W1, b1, W2, b2), X, y


def batches(X, y):
    cuts = np.cumsum([0, *SIZES])
    return [(X[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def top(op):
    r = specdens.eigsh(op, k=K, which="LA", tol=1e-12)
    assert r.converged
    return r.eigenvalues


def test_tensorflow_torch_and_jax_give_the_same_top_eigenvalues():
    (W1, b1, W2, b2), X, y = problem()

    keras_model = keras.Sequential([keras.Input((5,), dtype="float64"),
                                    keras.layers.Dense(7, activation="tanh", dtype="float64"),
                                    keras.layers.Dense(3, dtype="float64")])
    keras_model.set_weights([W1, b1, W2, b2])
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    lam_tf = top(stf.hessian(keras_model, xent, batches(X, y)))

    torch_model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                      torch.nn.Linear(7, 3)).double()
    with torch.no_grad():
        for p, w in zip(torch_model.parameters(), (W1.T, b1, W2.T, b2), strict=True):
            p.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    torch_batches = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in batches(X, y)]
    lam_torch = top(storch.hessian(torch_model, torch.nn.CrossEntropyLoss(), torch_batches))

    with jax_x64():
        shapes = [w.shape for w in (W1, b1, W2, b2)]
        sizes = [int(np.prod(s)) for s in shapes]
        Xj, yj = jnp.asarray(X), jnp.asarray(y)

        def loss(theta):
            parts, o = [], 0
            for s, k in zip(shapes, sizes, strict=True):
                parts.append(theta[o:o + k].reshape(s))
                o += k
            w1, c1, w2, c2 = parts
            logits = jnp.tanh(Xj @ w1 + c1) @ w2 + c2
            logp = logits - jax.scipy.special.logsumexp(logits, axis=1, keepdims=True)
            return -jnp.mean(jnp.take_along_axis(logp, yj[:, None], axis=1))

        theta = jnp.concatenate([jnp.asarray(w).reshape(-1) for w in (W1, b1, W2, b2)])
        H = jax.hessian(loss)(theta)
        assert H.dtype == jnp.float64
        lam_jax = top(H)
        lam_dense = np.linalg.eigvalsh(np.asarray(H))[-K:]

    scale = np.abs(lam_dense).max()
    for name, lam in (("tensorflow", lam_tf), ("torch", lam_torch), ("jax", lam_jax)):
        assert np.abs(lam - lam_dense).max() <= 1e-8 * scale, (name, lam, lam_dense)
    assert np.abs(lam_tf - lam_torch).max() <= 1e-8 * scale
    assert np.abs(lam_tf - lam_jax).max() <= 1e-8 * scale
    assert lam_dense[-1] > lam_dense[0] > 0  # a non-trivial spectrum at its top
