"""Trace and diagonal estimators from matrix-vector products, with ``num_matvecs`` as the
unit of cost.

========================  ==================================================================
``"hutchinson"``          Girard-Hutchinson: the mean of ``z^T A z`` over Rademacher ``z``
                          (Hutchinson, 1989; Girard, 1989)
``"hutch++"``             a rank-``m/3`` sketch ``Q`` of ``A``'s range, ``tr(Q^T A Q)``
                          exactly, and Hutchinson on ``(I - QQ^T) A (I - QQ^T)`` (Meyer,
                          Musco, Musco & Woodruff, 2021)
``"xtrace"``              the exchangeable version of Hutch++: ``m/2`` test vectors, each
                          left out in turn (Epperly, Tropp & Webber, 2024)
``"xnystrace"``           XTrace with a Nyström approximation, for positive semi-definite
                          operators only (Epperly, Tropp & Webber, 2024)
``"slq"``                 ``tr f(A)`` for any ``f`` by stochastic Lanczos quadrature
========================  ==================================================================

The diagonal estimators are the same ideas for ``diag(A)``: Hutchinson's (Bekas,
Kokiopoulou & Saad, 2007), Diag++ (Baston & Nakatsukasa, 2022; with the symmetric
deflation ``A - Q Q^T A Q Q^T``), XDiag and its Nyström variant (Epperly, Tropp & Webber,
2024).

The estimators of ``tr(A)`` and ``diag(A)`` are unbiased (in exact arithmetic, for a
symmetric ``A``; XTrace uses the improved normalisation of Epperly, Tropp & Webber, which
rescales each residual vector ``(I - P_i) w_i`` to the norm ``sqrt(n - s + 1)`` and
makes ``tr(c I)`` exact). SLQ (``method="slq"``, ``tr f(A)``) is unbiased only for
polynomials ``f`` of degree ``<= 2 num_steps - 1``: for other ``f`` the Gauss quadrature
adds a bias that can dwarf the standard error (``tr log A`` with 4 steps: 48.9 -/+ 0.85
for an exact -115.1), reported apart (and only roughly) by ``quadrature_error``.

Standard errors: for Hutchinson, the Hutchinson part of Hutch++ and SLQ, the sample
standard deviation over probes divided by ``sqrt(probes)`` (i.i.d. samples;
:meth:`TraceEstimate.interval` uses the Student-t quantile with ``probes - 1`` degrees of
freedom); for the exchangeable estimators, the standard deviation of the ``s``
leave-one-out estimates divided by ``sqrt(s)``, the error estimate of Epperly, Tropp &
Webber. Those estimates are dependent, so it is a heuristic that tends to be small:
nominal 95% intervals covered 0.73 to 0.89 of the exact traces in the review's
experiments (n = 150 to 1000, 30 products; ``tests/test_trace.py`` checks the standard
error against the spread over seeds within a factor 2). With ``num_matvecs >= n`` the
exact value is computed from ``n`` products with unit vectors.

Numerically low-rank sketches: when ``A W`` has numerical rank ``r < s`` (singular values
of ``R`` below ``s eps_eff sigma_max(R)``), the leave-one-out projectors are not formed
(``R^{-1}`` would amplify the products' rounding). The operator need not be low rank: the
cut-off singular values can carry a trace of up to ``~ n s eps_eff ||A||`` (``e1 e1^T +
1e-7 I`` in float32). XTrace then returns ``tr(P A)`` (``P`` the projector on the ``r``
leading directions) plus the mean of the Hutchinson terms ``x_i^T A x_i`` of the rest
(``x_i = (I - P) w_i`` normalised to the norm ``sqrt(n - r)``), with their standard
error; XDiag likewise ``diag(P A) + w_i * ((I - P) A w_i)``. ``P`` is fitted to the same
test vectors, so these rest terms are biased by a fraction of the rest itself (per entry
for XDiag: up to ~40% of a 1e-7 floor entry in ``tests/test_trace.py``, not covered by
the standard error); for an operator of exact rank ``r`` they are rounding.

Symmetry: the module assumes a symmetric operator. XDiag uses ``Z = A Q`` where its
authors use ``A^T Q``: for a non-symmetric ``A`` it estimates ``diag(A) + diag(A P_i) -
diag(P_i A)``, which is biased (no check is made; XTrace and Hutchinson estimate
``tr(A)`` and ``diag(A)`` of any square ``A``). :func:`specdens.lanczos` and
:func:`specdens.kpm` warn on asymmetry.

The ``n x s`` blocks stay in the operator's array library and on its device; the
``s x s`` matrices of the sketching methods are solved on the host in float64.

Scale: the estimates are equivariant under ``A -> c A`` (``est(c A) = c est(A)`` up to
rounding) for every ``c`` at which the operator's products are representable. The
sketching methods work in units of a power of two near ``max |R|`` (XTrace, XDiag) or
``max |A W|`` (the Nyström methods), so that no square or inverse of the operator's
scale is formed, and the standard errors are computed from samples divided by their
largest magnitude (per entry for the diagonal). An estimate that still leaves the
floating range (a trace beyond ``1.8e308``) is refused with a ``FloatingPointError``
rather than returned as Inf or NaN.

Rounding: the Nyström shift ``nu = eps_eff ||A W||_F / sqrt(n)`` (Epperly, Tropp &
Webber's code; ``sqrt(n) eps_eff ||A W||_F`` only when that leaves the Gram matrix
indefinite) and the tests for a negative ``w^T A w`` and a
numerically rank-deficient sketch use ``eps_eff``, the larger of the working dtype's
epsilon and that of the dtype the operator's products are rounded to (a float32
operator, or ``dtype="float32"``), as :func:`specdens.lanczos` does.

References
----------
M. F. Hutchinson (1989), A stochastic estimator of the trace of the influence matrix for
Laplacian smoothing splines. Comm. Statist. Simul. Comput. 18(3).
C. Bekas, E. Kokiopoulou, Y. Saad (2007), An estimator for the diagonal of a matrix.
Appl. Numer. Math. 57.
R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff (2021), Hutch++: optimal stochastic trace
estimation. SOSA.
R. Baston, Y. Nakatsukasa (2022), Stochastic diagonal estimation: probabilistic bounds and
an improved algorithm. arXiv:2201.10684.
E. N. Epperly, J. A. Tropp, R. J. Webber (2024), XTrace: making the most of every sample in
stochastic trace estimation. SIAM J. Matrix Anal. Appl. 45(1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import solve_triangular
from scipy.stats import t as student_t

from .. import _array, _checks
from ..density import estimate_from_samples, normal_quantile, pow2_units
from .probes import probe_block

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace", "xnystrace", "slq")
DIAGONAL_METHODS = ("hutchinson", "hutch++", "xdiag", "xnysdiag")
_DIAGONAL_ALIASES = {"xtrace": "xdiag", "xnystrace": "xnysdiag", "diag++": "hutch++"}

# Disjoint probe streams for the roles of the random vectors (probe i of a role is probe
# OFFSET + i of the seed's counter-based streams).
_SKETCH, _TEST = 0, 1 << 40


@dataclass(frozen=True, repr=False)
class TraceEstimate:
    """An estimate of ``tr(A)`` (or ``tr f(A)``).

    Attributes
    ----------
    value
        The estimate (also available as :attr:`mean`).
    stderr
        Its standard error (0 when exact; NaN when the method cannot estimate it).
    matvecs
        Products with single vectors spent.
    method
        The estimator that ran (``"exact"`` when ``num_matvecs >= n``).
    n
        Size of the operator.
    num_samples
        Number of terms averaged (probes, or leave-one-out estimates).
    quadrature_error
        For ``method="slq"``: the bias estimate of the Gauss quadrature (see
        :class:`specdens.Estimate`); NaN otherwise.
    """

    value: float
    stderr: float
    matvecs: int
    method: str
    n: int
    num_samples: int
    quadrature_error: float = float("nan")

    @property
    def mean(self) -> float:
        """The estimate (alias of :attr:`value`)."""
        return self.value

    def __float__(self) -> float:
        return float(self.value)

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Confidence interval ``value -/+ t * stderr``, ``t`` the two-sided Student-t
        quantile of ``confidence`` with ``num_samples - 1`` degrees of freedom (the
        normal quantile for a single sample, whose stderr is NaN, or an exact value).

        For the i.i.d. samples of Hutchinson, Hutch++ and SLQ this is the usual
        small-sample interval (exact for normal samples; with 4 Hutch++ samples the
        normal quantile covered 0.86 instead of 0.95). For XTrace and XNysTrace the
        standard error is the leave-one-out heuristic of Epperly, Tropp & Webber, and
        the interval covers less than ``confidence`` (see the module notes)."""
        z = normal_quantile(confidence)
        if self.num_samples >= 2 and self.stderr > 0:
            z = float(student_t.ppf(0.5 + 0.5 * float(confidence), self.num_samples - 1))
        return (self.value - z * self.stderr, self.value + z * self.stderr)

    def __repr__(self) -> str:
        quad = (f", quadrature_error={self.quadrature_error:.3g}"
                if math.isfinite(self.quadrature_error) else "")
        return (f"TraceEstimate(value={self.value:.8g}, stderr={self.stderr:.3g}, "
                f"matvecs={self.matvecs}, method={self.method!r}{quad})")


