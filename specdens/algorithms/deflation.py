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
  calls (different seeds, step counts, functionals): eigsh does not run again; one block
  product of its ``k`` eigenvectors checks that its residuals are this operator's, and an
  unconverged result draws an :class:`specdens.EigshWarning` (it spans no invariant
  subspace, so the estimate is biased).
* The eigenvalues added as atoms are eigsh's Ritz values (accurate to
  ``residual^2 / gap``), so no product is spent on them either; eigsh's explicit residuals
  are kept in the result (``deflated_residuals``).
* With a checkpoint, the eigenpairs are saved next to it (``PATH.eigsh.npz``), so a
  resumed run does not repeat the eigensolver (its file is validated, and its eigenpairs
  checked against the operator with one block product; eigsh's options are compared as
  resolved, so a default passed explicitly is the default). The Lanczos checkpoint's
  settings, and its key, hold a SHA-256 of the eigenpairs: another deflation is refused.

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

import hashlib
import json
import math
import os
import warnings
from typing import Any

import numpy as np

from .. import _array, _checks
from ..operators import LinearOperatorBase
from . import checkpoint as checkpoint_mod
from .eigsh import (
    DEFAULT_MAXITER,
    WHICH,
    EigshResult,
    EigshWarning,
    _norm,
    _resolve_ncv,
    _resolve_tol,
    _scale_bounds,
    eigsh,
)

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
                 eigsh_matvecs: int, check: str | None = None):
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
        self.check_matvecs = 0
        if check is not None:
            # (a given EigshResult, or one read from a checkpoint: eigsh did not just
            # compute it for this operator)
            _check_eigenpairs(op, eig, xp.astype(V, wdt), work, check)
            self.check_matvecs = eig.k
            if not eig.converged:
                warnings.warn(
                    f"deflate= holds eigenpairs that did not converge ({eig.num_converged} "
                    f"of {eig.k} met tol={eig.tol:.2e}, largest residual "
                    f"{float(np.max(eig.residuals, initial=0.0)):.2e}): they span no "
                    "invariant subspace, so the deflated estimate is biased (by about the "
                    "residuals' size); run specdens.eigsh to convergence (more maxiter or "
                    "ncv) and pass that result",
                    EigshWarning, stacklevel=4)
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

    def digest(self) -> str:
        """SHA-256 of the eigenvalues and eigenvectors (their bytes in the working dtype),
        for checkpoint keys and settings: a checkpoint written with another deflation is
        refused. The vectors cross to the host one column at a time."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.eig.eigenvalues, dtype=np.float64).tobytes())
        V = self.eig.eigenvectors
        dt = _array.dtype_name(self.V.dtype)
        for i in range(self.k):
            h.update(np.ascontiguousarray(_array.to_numpy(V[:, i], np.dtype(dt))).tobytes())
        return h.hexdigest()

    def info(self) -> dict:
        """JSON metadata for ``SpectralDensity.extra["deflation"]``."""
        return {
            "k": int(self.k), "which": self.which, "eigsh_matvecs": self.eigsh_matvecs,
            "check_matvecs": int(self.check_matvecs),
            "eigsh_converged": bool(self.eig.converged),
            "max_residual": float(np.max(self.eig.residuals, initial=0.0)),
        }


def make_deflation(op: Any, deflate: Any, *, which: str | None = None, seed: int = 0,
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
        ``EigshResult`` (with eigenvectors) to reuse. A given result is checked against
        the operator with one block product of its ``k`` eigenvectors (see
        :func:`_check_eigenpairs`), and an unconverged one draws an
        :class:`~specdens.EigshWarning`.
    which
        Which eigenpairs: ``"LA"`` (largest algebraic, the default: a Hessian's outliers),
        ``"LM"`` (largest magnitude, also large negative ones), ``"SA"`` or ``"BE"``. With
        an ``EigshResult`` it must be ``None`` or the result's own ``which``.
    seed
        Seed of eigsh's start vector.
    dtype
        Working dtype of the eigenvectors and projections.
    eigsh_options
        More keyword arguments for :func:`specdens.eigsh` (``tol``, ``ncv``, ``maxiter``);
        refused with an ``EigshResult``, which was computed with its own.
    checkpoint, checkpoint_key
        When given, the eigenpairs are saved to (or resumed from) ``checkpoint + ".eigsh.npz"``.
    """
    if isinstance(deflate, EigshResult):
        if deflate.n != int(op.shape[0]):
            raise ValueError(f"deflate= holds eigenpairs of an operator of size {deflate.n}; "
                             f"this one has n = {op.shape[0]}")
        if eigsh_options is not None:
            raise ValueError("eigsh_options only apply with deflate=k; deflate= is an "
                             "EigshResult, computed with its own options")
        if which is not None and which != deflate.which:
            raise ValueError(f"deflate_which={which!r} but deflate= holds the eigenpairs "
                             f"which={deflate.which!r} chose; omit deflate_which, or compute "
                             f"them with specdens.eigsh(..., which={which!r})")
        return Deflation(op, deflate, deflate.which, dtype, eigsh_matvecs=0,
                         check="deflate=")
    which = "LA" if which is None else which
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
    # Settings as resolved, so that a default passed explicitly is the default (the
    # options are checked here as eigsh checks them).
    eps = max(_array.finfo_eps(dtype), _array.finfo_eps(_checks.product_dtype(op)))
    settings = {"k": k, "which": which, "dtype": dtype,
                "eigsh_options": _resolved_options(options, k, n, eps)}
    fingerprint = checkpoint_mod.operator_fingerprint(op, checkpoint_key)
    if os.path.exists(path):
        header, arrays = checkpoint_mod.read_npz(path, EIGSH_CHECKPOINT_FORMAT,
                                                 EIGSH_CHECKPOINT_VERSION)
        _check_eigsh_header(header, path)
        checkpoint_mod.check_fingerprint(header["fingerprint"], fingerprint, path)
        saved = dict(header["settings"])
        try:  # (files written before the settings were stored resolved)
            saved["eigsh_options"] = _resolved_options(saved.get("eigsh_options"), saved.get("k"),
                                                       n, eps)
        except (TypeError, ValueError, AttributeError) as exc:
            raise checkpoint_mod.CheckpointError(
                f"{path} is corrupt or not written by this specdens: settings.eigsh_options "
                f"({exc}); delete it to start afresh") from None
        checkpoint_mod.check_settings(saved, settings, path)
        eig = _eig_from_arrays(header, arrays, op, dtype, path)
        return Deflation(op, eig, which, dtype, eigsh_matvecs=eig.matvecs, check=path)
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


