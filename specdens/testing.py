"""Validation against dense eigensolvers.

``dense_eigenvalues`` builds the dense matrix of an operator from identity blocks and
solves it with numpy in float64; ``compare`` measures how far an SLQ estimate is from
those eigenvalues.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _array, _checks
from .density import SpectralDensity
from .operators import DenseOperator, LinearOperatorBase, aslinearoperator

DENSE_LIMIT = 20_000

_FRESH_TO_DENSE = (LinearOperatorBase.to_dense, DenseOperator.to_dense)
"""``to_dense`` methods that return a new array (never the operator's own)."""


def dense_matrix(op: Any, *, block_size: int = 256) -> np.ndarray:
    """The operator as a dense float64 numpy matrix, built through ``matmat`` on identity
    blocks of ``block_size`` columns (a positive integer) in the operator's own library,
    dtype and device; a matrix (an array, or a :class:`~specdens.operators.DenseOperator`)
    is read as it is. The result is a new array: writing into it never changes the
    operator or the array passed in."""
    block_size = _checks.positive_int(block_size, "block_size")
    op = aslinearoperator(op)
    n = op.shape[0]
    if n > DENSE_LIMIT:
        raise ValueError(f"the operator has n = {n} > {DENSE_LIMIT}; a dense reference would "
                         f"need {8 * n * n / 2**30:.1f} GiB. Validate on a smaller instance.")
    D = op.to_dense(block_size=block_size)
    out = _array.to_numpy(D)
    if out is D and type(op).to_dense not in _FRESH_TO_DENSE:
        out = out.copy()  # an operator's own to_dense may hand back its stored matrix
    return out


def dense_eigenvalues(op: Any, *, symmetrize: bool = False) -> np.ndarray:
    """All eigenvalues of a symmetric operator, ascending, by ``numpy.linalg.eigvalsh`` in
    float64 on the dense matrix.

    Raises a ValueError when the dense matrix has a NaN or infinite entry, and when it is
    not symmetric to rounding (relative
    asymmetry above ``sqrt(eps)`` of the dtype whose rounding its products carry: the
    operator's, or that of its least precise part) unless ``symmetrize=True``.
    """
    op = aslinearoperator(op)
    A = dense_matrix(op)
    bad = int(A.size - np.count_nonzero(np.isfinite(A)))
    if bad:
        raise ValueError(f"the operator's dense matrix has {bad} non-finite entries (NaN or "
                         "Inf); it has no eigenvalues to compare with")
    asym = float(np.max(np.abs(A - A.T))) if A.size else 0.0
    scale = float(np.max(np.abs(A))) if A.size else 0.0
    tol = np.sqrt(_array.finfo_eps(_checks.product_dtype(op))) * max(scale, np.finfo(float).tiny)
    if asym > tol and not symmetrize:
        raise ValueError(f"the operator is not symmetric (max |A - A^T| = {asym:.3e}, "
                         f"max |A| = {scale:.3e}); pass symmetrize=True to use (A + A^T) / 2")
    return np.linalg.eigvalsh(0.5 * (A + A.T))


@dataclass(frozen=True)
class Comparison:
    """Distances between an SLQ estimate and the exact eigenvalue distribution.

    Attributes
    ----------
    wasserstein
        Wasserstein-1 distance between the SLQ measure (its atoms) and the empirical
        distribution of the eigenvalues.
    wasserstein_relative
        ``wasserstein`` divided by the spectral range ``max(lambda) - min(lambda)``; the
        absolute ``wasserstein`` when that range is 0 (all eigenvalues equal).
    kolmogorov_smirnov
        ``sup_x |F_slq(x) - F(x)|`` over the step CDFs.
    moments, moment_estimates, moment_stderrs
        Exact ``tr(A^p)/n`` for ``p = 1..max_moment``, the SLQ estimates and their
        standard errors over probes.
    moment_errors
        ``|estimate - exact| / max|lambda|^p``: errors relative to the scale of ``A^p``.
    """

    wasserstein: float
    wasserstein_relative: float
    kolmogorov_smirnov: float
    spectral_range: float
    moments: np.ndarray
    moment_estimates: np.ndarray
    moment_stderrs: np.ndarray
    moment_errors: np.ndarray

    def __repr__(self) -> str:
        return (f"Comparison(W1/range={self.wasserstein_relative:.3e}, "
                f"KS={self.kolmogorov_smirnov:.3e}, moment_errors="
                f"{np.array2string(self.moment_errors, precision=2)})")


def compare(density: SpectralDensity, eigenvalues: Any, *, max_moment: int = 4) -> Comparison:
    """Compare an SLQ estimate with exact eigenvalues (e.g. from :func:`dense_eigenvalues`),
    all finite, through the moments ``p = 1..max_moment`` (``max_moment`` a positive
    integer)."""
    from scipy.stats import wasserstein_distance

    max_moment = _checks.positive_int(max_moment, "max_moment")
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64).reshape(-1))
    if lam.size == 0:
        raise ValueError("compare needs at least one eigenvalue")
    bad = int(lam.size - np.count_nonzero(np.isfinite(lam)))
    if bad:
        raise ValueError(f"compare got {bad} non-finite eigenvalues (NaN or Inf); the "
                         "distances to them are undefined")
    if lam.size != density.n:
        raise ValueError(f"got {lam.size} eigenvalues for an operator of size n = {density.n}")
    loc, mass = density.atoms()
    w1 = float(wasserstein_distance(loc, lam, u_weights=mass))
    span = float(lam[-1] - lam[0])
    # KS over the union of jump points of both step CDFs.
    xs = np.union1d(loc, lam)
    F_slq = density.cdf(xs) / mass.sum()
    F = np.searchsorted(lam, xs, side="right") / lam.size
    ks = float(np.max(np.abs(F_slq - F)))
    ps = np.arange(1, max_moment + 1)
    exact = np.array([np.mean(lam**p) for p in ps])
    est = density.moments(ps)
    scale = np.max(np.abs(lam)) ** ps
    err = np.abs(np.asarray(est.value) - exact) / np.where(scale > 0, scale, 1.0)
    return Comparison(
        wasserstein=w1,
        wasserstein_relative=w1 / span if span > 0 else w1,
        kolmogorov_smirnov=ks,
        spectral_range=span,
        moments=exact,
        moment_estimates=np.asarray(est.value),
        moment_stderrs=np.asarray(est.stderr),
        moment_errors=err,
    )
