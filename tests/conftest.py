"""Shared fixtures: operators with known spectra, built from random orthogonal bases, and
the exact Hessian references."""

from __future__ import annotations

import os

# Under pytest-xdist (pyproject's addopts: two workers) each worker computes with one
# thread: two workers with two threads each on a 2-core machine make PyTorch's small
# products wait on descheduled threads, up to a hundred times slower. Set before any test
# module imports a framework (they read these at import); exported values win.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                 "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np
import pytest
from hypothesis import settings

# The property tests draw the same examples on every run, so a CI result does not depend on
# the draw; `pytest --hypothesis-profile=explore` draws new ones (and may be repeated with
# `--hypothesis-seed=N`) to look for failures the fixed draw misses.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("deterministic")


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


def sym_from_spectrum(lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A dense symmetric matrix Q diag(lam) Q^T with a random orthogonal Q (float64)."""
    lam = np.asarray(lam, dtype=np.float64)
    Q = random_orthogonal(lam.size, rng)
    A = (Q * lam) @ Q.T
    return 0.5 * (A + A.T)

def flat_function_hessian(names, values, f, *, with_gradient=False):
    """``torch.func.hessian`` of ``f(dict of tensors)`` at ``values`` (a dict), flat in
    ``names`` order; with ``with_gradient``, ``(hessian, gradient)``."""
    import torch

    shapes = [values[n].shape for n in names]
    theta0 = torch.cat([values[n].reshape(-1) for n in names])

    def g(theta):
        d, o = {}, 0
        for n, s in zip(names, shapes, strict=True):
            d[n] = theta[o:o + s.numel()].reshape(s)
            o += s.numel()
        return f(d)

    H = torch.func.hessian(g)(theta0)
    return (H, torch.func.grad(g)(theta0)) if with_gradient else H



@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def spectrum_matrix(rng):
    """n = 200, indefinite spectrum with a few outliers: (A, eigenvalues)."""
    lam = np.concatenate([np.linspace(-1.0, 2.0, 195), [5.0, 7.5, 10.0, 12.0, 20.0]])
    return sym_from_spectrum(lam, rng), np.sort(lam)


def tf_exact_hessian(fn, variables):
    """``(H, g)`` of the scalar ``fn()`` in ``variables`` by nested ``tf.GradientTape``s,
    dense numpy arrays in the variables' dtype (the TensorFlow reference of the tests).

    Keras variables are replaced by the ``tf.Variable``s behind them (TensorFlow needs a
    DType for the zero derivative of a variable the value does not depend on)."""
    import tensorflow as tf

    zero = tf.UnconnectedGradients.ZERO
    variables = [getattr(v, "value", v) if hasattr(v, "path") else v for v in variables]
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            value = fn()
        g = tf.concat([tf.reshape(tf.convert_to_tensor(t), [-1]) for t in inner.gradient(
            value, variables, unconnected_gradients=zero)], 0)
    rows = outer.jacobian(g, variables, unconnected_gradients=zero,
                          experimental_use_pfor=False)
    n = int(g.shape[0])
    H = np.concatenate([tf.reshape(r, (n, -1)).numpy() for r in rows], axis=1)
    return H, g.numpy()
