"""The Lanczos engine: many probes in lock-step, on the operator's own arrays and device.

References
----------
C. Lanczos (1950), An iteration method for the solution of the eigenvalue problem of
linear differential and integral operators. L. Giraud, J. Langou, M. Rozloznik (2005),
The loss of orthogonality in the Gram-Schmidt orthogonalization process (CGS2).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _array, _checks, _memory
from .._progress import ProgressCallback, make_progress
from .probes import PROBE_KINDS, draw_probe, probe_block

REORTH_MODES = ("full", "local", "none", "auto")


class LanczosWarning(UserWarning):
    """The recurrence saw something suspicious (e.g. an operator that is not symmetric)."""


@dataclass(frozen=True, repr=False)
class LanczosResult:
    """Tridiagonal matrices of a Lanczos run, one per probe.

    Attributes
    ----------
    alpha, beta : numpy.ndarray, shape (num_probes, num_steps), float64
        Diagonal and residual norms: probe ``i``'s tridiagonal has diagonal
        ``alpha[i, :L]`` and off-diagonal ``beta[i, :L-1]`` with ``L = lengths[i]``;
        ``beta[i, L-1]`` is the norm of the final residual. Entries past ``L`` are 0.
    lengths : numpy.ndarray of int
        Steps each probe reached (smaller than ``num_steps`` after a breakdown).
    breakdown : numpy.ndarray of bool
        Whether the probe's Krylov space became invariant (``beta ~ 0``).
    reorth : str
        The reorthogonalisation that ran (``"auto"`` resolved to what it picked).
    basis : array or None
        With ``return_basis=True``: the Lanczos vectors, shape ``(num_probes, num_steps, n)``
        in the operator's array library, on its device.
    last_vector : array or None
        With ``return_basis=True``: ``q_{m+1}``, shape ``(num_probes, n)``, so that
        ``A Q^T = Q^T T + beta_m q_{m+1} e_m^T``.
    probe_scales : numpy.ndarray
        Hutchinson scale of each probe (``||v||^2 / n``; 1 except for Gaussian probes).
    asymmetry : float
        Largest relative coupling to older Lanczos vectors seen by reorthogonalisation,
        ~ machine epsilon for symmetric operators (NaN without reorthogonalisation).
    """

    alpha: np.ndarray
    beta: np.ndarray
    lengths: np.ndarray
    breakdown: np.ndarray
    n: int
    num_steps: int
    reorth: str
    window: int | None
    seed: int | None
    probe_kind: str
    probe_indices: np.ndarray
    probe_scales: np.ndarray
    dtype: str
    basis_dtype: str
    matvecs: int
    wall_time: float
    asymmetry: float
    basis: Any = None
    last_vector: Any = None

    @property
    def num_probes(self) -> int:
        return int(self.alpha.shape[0])

    def tridiagonal(self, i: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Diagonal and off-diagonal of probe ``i``'s tridiagonal matrix."""
        L = int(self.lengths[i])
        return self.alpha[i, :L].copy(), self.beta[i, : max(L - 1, 0)].copy()

    def tridiagonal_matrix(self, i: int = 0) -> np.ndarray:
        """Probe ``i``'s tridiagonal matrix as a dense float64 array."""
        d, e = self.tridiagonal(i)
        return np.diag(d) + np.diag(e, 1) + np.diag(e, -1)

    def __repr__(self) -> str:
        return (
            f"LanczosResult(n={self.n}, num_probes={self.num_probes}, num_steps={self.num_steps}, "
            f"reorth={self.reorth!r}, lengths={_short(self.lengths)}, "
            f"breakdowns={int(self.breakdown.sum())}, matvecs={self.matvecs}, "
            f"wall_time={self.wall_time:.3g}s)"
        )


def _short(a: np.ndarray) -> str:
    a = np.asarray(a)
    if a.size <= 6:
        return str(a.tolist())
    return f"[{a.min()}..{a.max()}]"