@dataclass(frozen=True, repr=False)
class DiagonalEstimate:
    """An estimate of ``diag(A)``.

    Attributes
    ----------
    value, stderr
        Arrays of shape ``(n,)`` in the operator's array library, on its device, in the
        working dtype (also available as :attr:`mean`).
    matvecs, method, n, num_samples
        As for :class:`TraceEstimate`.
    """

    value: Any
    stderr: Any
    matvecs: int
    method: str
    n: int
    num_samples: int

    @property
    def mean(self) -> Any:
        """The estimate (alias of :attr:`value`)."""
        return self.value

    def __repr__(self) -> str:
        v = _array.to_numpy(self.value)
        se = _array.to_numpy(self.stderr)
        return (f"DiagonalEstimate(n={self.n}, value=[{v.min():.4g} .. {v.max():.4g}], "
                f"median stderr={float(np.median(se)):.3g}, matvecs={self.matvecs}, "
                f"method={self.method!r})")


# -- small helpers ------------------------------------------------------------------------
class _Ctx:
    """The operator, its namespace, device and working dtype, and a product counter."""

    def __init__(self, op: Any, dtype: Any):
        self.op, self.n = _checks.operator_of(op)
        self.xp, self.device = self.op.xp, self.op.device
        _array.check_supported_dtype(self.op.dtype)
        self.work = _checks.work_dtype(dtype, self.op)
        self.wdt = _array.xp_dtype(self.xp, self.work)
        # the rounding the products carry: the working dtype's, or coarser when the
        # operator computes (or says it computes) in a lower precision
        self.eps = max(_array.finfo_eps(self.work),
                       _array.finfo_eps(_checks.product_dtype(self.op)))
        self.matvecs = 0

    def apply(self, X: Any) -> Any:
        """``A X`` for ``X`` of shape ``(n, b)`` in the working dtype."""
        xp = self.xp
        Y = _array.detached(self.op.matmat(xp.astype(X, self.op.dtype, copy=False)))
        self.matvecs += int(X.shape[1])
        if self.matvecs == int(X.shape[1]):
            _checks.check_product(self.op, Y, int(X.shape[1]))
        Y = xp.astype(Y, self.wdt, copy=False)
        if not bool(_array.to_numpy(xp.all(xp.isfinite(Y)), bool)):
            raise FloatingPointError("the operator returned NaN or Inf; specdens never "
                                     "averages such values in. Check the operator.")
        return Y

    def vectors(self, kind: str, seed: int, first: int, count: int) -> Any:
        """``count`` random vectors as columns ``(n, count)``: Rademacher with entries
        +-1, or uniform on the sphere of radius ``sqrt(n)`` (``E[w w^T] = I`` for both)."""
        rows, _ = probe_block("rademacher" if kind == "rademacher" else "sphere", self.n,
                              seed, range(first, first + count), self.xp, self.device, self.wdt)
        return self.xp.matrix_transpose(rows) * math.sqrt(self.n)

    def host(self, X: Any) -> np.ndarray:
        return _array.to_numpy(X)

    def dev(self, X: np.ndarray) -> Any:
        return _array.from_numpy(np.ascontiguousarray(X), self.xp, self.device, self.wdt)

    def mm(self, A: Any, B: Any) -> Any:
        return self.xp.matmul(A, B)

    def t(self, A: Any) -> Any:
        return self.xp.matrix_transpose(A)

    def absmax(self, X: Any) -> float:
        """``max |X|`` on the host (0 for an empty array)."""
        if X.shape[0] == 0 or X.shape[1] == 0:
            return 0.0
        return float(self.host(self.xp.max(self.xp.abs(X))))


