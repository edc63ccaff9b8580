"""Gauss quadrature from Lanczos tridiagonals (Golub & Welsch, 1969).

For a unit start vector ``u`` and ``T_m`` the Lanczos tridiagonal, the nodes are the
eigenvalues ``theta_j`` of ``T_m`` and the weights the squared first components
``tau_j^2`` of its eigenvectors: ``u^T f(A) u ~ sum_j tau_j^2 f(theta_j)``, exact for
polynomials of degree up to ``2m - 1`` (and for all ``f`` after a breakdown).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import eigh_tridiagonal

from .lanczos import LanczosResult


def gauss_quadrature(d: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nodes, weights and last eigenvector components of the tridiagonal ``(d, e)``.

    Solved in float64 on the host. The weights sum to 1 up to rounding and are
    renormalised to sum to exactly 1.
    """
    d = np.asarray(d, dtype=np.float64)
    e = np.asarray(e, dtype=np.float64)
    if d.size == 1:
        return d.copy(), np.ones(1), np.ones(1)
    theta, S = eigh_tridiagonal(d, e, lapack_driver="stev")
    w = S[0, :] ** 2
    w = w / w.sum()
    return theta, w, S[-1, :].copy()


def quadrature_rules(result: LanczosResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-probe Gauss rules of a Lanczos run.

    Returns
    -------
    nodes, weights, residuals : numpy.ndarray, shape (num_probes, num_steps)
        ``residuals[i, j] = beta_m |s_{m,j}|`` bounds the distance from Ritz value
        ``nodes[i, j]`` to the spectrum. Past a probe's length the weight and residual
        are 0 and the node repeats the probe's last node.
    """
    k, m = result.alpha.shape
    nodes = np.zeros((k, m))
    weights = np.zeros((k, m))
    residuals = np.zeros((k, m))
    for i in range(k):
        L = int(result.lengths[i])
        d, e = result.tridiagonal(i)
        theta, w, last = gauss_quadrature(d, e)
        nodes[i, :L] = theta
        nodes[i, L:] = theta[-1]
        weights[i, :L] = w
        tail = 0.0 if result.breakdown[i] else result.beta[i, L - 1]
        residuals[i, :L] = np.abs(tail * last)
    return nodes, weights, residuals