def lanczos(
    op: Any,
    num_steps: int,
    *,
    num_probes: int = 1,
    probes: Any = None,
    seed: int = 0,
    reorth: str = "full",
    window: int = 20,
    dtype: Any = None,
    basis_dtype: Any = None,
    block_size: int | None = None,
    max_basis_bytes: int | None = None,
    return_basis: bool = False,
    check_every: int | None = None,
    check_symmetry: bool = False,
    breakdown_tol: float | None = None,
    progress: bool | ProgressCallback = False,
) -> LanczosResult:
    """Run the Lanczos recurrence from ``num_probes`` probes in lock-step.

    All probes of a block advance together: one ``matmat`` per step when the operator
    has it. Vectors stay in the operator's array library and on its device; alpha and
    beta stay there too and reach the host at the end (numpy operators, which need no
    synchronisation, are checked every step).

    Parameters
    ----------
    op
        A symmetric operator: anything :func:`specdens.aslinearoperator` accepts.
    num_steps
        Lanczos steps per probe (capped at ``n``: the Krylov space cannot be larger).
    num_probes
        Number of random probes.
    probes
        ``"rademacher"`` (default), ``"gaussian"`` or ``"sphere"``, or explicit start
        vectors: an array of shape ``(n,)`` or ``(n, k)`` in the operator's library.
    seed
        Probe ``i`` depends on ``(seed, i)`` only (counter-based seeding).
    reorth
        ``"full"``: classical Gram-Schmidt twice (CGS2) against all previous vectors,
        kept in a preallocated basis; ``"local"``: against the last ``window`` vectors;
        ``"none"``: three-term recurrence only, O(n) memory per probe; ``"auto"``: full
        when its basis fits in ``max_basis_bytes``, else (unless ``basis_dtype`` was given)
        full with a float32 basis, else local with the largest window that fits, else
        none. The result's ``reorth``, ``window`` and ``basis_dtype`` say what ran.
    window
        Window length for ``reorth="local"``.
    dtype, basis_dtype
        Dtype of the Lanczos arithmetic (default float64, or float32 where the array
        library has no float64: JAX without ``jax_enable_x64``, MPS) and of the stored basis
        (default: ``dtype``); ``"float32"`` or ``"float64"``. The tridiagonal
        coefficients are always returned in float64.
    block_size
        Probes per block (default: all). Probe ``i`` is the same vector whatever it is.
    max_basis_bytes
        Memory budget of the basis for ``reorth="auto"`` (default: half of the free
        memory of the operator's device).
    return_basis
        Keep the Lanczos vectors (needs ``reorth="full"``).
    check_every
        Read alpha and beta back every this many steps to stop early on NaN/Inf or when
        every probe has broken down (default: every step for numpy, never otherwise).
    check_symmetry
        Test ``y^T A x == x^T A y`` for two random vectors first (one extra ``matmat``).
    breakdown_tol
        A probe stops when ``beta <= breakdown_tol * ||T||`` (default: the square root of
        the machine epsilon of the arithmetic or basis dtype, whichever is larger).
    progress
        ``True`` for a progress bar on runs longer than 2 s, or a callable(done, total).

    Returns
    -------
    LanczosResult

    Raises
    ------
    FloatingPointError
        When the operator returns NaN or Inf; names the step and the probe.
    """
    t0 = time.perf_counter()
    op, n = _checks.operator_of(op)
    num_steps = _checks.positive_int(num_steps, "num_steps")
    num_probes = _checks.positive_int(num_probes, "num_probes")
    if reorth not in REORTH_MODES:
        raise ValueError(f"reorth={reorth!r}; choose one of {', '.join(REORTH_MODES)}")
    window = _checks.positive_int(window, "window")
    xp, device = op.xp, op.device
    _array.check_supported_dtype(op.dtype)
    has64 = _array.supports_float64(xp, device)
    work = _checks.float_dtype_name(dtype, "dtype", default="float64" if has64 else "float32")
    if not has64 and "float64" in (work, _array.dtype_name(basis_dtype or work)):
        raise TypeError(
            f"float64 Lanczos arithmetic was asked for, but {op.array_library} on {device} has "
            "no float64 now (for JAX, enable jax_enable_x64); use dtype='float32'"
        )
    basis_name = _checks.float_dtype_name(basis_dtype, "basis_dtype", default=work)
    m = min(num_steps, n)

    explicit, kind = _parse_probes(probes, op, num_probes)
    if explicit is not None:
        num_probes = int(explicit.shape[1])
    block = num_probes if block_size is None else _checks.positive_int(block_size, "block_size")
    block = min(block, num_probes)

    mode, win, basis_name = _resolve_reorth(reorth, m, n, block, basis_name, window,
                                            max_basis_bytes, xp, device,
                                            basis_fixed=basis_dtype is not None)
    wdt, bdt = _array.xp_dtype(xp, work), _array.xp_dtype(xp, basis_name)
    if breakdown_tol is None:
        breakdown_tol = float(np.sqrt(max(_array.finfo_eps(work), _array.finfo_eps(basis_name))))
    matvecs = 0
    if check_symmetry:
        _check_symmetry(op, seed, wdt)
        matvecs += 2
    if return_basis and mode != "full":
        raise ValueError(f"return_basis=True needs reorth='full' (this run uses {mode!r})")
    if check_every is None:
        check_every = 1 if _array.is_host_namespace(xp) else 0
    tick = make_progress(progress, "lanczos")
    total_steps = m * ((num_probes + block - 1) // block)

    alphas, betas, actives, scales, bases, lasts, asym = [], [], [], [], [], [], []
    done_steps = 0
    for start in range(0, num_probes, block):
        idx = range(start, min(start + block, num_probes))
        if explicit is None:
            V0, sc = probe_block(kind, n, seed, idx, xp, device, wdt)
        else:
            V0 = _normalised_rows(xp.astype(xp.matrix_transpose(explicit[:, idx.start:idx.stop]),
                                            wdt), xp)
            sc = np.ones(len(idx))

        def on_step(j: int, _done: int = done_steps) -> None:
            if tick is not None:
                tick(_done + j, total_steps)

        out = _run_block(op, V0, m, mode, win, wdt, bdt, breakdown_tol, check_every,
                         return_basis, idx.start, on_step)
        done_steps += m
        alphas.append(out["alpha"])
        betas.append(out["beta"])
        actives.append(out["active"])
        scales.append(sc)
        asym.append(out["asymmetry"])
        matvecs += out["matvecs"]
        if return_basis:
            bases.append(out["basis"])
            lasts.append(out["last"])
    if tick is not None:
        tick(total_steps, total_steps)

    alpha = np.concatenate(alphas, axis=0)
    beta = np.concatenate(betas, axis=0)
    active = np.concatenate(actives, axis=0)
    _raise_on_nonfinite(alpha, beta, 0)
    stopped = ~active
    breakdown = stopped.any(axis=1)
    lengths = np.where(breakdown, stopped.argmax(axis=1) + 1, m)
    steps = np.arange(m)[None, :]
    alpha = np.where(steps < lengths[:, None], alpha, 0.0)
    beta = np.where(steps < lengths[:, None], beta, 0.0)
    asymmetry = float(max(asym)) if mode != "none" else float("nan")
    eps_eff = max(_array.finfo_eps(op.dtype), _array.finfo_eps(work), _array.finfo_eps(basis_name))
    if asymmetry > np.sqrt(eps_eff):
        warnings.warn(
            f"the Lanczos recurrence reveals an operator that is not symmetric (relative "
            f"coupling to older Lanczos vectors {asymmetry:.2e}, expected ~{eps_eff:.1e}); "
            "specdens assumes a symmetric operator, so the results are not meaningful. "
            "Symmetrise it, e.g. (A + A.T) * 0.5.",
            LanczosWarning,
            stacklevel=2,
        )
    return LanczosResult(
        alpha=alpha,
        beta=beta,
        lengths=lengths.astype(np.int64),
        breakdown=breakdown,
        n=n,
        num_steps=m,
        reorth=mode,
        window=win if mode == "local" else None,
        seed=None if explicit is not None else seed,
        probe_kind="explicit" if explicit is not None else kind,
        probe_indices=np.arange(num_probes),
        probe_scales=np.concatenate(scales),
        dtype=work,
        basis_dtype=basis_name,
        matvecs=matvecs,
        wall_time=time.perf_counter() - t0,
        asymmetry=asymmetry,
        basis=xp.concat(bases, axis=0) if return_basis else None,
        last_vector=xp.concat(lasts, axis=0) if return_basis else None,
    )


def _run_block(op, V0, m, mode, win, wdt, bdt, tol, check_every, keep_basis, first_probe,
               on_step) -> dict:
    """The recurrence for one block of probes (rows of ``V0``, unit norm, dtype ``wdt``)."""
    xp = op.xp
    k, n = V0.shape
    q = V0
    q_prev = xp.zeros_like(q)
    beta_prev = xp.zeros((k,), dtype=wdt, device=_array.creation_device(op))
    anorm = xp.zeros((k,), dtype=wdt, device=_array.creation_device(op))
    asym = xp.zeros((k,), dtype=wdt, device=_array.creation_device(op))
    active = xp.ones((k,), dtype=xp.bool, device=_array.creation_device(op))
    Q = None
    if mode == "full":
        Q = xp.zeros((k, m, n), dtype=bdt, device=_array.creation_device(op))
    elif mode == "local":
        Q = xp.zeros((k, win, n), dtype=bdt, device=_array.creation_device(op))
    same_basis = _array.dtype_name(wdt) == _array.dtype_name(bdt)
    # Libraries that compile per array shape (JAX) project against the whole preallocated
    # basis, whose unused rows are zero, so that every step has the same shapes.
    fixed_shapes = _array.library_name(xp) == "jax"
    al, be, ac = [], [], []
    matvecs = 0
    steps_run = m
    for j in range(m):
        slot = j if mode == "full" else (j % win if mode == "local" else None)
        if Q is not None:
            Q = _array.set_rows(Q, (slice(None), slot, slice(None)),
                                q if same_basis else xp.astype(q, bdt))
        Aq = op.matmat(xp.matrix_transpose(xp.astype(q, op.dtype, copy=False)))
        matvecs += k
        if j == 0:
            _checks.check_product(op, Aq, k)
        w = xp.matrix_transpose(xp.astype(Aq, wdt, copy=False)) - beta_prev[:, None] * q_prev
        alpha = _rowdot(xp, q, w)
        # ``w`` is a fresh array of ours: update it in place (JAX arrays, which have no
        # in-place operators, are rebound by ``-=`` instead).
        w -= alpha[:, None] * q
        if Q is not None:
            Qs = Q[:, : j + 1, :] if (mode == "full" and not fixed_shapes) else Q
            for sweep in range(2):
                wb = w if same_basis else xp.astype(w, bdt)
                h = xp.matmul(Qs, wb[:, :, None])[:, :, 0]
                corr = xp.matmul(xp.matrix_transpose(Qs), h[:, :, None])[:, :, 0]
                w -= corr if same_basis else xp.astype(corr, wdt)
                hw = h if same_basis else xp.astype(h, wdt)
                alpha = alpha + hw[:, slot]
                if sweep == 0:
                    older = xp.abs(hw)
                    if Qs.shape[1] == j + 1:
                        older = older[:, :j] if j > 0 else None
                    else:
                        older = xp.where(_slot_mask(xp, Qs.shape[1], slot, op), 0.0, older)
                    if older is not None:
                        # Near a breakdown (beta_prev << ||T||) the new vector carries
                        # rounding noise of relative size eps ||T|| / beta_prev even for
                        # symmetric operators: weigh the coupling by beta_prev / ||T||.
                        safe_norm = xp.where(anorm > 0, anorm, xp.ones_like(anorm))
                        fac = xp.minimum(beta_prev / safe_norm, xp.ones_like(anorm))
                        asym = xp.maximum(asym, xp.max(older, axis=1) * fac)
        beta = xp.sqrt(_rowdot(xp, w, w))
        anorm = xp.maximum(anorm, xp.abs(alpha) + beta + beta_prev)
        active = active & (beta > tol * anorm)
        al.append(alpha)
        be.append(beta)
        ac.append(active)
        safe = xp.where(active, beta, xp.ones_like(beta))
        w *= xp.where(active, 1.0 / safe, xp.zeros_like(safe))[:, None]
        q_prev, q = q, w
        beta_prev = xp.where(active, beta, xp.zeros_like(beta))
        on_step(j + 1)
        if check_every and ((j + 1) % check_every == 0) and j + 1 < m:
            a_h = _array.to_numpy(xp.stack(al, axis=1))
            b_h = _array.to_numpy(xp.stack(be, axis=1))
            _raise_on_nonfinite(a_h, b_h, first_probe)
            if not bool(_array.to_numpy(xp.stack(ac, axis=1), bool)[:, -1].any()):
                steps_run = j + 1
                break
    alpha_h = _pad(_array.to_numpy(xp.stack(al, axis=1)), m)
    beta_h = _pad(_array.to_numpy(xp.stack(be, axis=1)), m)
    active_h = _pad(_array.to_numpy(xp.stack(ac, axis=1), bool), m, False)
    with np.errstate(invalid="ignore"):
        asym_rel = _array.to_numpy(asym) / np.maximum(_array.to_numpy(anorm), np.finfo(float).tiny)
    out = {
        "alpha": alpha_h,
        "beta": beta_h,
        "active": active_h,
        "matvecs": matvecs,
        # (non-finite values are reported by _raise_on_nonfinite, not here)
        "asymmetry": float(np.max(np.where(np.isfinite(asym_rel), asym_rel, 0.0))),
        "steps_run": steps_run,
    }
    if keep_basis:
        out["basis"] = Q
        out["last"] = q
    return out



def _slot_mask(xp: Any, size: int, slot: int, op: Any) -> Any:
    host = np.zeros((1, size), dtype=bool)
    host[0, slot] = True
    return _array.from_numpy(host, xp, op.device, xp.bool)


def _rowdot(xp: Any, a: Any, b: Any) -> Any:
    """Row-wise dot products of two ``(k, n)`` arrays, as one batched matmul."""
    return xp.matmul(a[:, None, :], b[:, :, None])[:, 0, 0]


def _pad(a: np.ndarray, m: int, value: Any = 0.0) -> np.ndarray:
    if a.shape[1] == m:
        return a
    out = np.full((a.shape[0], m), value, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def _raise_on_nonfinite(alpha: np.ndarray, beta: np.ndarray, first_probe: int) -> None:
    bad = ~(np.isfinite(alpha) & np.isfinite(beta))
    if bad.any():
        probe, step = np.argwhere(bad)[np.argmin(np.argwhere(bad)[:, 1])]
        raise FloatingPointError(
            f"the operator returned NaN or Inf at Lanczos step {int(step) + 1} for probe "
            f"{int(probe) + first_probe}; specdens never averages such values in. Check the "
            "operator (an overflowing loss, a float16 model, a broken matvec) and run again."
        )



def _check_symmetry(op: Any, seed: int, wdt: Any) -> None:
    n = op.shape[0]
    xp = op.xp
    x, _ = draw_probe("gaussian", n, seed, 2**62)
    y, _ = draw_probe("gaussian", n, seed, 2**62 + 1)
    X = _array.from_numpy(np.stack([x, y], axis=1), xp, op.device, op.dtype)
    Z = _array.to_numpy(op.matmat(X))
    ax, ay = Z[:, 0], Z[:, 1]
    gap = abs(float(y @ ax) - float(x @ ay))
    scale = max(float(np.linalg.norm(ax)), float(np.linalg.norm(ay)), np.finfo(float).tiny)
    tol = 10 * np.sqrt(_array.finfo_eps(op.dtype))
    if not np.isfinite(gap) or gap > tol * scale:
        raise ValueError(
            f"the operator is not symmetric: |y^T A x - x^T A y| = {gap:.3e} for random unit x, y "
            f"(relative {gap / scale:.2e} > {tol:.1e}). specdens needs a symmetric operator; "
            "symmetrise it, e.g. (A + A.T) * 0.5."
        )


def _resolve_reorth(reorth, m, n, block, basis_name, window, budget, xp, device, *,
                    basis_fixed):
    """The reorthogonalisation mode, window and basis dtype that fit the budget.

    ``"auto"``: a full basis in ``basis_name``; else, when the basis dtype was not given,
    a full float32 basis (CGS2 in float32 keeps orthogonality at float32 precision, far
    better than local reorthogonalisation); else a local window; else none.
    """
    win = min(window, m)
    if reorth != "auto":
        return reorth, win, basis_name
    if budget is None:
        budget = _memory.available_bytes(xp, device) // 2
    per_vector = block * n * (4 if basis_name == "float32" else 8)
    if m * per_vector <= budget:
        return "full", win, basis_name
    if not basis_fixed and basis_name == "float64" and m * per_vector // 2 <= budget:
        return "full", win, "float32"
    fit = int(budget // per_vector)
    if fit >= 2:
        return "local", min(win, fit), basis_name
    return "none", win, basis_name


def _parse_probes(probes: Any, op: Any, num_probes: int) -> tuple[Any, str]:
    if probes is None:
        return None, "rademacher"
    if isinstance(probes, str):
        if probes not in PROBE_KINDS:
            raise ValueError(f"probes={probes!r}; choose one of {', '.join(PROBE_KINDS)} "
                             "or pass start vectors")
        return None, probes
    xp = op.xp
    lib = _array.library_name(probes)
    if lib != op.array_library:
        raise TypeError(f"probes are {lib} arrays but the operator works on "
                        f"{op.array_library} arrays")
    V = probes
    if len(V.shape) == 1:
        V = xp.reshape(V, (-1, 1))
    if len(V.shape) != 2 or V.shape[0] != op.shape[0]:
        raise ValueError(f"probes must have shape ({op.shape[0]},) or ({op.shape[0]}, k); "
                         f"got {tuple(probes.shape)}")
    host_norms = np.linalg.norm(_array.to_numpy(V), axis=0)
    if not np.all(np.isfinite(host_norms)) or np.any(host_norms == 0):
        raise ValueError("probes must be finite and non-zero")
    return V, "explicit"


def _normalised_rows(V: Any, xp: Any) -> Any:
    return V / xp.sqrt(xp.sum(V * V, axis=1))[:, None]
