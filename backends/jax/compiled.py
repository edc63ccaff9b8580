"""The Lanczos recurrence compiled whole: one :func:`jax.jit` call per block of probes, the
steps in a :func:`jax.lax.fori_loop` (never unrolled, so compile time does not grow with
the number of steps), the products inside the same program.

The arithmetic is the core engine's (:func:`specdens.lanczos`, its fixed-shape path for
JAX): classical Gram-Schmidt against the whole preallocated basis, the second sweep only
when the first cancelled (the DGKS criterion, decided on the device by
:func:`jax.lax.cond`), Simon's estimate of the loss of orthogonality for
``reorth="partial"`` (advanced on the device, the sweep again under
:func:`jax.lax.cond`), the same breakdown rule, the same asymmetry monitors; probes come
from the core's generator, so both paths start from the same vectors and agree to
rounding. Results are the core's
:class:`~specdens.LanczosResult` and :class:`~specdens.SpectralDensity`.

References
----------
C. Lanczos (1950), An iteration method for the solution of the eigenvalue problem of
linear differential and integral operators. L. Giraud, J. Langou, M. Rozloznik (2005),
The loss of orthogonality in the Gram-Schmidt orthogonalization process. H. D. Simon
(1984), The Lanczos algorithm with partial reorthogonalization, Math. Comp. 42(165).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from specdens import LanczosResult, SpectralDensity, _array, _checks
from specdens.algorithms.lanczos import (
    _resolve_reorth,
    check_breakdown_tol,
    check_scale,
    default_basis_dtype,
    finish_coefficients,
)
from specdens.algorithms.probes import PROBE_KINDS, probe_block
from specdens.operators import DenseOperator, LinearOperatorBase

MODES = ("full", "partial", "local", "none", "auto")


# --------------------------------------------------------------------------- operators
def _dense_apply(A: Any, V: Any) -> Any:
    return A @ V


class _OpApply:
    """A specdens operator's ``_matmat`` as a traceable function (its arrays are closed
    over and become constants of the program)."""

    def __init__(self, op: Any):
        self.op = op

    def __call__(self, _: Any, V: Any) -> Any:
        return self.op._matmat(V)

    def __eq__(self, other: object) -> bool:  # one compilation per operator
        return type(other) is _OpApply and other.op is self.op

    def __hash__(self) -> int:
        return hash(id(self.op))


class _MatvecApply:
    """A matvec callable, vectorised over the columns of a block."""

    def __init__(self, f: Callable[[Any], Any]):
        self.f = f

    def __call__(self, _: Any, V: Any) -> Any:
        return jax.vmap(self.f, in_axes=1, out_axes=1)(V)

    def __eq__(self, other: object) -> bool:  # one compilation per function
        return type(other) is _MatvecApply and other.f is self.f

    def __hash__(self) -> int:
        return hash(id(self.f))


def as_traceable(op: Any, n: int | None = None, dtype: Any = None
                 ) -> tuple[Callable[[Any, Any], Any], Any, int, Any, Any]:
    """``(apply, operand, n, dtype, device)`` with ``apply(operand, V)`` traceable.

    Accepts an operator with ``jax_operand()`` and ``jax_apply(operand, V)`` (the
    operators of this backend), a square jax array, a specdens operator on jax arrays (its
    ``_matmat`` is traced), or a callable ``matvec(v)`` on jax vectors with ``n=``.
    """
    if hasattr(op, "jax_operand") and hasattr(op, "jax_apply"):
        return op.jax_apply, op.jax_operand(), int(op.shape[0]), op.dtype, op.device
    if isinstance(op, jax.Array):
        if op.ndim != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"a matrix operator must be square; got shape {op.shape}")
        return _dense_apply, op, int(op.shape[0]), op.dtype, _array.device_of(op)
    if isinstance(op, LinearOperatorBase):
        if op.array_library != "jax":
            raise TypeError(f"the compiled Lanczos loop needs an operator on jax arrays; this "
                            f"one works on {op.array_library} arrays (use specdens.lanczos)")
        if isinstance(op, DenseOperator):
            return _dense_apply, op.A, int(op.shape[0]), op.dtype, op.device
        return _OpApply(op), None, int(op.shape[0]), op.dtype, op.device
    if callable(op):
        if n is None:
            raise TypeError("a matvec callable needs n=... (the size of its vectors)")
        n = _checks.positive_int(n, "n")
        dt = jnp.dtype(dtype or ("float64" if jax.config.read("jax_enable_x64") else "float32"))
        return _MatvecApply(op), None, n, dt, jax.devices()[0]
    raise TypeError(f"cannot run the compiled Lanczos loop on a {type(op).__name__}: pass an "
                    "operator of specdens.backends.jax, a jax array, a specdens operator on jax "
                    "arrays or a matvec callable with n=")


# --------------------------------------------------------------------------- the loop
def _rowdot(a: Any, b: Any) -> Any:
    return jnp.matmul(a[:, None, :], b[:, :, None])[:, 0, 0]


CHUNK = 16  # basis rows per block of the full mode's projection


def _gram_schmidt(Q: Any, w: Any, j: Any) -> tuple[Any, Any]:
    """``h = Q w`` and ``corr = Q^T h`` per probe (``Q``: ``(k, size, n)``, ``w``: ``(k, n)``).

    With ``j`` (the full mode) only the blocks of ``CHUNK`` rows that hold the vectors
    ``0..j`` are read -- a loop with a traced trip count -- instead of the whole
    preallocated basis, whose later rows are still zero: on average half the memory
    traffic. The last block is moved back to end at ``size`` when it would overrun, and
    its rows that an earlier block already covered are left out of ``corr``.
    """
    if j is None:
        h = jnp.matmul(Q, w[:, :, None])[:, :, 0]
        return h, jnp.matmul(h[:, None, :], Q)[:, 0, :]
    k, size, n = Q.shape
    c_rows = min(size, CHUNK)
    blocks = j // c_rows + 1

    def start(c: Any) -> Any:
        return jnp.minimum(c * c_rows, size - c_rows)

    def project(c: Any, h: Any) -> Any:
        Qc = jax.lax.dynamic_slice_in_dim(Q, start(c), c_rows, axis=1)
        hc = jnp.matmul(Qc, w[:, :, None])[:, :, 0]
        return jax.lax.dynamic_update_slice_in_dim(h, hc, start(c), axis=1)

    h = jax.lax.fori_loop(0, blocks, project, jnp.zeros((k, size), Q.dtype))

    def correct(c: Any, acc: Any) -> Any:
        s0 = start(c)
        Qc = jax.lax.dynamic_slice_in_dim(Q, s0, c_rows, axis=1)
        hc = jax.lax.dynamic_slice_in_dim(h, s0, c_rows, axis=1)
        hc = jnp.where((s0 + jnp.arange(c_rows))[None, :] >= c * c_rows, hc, 0.0)
        return acc + jnp.matmul(hc[:, None, :], Qc)[:, 0, :]

    corr = jax.lax.fori_loop(0, blocks, correct, jnp.zeros((k, n), Q.dtype))
    return h, corr


def _omega_advance(om: dict, j: Any, alpha: Any, beta: Any, beta_prev: Any, anorm: Any,
                   *, eps: float, n: int, tol: Any) -> tuple[dict, Any]:
    """Simon's recurrence for the estimates of ``|q_{j+1}^T q_i|``, on the device: the
    core's ``_Omega.advance`` (see there) with fixed shapes. ``om`` holds ``cur`` and
    ``prev`` (``(k, m + 1)``), the coefficients so far (``(k, m)``), ``force`` and
    ``sweeps``; returns the advanced state and whether the new vector is reorthogonalised.
    ``tol``: the breakdown tolerance; a probe whose ``beta`` is at a step's rounding but
    above ``tol ||T||`` goes on (a weak step): that vector and the next one are
    reorthogonalised, as in the core.
    """
    dt = om["cur"].dtype
    a = om["alpha"].at[:, j].set(alpha.astype(dt))
    b = om["beta"].at[:, j].set(beta.astype(dt))
    cur, prev = om["cur"], om["prev"]
    alpha, beta = alpha.astype(dt), beta.astype(dt)
    beta_prev, anorm = beta_prev.astype(dt), anorm.astype(dt)
    k, size = cur.shape
    zero = jnp.zeros((k, 1), dt)
    a_i = jnp.concatenate([a, zero], axis=1)          # alpha_i
    b_i = jnp.concatenate([b, zero], axis=1)          # beta_i
    b_im1 = jnp.concatenate([zero, b], axis=1)        # beta_{i-1} (0 for i = 0)
    w_ip1 = jnp.concatenate([cur[:, 1:], zero], axis=1)
    w_im1 = jnp.concatenate([zero, cur[:, :-1]], axis=1)
    norm = jnp.maximum(jnp.maximum(anorm, jnp.abs(alpha) + beta + beta_prev),
                       jnp.finfo(dt).tiny)
    live = beta > eps * norm
    # active before this step and not sure to break down at it (half of the engine's
    # breakdown test, which runs in the arithmetic's dtype: a safe margin)
    entering = (beta_prev > 0) | (j == 0)
    weak = jnp.any(entering & ~live & (beta > 0.5 * tol * norm))
    rounding = eps * float(np.sqrt(n))
    safe = jnp.where(live, beta, jnp.ones_like(beta))
    t = (b_i * w_ip1 + (a_i - alpha[:, None]) * cur + b_im1 * w_im1
         - beta_prev[:, None] * prev)
    t = t + jnp.where(t >= 0, 1.0, -1.0) * rounding * norm[:, None]
    i = jnp.arange(size)[None, :]
    new = jnp.where(i < j, t / safe[:, None], 0.0)
    new = jnp.where(i == j, (rounding * norm / safe)[:, None], new)
    new = jnp.where(i == j + 1, 1.0, new)
    new = jnp.where(live[:, None], new, jnp.where(i == j + 1, 1.0, 0.0))
    reorth = om["force"] | weak | jnp.any((i <= j) & (jnp.abs(new) > float(np.sqrt(eps))))
    # reorthogonalised: the estimates reset; Simon: the next vector is reorthogonalised too
    new = jnp.where(reorth & (i <= j), rounding, new).astype(dt)
    out = {"cur": new, "prev": cur, "alpha": a, "beta": b,
           "force": jnp.where(reorth, weak | ~om["force"], om["force"]),
           "sweeps": om["sweeps"] + reorth.astype(om["sweeps"].dtype)}
    return out, reorth


@partial(jax.jit, static_argnums=(0,),
         static_argnames=("m", "mode", "win", "wdt", "bdt", "odt", "keep"))
def _run(apply: Callable[[Any, Any], Any], operand: Any, V0: Any, tol: Any, *, m: int,
         mode: str, win: int, wdt: str, bdt: str, odt: str, keep: bool) -> dict:
    k, n = V0.shape
    basis_all = mode in ("full", "partial")
    size = m if basis_all else win
    same = wdt == bdt
    zeros_k = jnp.zeros((k,), wdt)
    state = {
        "q": V0, "q_prev": jnp.zeros_like(V0), "beta_prev": zeros_k, "anorm": zeros_k,
        "asym": zeros_k, "active": jnp.ones((k,), bool),
        "alpha": jnp.zeros((k, m), wdt), "beta": jnp.zeros((k, m), wdt),
        "act": jnp.zeros((k, m), bool),
    }
    if mode != "none":
        state["Q"] = jnp.zeros((k, size, n), bdt)
    # the rounding that feeds the loss of orthogonality: of the products too
    eps_omega = max(_array.finfo_eps(wdt), _array.finfo_eps(bdt), _array.finfo_eps(odt))
    if mode == "partial":
        cur = jnp.zeros((k, m + 1), wdt).at[:, 0].set(1.0)
        state["omega"] = {"cur": cur, "prev": jnp.zeros((k, m + 1), wdt),
                          "alpha": jnp.zeros((k, m), wdt), "beta": jnp.zeros((k, m), wdt),
                          "force": jnp.asarray(False), "sweeps": jnp.asarray(0, jnp.int32)}

    def body(j: Any, s: dict) -> dict:
        s = dict(s)
        q, q_prev, beta_prev, anorm = s["q"], s["q_prev"], s["beta_prev"], s["anorm"]
        slot = j if basis_all else j % win
        if mode != "none":
            qb = q if same else q.astype(bdt)
            s["Q"] = jax.lax.dynamic_update_slice(s["Q"], qb[:, None, :], (0, slot, 0))
        Aq = apply(operand, q.astype(odt).T)
        w = Aq.T.astype(wdt)
        safe_norm = jnp.where(anorm > 0, anorm, jnp.ones_like(anorm))
        fac = jnp.minimum(beta_prev / safe_norm, jnp.ones_like(anorm))
        if mode == "partial":
            # couplings to older vectors reach sqrt(eps) by design: asymmetry is read
            # locally, q_{j-1}^T A q_j - beta_{j-1} (as in the core)
            dev = jnp.abs(_rowdot(q_prev, w) - beta_prev)
            s["asym"] = jnp.where(j > 0, jnp.maximum(s["asym"], dev * fac), s["asym"])
        w = w - beta_prev[:, None] * q_prev
        alpha = _rowdot(q, w)
        w = w - alpha[:, None] * q
        if mode != "none":
            Q = s["Q"]

            def sweep(w: Any, alpha: Any) -> tuple[Any, Any, Any]:
                wb = w if same else w.astype(bdt)
                h, corr = _gram_schmidt(Q, wb, j if basis_all else None)
                hw = h if same else h.astype(wdt)
                alpha = alpha + jax.lax.dynamic_index_in_dim(hw, slot, axis=1, keepdims=False)
                return w - (corr if same else corr.astype(wdt)), alpha, hw

            def cancels(w: Any, hw: Any) -> Any:
                # Daniel, Gragg, Kaufman & Stewart (1976): a sweep cancelled when it
                # removed more than half of ||w||^2, i.e. ||w'|| < ||h|| (Pythagoras)
                return jnp.any(_rowdot(w, w) < jnp.sum(hw * hw, axis=1))

            def again(wa: tuple[Any, Any]) -> tuple[Any, Any]:
                # the second sweep; a third when the second cancelled too (a vector
                # mostly made of rounding past a breakdown, as in the core)
                w, alpha, hw = sweep(*wa)
                return jax.lax.cond(cancels(w, hw), lambda wa: sweep(*wa)[:2],
                                    lambda wa: wa, (w, alpha))

            def sweeps(wa: tuple[Any, Any]) -> tuple[Any, Any, Any]:
                # (decided on the device by lax.cond, so nothing is read back)
                w, alpha, hw = sweep(*wa)
                w, alpha = jax.lax.cond(cancels(w, hw), again, lambda wa: wa, (w, alpha))
                return w, alpha, hw

            if mode == "partial":
                # Simon's estimate of the new vector's orthogonality to the older ones
                s["omega"], needed = _omega_advance(
                    s["omega"], j, alpha, jnp.sqrt(_rowdot(w, w)), beta_prev, anorm,
                    eps=eps_omega, n=n, tol=tol)
                w, alpha = jax.lax.cond(needed, lambda wa: sweeps(wa)[:2], lambda wa: wa,
                                        (w, alpha))
            else:
                w, alpha, hw = sweeps((w, alpha))
                older = jnp.where(jnp.arange(size)[None, :] == slot, 0.0, jnp.abs(hw))
                s["asym"] = jnp.maximum(s["asym"], jnp.max(older, axis=1) * fac)
        beta = jnp.sqrt(_rowdot(w, w))
        anorm = jnp.maximum(anorm, jnp.abs(alpha) + beta + beta_prev)
        active = s["active"] & (beta > tol * anorm)
        s["alpha"] = s["alpha"].at[:, j].set(alpha)
        s["beta"] = s["beta"].at[:, j].set(beta)
        s["act"] = s["act"].at[:, j].set(active)
        safe = jnp.where(active, beta, jnp.ones_like(beta))
        w = w * jnp.where(active, 1.0 / safe, jnp.zeros_like(safe))[:, None]
        s["q_prev"], s["q"] = q, w
        s["beta_prev"] = jnp.where(active, beta, jnp.zeros_like(beta))
        s["anorm"], s["active"] = anorm, active
        return s

    out = jax.lax.fori_loop(0, m, body, state)
    res = {key: out[key] for key in ("alpha", "beta", "act", "asym", "anorm")}
    if mode == "partial":
        res["sweeps"] = out["omega"]["sweeps"]
    if keep:
        res["basis"], res["last"] = out["Q"], out["q"]
    return res


# --------------------------------------------------------------------------- public API
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
    breakdown_tol: float | None = None,
    n: int | None = None,
) -> LanczosResult:
    """Run the Lanczos recurrence from ``num_probes`` probes, each block of probes as one
    compiled program.

    Same arguments and result as :func:`specdens.lanczos` (whose documentation has the
    details), and the same probes: for the same operator, seed and options the two agree
    to rounding. The whole recurrence -- products, Gram-Schmidt reorthogonalisation, breakdown
    test -- runs inside :func:`jax.jit` as a :func:`jax.lax.fori_loop` over the steps, so
    it compiles once per operator, block shape and ``num_steps`` (a few seconds at most,
    whatever ``num_steps``) and reads nothing back before the end. Every probe runs all
    ``num_steps`` steps; a probe that breaks down continues with a zero vector and its
    coefficients past the breakdown are discarded, as in the core.

    Parameters
    ----------
    op
        An operator of :mod:`specdens.backends.jax` (its product runs inside the program,
        over every batch: the data set is then held in device memory, stacked by batch
        shape), a square jax array, a specdens operator on jax arrays whose ``_matmat``
        is traceable (its arrays become constants of the program), such as a sum,
        scaling or shift of the others (``2 * H``, ``H.shift(1.0)``, ``H - A``: an
        operator of this backend in one runs its eager pass inside the program, with the
        data as constants), or a callable ``matvec(v)`` on jax vectors with ``n=``.
    num_steps, num_probes, probes, seed, reorth, window, dtype, basis_dtype, block_size,
    max_basis_bytes, return_basis, breakdown_tol
        As in :func:`specdens.lanczos`. ``check_every``, ``check_symmetry`` and
        ``progress`` do not apply: nothing leaves the device before the end.
    n
        Size of the vectors, for a matvec callable only.

    Returns
    -------
    specdens.LanczosResult

    Raises
    ------
    FloatingPointError
        When the operator returns NaN or Inf; names the step and the probe.
    """
    t0 = time.perf_counter()
    apply, operand, size, op_dtype, device = as_traceable(op, n, dtype)
    num_steps = _checks.positive_int(num_steps, "num_steps")
    num_probes = _checks.positive_int(num_probes, "num_probes")
    window = _checks.positive_int(window, "window")
    if reorth not in MODES:
        raise ValueError(f"reorth={reorth!r}; choose one of {', '.join(MODES)}")
    _array.check_supported_dtype(op_dtype)
    has64 = bool(jax.config.read("jax_enable_x64"))
    work = _checks.float_dtype_name(dtype, "dtype", default="float64" if has64 else "float32")
    product = getattr(op, "product_dtype", op_dtype)
    basis = _checks.float_dtype_name(basis_dtype, "basis_dtype",
                                     default=default_basis_dtype(product, work))
    if not has64 and "float64" in (work, basis):
        raise TypeError("float64 Lanczos arithmetic was asked for, but jax_enable_x64 is off; "
                        "enable it or use dtype='float32'")
    m = min(num_steps, size)
    explicit, kind = _parse_probes(probes, size, device)
    if explicit is not None:
        if num_probes not in (1, int(explicit.shape[0])):
            # 1 is the default: it cannot be told apart from an explicit num_probes=1
            raise ValueError(f"num_probes={num_probes} but probes holds "
                             f"{int(explicit.shape[0])} start vectors; the explicit vectors set "
                             "the number of probes (leave num_probes out or make it equal)")
        num_probes = int(explicit.shape[0])
    block = min(num_probes if block_size is None else
                _checks.positive_int(block_size, "block_size"), num_probes)
    mode, win, basis = _resolve(reorth, m, size, block, basis, window, max_basis_bytes,
                                device, basis_dtype is not None)
    if return_basis and mode not in ("full", "partial"):
        raise ValueError("return_basis=True needs reorth='full' or 'partial' "
                         f"(this run uses {mode!r})")
    breakdown_tol = check_breakdown_tol(breakdown_tol, work)
    tol = jnp.asarray(breakdown_tol, work)
    if device is not None and not isinstance(device, jax.Device):
        tol = jax.device_put(tol, device)  # a replicated sharding: the whole mesh

    outs, scales = [], []
    for start in range(0, num_probes, block):
        idx = range(start, min(start + block, num_probes))
        if explicit is None:
            V0, sc = probe_block(kind, size, seed, idx, jnp, device, jnp.dtype(work))
        else:
            V = explicit[idx.start:idx.stop].astype(work)
            V0, sc = V / jnp.sqrt(jnp.sum(V * V, axis=1))[:, None], np.ones(len(idx))
        outs.append(_run(apply, operand, V0, tol, m=m, mode=mode, win=min(win, m), wdt=work,
                         bdt=basis, odt=jnp.dtype(op_dtype).name, keep=return_basis))
        scales.append(sc)
    host = [{key: np.asarray(o[key]) for key in ("alpha", "beta", "act", "asym", "anorm")}
            for o in outs]
    return _result(host, outs, scales, mode=mode, win=win, m=m, n=size, seed=seed,
                   explicit=explicit is not None, kind=kind, work=work, basis=basis,
                   product=product, keep=return_basis, t0=t0)


def slq(op: Any, *, num_steps: int = 90, num_probes: int = 1, seed: int = 0,
        probes: Any = None, reorth: str = "full", **kwargs: Any) -> SpectralDensity:
    """Stochastic Lanczos quadrature with the compiled loop of :func:`lanczos`.

    Same arguments and result as :func:`specdens.slq`; see :func:`lanczos`.

    References
    ----------
    B. Ghorbani, S. Krishnan, Y. Xiao (2019), An Investigation into Neural Net
    Optimization via Hessian Eigenvalue Density, ICML. T. Chen, T. Trogdon, S. Ubaru
    (2021), Analysis of stochastic Lanczos quadrature for spectrum approximation, ICML.
    """
    result = lanczos(op, num_steps, num_probes=num_probes, probes=probes, seed=seed,
                     reorth=reorth, **kwargs)
    return SpectralDensity.from_lanczos(result)


# --------------------------------------------------------------------------- helpers
def _parse_probes(probes: Any, n: int, device: Any) -> tuple[Any, str]:
    """``(rows of explicit start vectors or None, kind)``."""
    if probes is None:
        return None, "rademacher"
    if isinstance(probes, str):
        if probes not in PROBE_KINDS:
            raise ValueError(f"probes={probes!r}; choose one of {', '.join(PROBE_KINDS)} "
                             "or pass start vectors")
        return None, probes
    if not isinstance(probes, jax.Array):
        raise TypeError(f"explicit probes must be a jax array of shape ({n},) or ({n}, k); got "
                        f"{type(probes).__name__}")
    V = probes.reshape(-1, 1) if probes.ndim == 1 else probes
    if V.ndim != 2 or V.shape[0] != n:
        raise ValueError(f"probes must have shape ({n},) or ({n}, k); got {probes.shape}")
    norms = np.linalg.norm(np.asarray(V, dtype=np.float64), axis=0)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError("probes must be finite and non-zero")
    V = V.T
    if device is not None:
        V = jax.device_put(V, device)
    return V, "explicit"


def _resolve(reorth: str, m: int, n: int, block: int, basis: str, window: int,
             budget: int | None, device: Any, fixed: bool) -> tuple[str, int, str]:
    """The core's rule for ``reorth="auto"`` (see :func:`specdens.lanczos`)."""
    return _resolve_reorth(reorth, m, n, block, basis, window, budget, jnp, device,
                           basis_fixed=fixed)


