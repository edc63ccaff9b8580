"""Deflated stochastic Lanczos quadrature: exact outliers plus SLQ of the rest.

With ``V`` (``n x k``, orthonormal) spanning an invariant subspace of ``A`` with
eigenvalues ``lambda_1..lambda_k``, and ``P = I - V V^T``,

``tr f(A) = sum_i f(lambda_i) + tr(P f(P A P) P)``,

because ``A = V diag(lambda) V^T + P A P`` with the two parts acting on orthogonal
subspaces. The first sum is computed exactly; the second is estimated by SLQ on the
deflated operator ``P A P`` from projected probes ``P v``: for any probe with
``E[v v^T] = I`` (Rademacher, Gaussian, or uniform on the sphere of radius ``sqrt(n)``),
``E[(P v)^T f(PAP) (P v)] = tr(P f(PAP) P)``. Lanczos runs from the unit vector
``u = P v / ||P v||``, so the probe's Hutchinson scale becomes ``||P v||^2 / n`` (the
scale of ``v`` times ``||P v_hat||^2`` for the unit probe ``v_hat``), whose mean is
``(n - k) / n``: the deflated part has ``n - k`` dimensions. For probes uniform on the
sphere, ``P v / ||P v||`` is uniform on the unit sphere of the ``(n - k)``-dimensional
range of ``P``, and the exact scale ``(n - k) / n`` is used. Either way the estimator of
``tr f(A) / n`` is unbiased; the ``k`` eigenvalues enter the measure as atoms of mass
``1/n`` each.

Why it helps: the variance of Hutchinson's estimator is about ``2 ||B||_F^2`` for
``B = f(A)``; a few large eigenvalues dominate ``||B||_F`` (a Hessian's outliers), and
deflation removes exactly them (Gambhir, Stathopoulos & Orginos, 2017; Meyer, Musco,
Musco & Woodruff, 2021; Lin, 2017).

What is reused
--------------
* One :func:`specdens.eigsh` run serves every probe, probe block and adaptive round, and
  a previous :class:`specdens.EigshResult` can be passed as ``deflate=`` to reuse it across
  calls (different seeds, step counts, functionals): no product is spent on it again.
* The eigenvalues added as atoms are eigsh's Ritz values (accurate to
  ``residual^2 / gap``), so no product is spent on them either; eigsh's explicit residuals
  are kept in the result (``deflated_residuals``).
* With a checkpoint, the eigenpairs are saved next to it (``PATH.eigsh.npz``), so a
  resumed run does not repeat the eigensolver.

References
----------
S. Gambhir, A. Stathopoulos, K. Orginos (2017), Deflation as a method of variance
reduction for estimating the trace of a matrix inverse. SIAM J. Sci. Comput. 39(2).
R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff (2021), Hutch++: optimal stochastic trace
estimation. SOSA.
L. Lin (2017), Randomized estimation of spectral densities of large matrices made
accurate. Numer. Math. 136.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .. import _array, _checks
from ..operators import LinearOperatorBase
from . import checkpoint as checkpoint_mod
from .eigsh import WHICH, EigshResult, eigsh

EIGSH_CHECKPOINT_FORMAT = "specdens.EigshCheckpoint"
EIGSH_CHECKPOINT_VERSION = 1


class DeflatedOperator(LinearOperatorBase):
    """``(I - V V^T) A (I - V V^T)`` for orthonormal columns ``V`` (``n x k``).

    Products run in the operator's library and on its device; ``A`` is applied in its own
    dtype, the projections in the dtype of ``V`` (the working dtype).
    """

    def __init__(self, op: Any, V: Any):
        super().__init__(op.shape, V.dtype, op.xp, op.device)
        self.symmetric = True
        self.op = op
        self.V = V
        # the rounding of the products is that of ``A``'s dtype, not of the projections
        self.product_dtype = _checks.product_dtype(op)

    def parts(self) -> tuple[Any, ...]:
        return (self.op,)

    def project(self, X: Any) -> Any:
        """``(I - V V^T) X`` for a block ``X`` of shape ``(n, b)``."""
        xp = self.xp
        return X - xp.matmul(self.V, xp.matmul(xp.matrix_transpose(self.V), X))

    def project_rows(self, W: Any) -> Any:
        """``W (I - V V^T)`` for rows ``W`` (``(k, n)``, the working dtype), in place where
        ``W`` is mutable.

        The Lanczos engine applies it to each new vector. ``P A P`` has the eigenvalue 0 on
        ``span(V)``; the recurrence's rounding leaves components there that it amplifies
        like any other eigenvector's, fast when 0 lies outside the rest of the spectrum
        (``|V^T q_j|`` reached 0.4 by step 20 for a positive definite ``A``), and they
        came back as Ritz values at 0 of negligible weight that ``bounds()`` and the
        density's grid took for part of the spectrum. Locked out at every step, they stay
        at rounding level.
        """
        xp = self.xp
        corr = xp.matmul(xp.matmul(W, self.V), xp.matrix_transpose(self.V))
        return _array.subtract_rows(W, corr)

    def _matmat(self, X: Any) -> Any:
        xp = self.xp
        Y = self.project(xp.astype(X, self.dtype, copy=False))
        AY = _array.detached(self.op.matmat(xp.astype(Y, self.op.dtype, copy=False)))
        return self.project(xp.astype(AY, self.dtype, copy=False))


def _orthonormalised(V: Any, xp: Any) -> Any:
    """``V`` with orthonormal columns (Löwdin: ``V (V^T V)^{-1/2}``, same span), when
    ``V^T V`` is not the identity to rounding."""
    G = _array.to_numpy(xp.matmul(xp.matrix_transpose(V), V))
    k = G.shape[0]
    if np.max(np.abs(G - np.eye(k)), initial=0.0) <= 1e-12:
        return V
    w, U = np.linalg.eigh(0.5 * (G + G.T))
    if w.min() <= 1e-10 * max(w.max(), 1.0):
        raise ValueError("the deflation eigenvectors are linearly dependent; check the "
                         "EigshResult passed as deflate=")
    C = (U / np.sqrt(w)) @ U.T
    return xp.matmul(V, _array.from_numpy(C, xp, _array.device_of(V), V.dtype))


class Deflation:
    """The deflation of an operator: eigenpairs, the deflated operator and the probe map.

    Build it with :func:`make_deflation`.
    """

    def __init__(self, op: Any, eig: EigshResult, which: str, work: str, *,
                 eigsh_matvecs: int):
        xp = op.xp
        V = eig.eigenvectors
        if V is None:
            raise ValueError("deflate= needs an EigshResult with eigenvectors "
                             "(return_eigenvectors=True)")
        if _array.library_name(V) != op.array_library:
            raise TypeError(f"the deflation eigenvectors are {_array.library_name(V)} arrays "
                            f"but the operator works on {op.array_library} arrays")
        n = int(op.shape[0])
        if tuple(V.shape) != (n, eig.k):
            raise ValueError(f"the deflation eigenvectors have shape {tuple(V.shape)}; the "
                             f"operator needs ({n}, k)")
        if not np.all(np.isfinite(eig.eigenvalues)):
            raise ValueError("the deflation eigenvalues are not finite")
        wdt = _array.xp_dtype(xp, work)
        self.V = _orthonormalised(xp.astype(V, wdt), xp)
        self.eig = eig
        self.k = eig.k
        self.n = n
        self.which = which
        self.eigsh_matvecs = int(eigsh_matvecs)
        self.operator = DeflatedOperator(op, self.V)

    def probe_map(self, kind: str) -> Any:
        """The map from unit probes (rows) and scales to projected unit probes and the
        scales that keep the estimator unbiased (see the module notes)."""
        xp, V, n, k = self.operator.xp, self.V, self.n, self.k

        def apply(V0: Any, scales: np.ndarray) -> tuple[Any, np.ndarray]:
            P = V0 - xp.matmul(xp.matmul(V0, V), xp.matrix_transpose(V))
            norms2 = xp.sum(P * P, axis=1)
            host = _array.to_numpy(norms2)
            if np.any(host <= (1e3 * np.finfo(float).eps) ** 2):
                raise ValueError("a probe lies in the deflated subspace (its projection is "
                                 "zero); use more probes or another seed")
            P = P / xp.sqrt(norms2)[:, None]
            if kind == "sphere":
                new = np.asarray(scales, dtype=np.float64) * (n - k) / n
            else:
                new = np.asarray(scales, dtype=np.float64) * host
            return P, new

        return apply

    def info(self) -> dict:
        """JSON metadata for ``SpectralDensity.extra["deflation"]``."""
        return {
            "k": int(self.k), "which": self.which, "eigsh_matvecs": self.eigsh_matvecs,
            "eigsh_converged": bool(self.eig.converged),
            "max_residual": float(np.max(self.eig.residuals, initial=0.0)),
        }


def make_deflation(op: Any, deflate: Any, *, which: str = "LA", seed: int = 0,
                   dtype: str = "float64", eigsh_options: dict | None = None,
                   checkpoint: str | os.PathLike | None = None,
                   checkpoint_key: str | None = None) -> Deflation:
    """The deflation of ``op`` by ``deflate`` eigenpairs (an int) or by a given
    :class:`~specdens.EigshResult`.

    Parameters
    ----------
    op
        The operator (already wrapped by :func:`specdens.aslinearoperator`).
    deflate
        Number of eigenpairs to compute with :func:`specdens.eigsh`, or an
        ``EigshResult`` (with eigenvectors) to reuse.
    which
        Which eigenpairs: ``"LA"`` (largest algebraic, the default: a Hessian's outliers),
        ``"LM"`` (largest magnitude, also large negative ones), ``"SA"`` or ``"BE"``.
    seed
        Seed of eigsh's start vector.
    dtype
        Working dtype of the eigenvectors and projections.
    eigsh_options
        More keyword arguments for :func:`specdens.eigsh` (``tol``, ``ncv``, ``maxiter``).
    checkpoint, checkpoint_key
        When given, the eigenpairs are saved to (or resumed from) ``checkpoint + ".eigsh.npz"``.
    """
    if isinstance(deflate, EigshResult):
        if deflate.n != int(op.shape[0]):
            raise ValueError(f"deflate= holds eigenpairs of an operator of size {deflate.n}; "
                             f"this one has n = {op.shape[0]}")
        return Deflation(op, deflate, deflate.which, dtype, eigsh_matvecs=0)
    k = _checks.positive_int(deflate, "deflate")
    n = int(op.shape[0])
    if k >= n:
        raise ValueError(f"deflate={k} must be smaller than the operator size n={n}")
    if not isinstance(which, str) or which not in WHICH:
        raise ValueError(f"deflate_which={which!r}; choose one of {', '.join(WHICH)} "
                         "('LA': largest algebraic, 'LM': largest magnitude)")
    options = dict(eigsh_options or {})
    for bad in ("k", "which", "return_eigenvectors", "dtype"):
        if bad in options:
            raise ValueError(f"eigsh_options may not set {bad!r}; it is fixed by deflation")
    options.setdefault("seed", seed)
    if checkpoint is None:
        eig = eigsh(op, k, which=which, dtype=dtype, **options)
        return Deflation(op, eig, which, dtype, eigsh_matvecs=eig.matvecs)

    path = f"{os.fspath(checkpoint)}.eigsh.npz"
    settings = {"k": k, "which": which, "dtype": dtype,
                "eigsh_options": json.loads(json.dumps(options, default=str))}
    fingerprint = checkpoint_mod.operator_fingerprint(op, checkpoint_key)
    if os.path.exists(path):
        header, arrays = checkpoint_mod.read_npz(path, EIGSH_CHECKPOINT_FORMAT,
                                                 EIGSH_CHECKPOINT_VERSION)
        checkpoint_mod.check_fingerprint(header["fingerprint"], fingerprint, path)
        checkpoint_mod.check_settings(header["settings"], settings, path)
        try:
            eig = _eig_from_arrays(header, arrays, op, dtype)
        except (KeyError, ValueError, TypeError) as exc:
            raise checkpoint_mod.CheckpointError(
                f"{path} is corrupt ({exc}); delete it to start afresh") from None
        return Deflation(op, eig, which, dtype, eigsh_matvecs=eig.matvecs)
    eig = eigsh(op, k, which=which, dtype=dtype, **options)
    header = {"format": EIGSH_CHECKPOINT_FORMAT, "version": EIGSH_CHECKPOINT_VERSION,
              "settings": settings, "fingerprint": fingerprint,
              "result": {"converged": bool(eig.converged), "num_converged": eig.num_converged,
                         "num_restarts": eig.num_restarts, "matvecs": eig.matvecs,
                         "anorm": eig.anorm, "tol": eig.tol, "ncv": eig.ncv,
                         "wall_time": eig.wall_time}}
    checkpoint_mod.atomic_savez(path, header, {
        "eigenvalues": eig.eigenvalues,
        "eigenvectors": _array.to_numpy(eig.eigenvectors, np.dtype(dtype)),
        "residuals": eig.residuals, "residual_estimates": eig.residual_estimates,
    })
    return Deflation(op, eig, which, dtype, eigsh_matvecs=eig.matvecs)


def _eig_from_arrays(header: dict, arrays: dict, op: Any, dtype: str) -> EigshResult:
    r = header["result"]
    xp = op.xp
    vecs = _array.from_numpy(np.array(arrays["eigenvectors"], copy=True), xp, op.device,
                             _array.xp_dtype(xp, dtype))
    return EigshResult(
        eigenvalues=np.asarray(arrays["eigenvalues"], dtype=np.float64),
        eigenvectors=vecs,
        residuals=np.asarray(arrays["residuals"], dtype=np.float64),
        residual_estimates=np.asarray(arrays["residual_estimates"], dtype=np.float64),
        converged=bool(r["converged"]), num_converged=int(r["num_converged"]),
        num_restarts=int(r["num_restarts"]), matvecs=int(r["matvecs"]),
        anorm=float(r["anorm"]), tol=float(r["tol"]), which=header["settings"]["which"],
        ncv=int(r["ncv"]), n=int(op.shape[0]), dtype=dtype, wall_time=float(r["wall_time"]),
    )