def _orth(ctx: _Ctx, Y: Any) -> tuple[Any, np.ndarray]:
    """Thin QR of ``Y`` (``n x s``): ``Q`` on the device, ``R`` on the host."""
    xp = ctx.xp
    linalg = getattr(xp, "linalg", None)
    if linalg is not None and hasattr(linalg, "qr"):
        Q, R = linalg.qr(Y)
        return Q, ctx.host(R)
    Qh, Rh = np.linalg.qr(ctx.host(Y))
    return ctx.dev(Qh), Rh


def _colsums(ctx: _Ctx, X: Any) -> np.ndarray:
    return ctx.host(ctx.xp.sum(X, axis=0))


def _check_num_matvecs(num_matvecs: Any, minimum: int, method: str) -> int:
    m = _checks.positive_int(num_matvecs, "num_matvecs")
    if m < minimum:
        raise ValueError(f"method={method!r} needs num_matvecs >= {minimum}; got {m}")
    return m


def _numerical_rank(R: np.ndarray, eps: float) -> tuple[int, np.ndarray]:
    """Rank of ``R`` (to ``s * eps * sigma_max``, ``eps`` the products' rounding) and its
    left singular vectors."""
    U, sv, _ = np.linalg.svd(R)
    tol = R.shape[0] * eps * (sv[0] if sv.size else 0.0)
    return int(np.sum(sv > tol)), U


def _not_finite(what: str) -> FloatingPointError:
    return FloatingPointError(
        f"the {what} is not finite: the operator's values are so large that the estimate "
        "(or the sums that form it) leave the floating-point range; specdens does not "
        "return Inf or NaN as an estimate. Scale the operator down.")


def _finish_scalar(samples: np.ndarray, offset: float, matvecs: int, method: str, n: int,
                   scale: float = 1.0) -> TraceEstimate:
    """Mean and standard error of ``scale * (offset + samples)``."""
    samples = np.asarray(samples, dtype=np.float64)
    k = samples.size
    if not np.all(np.isfinite(samples)) or not math.isfinite(offset):
        raise _not_finite("trace estimate")
    est = estimate_from_samples(samples)   # (in units where no square overflows)
    se = est.stderr * scale if k > 1 else float("nan")
    value = (offset + est.value) * scale
    if not math.isfinite(value) or (k > 1 and not math.isfinite(se)):
        raise _not_finite("trace estimate")
    return TraceEstimate(value, se, matvecs, method, n, k)