def _resolved_options(options: Any, k: Any, n: int, eps: float) -> dict:
    """eigsh's options with its defaults filled in (``tol``, ``ncv``, ``maxiter``) as
    eigsh resolves them, so that a default passed explicitly compares equal to it. Other
    options (``seed``, ``v0``) as JSON would write them."""
    if not isinstance(options, dict):
        raise TypeError(f"eigsh_options is {options!r}, not an object")
    out = json.loads(json.dumps(options, default=str))
    out["tol"] = _resolve_tol(options.get("tol"), eps)
    out["ncv"] = _resolve_ncv(options.get("ncv"), k, n)
    maxiter = options.get("maxiter")
    out["maxiter"] = DEFAULT_MAXITER if maxiter is None else _checks.nonnegative_int(
        maxiter, "maxiter")
    return out


def _check_eigenpairs(op: Any, eig: EigshResult, V: Any, work: str, source: str) -> None:
    """Refuse eigenpairs that are not those of ``op``: one block product gives the
    residuals ``||A x_i - lambda_i x_i||``, which must match the result's own.

    The residuals were computed the same way from the same vectors, so they differ only
    by the rounding of the products and of the norm: at most about ``sqrt(n) eps ||A||``
    (a sum of ``n`` rounded terms; ``n eps ||A||`` at worst), plus ``10 ncv eps ||A||``,
    eigsh's allowance for the Lanczos relation (the vectors may have been rounded to
    another dtype since). ``eps`` is the largest of the working dtype's, the result's and
    the products'. Eigenpairs of another operator have residuals of the size of the
    eigenvalues' differences, far above that. ``source`` names them in the error
    (``"deflate="``, or the checkpoint file).
    """
    xp, n = op.xp, int(op.shape[0])
    eps = max(_array.finfo_eps(work), _array.finfo_eps(eig.dtype),
              _array.finfo_eps(_checks.product_dtype(op)))
    AV = xp.astype(_array.detached(op.matmat(xp.astype(V, op.dtype, copy=False))), V.dtype,
                   copy=False)
    lam = _array.from_numpy(np.asarray(eig.eigenvalues, dtype=np.float64)[None, :], xp,
                            _array.device_of(V), V.dtype)
    res = _array.to_numpy(_norm(xp, AV - V * lam, _scale_bounds(work, n), axis=0))
    scale = max(float(eig.anorm), float(np.max(np.abs(eig.eigenvalues), initial=0.0)))
    allowed = (np.asarray(eig.residuals, dtype=np.float64)
               + (10.0 * (eig.ncv + math.sqrt(n))) * eps * scale)
    bad = ~(res <= allowed)
    if bad.any():
        i = int(np.argmax(bad))
        what = ("the eigenpairs of another operator" if source == "deflate="
                else "eigenpairs that are not this operator's (corrupt, or a different operator)")
        msg = (f"{source} holds {what}: ||A x - lambda x|| = {res[i]:.3e} for eigenvalue "
               f"{eig.eigenvalues[i]:.6g} (pair {i}), where the result records "
               f"{eig.residuals[i]:.3e} (allowed up to {allowed[i]:.3e} for rounding)")
        if source == "deflate=":
            raise ValueError(msg + "; compute the EigshResult with specdens.eigsh of this "
                             "operator")
        raise checkpoint_mod.CheckpointError(msg + "; delete the file to start afresh")


