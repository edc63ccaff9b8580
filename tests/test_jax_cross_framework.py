"""The same MLP with the same weights and data in PyTorch and JAX (float64): the same top
eigenvalues and, from the same explicit probes, the same SLQ nodes.

The two backends compute the same products up to the order of their float64 sums
(~1e-16 relative). Eigenvalues are perfectly conditioned (|d lambda| <= ||dH||), so the
top ones agree to ~1e-14 relative when both eigsh runs converge to their tolerance
(1e-10 * ||H|| residuals, so 1e-8 relative as the acceptance bound covers the larger
residual bound of the two runs with room). Ritz values of the 30-step tridiagonals,
eigenvalues of T, move by at most ||dT||; with full reorthogonalisation dT is rounding
times the recurrence's growth, so 1e-10 * ||T|| is a wide margin.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402
from specdens.backends import jax as sjax  # noqa: E402
from specdens.backends import torch as storch  # noqa: E402

import specdens  # noqa: E402


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def models():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(),
                              torch.nn.Linear(10, 4)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (40,), generator=g)
    # JAX params as a list in torch's named_parameters() order: the flat vectors coincide
    params = [jnp.asarray(p.detach().numpy()) for p in net.parameters()]

    def loss(p, batch):
        x, t = batch
        h = jnp.tanh(x @ p[0].T + p[1])
        out = h @ p[2].T + p[3]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), t[:, None], axis=1))

    tb = [(X[:16], y[:16]), (X[16:32], y[16:32]), (X[32:], y[32:])]
    jb = [(jnp.asarray(a.numpy()), jnp.asarray(b.numpy())) for a, b in tb]
    H_t = storch.hessian(net, torch.nn.CrossEntropyLoss(), tb)
    H_j = sjax.hessian(loss, params, jb)
    return H_t, H_j


def test_top_eigenvalues_and_slq_nodes_agree():
    H_t, H_j = models()
    assert H_t.shape == H_j.shape == (6 * 10 + 10 + 10 * 4 + 4,) * 2
    e_t = specdens.eigsh(H_t, k=4, which="LA", tol=1e-10)
    e_j = specdens.eigsh(H_j, k=4, which="LA", tol=1e-10)
    assert e_t.converged and e_j.converged
    lam_t, lam_j = np.asarray(e_t.eigenvalues), np.asarray(e_j.eigenvalues)
    assert np.max(np.abs(lam_j - lam_t) / np.abs(lam_t)) <= 1e-8
    # and they are the top of the dense spectrum
    dense = np.linalg.eigvalsh(H_t.to_dense().numpy())
    np.testing.assert_allclose(np.sort(lam_j), dense[-4:], rtol=1e-8)
    # identical explicit probes in both frameworks (the flat layouts coincide)
    V = np.random.default_rng(2).standard_normal((H_t.shape[0], 3))
    d_t = specdens.slq(H_t, num_steps=30, probes=torch.from_numpy(V))
    d_j = specdens.slq(H_j, num_steps=30, probes=jnp.asarray(V))
    scale = np.abs(dense).max()
    assert np.max(np.abs(d_j.nodes - d_t.nodes)) <= 1e-10 * scale
