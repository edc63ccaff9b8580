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
from . import _buffers
from .lanczos import LanczosWarning, ScaleError, _normalised_rows, _reads_are_free, check_scale

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
        for missed eigenvalues (from a random vector orthogonal to the converged pairs,
        see Notes of :func:`eigsh`) converged and left the eigenvalues unchanged, and the
        explicit ``residuals`` are at most ``tol * anorm`` plus the rounding allowance
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
    Once they have converged, a search from a random vector orthogonal to them looks
    for wanted eigenvalues the basis missed (see Notes). Vectors stay in the operator's
    array library and on its device; per restart only ``ncv``-sized numbers cross
    between host and device (and a random start vector for each search).

    Two differences from ``scipy.sparse.linalg.eigsh`` are deliberate: the default
    ``which`` is ``"LA"`` (the largest algebraic eigenvalues, the top of a Hessian's
    spectrum), not scipy's ``"LM"``, and the result is an :class:`EigshResult`, not a
    tuple ``(w, v)``: write ``r = eigsh(A, k)`` and use ``r.eigenvalues`` and
    ``r.eigenvectors``.

    Parameters
    ----------
    op
        A symmetric operator: anything :func:`specdens.aslinearoperator` accepts.
    k
        Number of eigenpairs, ``1 <= k < n``.
    which
        ``"LA"`` (default): largest algebraic; ``"SA"``: smallest algebraic; ``"LM"``:
        largest magnitude (scipy's default); ``"BE"``: both ends, ``k // 2`` from the low
        end and the rest from the high end (as ARPACK).
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
        at ``n``. A value below ``k + 3`` is raised to ``min(k + 3, n)`` (the result's
        ``ncv`` says which): the search for missed eigenvalues needs, beyond the ``k``
        locked vectors, a kept Ritz vector and two Lanczos steps, and cannot converge
        with fewer. Memory: the basis, ``ncv`` vectors of length ``n``, and as much again
        for a moment at each restart.
    maxiter
        Largest number of thick restarts (default 1000); ``0`` runs a single Lanczos
        expansion of ``ncv`` steps (with no search for missed eigenvalues, so that the
        result is reported converged only when ``ncv = n``).
    v0
        Start vector of shape ``(n,)`` in the operator's array library (default: a
        Gaussian vector drawn from ``seed``): any finite non-zero vector, of any scale.
    seed
        Seed of the numpy generator that draws the start vector and the random vectors
        of the searches for missed eigenvalues (see Notes).
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
        convergence information (not scipy's tuple ``(w, v)``).

    Raises
    ------
    ValueError
        For ``k``, ``ncv``, ``which``, ``tol``, ``maxiter`` or ``v0`` out of range, or an
        operator that writes into the vectors it is given (caught at the first product
        where reading them back is free: numpy, and PyTorch on the CPU).
    ScaleError
        (``specdens.algorithms.lanczos.ScaleError``, a ``ValueError``) When the operator
        is too small in magnitude for the working dtype: ``||A||`` below about
        ``sqrt(tiny / eps) sqrt(n)`` (``1e-146 sqrt(n)`` in float64, ``3e-16 sqrt(n)``
        in float32), as for :func:`specdens.lanczos` and :func:`specdens.slq`; multiply
        the operator by a power of ten and divide the eigenvalues back. Large operators
        need nothing (norms are computed with scaling): only one whose finite products
        give coefficients beyond the working dtype's range (``~1e38`` in float32) is
        refused, the same way.
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

    Missed eigenvalues: a Krylov space from one start vector holds one direction of each
    eigenspace, so in exact arithmetic Lanczos sees each distinct eigenvalue once; and
    an eigenvector the start vector barely touched (in a cluster of eigenvalues closer
    than the others) may surface only after the wanted Ritz values have converged, so
    that converged values can still miss a wanted eigenvalue. Therefore, once the wanted
    pairs have converged, ``eigsh`` locks them (drops their coupling to the rest, once
    it is below ``tol * anorm / (2 sqrt(ncv))``, and adds the dropped couplings to the
    residual estimates of the other pairs) and goes on from a random vector orthogonal
    to them, until the extreme Ritz pair of that complement has converged too (both
    extreme pairs, the lowest and the highest, for ``"BE"``); a value it finds beyond
    the wanted ones joins them and the search runs again, and the run stops once a
    search leaves the wanted values unchanged (only a basis that spans the whole space,
    ``ncv = n``, skips it). This finds every copy of a repeated eigenvalue and every
    eigenvalue of a cluster that the wanted set needs, with probability 1 over the
    random vectors, as long as the search's own extreme Ritz value converges to the
    complement's extreme eigenvalue; it is not a proof (a search can itself converge
    before a barely-touched eigenvector surfaces, however unlikely for a random start).
    It costs about as many products as converging the eigenvalue next to the wanted
    ones: typically 1.5 to 2.5 times those of the wanted pairs alone.

    Comparison with ``scipy.sparse.linalg.eigsh``: ``which`` means the same and the
    eigenvalues come in the same ascending order (scipy returns another order with
    ``return_eigenvectors=False``), but the defaults differ (``"LA"`` here, ``"LM"``
    there) and so do the tolerances: ARPACK's test ``||r_i|| <= tol |theta_i|`` is
    relative to each eigenvalue, much stricter here than ``tol * anorm`` for
    eigenvalues near zero, so the two may differ by up to ``tol * anorm`` on such
    eigenvalues. Neither method is certain to find every wanted eigenvalue (ARPACK
    returns each distinct eigenvalue of a repeated one once unless a restart reveals a
    copy); on cases where one misses a copy or a clustered eigenvalue the other may
    not, so agreement is not a guarantee either way. ``"SM"`` is not offered: Lanczos
    converges slowly to interior eigenvalues; use ``"SA"`` on a positive semi-definite
    operator, or shift-and-invert outside specdens.
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
    bounds = _scale_bounds(work, n)
    _checks.agree_on_run(op, "eigsh", k=k, which=which, tol=tol, ncv=m, maxiter=maxiter,
                         seed=int(seed), v0=v0 is not None, dtype=work)

    q = _start_vector(op, v0, rng, wdt, bounds)
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
    check_values = None  # the wanted values when the last random restart began
    while True:
        V, q_next, a, b, ok, cyc_asym, steps, out_max = _expand(
            op, V, q, L, l, m, wdt, consts, anorm, breakdown_tol, eager, checked, bounds
        )
        checked = True
        matvecs += steps
        bad = ~(np.isfinite(a) & np.isfinite(b))
        if bad.any():
            _raise_nonfinite(out_max, int(np.argmax(bad)), restarts, l, m, work)
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
        leak = math.hypot(*dropped.tolist())  # (no overflowing squares at any scale)
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
        if which == "BE" and L > 0 and len(rest):
            # Both ends are wanted: a missed eigenvalue may lie beyond either end, so the
            # complement's extreme Ritz pairs at both ends must converge (the priority
            # order alternates and its next pair is at one end only).
            rest_done = rest_done and bool(converged_mask[rest[np.argmin(theta[rest])]]
                                           and converged_mask[rest[np.argmax(theta[rest])]])
        searched = nconv == k and rest_done
        # A Krylov space holds one direction per eigenspace, and only small components of
        # eigenvectors the start vector barely touched: converged Ritz values may miss a
        # copy of a repeated eigenvalue, or a distinct eigenvalue in a tight cluster. So
        # once the wanted pairs have converged they are locked, and the search goes on
        # from a random vector orthogonal to them until the complement's own extreme Ritz
        # pair has converged too and the wanted values are unchanged (a value it finds
        # beyond them joins them, and the search runs again). If the search ends in an
        # invariant subspace, that subspace holds an eigenvector of each distinct
        # eigenvalue of the complement (with probability 1). Only a basis that spans the
        # whole space (p == n) needs no search.
        done = searched and (p == n or (
            check_values is not None
            and float(np.max(np.abs(values - check_values))) <= tol * anorm))
        if done or (restarts >= maxiter and p >= k):
            break

        # Vectors are locked after an exact breakdown (all kept ones), or to look for
        # missed eigenvalues once the wanted ones have converged to tight * anorm, so that
        # leak <= tol * anorm / 2 and the search can still converge.
        lockable = (np.arange(p) < L) | (raw <= tight * anorm)
        # A search whose wanted values have changed (a value it found joined them) is
        # over as soon as they have converged: the next search, from the new wanted set,
        # decides. Waiting for the complement's next pair instead could stall: the locked
        # vectors no longer wanted are held, and may leave it no room.
        changed = (check_values is not None and p >= k
                   and float(np.max(np.abs(values - check_values))) > tol * anorm)
        fresh = broke or ((searched or (nconv == k and changed))
                          and bool(np.all(lockable[wanted])))
        if fresh and not broke:
            # A random restart keeps the wanted vectors only, locked: their unconverged
            # neighbours would need their couplings, and converged ones would only hide
            # part of the complement the search is to explore.
            keep = order[:k]
        else:
            # Thick restart: the wanted Ritz vectors and the unlocked ones next to them.
            budget = min(p, m - 1, k + (m - k) // 2)
            held = order[:0]
            if not fresh:
                # Locked vectors that are no longer wanted stay locked (those with the
                # largest dropped couplings, as room allows) until the next random
                # restart: the unlocked Ritz vectors were computed with them in the
                # basis, and without them the projected matrix would miss their
                # couplings to them (up to the dropped coupling, tight * anorm). Those
                # locked at an invariant subspace (coupling below the breakdown
                # threshold) make room for the search.
                held = order[k:][order[k:] < L]
                held = held[raw[held] > breakdown_tol * anorm]
                held = held[np.argsort(-raw[held], kind="stable")][: max(budget - k, 0)]
            extra = order[k:][order[k:] >= L][: max(budget - k - len(held), 0)]
            keep = np.concatenate([order[:k], held, extra])
        if broke:
            dropped_new = np.concatenate([dropped, np.abs(beta_last * S_r[-1, :])])
        else:
            dropped_new = raw
        if fresh:
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
            q = _random_orthogonal(op, V, rng, wdt, bounds)
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
    residuals = _array.to_numpy(_norm(xp, R, bounds, axis=0))
    if not np.all(np.isfinite(residuals)):
        if bool(_array.to_numpy(xp.all(xp.isfinite(AX)), bool)):
            raise ScaleError(
                f"the operator's scale (anorm = {anorm:.1e}) is too large for {work} "
                "arithmetic: the residuals of the Ritz pairs overflow. Divide the operator "
                "by a power of ten and multiply the eigenvalues back"
                + (", or use dtype='float64'" if work != "float64" else ""))
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
            why = ("the search for missed eigenvalues (from a random vector orthogonal to "
                   f"the converged eigenvectors) has not converged to tol={tol:.2e}")
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


def _expand(op, V, q, L, l, m, wdt, consts, anorm, breakdown_tol, eager, checked, bounds):
    """Lanczos steps ``l .. m-1`` from the unit vector ``q`` (row ``l`` of the basis).

    Rows ``0 .. l-1`` of ``V`` hold kept Ritz vectors (the first ``L`` locked), ``q`` is
    orthogonal to them and rows ``l .. m-1`` are zero, so that every product has the same
    shape whatever the step (one compiled kernel per shape for JAX and GPU libraries).
    Returns the basis, the next unit Lanczos vector, and on the host the diagonal, the
    residual norms, the acceptance flag of each step, the largest coupling to older
    vectors (the symmetry check), the number of products and ``max |A q|`` of each step
    (NaN or Inf where the operator's output was). Values stay on the device during the
    expansion: a breakdown zeroes the following vectors and is found on the host
    afterwards (numpy arrays are read every step, to stop at once).

    A product whose largest entry is outside ``bounds`` (see :func:`_scale_bounds`) is
    divided by it before the Gram-Schmidt sweeps, and ``alpha`` and ``beta`` multiplied
    back, so that no square overflows or underflows at any scale of the operator;
    products inside them are not touched (the arithmetic is then exactly that of an
    unscaled recurrence).
    """
    xp = op.xp
    n = V.shape[1]
    zero, one, zeros_m, index = consts
    alphas, betas, oks, asyms, out_max = [], [], [], [], []
    beta_prev = None
    anorm_dev = xp.asarray(anorm, dtype=wdt, device=_array.creation_device(op))
    # A product wider than the arithmetic (a float64 operator, float32 vectors) is scaled
    # before the conversion, which could overflow.
    narrowing = _array.finfo_eps(op.dtype) < _array.finfo_eps(wdt)
    steps = 0
    for j in range(l, m):
        V = _array.set_rows(V, (j, slice(None)), q)
        q_op = xp.reshape(xp.astype(q, op.dtype, copy=False), (n, 1))
        before = None
        if not checked:
            # (the engine's own check: an operator that writes into its input is caught
            # at the first product where reading the values back is free)
            bufs = _buffers.StepBuffers(xp, 1, n, wdt, wdt, op.dtype,
                                        _array.creation_device(op), prev_owned=False,
                                        host=_reads_are_free(op))
            before = bufs.snapshot(q_op)
        Aq = _array.detached(op.matmat(q_op))
        steps += 1
        if not checked:
            if before is not None:
                bufs.check_unchanged(q_op, before)
            _checks.check_product(op, Aq, 1)
            checked = True
        if narrowing:
            s = xp.max(xp.abs(Aq[:, 0]))
            scale = _scale(xp, s, bounds, xp.ones_like(s))
            w = xp.astype(Aq[:, 0] / scale, wdt)
            scale = xp.astype(scale, wdt)
        else:
            w = xp.astype(Aq[:, 0], wdt, copy=False)
            s = xp.max(xp.abs(w))
            scale = _scale(xp, s, bounds, one)
            if not eager or bool(scale != one):
                w = w / scale
        out_max.append(s)
        # CGS2 against all rows (the rows after j are zero); h, alpha and w in units of
        # scale.
        h = xp.matmul(V, w)
        alpha = xp.sum(q * w)
        w = w - xp.matmul(h, V)
        if j > l and j >= L + 2:
            # For symmetric A, q_i^T A q_j vanishes for L <= i < j - 1 (rows l.. are
            # Lanczos vectors, kept rows L..l-1 couple only to row l; the locked rows < L
            # may keep a dropped coupling up to the tolerance and are not checked).
            older = (index >= L) & (index < j - 1)
            asyms.append(scale * xp.max(xp.where(older, xp.abs(h), zeros_m)))
        h2 = xp.matmul(V, w)
        alpha = (alpha + xp.sum(q * w)) * scale
        w = w - xp.matmul(h2, V)
        nrm = xp.sqrt(xp.sum(w * w))
        beta = nrm * scale
        bound = xp.abs(alpha) + beta + (beta_prev if beta_prev is not None else 0.0)
        anorm_dev = xp.maximum(anorm_dev, bound)
        ok = beta > breakdown_tol * anorm_dev
        safe = xp.where(ok, nrm, one)
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
    return V, q, a, b, ok_h, cyc_asym, steps, _array.to_numpy(xp.stack(out_max))


def _scale_bounds(work: str, n: int) -> tuple[float, float]:
    """``(lo, hi)``: vectors of length ``n`` whose largest entry is in ``[lo, hi]`` have
    their norms computed as ``sqrt(sum(x * x))`` directly; others are divided by their
    largest entry first.

    ``hi = sqrt(max / n) / 2``: the squares of a vector of norm up to ``sqrt(n) hi`` (as
    the Gram-Schmidt sweeps may leave it) sum to less than the largest float.
    ``lo = sqrt(n tiny / eps) / (100 eps)``: squares below ``tiny`` (subnormal or
    flushed to zero) change a sum of squares by at most ``n tiny``, which is at most
    ``eps beta^2`` for every ``beta >= sqrt(n tiny / eps)``; the recurrence accepts only
    ``beta >= 100 eps ||T|| >= 100 eps max|A q|``, so products whose largest entry is at
    least ``lo`` need no scaling. Unscaled at ``n = 1e6``: ``4.5e-130`` to ``6.7e150`` in
    float64, ``2.6e-8`` to ``9.2e15`` in float32.
    """
    fi = np.finfo(work)
    eps, root_n = float(fi.eps), math.sqrt(n)
    return (math.sqrt(float(fi.tiny) / eps) * root_n / (100.0 * eps),
            math.sqrt(float(fi.max)) / root_n / 2.0)


def _scale(xp: Any, s: Any, bounds: tuple[float, float], one: Any) -> Any:
    """``s`` (a vector's largest absolute entry, a device scalar or a row of them) where
    it is outside ``bounds`` and not 0, else 1. NaN gives 1 and Inf gives Inf, so that a
    non-finite vector stays non-finite."""
    lo, hi = bounds
    return xp.where((s > hi) | ((s < lo) & (s > 0)), s, one)


def _norm(xp: Any, x: Any, bounds: tuple[float, float], axis: int | None = None) -> Any:
    """The 2-norm of ``x`` (of its columns with ``axis=0``) on its device, with no square
    overflowing or underflowing at any scale (see :func:`_scale_bounds`)."""
    s = xp.max(xp.abs(x), axis=axis)
    scale = _scale(xp, s, bounds, xp.ones_like(s))
    y = x / (scale if axis is None else xp.reshape(scale, (1, -1)))
    return xp.sqrt(xp.sum(y * y, axis=axis)) * scale


def _raise_nonfinite(out_max: np.ndarray, step: int, restarts: int, l: int, m: int,
                     work: str) -> None:
    """Raise for the first non-finite ``alpha`` or ``beta`` (at expansion step ``step``):
    a ``FloatingPointError`` naming the operator when its output was non-finite, else a
    :class:`ScaleError` (finite products whose coefficients overflow the arithmetic)."""
    bad_out = ~np.isfinite(out_max[: step + 1])
    if bad_out.any():
        step = int(np.argmax(bad_out))
        raise FloatingPointError(
            f"the operator returned NaN or Inf at restart {restarts}, Lanczos step "
            f"{l + step + 1} of {m}; check the operator (an overflowing loss, a float16 "
            "model, a broken matvec) and run again."
        )
    # (as the Lanczos engine does: valid input that this dtype cannot resolve)
    raise ScaleError(
        f"the operator's scale is too large for {work} arithmetic: the Lanczos "
        f"coefficients overflow at restart {restarts}, Lanczos step {l + step + 1} of {m} "
        f"(the operator's output is finite, largest entry "
        f"{float(np.max(out_max[: step + 1])):.1e}). Divide the operator by a power of ten "
        "and multiply the eigenvalues back"
        + (", or use dtype='float64'" if work != "float64" else "")
    )


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


def _start_vector(op: Any, v0: Any, rng: np.random.Generator, wdt: Any,
                  bounds: tuple[float, float]) -> Any:
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
        v = v0
        if _array.dtype_name(v.dtype) not in _array.SUPPORTED_DTYPES:
            v = xp.astype(v, wdt)  # (integers, booleans)
        big = float(_array.to_numpy(xp.max(xp.abs(v))))
        if not math.isfinite(big) or big == 0.0:
            raise ValueError(f"v0 must be finite and non-zero (its largest entry is {big})")
        # (normalised as lanczos normalises explicit probes: divided by its largest entry
        # before its norm is taken, so any finite non-zero v0 is accepted)
        return _normalised_rows(xp.reshape(v, (1, n)), xp, _array.dtype_name(wdt))[0]
    nrm = float(_array.to_numpy(_norm(xp, v, bounds)))
    return v / nrm


def _padded(Y: np.ndarray, rows: int, cols: int, op: Any, wdt: Any) -> Any:
    """``Y`` zero-padded to ``(rows, cols)``, on the operator's device."""
    out = np.zeros((rows, cols))
    out[: Y.shape[0], : Y.shape[1]] = Y
    return _array.from_numpy(out, op.xp, op.device, wdt)


def _random_orthogonal(op: Any, B: Any, rng: np.random.Generator, wdt: Any,
                       bounds: tuple[float, float]) -> Any:
    """A unit random vector orthogonal to the rows of ``B`` (orthonormal or zero), by CGS2."""
    xp, n = op.xp, int(op.shape[0])
    for _ in range(10):
        w = _array.from_numpy(rng.standard_normal(n), xp, op.device, wdt)
        for _sweep in range(2):
            w = w - xp.matmul(xp.matmul(B, w), B)
        nrm = float(_array.to_numpy(_norm(xp, w, bounds)))
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
    # The search for missed eigenvalues needs, beyond the k locked vectors, a kept Ritz
    # vector of the complement and two Lanczos steps: with fewer it cannot converge.
    return max(ncv, min(k + 3, n))
