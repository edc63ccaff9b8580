"""Extreme eigenpairs by thick-restart Lanczos, on the operator's own arrays and device.

The algorithm is the thick-restart Lanczos method of Wu & Simon (2000), the symmetric
case of Stewart's Krylov-Schur method, with full reorthogonalisation by classical
Gram-Schmidt twice (CGS2) written as matrix products. Only the small projected matrix
(``ncv x ncv``) is solved on the host, in float64 numpy.

References
----------
K. Wu, H. Simon (2000), Thick-restart Lanczos method for large symmetric eigenvalue
problems, SIAM J. Matrix Anal. Appl. 22(2), 602-616.
G. W. Stewart (2001), A Krylov-Schur algorithm for large eigenproblems, SIAM J. Matrix
Anal. Appl. 23(3), 601-614.
R. B. Lehoucq, D. C. Sorensen, C. Yang (1998), ARPACK Users' Guide, SIAM.
B. N. Parlett (1998), The Symmetric Eigenvalue Problem, SIAM (chapters 4 and 11:
residual bounds for Ritz pairs).
L. Giraud, J. Langou, M. Rozloznik (2005), The loss of orthogonality in the Gram-Schmidt
orthogonalization process (CGS2: "twice is enough").
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _array, _checks
from .lanczos import LanczosWarning, check_scale

WHICH = ("LA", "SA", "LM", "BE")
"""Parts of the spectrum :func:`eigsh` computes."""

DEFAULT_MAXITER = 1000
"""Default number of thick restarts."""


class EigshWarning(UserWarning):
    """:func:`eigsh` stopped before every wanted eigenpair met the tolerance."""


@dataclass(frozen=True, repr=False)
class EigshResult:
    """Extreme eigenpairs of a symmetric operator, as computed by :func:`eigsh`.

    Attributes
    ----------
    eigenvalues : numpy.ndarray, shape (k,), float64
        Ritz values, in ascending algebraic order (as ``scipy.sparse.linalg.eigsh``
        returns them with eigenvectors), whatever ``which`` is.
    eigenvectors : array or None
        Unit Ritz vectors, shape ``(n, k)``, column ``i`` belonging to
        ``eigenvalues[i]``, in the operator's array library, on its device, in the
        working dtype. ``None`` with ``return_eigenvectors=False``.
    residuals : numpy.ndarray, shape (k,), float64
        ``||A x_i - lambda_i x_i||``, computed explicitly at the end with one block
        product. For symmetric ``A`` an exact eigenvalue lies within ``residuals[i]`` of
        ``eigenvalues[i]`` (and within ``residuals[i]**2 / gap``, ``gap`` the distance to
        the rest of the spectrum).
    residual_estimates : numpy.ndarray, shape (k,), float64
        The Lanczos estimates the convergence test used: ``beta_m |s_{m,i}|``, combined
        with the dropped couplings of locked vectors (see Notes of :func:`eigsh`).
    converged : bool
        Whether every wanted pair met ``residual_estimates <= tol * anorm``, the search
        for missed copies (when one ran) left the eigenvalues unchanged, and the explicit
        ``residuals`` are at most ``tol * anorm`` plus the rounding allowance
        ``10 * ncv * eps * anorm``.
    num_converged : int
        How many of the ``k`` pairs met the test.
    num_restarts : int
        Thick restarts done (the Lanczos basis was expanded ``num_restarts + 1`` times).
    matvecs : int
        Products with single vectors, including the ``k`` of the final residual check.
    anorm : float
        Largest ``|theta|`` over all Ritz values seen: a lower bound of ``||A||_2`` and
        the scale of the convergence test.
    tol, which, ncv, dtype, wall_time
        The settings of the run and its duration in seconds.
    """

    eigenvalues: np.ndarray
    eigenvectors: Any
    residuals: np.ndarray
    residual_estimates: np.ndarray
    converged: bool
    num_converged: int
    num_restarts: int
    matvecs: int
    anorm: float
    tol: float
    which: str
    ncv: int
    n: int
    dtype: str
    wall_time: float

    @property
    def k(self) -> int:
        return int(self.eigenvalues.shape[0])

    def __repr__(self) -> str:
        vals = np.array2string(self.eigenvalues, precision=6, threshold=8, edgeitems=3)
        return (
            f"EigshResult(which={self.which!r}, k={self.k}, eigenvalues={vals}, "
            f"max_residual={float(np.max(self.residuals, initial=0.0)):.2e}, "
            f"converged={self.converged} ({self.num_converged}/{self.k}), "
            f"num_restarts={self.num_restarts}, matvecs={self.matvecs}, n={self.n}, "
            f"ncv={self.ncv}, wall_time={self.wall_time:.3g}s)"
        )


def eigsh(
    op: Any,
    k: int = 6,
    *,
    which: str = "LA",
    tol: float | None = None,
    ncv: int | None = None,
    maxiter: int | None = None,
    v0: Any = None,
    seed: int = 0,
    dtype: Any = None,
    return_eigenvectors: bool = True,
) -> EigshResult:
    """``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    A Lanczos basis of ``ncv`` vectors is built with full reorthogonalisation (CGS2 as
    matrix products); the projected ``ncv x ncv`` matrix is diagonalised on the host; the
    wanted Ritz pairs and the ones nearest to them (``k + (ncv - k) // 2`` in all) are
    kept and the basis is expanded again from the Lanczos residual (Wu & Simon, 2000).
    Vectors stay in the operator's array library and on its device; per restart only
    ``ncv``-sized numbers cross between host and device (and a random start vector for
    each search for missed copies, see Notes).

    Parameters
    ----------
    op
        A symmetric operator: anything :func:`specdens.aslinearoperator` accepts.
    k
        Number of eigenpairs, ``1 <= k < n``.
    which
        ``"LA"``: largest algebraic; ``"SA"``: smallest algebraic; ``"LM"``: largest
        magnitude; ``"BE"``: both ends, ``k // 2`` from the low end and the rest from the
        high end (as ARPACK).
    tol
        Relative accuracy. A Ritz pair ``(theta_i, x_i)`` is converged when its Lanczos
        residual estimate satisfies ``beta_m |s_{m,i}| <= tol * anorm``, ``anorm`` the
        largest ``|theta|`` seen (a lower bound of ``||A||_2``). This is a backward error
        test: ``(theta_i, x_i)`` is an exact eigenpair of some ``A + E`` with
        ``||E||_2 <= tol ||A||_2``, so ``theta_i`` is within ``tol * anorm`` of an
        eigenvalue, and within ``(tol * anorm)**2 / gap`` when its eigenvalue is
        ``gap`` away from the others. Unlike ARPACK (``||r|| <= tol |theta_i|``) it does
        not stall on eigenvalues near zero. Default: ``sqrt(eps)``, ``eps`` the machine
        epsilon of the working dtype or of the dtype whose rounding the products carry,
        whichever is larger (1.5e-8 for float64, 3.5e-4 for float32); ``tol=0`` means
        ``eps``. The products carry the operator's dtype, or that of its least precise
        part: a float32 matrix plus a float64 one has dtype float64 but float32 products,
        and the float32 default.
    ncv
        Size of the Lanczos basis, ``k < ncv <= n``; default ``max(2k + 1, 20)`` capped
        at ``n``. Memory: the basis, ``ncv`` vectors of length ``n``, and as much again
        for a moment at each restart.
    maxiter
        Largest number of thick restarts (default 1000); ``0`` runs a single Lanczos
        expansion of ``ncv`` steps.
    v0
        Start vector of shape ``(n,)`` in the operator's array library (default: a
        Gaussian vector drawn from ``seed``).
    seed
        Seed of the numpy generator that draws the start vector and the random vectors
        of the searches for missed copies of repeated eigenvalues (see Notes).
    dtype
        Dtype of the Lanczos vectors and arithmetic: ``"float64"`` (default where the
        operator's library and device hold it; else ``"float32"``, e.g. JAX without
        ``jax_enable_x64``) or ``"float32"``. The operator is applied in its own dtype.
    return_eigenvectors
        With ``False`` the result holds no eigenvectors (the residuals are still
        computed from the Ritz vectors).

    Returns
    -------
    EigshResult
        Eigenvalues in ascending order, eigenvectors, explicit residual norms and
        convergence information.

    Raises
    ------
    ValueError
        For ``k``, ``ncv``, ``which``, ``tol``, ``maxiter`` or ``v0`` out of range.
    FloatingPointError
        When the operator returns NaN or Inf; names the restart and the Lanczos step.

    Warns
    -----
    EigshWarning
        When ``maxiter`` restarts were not enough (or the explicit residuals miss the
        tolerance); the result then has ``converged=False`` and holds the current Ritz
        approximations.
    LanczosWarning
        When the recurrence shows the operator is not symmetric.

    Notes
    -----
    Thick restart keeps ``k + (ncv - k) // 2`` Ritz vectors: the wanted ones and their
    neighbours; it is mathematically equivalent to ARPACK's implicit restart with exact
    shifts (Stewart, 2001). Each step costs one product and a CGS2 against all ``ncv``
    rows of the basis (``4 n ncv`` flops), with the same array shapes at every step so
    that JAX and GPU libraries reuse their compiled kernels.

    Repeated eigenvalues: a Krylov space from one start vector holds one direction of
    each eigenspace, so in exact arithmetic Lanczos sees each distinct eigenvalue once.
    When the space becomes invariant (exactly, or to within ``tol``) or two wanted Ritz
    values agree to within ``tol * anorm``, ``eigsh`` locks the converged wanted vectors
    (drops their coupling to the rest, once it is below ``tol * anorm / (2 sqrt(ncv))``,
    and adds the dropped couplings to the residual estimates of the other pairs) and goes
    on from a random vector orthogonal to them; it stops once such a search ends with
    the wanted values unchanged. This finds every copy when Krylov spaces
    become invariant (few distinct eigenvalues, low rank), and further copies of an
    eigenvalue of which rounding errors revealed two. A repeated eigenvalue of which
    only one copy surfaced, without a breakdown, may still be returned once: as with
    ARPACK, multiplicities may be missed.

    The result agrees with ``scipy.sparse.linalg.eigsh`` (``which`` and the ascending
    order of the eigenvalues are the same; scipy returns another order with
    ``return_eigenvectors=False``) up to the two tolerances. ``"SM"`` is not offered:
    Lanczos converges slowly to interior eigenvalues; use ``"SA"`` on a positive
    semi-definite operator, or shift-and-invert outside specdens.
    """
    t0 = time.perf_counter()
    op, n = _checks.operator_of(op)
    k = _checks.positive_int(k, "k")
    if k >= n:
        raise ValueError(
            f"k={k} must be smaller than the operator size n={n}; for all eigenvalues of a "
            "small operator use numpy.linalg.eigh(op.to_dense())"
        )
    if not isinstance(which, str) or which not in WHICH:
        hint = (" ('SM' is not offered: use 'SA' for a positive semi-definite operator)"
                if which == "SM" else "")
        raise ValueError(f"which={which!r}; choose one of {', '.join(WHICH)}{hint}")
    xp, device = op.xp, op.device
    _array.check_supported_dtype(op.dtype)
    work = _checks.work_dtype(dtype, op)
    wdt = _array.xp_dtype(xp, work)
    # The products carry the rounding of their least precise part (e.g. a float32 term
    # of a float64 sum), not necessarily of op.dtype.
    eps = max(_array.finfo_eps(work), _array.finfo_eps(_checks.product_dtype(op)))
    tol = _resolve_tol(tol, eps)
    m = _resolve_ncv(ncv, k, n)
    maxiter = DEFAULT_MAXITER if maxiter is None else _checks.nonnegative_int(maxiter, "maxiter")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer; got {seed!r}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed))))
    # Locked vectors (see below) may carry a dropped coupling of at most tight * anorm.
    tight = tol / (2.0 * math.sqrt(m))
    # A new Lanczos vector is accepted while beta > breakdown_tol * ||T||. Below that the
    # space is taken as invariant and beta is dropped: an error of at most eps^(2/3) ||A||
    # (and below the tolerance); CGS2 still returns directions orthogonal to ~eps^(1/3)
    # just above it, and to ~eps well above it.
    eps_work = _array.finfo_eps(work)
    breakdown_tol = max(min(eps_work ** (2.0 / 3.0), tight), 100 * eps_work)
    dev = _array.creation_device(op)
    _checks.agree_on_run(op, "eigsh", k=k, which=which, tol=tol, ncv=m, maxiter=maxiter,
                         seed=int(seed), v0=v0 is not None, dtype=work)

    q = _start_vector(op, v0, rng, wdt)
    V = xp.zeros((m, n), dtype=wdt, device=dev)
    consts = (
        xp.zeros((n,), dtype=wdt, device=dev),
        xp.asarray(1.0, dtype=wdt, device=dev),
        xp.zeros((m,), dtype=wdt, device=dev),
        _array.from_numpy(np.arange(m, dtype=np.float64), xp, device, wdt),
    )
    eager = _array.is_host_namespace(xp)

    # Rows of V: L locked vectors, then l - L kept Ritz vectors coupled to row l, then the
    # Lanczos vectors. A locked vector x_i is a Ritz vector whose coupling d_i to the rest
    # was dropped (A x_i = theta_i x_i + d_i u_i for a unit u_i outside the basis); its
    # residual is d_i. To first order (neglecting the residuals of the locked vectors
    # within the locked span), a Ritz vector y of the rest has residual
    # sqrt(est^2 + sum_i d_i^2 (u_i^T y)^2) <= sqrt(est^2 + leak^2), leak = ||d||.
    L = l = 0
    theta_locked = np.zeros(0)
    dropped = np.zeros(0)
    theta_keep = np.zeros(0)
    coupling = np.zeros(0)
    anorm = 0.0
    asym = 0.0
    matvecs = 0
    restarts = 0
    checked = False
    suspect = False  # a breakdown, an invariant subspace or a repeated wanted value seen
    check_values = None  # the wanted values when the last random restart began
    while True:
        V, q_next, a, b, ok, cyc_asym, steps = _expand(
            op, V, q, L, l, m, wdt, consts, anorm, breakdown_tol, eager, checked
        )
        checked = True
        matvecs += steps
        bad = ~(np.isfinite(a) & np.isfinite(b))
        if bad.any():
            step = int(np.argmax(bad))
            raise FloatingPointError(
                f"the operator returned NaN or Inf at restart {restarts}, Lanczos step "
                f"{l + step + 1} of {m}; check the operator (an overflowing loss, a float16 "
                "model, a broken matvec) and run again."
            )
        broke = not bool(ok.all())
        steps_valid = int(np.argmin(ok)) + 1 if broke else len(a)
        p = l + steps_valid
        beta_last = float(b[steps_valid - 1])
        beta_res = 0.0 if broke else beta_last
        T = _projected_matrix(theta_keep, coupling, a[:steps_valid], b[: steps_valid - 1])
        theta_r, S_r = np.linalg.eigh(T)
        # Ritz pairs of the whole basis: the locked ones, then those of T.
        theta = np.concatenate([theta_locked, theta_r])
        S = np.zeros((p, p))
        S[np.arange(L), np.arange(L)] = 1.0
        S[L:, L:] = S_r
        raw = np.concatenate([dropped, np.abs(beta_res * S_r[-1, :])])
        leak = float(np.sqrt(np.sum(dropped**2)))
        estimates = np.concatenate([dropped, np.hypot(raw[L:], leak)])
        anorm = max(anorm, float(np.max(np.abs(theta))))
        asym = max(asym, cyc_asym)

        order = _priority(theta, which)
        wanted = order[:k]
        values = np.sort(theta[wanted]) if p >= k else None
        converged_mask = estimates <= tol * anorm
        nconv = int(np.sum(converged_mask[wanted])) if p >= k else 0
        # Beyond the locked vectors the search is a Lanczos run on the complement of their
        # span: its wanted Ritz pairs, and the next one, must converge too.
        rest = order[order >= L]
        num_rest = int(np.sum(wanted >= L))
        rest_done = L == 0 or bool(np.all(converged_mask[rest[: min(num_rest + 1, k)]]))
        searched = nconv == k and rest_done
        # A Krylov space holds one direction per eigenspace: after an invariant subspace
        # (exact, or to within tol) or a wanted value found twice, further copies may hide
        # in the complement. Then the wanted vectors are locked and the search goes on
        # from a random vector orthogonal to them, until it leaves the wanted values
        # unchanged. If the search ends in an invariant subspace, that subspace holds an
        # eigenvector of each distinct eigenvalue of the complement (with probability 1).
        invariant = broke or beta_res <= tol * anorm
        repeated = values is not None and bool(np.any(np.diff(values) <= tol * anorm))
        suspect = suspect or invariant or repeated
        done = searched and (p == n or not suspect or (
            check_values is not None
            and float(np.max(np.abs(values - check_values))) <= tol * anorm))
        if done or (restarts >= maxiter and p >= k):
            break

        # Thick restart: keep the wanted Ritz vectors and the unlocked ones next to them
        # (locked vectors that are not wanted make room for the search).
        extra = order[k:][order[k:] >= L][: max(min(p, m - 1, k + (m - k) // 2) - k, 0)]
        keep = np.concatenate([order[:k], extra])
        # Vectors are locked after an exact breakdown (all kept ones), or to look for
        # missed copies once the wanted ones have converged to tight * anorm, so that
        # leak <= tol * anorm / 2 and the search can still converge.
        lockable = (np.arange(p) < L) | (raw <= tight * anorm)
        fresh = broke or (searched and bool(np.all(lockable[wanted])))
        if broke:
            dropped_new = np.concatenate([dropped, np.abs(beta_last * S_r[-1, :])])
        else:
            dropped_new = raw
        if fresh:
            keep = keep if broke else keep[lockable[keep]]
            L = len(keep)
            check_values = values
        else:
            keep = np.concatenate([keep[keep < L], keep[keep >= L]])  # locked ones first
            L = int(np.sum(keep < L))
        l = len(keep)
        V = xp.matmul(_padded(S[:, keep].T, m, m, op, wdt), V)  # rows >= l become zero
        theta_locked, theta_keep = theta[keep[:L]], theta[keep[L:]]
        dropped = dropped_new[keep[:L]]
        if fresh:
            q = _random_orthogonal(op, V, rng, wdt)
            coupling = np.zeros(0)
        else:
            q = q_next
            coupling = beta_res * S[p - 1, keep[L:]]
        restarts += 1

    check_scale(np.array([anorm]), np.zeros(1), work, n)  # underflowing norms: refused
    sel = wanted[np.argsort(theta[wanted], kind="stable")]
    values = theta[sel]
    X = xp.matrix_transpose(xp.matmul(_padded(S[:, sel].T, k, m, op, wdt), V))  # (n, k)
    AX = xp.astype(_array.detached(op.matmat(xp.astype(X, op.dtype, copy=False))), wdt,
                   copy=False)
    matvecs += k
    R = AX - X * _array.from_numpy(values[None, :], xp, device, wdt)
    residuals = _array.to_numpy(xp.sqrt(xp.sum(R * R, axis=0)))
    if not np.all(np.isfinite(residuals)):
        raise FloatingPointError(
            "the operator returned NaN or Inf in the final residual check "
            f"(restart {restarts}); check the operator and run again."
        )

    if asym > math.sqrt(eps) * max(anorm, np.finfo(float).tiny):
        warnings.warn(
            f"the Lanczos recurrence reveals an operator that is not symmetric (relative "
            f"coupling to older Lanczos vectors {asym / anorm:.2e}, expected ~{eps:.1e}); "
            "eigsh assumes a symmetric operator, so the results are not meaningful. "
            "Symmetrise it, e.g. (A + A.T) * 0.5.",
            LanczosWarning,
            stacklevel=2,
        )
    # The explicit residuals must meet the test too (up to the rounding errors of the
    # Lanczos relation): estimates of pairs next to locked vectors are first-order bounds.
    allowance = tol * anorm + 10 * m * eps * anorm
    explicit_ok = bool(np.all(residuals <= allowance))
    converged = done and explicit_ok
    if not converged:
        if nconv < k:
            why = f"only {nconv} of {k} eigenpairs (which={which!r}) converged to tol={tol:.2e}"
        elif not done:
            why = ("the search for further copies of repeated eigenvalues (beyond the "
                   f"locked eigenvectors) has not converged to tol={tol:.2e}")
        else:
            why = (f"the explicit residuals (largest {float(np.max(residuals)):.2e}) exceed "
                   f"tol * anorm = {tol * anorm:.2e}")
        warnings.warn(
            f"eigsh: {why} after {restarts} restarts and {matvecs} matvecs; increase "
            "maxiter or ncv, or loosen tol. The result holds the current Ritz "
            "approximations; see its residuals.",
            EigshWarning,
            stacklevel=2,
        )
    est_sel = estimates[sel]
    return EigshResult(
        eigenvalues=np.asarray(values, dtype=np.float64),
        eigenvectors=X if return_eigenvectors else None,
        residuals=np.asarray(residuals, dtype=np.float64),
        residual_estimates=np.asarray(est_sel, dtype=np.float64),
        converged=converged,
        num_converged=nconv if explicit_ok else int(np.sum(residuals <= allowance)),
        num_restarts=restarts,
        matvecs=matvecs,
        anorm=anorm,
        tol=tol,
        which=which,
        ncv=m,
        n=n,
        dtype=work,
        wall_time=time.perf_counter() - t0,
    )


def _expand(op, V, q, L, l, m, wdt, consts, anorm, breakdown_tol, eager, checked):
    """Lanczos steps ``l .. m-1`` from the unit vector ``q`` (row ``l`` of the basis).

    Rows ``0 .. l-1`` of ``V`` hold kept Ritz vectors (the first ``L`` locked), ``q`` is
    orthogonal to them and rows ``l .. m-1`` are zero, so that every product has the same
    shape whatever the step (one compiled kernel per shape for JAX and GPU libraries).
    Returns the basis, the next unit Lanczos vector, and on the host the diagonal, the
    residual norms, the acceptance flag of each step, the largest coupling to older
    vectors (the symmetry check) and the number of products. Values stay on the device
    during the expansion: a breakdown zeroes the following vectors and is found on the
    host afterwards (numpy arrays are read every step, to stop at once).
    """
    xp = op.xp
    n = V.shape[1]
    zero, one, zeros_m, index = consts
    alphas, betas, oks, asyms = [], [], [], []
    beta_prev = None
    anorm_dev = xp.asarray(anorm, dtype=wdt, device=_array.creation_device(op))
    steps = 0
    for j in range(l, m):
        V = _array.set_rows(V, (j, slice(None)), q)
        Aq = _array.detached(op.matmat(xp.reshape(xp.astype(q, op.dtype, copy=False), (n, 1))))
        steps += 1
        if not checked:
            _checks.check_product(op, Aq, 1)
            checked = True
        w = xp.astype(Aq[:, 0], wdt, copy=False)
        # CGS2 against all rows (the rows after j are zero).
        h = xp.matmul(V, w)
        alpha = xp.sum(q * w)
        w = w - xp.matmul(h, V)
        if j > l and j >= L + 2:
            # For symmetric A, q_i^T A q_j vanishes for L <= i < j - 1 (rows l.. are
            # Lanczos vectors, kept rows L..l-1 couple only to row l; the locked rows < L
            # may keep a dropped coupling up to the tolerance and are not checked).
            older = (index >= L) & (index < j - 1)
            asyms.append(xp.max(xp.where(older, xp.abs(h), zeros_m)))
        h2 = xp.matmul(V, w)
        alpha = alpha + xp.sum(q * w)
        w = w - xp.matmul(h2, V)
        beta = xp.sqrt(xp.sum(w * w))
        bound = xp.abs(alpha) + beta + (beta_prev if beta_prev is not None else 0.0)
        anorm_dev = xp.maximum(anorm_dev, bound)
        ok = beta > breakdown_tol * anorm_dev
        safe = xp.where(ok, beta, one)
        q = xp.where(ok, w / safe, zero)
        beta_prev = beta
        alphas.append(alpha)
        betas.append(beta)
        oks.append(ok)
        if eager and (not bool(ok) or not bool(xp.isfinite(alpha) & xp.isfinite(beta))):
            break
    a = _array.to_numpy(xp.stack(alphas))
    b = _array.to_numpy(xp.stack(betas))
    ok_h = _array.to_numpy(xp.stack(oks), bool)
    cyc_asym = float(np.max(_array.to_numpy(xp.stack(asyms)))) if asyms else 0.0
    return V, q, a, b, ok_h, cyc_asym, steps


def _projected_matrix(theta: np.ndarray, coupling: np.ndarray, alpha: np.ndarray,
                      beta: np.ndarray) -> np.ndarray:
    """The arrowhead-plus-tridiagonal matrix ``V^T A V`` of thick-restart Lanczos."""
    l, s = len(theta), len(alpha)
    T = np.zeros((l + s, l + s))
    T[np.arange(l), np.arange(l)] = theta
    T[l, :l] = coupling
    T[:l, l] = coupling
    idx = np.arange(l, l + s)
    T[idx, idx] = alpha
    T[idx[:-1], idx[1:]] = beta
    T[idx[1:], idx[:-1]] = beta
    return T


def _priority(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of the Ritz values ``theta``, most wanted first."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")
    # "BE": alternately from the high and the low end, the high end first.
    asc = np.argsort(theta, kind="stable")
    order, lo, hi = [], 0, len(theta) - 1
    while lo <= hi:
        order.append(asc[hi])
        hi -= 1
        if lo <= hi:
            order.append(asc[lo])
            lo += 1
    return np.asarray(order, dtype=np.intp)


def _start_vector(op: Any, v0: Any, rng: np.random.Generator, wdt: Any) -> Any:
    xp, n = op.xp, int(op.shape[0])
    if v0 is None:
        v = _array.from_numpy(rng.standard_normal(n), xp, op.device, wdt)
    else:
        lib = _array.library_name(v0)
        if lib != op.array_library:
            raise TypeError(f"v0 is a {lib} array but the operator works on "
                            f"{op.array_library} arrays")
        if tuple(v0.shape) != (n,):
            raise ValueError(f"v0 must have shape ({n},); got {tuple(v0.shape)}")
        if str(_array.device_of(v0)) != str(op.device):
            raise ValueError(f"v0 is on device {_array.device_of(v0)}; the operator's vectors "
                             f"live on {op.device}")
        v = xp.astype(v0, wdt)
    nrm = float(_array.to_numpy(xp.sqrt(xp.sum(v * v))))
    if not math.isfinite(nrm) or nrm == 0.0:
        raise ValueError(f"v0 must be finite and non-zero (its norm is {nrm})")
    return v / nrm


def _padded(Y: np.ndarray, rows: int, cols: int, op: Any, wdt: Any) -> Any:
    """``Y`` zero-padded to ``(rows, cols)``, on the operator's device."""
    out = np.zeros((rows, cols))
    out[: Y.shape[0], : Y.shape[1]] = Y
    return _array.from_numpy(out, op.xp, op.device, wdt)