def _check_eigsh_header(header: dict, path: str) -> None:
    """Refuse an eigsh checkpoint header whose sections are missing or malformed, naming
    the field (the fingerprint as :func:`checkpoint.check_header` checks it)."""
    def bad(field: str, what: str) -> checkpoint_mod.CheckpointError:
        return checkpoint_mod.CheckpointError(
            f"{path} is corrupt or not written by this specdens: {field} {what}; delete it "
            "to start afresh")

    for section in ("settings", "fingerprint", "result"):
        if not isinstance(header.get(section), dict):
            raise bad(section, "is missing" if section not in header else "is not an object")
    # (check_header wants the sections of a Lanczos checkpoint too; its fingerprint checks
    # are the ones wanted here)
    checkpoint_mod.check_header({**header, "resolved": {}, "progress": {}}, path)
    r = header["result"]
    for field, kind in (("converged", bool), ("num_converged", int), ("num_restarts", int),
                        ("matvecs", int), ("anorm", float), ("tol", float), ("ncv", int),
                        ("wall_time", float)):
        v = r.get(field)
        ok = (isinstance(v, bool) if kind is bool else
              isinstance(v, (int, float) if kind is float else int)
              and not isinstance(v, bool) and math.isfinite(v))
        if not ok:
            raise bad(f"result.{field}", f"is {v!r}")
    if header["settings"].get("which") not in WHICH:
        raise bad("settings.which", f"is {header['settings'].get('which')!r}")


def _eig_from_arrays(header: dict, arrays: dict, op: Any, dtype: str,
                     path: str) -> EigshResult:
    """The EigshResult a checkpoint holds, its arrays checked against the settings:
    ``eigenvalues``, ``residuals`` and ``residual_estimates`` finite of shape ``(k,)``,
    ``eigenvectors`` finite floating point of shape ``(n, k)``."""
    def bad(field: str, what: str) -> checkpoint_mod.CheckpointError:
        return checkpoint_mod.CheckpointError(
            f"{path} is corrupt or not written by this specdens: {field} {what}; delete it "
            "to start afresh")

    r = header["result"]
    k, n = header["settings"].get("k"), int(op.shape[0])
    shapes = {"eigenvalues": (k,), "residuals": (k,), "residual_estimates": (k,),
              "eigenvectors": (n, k)}
    for field, shape in shapes.items():
        if field not in arrays:
            raise bad(field, "is missing")
        a = arrays[field]
        if a.shape != shape:
            raise bad(field, f"has shape {a.shape}, not {shape}")
        if a.dtype.kind != "f":
            raise bad(field, f"has dtype {a.dtype}, not floating point")
        if not np.all(np.isfinite(a)):
            raise bad(field, "is not finite")
    if np.any(arrays["residuals"] < 0) or np.any(arrays["residual_estimates"] < 0):
        raise bad("residuals", "are negative")
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
        ncv=int(r["ncv"]), n=n, dtype=dtype, wall_time=float(r["wall_time"]),
    )
