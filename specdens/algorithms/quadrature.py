"""Gauss quadrature from Lanczos tridiagonals (Golub & Welsch, 1969).

For a unit start vector ``u`` and ``T_m`` the Lanczos tridiagonal, the nodes are the
eigenvalues ``theta_j`` of ``T_m`` and the weights the squared first components
``tau_j^2`` of its eigenvectors: ``u^T f(A) u ~ sum_j tau_j^2 f(theta_j)``, exact for
polynomials of degree up to ``2m - 1`` (and for all ``f`` after a breakdown, but only
for an operator within the breakdown's ``beta`` of ``A``: eigenvalues closer together
than that merge into one node, see ``SpectralDensity``'s quadrature error).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import eigh_tridiagonal

from .. import _array
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


# Rounding allowance of a product, in units of its eps times the spectral radius: a
# float32 matrix-vector or Hessian-vector product is off by a few eps of ||A|| (two
# probes' copies of one eigenvalue of a float32 network's Hessian differed by ~1 eps32
# relative). 4 eps32 = 4.8e-7 stays below the 1e-6 convergence tolerance of
# specdens.summary.outliers, and twice it covers the copies' spread.
PRODUCT_ROUNDINGS = 4


def quadrature_rules(result: LanczosResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-probe Gauss rules of a Lanczos run.

    Returns
    -------
    nodes, weights, residuals : numpy.ndarray, shape (num_probes, num_steps)
        ``residuals[i, j] = beta_m |s_{m,j}|`` bounds the distance from Ritz value
        ``nodes[i, j]`` to the spectrum, floored at the rounding of the run,
        ``PRODUCT_ROUNDINGS * eps * max |theta|`` with ``eps`` the coarser of the
        arithmetic's and the products' (a float32 network under float64 Lanczos, or
        float32 arithmetic): the recurrence is exact for an operator about that far from
        ``A``, and the same eigenvalue found by two probes differs by about that much
        (~1 eps relative), so the copies are recognised as one. Past a probe's length the weight
        and residual are 0 and the node repeats the probe's last node.
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
    eps = _array.finfo_eps(result.dtype)
    product = getattr(result, "product_dtype", None)
    if product is not None:
        eps = max(eps, _array.finfo_eps(product))
    live = np.arange(m)[None, :] < result.lengths[:, None]
    radius = float(np.max(np.abs(nodes[live]), initial=0.0))
    residuals[live] = np.maximum(residuals[live], PRODUCT_ROUNDINGS * eps * radius)
    return nodes, weights, residuals


def jacobi_from_rule(nodes: np.ndarray, weights: np.ndarray,
                     num_steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The Jacobi (Lanczos tridiagonal) matrix of a discrete measure.

    The inverse of :func:`gauss_quadrature`: Lanczos on ``diag(nodes)`` from the unit
    vector ``sqrt(weights)``, with full reorthogonalisation (twice), gives the tridiagonal
    whose ``k``-point Gauss rule is the ``k``-point Gauss rule of the measure
    ``sum_j weights_j delta(nodes_j)`` (Gragg & Harrod, 1984, The numerically stable
    reconstruction of Jacobi matrices from spectral data). Stops early when the measure
    has fewer points than ``num_steps`` (its rule is then the measure itself).

    Returns
    -------
    alpha, beta : numpy.ndarray
        Diagonal (length ``L <= num_steps``) and off-diagonal (length ``L - 1``).
    """
    theta = np.asarray(nodes, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    m = theta.size if num_steps is None else min(int(num_steps), theta.size)
    q = np.sqrt(np.maximum(w, 0.0))
    q = q / np.linalg.norm(q)
    scale = max(float(np.max(np.abs(theta))), np.finfo(float).tiny)
    Q = np.zeros((m, theta.size))
    alpha, beta = [], []
    for j in range(m):
        Q[j] = q
        v = theta * q
        a = float(q @ v)
        v -= a * q
        if j > 0:
            v -= beta[-1] * Q[j - 1]
        for _ in range(2):
            v -= Q[: j + 1].T @ (Q[: j + 1] @ v)
        alpha.append(a)
        b = float(np.linalg.norm(v))
        if j + 1 == m or b <= 1e3 * np.finfo(float).eps * scale:
            break
        beta.append(b)
        q = v / b
    return np.asarray(alpha), np.asarray(beta[: len(alpha) - 1])


def previous_rules(nodes: np.ndarray, weights: np.ndarray, lengths: np.ndarray, num_steps: int,
                   n: int, breakdown: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``(L-1)``-point Gauss rule of each probe, next to its ``L``-point rule.

    The ``(L-1)``-point Gauss rule of the true probe measure equals that of its
    ``L``-point Gauss rule (both are fixed by the moments of degree ``<= 2L - 3``, which
    the ``L``-point rule reproduces), so it is rebuilt from the stored nodes and weights
    with :func:`jacobi_from_rule`: no Lanczos coefficients need to be kept.

    Parameters
    ----------
    nodes, weights : numpy.ndarray, shape (num_probes, num_steps)
        The probes' Gauss rules.
    lengths : numpy.ndarray of int, shape (num_probes,)
        Steps each probe reached.
    num_steps, n
        The run's step count and the operator size.
    breakdown : numpy.ndarray of bool, shape (num_probes,), optional
        Whether each probe broke down (``breakdown`` of :class:`~specdens.LanczosResult`).
        A breakdown may come at the last step (``L == num_steps``), which
        ``L < num_steps`` misses; that is the test only without the flags (e.g. an
        estimate read from an older file).

    Returns
    -------
    nodes_prev, weights_prev : numpy.ndarray, shape (num_probes, num_steps)
        Zero-padded rules; a probe whose rule is exact (a breakdown, or a full run,
        ``L == n``) gets its own rule back.
    defined : numpy.ndarray of bool
        False where no previous rule exists (``L == 1`` without a breakdown).
    """
    k, m = nodes.shape
    out_nodes = np.zeros((k, m))
    out_weights = np.zeros((k, m))
    defined = np.ones(k, dtype=bool)
    if breakdown is None:
        breakdown = np.asarray(lengths) < num_steps
    for i in range(k):
        L = int(lengths[i])
        exact = bool(breakdown[i]) or L == n
        if exact:
            out_nodes[i], out_weights[i, :L] = nodes[i], weights[i, :L]
            continue
        if L == 1:
            defined[i] = False
            out_nodes[i] = nodes[i]
            continue
        a, b = jacobi_from_rule(nodes[i, :L], weights[i, :L], L - 1)
        theta, w, _ = gauss_quadrature(a, b)
        out_nodes[i, : theta.size], out_weights[i, : w.size] = theta, w
        out_nodes[i, theta.size:] = theta[-1]
    return out_nodes, out_weights, defined