def _random_orthogonal(op: Any, B: Any, rng: np.random.Generator, wdt: Any) -> Any:
    """A unit random vector orthogonal to the rows of ``B`` (orthonormal or zero), by CGS2."""
    xp, n = op.xp, int(op.shape[0])
    for _ in range(10):
        w = _array.from_numpy(rng.standard_normal(n), xp, op.device, wdt)
        for _sweep in range(2):
            w = w - xp.matmul(xp.matmul(B, w), B)
        nrm = float(_array.to_numpy(xp.sqrt(xp.sum(w * w))))
        if nrm > 1e-3:  # a Gaussian vector of norm ~sqrt(n) keeps ~sqrt(n - l) of it
            return w / nrm
    raise RuntimeError("could not draw a vector orthogonal to the kept Ritz vectors")


def _resolve_tol(tol: Any, eps: float) -> float:
    if tol is None:
        return math.sqrt(eps)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol must be a real number; got {tol!r}")
    tol = float(tol)
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be finite and >= 0; got {tol}")
    return eps if tol == 0 else tol


def _resolve_ncv(ncv: Any, k: int, n: int) -> int:
    if ncv is None:
        return min(max(2 * k + 1, 20), n)
    ncv = _checks.positive_int(ncv, "ncv")
    if not k < ncv <= n:
        raise ValueError(f"ncv={ncv} must satisfy k < ncv <= n (k={k}, n={n})")
    return ncv