# -- trace ------------------------------------------------------------------------------
def trace(
    op: Any,
    *,
    num_matvecs: int = 100,
    method: str | None = None,
    f: Callable[[np.ndarray], np.ndarray] | None = None,
    seed: int = 0,
    num_steps: int | None = None,
    block_size: int = 64,
    dtype: Any = None,
    **slq_kwargs: Any,
) -> TraceEstimate:
    """Estimate ``tr(A)`` (or ``tr f(A)``) from ``num_matvecs`` matrix-vector products.

    Parameters
    ----------
    op
        A symmetric operator (anything :func:`specdens.aslinearoperator` accepts);
        positive semi-definite for ``method="xnystrace"``.
    num_matvecs
        The budget of products with single vectors: Hutchinson uses them all as probes;
        Hutch++ a third each for the sketch, for ``A Q`` and for the Hutchinson part;
        XTrace half for ``s = num_matvecs // 2`` test vectors and half for ``A Q``;
        XNysTrace all as test vectors; SLQ ``num_matvecs // num_steps`` probes of
        ``num_steps`` Lanczos steps. With ``num_matvecs >= n`` and no ``f`` the exact
        trace is computed from ``n`` products with unit vectors, whatever the method
        (``"slq"`` included: its other arguments then have nothing to do); ``tr f(A)``
        is always estimated by SLQ.
    method
        ``"xtrace"`` (the default without ``f``), ``"hutchinson"``, ``"hutch++"``,
        ``"xnystrace"`` or ``"slq"`` (the default with ``f``); see the module notes.
    f
        A vectorised function: estimate ``tr f(A)`` by stochastic Lanczos quadrature
        (``method="slq"``, chosen when ``f`` is given). For several functions from one
        Lanczos run, use :func:`trace_functions`.
    seed
        Seed of the random vectors (counter-based, as the probes of :func:`specdens.slq`).
    num_steps
        Lanczos steps per probe for ``method="slq"`` (default 30; at most ``n``: a larger
        value is capped at ``n`` before the budget is split). Other methods refuse it
        (``TypeError``) rather than ignore it.
    block_size
        Hutchinson probes per block of products (memory: ``n * block_size`` values).
    dtype
        Working dtype, ``"float64"`` (default where available) or ``"float32"``.
    **slq_kwargs
        For ``method="slq"``: more arguments of :func:`specdens.slq` (e.g. ``deflate``),
        but not ``num_probes``: here it is ``num_matvecs // num_steps`` (for a probe count,
        call :func:`trace_functions`).

    Returns
    -------
    TraceEstimate

    Raises
    ------
    ValueError
        For an unknown method, a budget too small for it, ``f`` with another method than
        ``"slq"``, or, with ``"xnystrace"``, an operator that is not positive
        semi-definite (a negative ``w^T A w`` or a Gram matrix ``W^T A W`` that is not
        positive definite).
    TypeError
        For ``num_steps`` or arguments of :func:`specdens.slq` with another method, or
        ``num_probes``.
    FloatingPointError
        When the operator returns NaN or Inf, or the estimate leaves the floating-point
        range.
    """
    if method is None:
        method = "slq" if f is not None else "xtrace"
    if method not in TRACE_METHODS:
        raise ValueError(f"method={method!r}; choose one of {', '.join(TRACE_METHODS)}")
    if f is not None and method != "slq":
        raise ValueError(f"trace(f=...) estimates tr f(A) by stochastic Lanczos quadrature: use "
                         f"method='slq' (got method={method!r})")
    if method != "slq" and (slq_kwargs or num_steps is not None):
        extra = (["num_steps"] if num_steps is not None else []) + list(slq_kwargs)
        raise TypeError(f"unexpected arguments for method={method!r}: {', '.join(extra)} "
                        "(only method='slq' takes them)")
    if "num_probes" in slq_kwargs:
        raise TypeError(
            "trace(method='slq') takes no num_probes: it runs num_matvecs // num_steps probes "
            f"of num_steps Lanczos steps (num_probes={slq_kwargs['num_probes']!r} would be "
            f"num_matvecs=num_probes * num_steps); for a probe count, call trace_functions")
    if method == "slq":
        num_steps = _checks.positive_int(30 if num_steps is None else num_steps, "num_steps")
        op = _checks.operator_of(op)[0]
        # more than n steps cannot run (the Krylov space is all of R^n after n): cap first,
        # so that the budget buys num_matvecs // num_steps probes of the steps that run
        num_steps = min(num_steps, int(op.shape[0]))
        m = _check_num_matvecs(num_matvecs, 2 * num_steps, "slq")
        if f is None and m >= int(op.shape[0]):
            # tr(A) itself, and the budget reaches n: exact, as for the other methods
            ctx = _Ctx(op, dtype)
            block_size = _checks.positive_int(block_size, "block_size")
            _checks.agree_on_run(ctx.op, "trace", method=method, num_matvecs=m,
                                 block_size=block_size, seed=seed, dtype=ctx.work)
            return _exact_trace(ctx, block_size)
        out = trace_functions(op, [f if f is not None else (lambda t: t)], num_steps=num_steps,
                              num_probes=m // num_steps, seed=seed, dtype=dtype, **slq_kwargs)
        return out[0]
    ctx = _Ctx(op, dtype)
    minimum = {"hutchinson": 1, "hutch++": 3, "xtrace": 4, "xnystrace": 2}[method]
    m = _check_num_matvecs(num_matvecs, minimum, method)
    block_size = _checks.positive_int(block_size, "block_size")
    _checks.agree_on_run(ctx.op, "trace", method=method, num_matvecs=m, block_size=block_size,
                         seed=seed, dtype=ctx.work)
    if m >= ctx.n:
        return _exact_trace(ctx, block_size)
    if method == "hutchinson":
        samples = _hutchinson_forms(ctx, m, seed, _TEST, block_size)
        return _finish_scalar(samples, 0.0, ctx.matvecs, method, ctx.n)
    if method == "hutch++":
        return _hutchpp_trace(ctx, m, seed, block_size)
    if method == "xtrace":
        return _xtrace(ctx, m // 2, seed)
    return _xnystrace(ctx, m, seed)


def _exact_trace(ctx: _Ctx, block_size: int) -> TraceEstimate:
    total = 0.0
    n = ctx.n
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        E = np.zeros((n, stop - start))
        E[np.arange(start, stop), np.arange(stop - start)] = 1.0
        Y = ctx.host(ctx.apply(ctx.dev(E)))
        total += float(np.sum(Y[np.arange(start, stop), np.arange(stop - start)]))
    if not math.isfinite(total):
        raise _not_finite("trace")
    return TraceEstimate(total, 0.0, ctx.matvecs, "exact", n, n)


def _hutchinson_forms(ctx: _Ctx, count: int, seed: int, offset: int, block_size: int,
                      Q: Any = None) -> np.ndarray:
    """``w^T B w`` for Rademacher ``w`` (``count`` of them), ``B = A`` or, given ``Q``,
    ``(I - QQ^T) A (I - QQ^T)``."""
    out = []
    for start in range(0, count, block_size):
        b = min(block_size, count - start)
        W = ctx.vectors("rademacher", seed, offset + start, b)
        if Q is not None:
            W = W - ctx.mm(Q, ctx.mm(ctx.t(Q), W))
        out.append(_colsums(ctx, W * ctx.apply(W)))
        del W
    return np.concatenate(out) if out else np.zeros(0)


def _hutchpp_trace(ctx: _Ctx, m: int, seed: int, block_size: int) -> TraceEstimate:
    s = m // 3
    g = m - 2 * s
    S = ctx.vectors("sphere", seed, _SKETCH, s)
    Q, _ = _orth(ctx, ctx.apply(S))
    del S
    low = float(np.trace(ctx.host(ctx.mm(ctx.t(Q), ctx.apply(Q)))))
    samples = _hutchinson_forms(ctx, g, seed, _TEST, block_size, Q=Q)
    return _finish_scalar(samples, low, ctx.matvecs, "hutch++", ctx.n)


def _xtrace_parts(ctx: _Ctx, s: int, seed: int, kind: str):
    """Test vectors, ``Q``, ``R``, ``Z = A Q`` and the small matrices of XTrace/XDiag."""
    Om = ctx.vectors(kind, seed, _SKETCH, s)
    Y = ctx.apply(Om)
    Q, R = _orth(ctx, Y)
    del Y
    Z = ctx.apply(Q)
    return Om, Q, R, Z


def _unit_columns_of_inverse_transpose(R: np.ndarray) -> np.ndarray:
    """The columns of ``R^{-T}`` normalised to unit length, for ``R`` of full numerical
    rank scaled to ``max |R|`` in ``[1, 2)`` (so ``||R^{-1}|| <= 1 / (s eps)``: the
    squares of the column norms stay far inside the floating range)."""
    s = R.shape[0]
    Sm = solve_triangular(R, np.eye(s), lower=False).T
    return Sm / np.linalg.norm(Sm, axis=0)[None, :]


def _xtrace(ctx: _Ctx, s: int, seed: int) -> TraceEstimate:
    Om, Q, R, Z = _xtrace_parts(ctx, s, seed, "sphere")
    if not np.all(np.isfinite(R)):
        raise _not_finite("sketch A W (its QR factor)")
    # work in units of rho ~ max |R| ~ the operator's scale: R^{-1} then neither overflows
    # nor underflows (the results are multiplied back by rho at the end)
    rho = pow2_units(float(np.max(np.abs(R))) if R.size else 0.0)
    R = R / rho
    H = ctx.host(ctx.mm(ctx.t(Q), Z)) / rho
    W = ctx.host(ctx.mm(ctx.t(Q), Om))
    T = ctx.host(ctx.mm(ctx.t(Z), Om)) / rho
    rank, U = _numerical_rank(R, ctx.eps)
    if rank < s:
        # A Omega has numerical rank r < s at the products' rounding: R^{-1} would amplify
        # that rounding, so the leave-one-out projectors are not formed. This does not
        # make A low rank: the singular values cut off (up to s eps_eff sigma_max(R) each)
        # can add up to a trace of ~ n s eps_eff ||A|| (e.g. e1 e1^T + 1e-7 I in float32).
        # The estimate i is tr(P A) + the Hutchinson term x_i^T A x_i of the rest, with
        # P = Q U_r U_r^T Q^T and x_i = (I - P) w_i scaled to the norm sqrt(n - r)
        # (A w_i = Q r_i). P is fitted to the same vectors, so the rest term is slightly
        # biased, by a fraction of the rest itself; for an A of exact rank r it is 0 up
        # to rounding (and so is the standard error).
        Ur = U[:, :rank]
        UUw = Ur @ (Ur.T @ W)                                   # Q^T P w_i
        low = float(np.trace(Ur.T @ H @ Ur))
        rest = (np.einsum("ij,ij->j", W, R) - np.einsum("ij,ij->j", T, UUw)
                - np.einsum("ij,ij->j", UUw, R) + np.einsum("ij,ij->j", UUw, H @ UUw))
        x2 = ctx.n - np.sum(UUw * UUw, axis=0)                  # ||(I - P) w_i||^2
        scale = (ctx.n - rank) / np.where(x2 > 0, x2, 1.0)
        return _finish_scalar(rest * scale, low, ctx.matvecs, "xtrace", ctx.n, scale=rho)
    # Leave-one-out: span(Y without column i) = Q (I - s_i s_i^T) with s_i the unit
    # column i of R^{-T}; the estimate i is tr(P_i A) + x_i^T A x_i, x_i = (I - P_i) w_i.
    Sm = _unit_columns_of_inverse_transpose(R)
    HS = H @ Sm
    low = np.trace(H) - np.einsum("ij,ij->j", Sm, HS)
    c = np.einsum("ij,ij->j", Sm, W)                       # s_i^T w_i
    wHw = np.einsum("ij,ij->j", W, H @ W)
    tw = np.einsum("ij,ij->j", T, W)
    ts = np.einsum("ij,ij->j", T, Sm)
    wHs = np.einsum("ij,ij->j", W, HS)
    sHw = np.einsum("ij,ij->j", Sm, H @ W)
    sr = np.einsum("ij,ij->j", Sm, R)
    sHs = np.einsum("ij,ij->j", Sm, HS)
    resid = wHw - tw + c * (ts - wHs - sHw + sr) + c * c * sHs   # x_i^T A x_i
    # the improved normalisation of Epperly, Tropp & Webber (their xtrace_helper,
    # "improved"): x_i = (I - P_i) w_i is rescaled to the norm sqrt(n - s + 1) of a
    # uniform vector on the sphere of range(I - P_i) (w_i is uniform on the sphere of
    # radius sqrt(n) and independent of P_i, so the estimate stays unbiased), which makes
    # it exact for A = c I; ||x_i||^2 = n - ||P_i w_i||^2 = n - ||w_i||^2 + (s_i^T w_i)^2
    x2 = ctx.n - np.sum(W * W, axis=0) + c * c
    scale = (ctx.n - s + 1) / np.where(x2 > 0, x2, 1.0)
    return _finish_scalar(low + resid * scale, 0.0, ctx.matvecs, "xtrace", ctx.n, scale=rho)


def _nystrom_parts(ctx: _Ctx, s: int, seed: int, kind: str):
    """``B = Y_nu C^{-1}``, ``X = C^{-T}``, the shift, the test vectors of XNysTrace and
    the unit ``scale`` (a power of two near ``max |A W|``) that ``B B^T`` and ``nu`` are
    measured in (``B`` and ``X`` are None when ``Y = A W`` is exactly 0: every estimate
    is then 0)."""
    Om = ctx.vectors(kind, seed, _SKETCH, s)
    Y = ctx.apply(Om)
    amax = ctx.absmax(Y)
    if amax == 0.0:
        # A W = 0: the Nyström approximation and every residual term w^T A w vanish, so
        # each estimate is exactly 0 (the zero operator is positive semi-definite).
        return Om, None, None, 0.0, 1.0
    unit = pow2_units(amax)
    Y = Y / unit  # exact (a power of two); max |Y| in [1, 2): no square over/underflows
    G = ctx.host(ctx.mm(ctx.t(Om), Y))
    G = 0.5 * (G + G.T)
    d = np.diag(G)
    scale = float(np.max(np.abs(G))) if G.size else 0.0
    if np.any(d < -s * ctx.eps * scale * 10):
        i = int(np.argmin(d))
        raise ValueError(
            f"the Nyström methods need a positive semi-definite operator, but w^T A w = "
            f"{d[i]:.3e} < 0 for a test vector: the operator is indefinite. Use "
            "method='xtrace' (or 'hutch++') for indefinite operators."
        )
    fro = float(np.sqrt(np.sum(_colsums(ctx, Y * Y))))  # in [1, 2 sqrt(n s))
    # The shift of Epperly, Tropp & Webber's code (xnystrace_helper: eps ||Y||_F /
    # sqrt(n)), at the rounding eps_eff the products carry. Since W^T W ~ n I, it adds
    # ~ sqrt(n) eps ||Y||_F I to the Gram matrix W^T Y, which covers the perturbation
    # W^T dY (||W|| ~ sqrt(n), ||dY|| <= eps ||Y||_F) by products rounded entrywise. A
    # product whose accumulated rounding exceeds that (a dense float32 product) may
    # leave the Gram matrix indefinite: then once more with a shift n times larger
    # (sqrt(n) eps ||Y||_F, which costs accuracy: -n nu is part of the estimate) before
    # calling the operator indefinite.
    WtW = ctx.host(ctx.mm(ctx.t(Om), Om))
    for nu in (float(ctx.eps * fro / math.sqrt(ctx.n)), float(ctx.eps * fro * math.sqrt(ctx.n))):
        Gnu = G + nu * WtW
        try:
            C = np.linalg.cholesky(0.5 * (Gnu + Gnu.T)).T  # upper: G = C^T C
            break
        except np.linalg.LinAlgError:
            continue
    else:
        raise ValueError(
            "the Nyström methods need a positive semi-definite operator, but the Gram matrix "
            "W^T A W of the test vectors is not positive definite: the operator is "
            "indefinite. Use method='xtrace' (or 'hutch++') for indefinite operators."
        )
    Y = Y + nu * Om
    Cinv = solve_triangular(C, np.eye(s), lower=False)
    B = ctx.mm(Y, ctx.dev(Cinv))
    X = Cinv.T  # C^{-T}; column i is C^{-T} e_i
    return Om, B, X, nu, unit


def _xnystrace(ctx: _Ctx, s: int, seed: int) -> TraceEstimate:
    # Nyström A_nu ~ B B^T from all s test vectors; leaving out vector i removes the rank
    # one term v_i v_i^T, v_i = Y_nu G^{-1} e_i / sqrt((G^{-1})_ii), and the residual term
    # w_i^T (A_nu - Ahat_(i)) w_i equals 1 / (G^{-1})_ii.
    Om, B, X, nu, unit = _nystrom_parts(ctx, s, seed, "sphere")
    del Om
    if B is None:
        return _finish_scalar(np.zeros(s), 0.0, ctx.matvecs, "xnystrace", ctx.n)
    trA = float(np.sum(_colsums(ctx, B * B)))
    g = np.sum(X * X, axis=0)                      # (G^{-1})_ii
    BX = ctx.mm(B, ctx.dev(X))
    v2 = _colsums(ctx, BX * BX) / g
    samples = trA - v2 + 1.0 / g
    return _finish_scalar(samples, -ctx.n * nu, ctx.matvecs, "xnystrace", ctx.n, scale=unit)


# -- trace of functions by SLQ -------------------------------------------------------------
def trace_functions(
    op: Any,
    fs: Sequence[Callable[[np.ndarray], np.ndarray]] | Mapping[str, Callable],
    *,
    num_steps: int = 90,
    num_probes: int = 10,
    seed: int = 0,
    **slq_kwargs: Any,
) -> list[TraceEstimate] | dict[str, TraceEstimate]:
    """``tr f(A)`` for several functions from one stochastic Lanczos quadrature run.

    Parameters
    ----------
    op
        A symmetric operator.
    fs
        Vectorised functions (a list, or a dict name -> function).
    num_steps, num_probes, seed, **slq_kwargs
        Passed to :func:`specdens.slq` (e.g. ``deflate=k`` removes outliers first).

    Returns
    -------
    list or dict of TraceEstimate
        In the order (or with the keys) of ``fs``; each with its standard error over
        probes and its ``quadrature_error`` (see :class:`specdens.Estimate`), all sharing
        the run's ``matvecs``.
    """
    from .slq import slq

    items = list(fs.items()) if isinstance(fs, Mapping) else list(enumerate(fs))
    if not items:
        raise ValueError("trace_functions needs at least one function")
    for name, fn in items:
        if not callable(fn):
            raise TypeError(f"fs[{name!r}] is not callable")
    d = slq(op, num_steps=num_steps, num_probes=num_probes, seed=seed, **slq_kwargs)
    out = []
    for _, fn in items:
        est = d.trace(fn)
        out.append(TraceEstimate(float(est.value), float(est.stderr), d.matvecs, "slq", d.n,
                                 d.num_probes, float(est.quadrature_error)))
    if isinstance(fs, Mapping):
        return {name: e for (name, _), e in zip(items, out, strict=True)}
    return out


# -- diagonal ---------------------------------------------------------------------------
class _Welford:
    """Running mean and sum of squared deviations of columns, merged block by block
    (Chan, Golub & LeVeque, 1983): no cancellation when the mean dwarfs the spread.

    Each row is kept in units of its largest magnitude so far (``mean`` and ``m2`` of
    ``X / S``, ``m2`` in units of ``S^2``): the squares of the deviations neither
    overflow nor underflow at any representable scale of the samples."""

    def __init__(self) -> None:
        self.count = 0
        self.scale: Any = None   # max |X| per row so far (0 for rows of zeros)
        self.mean: Any = None    # in units of scale
        self.m2: Any = None      # in units of scale^2

    @staticmethod
    def _safe(xp: Any, S: Any) -> Any:
        return xp.where(S > 0, S, xp.ones_like(S))

    def add(self, xp: Any, X: Any) -> None:
        b = int(X.shape[1])
        S_b = xp.max(xp.abs(X), axis=1)
        S = S_b if self.count == 0 else xp.maximum(self.scale, S_b)
        unit = self._safe(xp, S)
        Xs = X / unit[:, None]
        mean_b = xp.sum(Xs, axis=1) / b
        dev = Xs - mean_b[:, None]
        m2_b = xp.sum(dev * dev, axis=1)
        if self.count == 0:
            self.count, self.scale, self.mean, self.m2 = b, S, mean_b, m2_b
            return
        r = self.scale / unit  # <= 1: the old statistics in the new units
        mean_a, m2_a = self.mean * r, self.m2 * (r * r)
        total = self.count + b
        delta = mean_b - mean_a
        self.mean = mean_a + delta * (b / total)
        self.m2 = m2_a + m2_b + delta * delta * (self.count * b / total)
        self.scale = S
        self.count = total

    def value(self, xp: Any) -> Any:
        return self.mean * self._safe(xp, self.scale)

    def stderr(self, xp: Any) -> Any:
        if self.count < 2:
            return self.mean * float("nan")
        return xp.sqrt(self.m2 / (self.count - 1) / self.count) * self._safe(xp, self.scale)


def _finish_diagonal(ctx: _Ctx, acc: _Welford, method: str, unit: float = 1.0
                     ) -> DiagonalEstimate:
    """The estimate from the accumulated samples (in units of ``unit``)."""
    xp = ctx.xp
    value = acc.value(xp) * unit
    stderr = acc.stderr(xp) * unit
    finite = xp.all(xp.isfinite(value))
    if acc.count > 1:
        finite = xp.logical_and(finite, xp.all(xp.isfinite(stderr)))
    if not bool(_array.to_numpy(finite, bool)):
        raise _not_finite("diagonal estimate")
    return DiagonalEstimate(value, stderr, ctx.matvecs, method, ctx.n, acc.count)


def diagonal(
    op: Any,
    *,
    num_matvecs: int = 100,
    method: str = "xdiag",
    seed: int = 0,
    block_size: int = 64,
    dtype: Any = None,
) -> DiagonalEstimate:
    """Estimate ``diag(A)`` from ``num_matvecs`` matrix-vector products.

    Parameters
    ----------
    op
        A symmetric operator; positive semi-definite for ``method="xnysdiag"``.
    num_matvecs
        Budget of products with single vectors, split as in :func:`trace`. With
        ``num_matvecs >= n`` the exact diagonal is computed from ``n`` products.
    method
        ``"xdiag"`` (default), ``"hutchinson"``, ``"hutch++"`` (Diag++) or
        ``"xnysdiag"``; ``"xtrace"`` and ``"xnystrace"`` are accepted as aliases of the
        last two.
    seed, block_size, dtype
        As for :func:`trace`.

    Returns
    -------
    DiagonalEstimate
        ``value`` and per-entry ``stderr`` as arrays in the operator's library.

    Raises
    ------
    ValueError
        For an unknown method, a budget too small for it, or an indefinite operator with
        ``"xnysdiag"``.
    FloatingPointError
        When the operator returns NaN or Inf, or the estimate leaves the floating-point
        range.
    """
    method = _DIAGONAL_ALIASES.get(method, method)
    if method not in DIAGONAL_METHODS:
        raise ValueError(f"method={method!r}; choose one of {', '.join(DIAGONAL_METHODS)} "
                         "(or the aliases 'xtrace', 'xnystrace')")
    ctx = _Ctx(op, dtype)
    xp = ctx.xp
    minimum = {"hutchinson": 1, "hutch++": 3, "xdiag": 4, "xnysdiag": 2}[method]
    m = _check_num_matvecs(num_matvecs, minimum, method)
    block_size = _checks.positive_int(block_size, "block_size")
    _checks.agree_on_run(ctx.op, "diagonal", method=method, num_matvecs=m,
                         block_size=block_size, seed=seed, dtype=ctx.work)
    if m >= ctx.n:
        return _exact_diagonal(ctx, block_size)
    if method in ("hutchinson", "hutch++"):
        base = None
        Q = H = None
        g = m
        if method == "hutch++":
            s = m // 3
            g = m - 2 * s
            S = ctx.vectors("sphere", seed, _SKETCH, s)
            Q, _ = _orth(ctx, ctx.apply(S))
            del S
            H = ctx.mm(ctx.t(Q), ctx.apply(Q))
            base = xp.sum(ctx.mm(Q, H) * Q, axis=1)  # diag(Q H Q^T)
        acc = _Welford()
        for start in range(0, g, block_size):
            b = min(block_size, g - start)
            W = ctx.vectors("rademacher", seed, _TEST + start, b)
            AW = ctx.apply(W)
            if Q is not None:
                AW = AW - ctx.mm(Q, ctx.mm(H, ctx.mm(ctx.t(Q), W)))
            acc.add(xp, W * AW)
        out = _finish_diagonal(ctx, acc, method)
        if base is None:
            return out
        value = out.value + base
        if not bool(_array.to_numpy(xp.all(xp.isfinite(value)), bool)):
            raise _not_finite("diagonal estimate")
        return DiagonalEstimate(value, out.stderr, ctx.matvecs, method, ctx.n, acc.count)
    unit = 1.0
    if method == "xdiag":
        s = m // 2
        Om, Q, R, Z = _xtrace_parts(ctx, s, seed, "rademacher")
        if not np.all(np.isfinite(R)):
            raise _not_finite("sketch A W (its QR factor)")
        # in units of a power of two near max |R| (see _xtrace)
        unit = pow2_units(float(np.max(np.abs(R))) if R.size else 0.0)
        R = R / unit
        Z = Z / unit
        rank, U = _numerical_rank(R, ctx.eps)
        if rank < s:
            # numerical rank r < s (see _xtrace): diag(P A) with P = Q U_r U_r^T Q^T, plus
            # the Hutchinson term w_i * ((I - P) A w_i) = w_i * (Q (I - U_r U_r^T) r_i) of
            # what the cut-off singular values leave (0 up to rounding for an A of exact
            # rank r)
            Ur = U[:, :rank]
            Urd = ctx.dev(Ur)
            base = xp.sum(ctx.mm(Q, Urd) * ctx.mm(Z, Urd), axis=1)
            D = base[:, None] + Om * ctx.mm(Q, ctx.dev(R - Ur @ (Ur.T @ R)))
            acc = _Welford()
            acc.add(xp, D)
            return _finish_diagonal(ctx, acc, method, unit)
        Sm = _unit_columns_of_inverse_transpose(R)
        sr = np.einsum("ij,ij->j", Sm, R)            # s_i^T r_i
        QS = ctx.mm(Q, ctx.dev(Sm))
        ZS = ctx.mm(Z, ctx.dev(Sm))
        base = xp.sum(Q * Z, axis=1)                  # diag(Q Z^T) = diag(Q Q^T A)
        # estimate i: diag(P_i A) + w_i * ((I - P_i) A w_i), with (I - P_i) A w_i =
        # Q s_i (s_i^T r_i) and diag(P_i A) = diag(Q Z^T) - (Q s_i) * (Z s_i).
        D = base[:, None] - QS * ZS + Om * QS * ctx.dev(sr[None, :])
    else:  # xnysdiag
        s = m
        Om, B, X, nu, unit = _nystrom_parts(ctx, s, seed, "rademacher")
        if B is None:
            D = xp.zeros_like(Om)
        else:
            g = np.sum(X * X, axis=0)
            V = ctx.mm(B, ctx.dev(X / np.sqrt(g)[None, :]))    # columns v_i
            base = xp.sum(B * B, axis=1)                          # diag(B B^T)
            # estimate i: diag(Ahat - v_i v_i^T) + w_i * v_i / sqrt(g_ii) - nu.
            D = (base[:, None] - V * V + Om * V * ctx.dev(1.0 / np.sqrt(g)[None, :])) - nu
    acc = _Welford()
    acc.add(xp, D)
    return _finish_diagonal(ctx, acc, method, unit)


def _exact_diagonal(ctx: _Ctx, block_size: int) -> DiagonalEstimate:
    n = ctx.n
    parts = []
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        E = np.zeros((n, stop - start))
        E[np.arange(start, stop), np.arange(stop - start)] = 1.0
        Y = ctx.apply(ctx.dev(E))
        parts.append(ctx.xp.sum(Y * ctx.dev(E), axis=0))
    value = ctx.xp.concat(parts, axis=0)
    return DiagonalEstimate(value, value * 0.0, ctx.matvecs, "exact", n, n)