def _result(host: list[dict], outs: list[dict], scales: list[Any], *, mode: str, win: int,
            m: int, n: int, seed: int, explicit: bool, kind: str, work: str, basis: str,
            product: Any, keep: bool, t0: float) -> LanczosResult:
    asymmetry = float("nan")
    if mode != "none":
        rel = []
        for h in host:
            with np.errstate(invalid="ignore"):
                r = h["asym"].astype(np.float64) / np.maximum(h["anorm"].astype(np.float64),
                                                              np.finfo(float).tiny)
            rel.append(float(np.max(np.where(np.isfinite(r), r, 0.0))))
        asymmetry = max(rel)
    eps = max(_array.finfo_eps(product), _array.finfo_eps(work), _array.finfo_eps(basis))
    check_scale(np.concatenate([h["alpha"] for h in host]).astype(np.float64),
                np.concatenate([h["beta"] for h in host]).astype(np.float64), work, n)
    alpha, beta, lengths, breakdown = finish_coefficients(
        np.concatenate([h["alpha"] for h in host]).astype(np.float64),
        np.concatenate([h["beta"] for h in host]).astype(np.float64),
        np.concatenate([h["act"] for h in host]).astype(bool), asymmetry, eps, work)
    k = alpha.shape[0]
    return LanczosResult(
        alpha=alpha, beta=beta, lengths=lengths, breakdown=breakdown, n=n,
        num_steps=m, reorth=mode, window=win if mode == "local" else None,
        seed=None if explicit else seed, probe_kind="explicit" if explicit else kind,
        probe_indices=np.arange(k), probe_scales=np.concatenate(scales), dtype=work,
        basis_dtype=basis, product_dtype=_array.dtype_name(product),
        matvecs=m * k, wall_time=time.perf_counter() - t0,
        asymmetry=asymmetry,
        basis=jnp.concatenate([o["basis"] for o in outs]) if keep else None,
        last_vector=jnp.concatenate([o["last"] for o in outs]) if keep else None)


__all__ = ["lanczos", "slq"]
