"""The kernel polynomial method (KPM): a second, independent density estimator.

The operator is mapped to ``B = (A - c I) / h`` with spectrum strictly inside
``(-1, 1)``; Chebyshev moments ``mu_k = u^T T_k(B) u`` of unit probes ``u`` (the same
probe streams as :func:`specdens.slq`) are computed by the three-term recurrence with
the doubling trick ``mu_{2k} = 2 <t_k, t_k> - mu_0``, ``mu_{2k+1} = 2 <t_{k+1}, t_k> -
mu_1`` (``t_k = T_k(B) u``), so ``N`` moments cost ``floor(N / 2)`` products per probe.
The density is the Jackson-damped Chebyshev series

``rho(x) = [g_0 mu_0 + 2 sum_{k >= 1} g_k mu_k T_k(x)] / (pi sqrt(1 - x^2))``

with ``g_k = [(N - k + 1) cos(pi k / (N + 1)) + sin(pi k / (N + 1)) cot(pi / (N + 1))]
/ (N + 1)`` (Weiße, Wellein, Alvermann & Fehske, 2006, eq. 71).

Accuracy
--------
The Jackson kernel is non-negative, so the KPM measure is the probe measure
(``sum_j (u^T q_j)^2 delta(lambda_j)``, averaged over probes) smeared by a kernel
centred near each eigenvalue ``y`` (mapped units) with mean ``g_1 y`` and second moment
about ``y``

``E(X - y)^2 = (1 - g_2) / 2 + y^2 (1 - 2 g_1 + g_2) <= (1 - g_2) / 2 ~ (pi / (N + 1))^2``

(the last step since ``1 - 2 g_1 + g_2 < 0``). Hence the Wasserstein-1 distance between
the KPM measure and the probe measure is at most :meth:`KPMDensity.resolution`,
``h sqrt((1 - g_2) / 2) ~ pi (b - a) / (2 (N + 1))`` for the interval ``[a, b] =
[c - h, c + h]``: features narrower than that are smeared. The probe measure itself
differs from the spectrum by the Hutchinson noise, as for SLQ. Moments ``tr(A^p)/n`` for
``p < N`` come from the undamped Chebyshev moments and are exact per probe (unbiased).

Spectral bounds come from a short Lanczos run (:func:`specdens.lanczos`, ``bound_steps``
steps from each of ``2`` Gaussian probes of their own, in one block): the smallest and
largest Ritz values over both probes, each widened by its residual norm, then the
half-width multiplied by ``1 + widen`` so that the spectrum lies strictly inside
``(-1, 1)``. The probes are Gaussian, not Rademacher: a Rademacher vector is orthogonal to
fixed vectors with positive probability (to ``(1, -1, 0, ...)`` with probability 1/2, and
for the block ``[[0, 5], [5, 0]]`` always to one of its eigenvectors), and then no number
of steps finds that eigenvalue, while a Gaussian vector is orthogonal to a fixed vector
with probability 0. A Krylov space still reaches an extreme eigenvalue only as fast as
the probe's component along it allows (Kuczyński & Woźniakowski, 1992); the second probe
makes a bound that falls short of it much less likely (both must fall short), for
``bound_steps`` more products in the same block. A spectrum that still leaks out makes
``|mu_k| > 1`` grow exponentially; that is detected and reported (pass ``bounds=`` to
fix), as is a recurrence that overflows because the interval is far too narrow (the
operator is blamed only when it returns NaN or Inf for a vector the recurrence had not
yet blown up).

References
----------
A. Weiße, G. Wellein, A. Alvermann, H. Fehske (2006), The kernel polynomial method. Rev.
Mod. Phys. 78, 275-306.
L. Lin, Y. Saad, C. Yang (2016), Approximating spectral densities of large matrices. SIAM
Review 58(1).
J. Kuczyński, H. Woźniakowski (1992), Estimating the largest eigenvalue by the power and
Lanczos algorithms with a random start. SIAM J. Matrix Anal. Appl. 13(4).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.polynomial import chebyshev as C

from .. import _array, _checks
from ..density import Estimate, SpectralBounds, SpectralDensity, estimate_from_samples
from .lanczos import LanczosWarning, _lanczos
from .probes import PROBE_KINDS, check_seed, probe_block

KERNELS = ("jackson", "dirichlet")
_BOUND_PROBE = 1 << 41  # probe index of the bounds' Lanczos run (a stream of its own)
_BOUND_PROBES = 2       # Gaussian probes of the bounds' Lanczos run (see the module notes)
# The symmetry check computes the moments <u, t_k> directly for k = 2 .. _SYMMETRY_K only
# (one row dot per product; for all K it cost 3-16% on a cheap sparse operator). An
# asymmetric B shows from k = 2 on: the doubled mu_2 = 2 <Bu, Bu> - 1 and the direct
# <u, (2 B^2 - I) u> differ by 2 <u, (B - B^T) B u>, not zero for a random probe unless
# the symmetric part of (B - B^T) B vanishes, and each further k adds other polynomials
# in B and B^T; a fixed handful (7 moments, independent of K) keeps the check's cost
# negligible, and its rounding (~k eps) far below the sqrt(eps) threshold.
_SYMMETRY_K = 8


def jackson_damping(num_moments: int) -> np.ndarray:
    """Jackson kernel coefficients ``g_0 .. g_{N-1}`` (Weiße et al., 2006, eq. 71)."""
    N = int(num_moments)
    k = np.arange(N)
    a = np.pi / (N + 1)
    return ((N - k + 1) * np.cos(a * k) + np.sin(a * k) / np.tan(a)) / (N + 1)


@dataclass(frozen=True, repr=False)
class KPMDensity:
    """Kernel polynomial method estimate of an eigenvalue density.

    Offers the interface of :class:`specdens.SpectralDensity` (``density``, ``cdf``,
    ``moments``, ``trace``, ``fraction_negative``, ``bounds``), so the two estimates can
    be compared.

    Attributes
    ----------
    chebyshev_moments : numpy.ndarray, shape (num_probes, num_moments)
        ``u_i^T T_k(B) u_i`` for each unit probe ``u_i``, ``B = (A - center) / half_width``.
    probe_scales : numpy.ndarray
        Hutchinson scales of the probes (1 except for Gaussian probes).
    center, half_width : float
        The map to ``[-1, 1]``: the density lives on ``[center - half_width, center +
        half_width]``.
    n, num_moments, kernel, seed, probe_kind, matvecs, wall_time
        Run metadata (``matvecs`` includes the bounds' Lanczos run).
    lanczos_bounds : SpectralBounds or None
        The Lanczos Ritz values the interval came from (None when ``bounds`` was given).
    """

    chebyshev_moments: np.ndarray
    probe_scales: np.ndarray
    center: float
    half_width: float
    n: int
    num_moments: int
    kernel: str = "jackson"
    seed: int | None = None
    probe_kind: str = "rademacher"
    matvecs: int = 0
    wall_time: float = float("nan")
    lanczos_bounds: SpectralBounds | None = None
    extra: dict = field(default_factory=dict)

    # -- construction -----------------------------------------------------------
    @classmethod
    def from_spectral_density(cls, density: SpectralDensity, num_moments: int, *,
                              center: float | None = None, half_width: float | None = None,
                              kernel: str = "jackson", widen: float = 0.01) -> KPMDensity:
        """The Chebyshev moments of an SLQ estimate's quadrature rules, as a KPM estimate.

        Each probe's ``m``-point Gauss rule reproduces ``u^T T_k(B) u`` exactly for
        ``k <= 2m - 1``, so with ``num_moments <= 2 * num_steps`` and the same probes and
        interval this equals :func:`kpm` up to rounding: an exact cross-check of the two
        methods. Deflated atoms are not supported (their probe measure differs).
        """
        if density.num_deflated:
            raise ValueError("from_spectral_density needs an estimate without deflation")
        N = _checks.positive_int(num_moments, "num_moments")
        if center is None or half_width is None:
            b = density.bounds()
            center, half_width = _widened(b.lower, b.upper, widen)
        valid = density._valid()
        x = (density.nodes - center) / half_width
        if np.any(np.abs(x[valid]) >= 1):
            raise ValueError("the Ritz values reach outside the interval; widen it")
        # T_k(x) by the recurrence, weighted by the Gauss weights.
        mu = np.zeros((density.num_probes, N))
        w = np.where(valid, density.weights, 0.0)
        t_prev, t = np.ones_like(x), x
        mu[:, 0] = w.sum(axis=1)
        if N > 1:
            mu[:, 1] = (w * t).sum(axis=1)
        for k in range(2, N):
            t_prev, t = t, 2 * x * t - t_prev
            mu[:, k] = (w * t).sum(axis=1)
        return cls(chebyshev_moments=mu, probe_scales=density.probe_scales.copy(),
                   center=float(center), half_width=float(half_width), n=density.n,
                   num_moments=N, kernel=kernel, seed=density.seed,
                   probe_kind=density.probe_kind, matvecs=density.matvecs,
                   wall_time=density.wall_time, lanczos_bounds=None,
                   extra={"source": "slq"})

    @property
    def num_probes(self) -> int:
        return int(self.chebyshev_moments.shape[0])

    # -- the series -------------------------------------------------------------
    def damping(self) -> np.ndarray:
        """The kernel's coefficients ``g_k`` (all 1 for ``kernel="dirichlet"``)."""
        if self.kernel == "jackson":
            return jackson_damping(self.num_moments)
        return np.ones(self.num_moments)

    def mean_moments(self) -> Estimate:
        """Estimate of the Chebyshev moments ``tr T_k(B) / n``, ``k < num_moments``."""
        return estimate_from_samples(self.chebyshev_moments * self.probe_scales[:, None])

    def _coefficients(self) -> np.ndarray:
        mu = np.mean(self.chebyshev_moments * self.probe_scales[:, None], axis=0)
        c = self.damping() * mu
        c[1:] *= 2
        return c

    def resolution(self) -> float:
        """Width of the kernel in the operator's units: ``half_width * sqrt((1 - g_2) / 2)``
        ~ ``pi (b - a) / (2 (N + 1))``, a bound on the Wasserstein-1 distance between
        the KPM measure and the probe measure (see the module notes)."""
        N = self.num_moments
        if self.kernel != "jackson" or N < 3:
            return float("inf")
        g = jackson_damping(N)
        return float(self.half_width * math.sqrt(max(0.0, (1 - g[2]) / 2)))

    def _to_x(self, t: np.ndarray) -> np.ndarray:
        return (np.asarray(t, dtype=np.float64) - self.center) / self.half_width

    # -- density ----------------------------------------------------------------
    def default_grid(self, *, num: int | None = None) -> np.ndarray:
        """Uniform grid inside the interval (ends excluded), about 10 points per kernel
        width (at least 1001 points)."""
        num = max(1001, 10 * self.num_moments) if num is None else int(num)
        # open interval: the series is divided by sqrt(1 - x^2), which vanishes at the ends
        return np.linspace(self.center - self.half_width, self.center + self.half_width,
                           num + 2)[1:-1]

    def density(self, grid: Any = None, *, sigma: float | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """The damped Chebyshev series on a grid (0 outside the interval).

        ``sigma`` is not accepted: the resolution is fixed by ``num_moments`` (see
        :meth:`resolution`).
        """
        if sigma is not None:
            raise ValueError("KPMDensity.density takes no sigma: its resolution "
                             f"({self.resolution():.3g}) is set by num_moments")
        grid = self.default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
        x = self._to_x(grid)
        inside = np.abs(x) < 1 - 4 * np.finfo(float).eps
        xi = np.where(inside, x, 0.0)
        vals = C.chebval(xi, self._coefficients()) / (np.pi * np.sqrt(1 - xi * xi))
        return grid, np.where(inside, vals / self.half_width, 0.0)

    def cdf(self, x: Any) -> np.ndarray:
        """Estimated fraction of eigenvalues ``<= x``: the integral of :meth:`density`,
        in closed form (``int_{-1}^{cos th} T_k(x) / (pi sqrt(1 - x^2)) dx =
        -sin(k th) / (k pi)``, ``(pi - th) / pi`` for ``k = 0``)."""
        x = np.asarray(x, dtype=np.float64)
        flat = self._to_x(x).reshape(-1)
        c = self._coefficients()
        th = np.arccos(np.clip(flat, -1.0, 1.0))
        out = np.empty(flat.shape)
        k = np.arange(1, self.num_moments)
        chunk = max(1, 2**20 // max(k.size, 1))
        for s in range(0, flat.size, chunk):
            t = th[s:s + chunk]
            tail = (np.sin(np.outer(t, k)) / k) @ c[1:] if k.size else 0.0
            out[s:s + chunk] = (c[0] * (np.pi - t) - tail) / np.pi
        out = np.where(flat <= -1.0, 0.0, np.where(flat >= 1.0, c[0], out))
        return out.reshape(x.shape)

    # -- functionals ------------------------------------------------------------
    def moments(self, p: int | Any) -> Estimate:
        """Estimate of ``tr(A^p) / n`` for integer ``0 <= p < num_moments``: exact per
        probe (the power is a combination of ``T_0 .. T_p``), with standard errors."""
        ps = np.asarray(p)
        if ps.dtype.kind not in "iu" or np.any(ps < 0):
            raise ValueError(f"moments need non-negative integer powers; got {p!r}")
        if np.any(ps >= self.num_moments):
            raise ValueError(f"moments up to p = {self.num_moments - 1} are available from "
                             f"num_moments={self.num_moments}; got {p!r}")
        per = np.stack([self._per_probe_power(int(q)) for q in ps.reshape(-1)], axis=1)
        zero = np.zeros(ps.size)
        if ps.ndim:
            return estimate_from_samples(per.reshape((-1,) + ps.shape), zero.reshape(ps.shape))
        return estimate_from_samples(per[:, 0], 0.0)

    def _per_probe_power(self, p: int) -> np.ndarray:
        # lambda^p = (c + h x)^p = sum_j binom(p, j) c^(p-j) h^j x^j, in the Chebyshev basis.
        poly = np.array([math.comb(p, j) * self.center ** (p - j) * self.half_width ** j
                         for j in range(p + 1)])
        cheb = C.poly2cheb(poly)
        return self.probe_scales * (self.chebyshev_moments[:, : cheb.size] @ cheb)

    def trace(self, f: Callable[[np.ndarray], np.ndarray]) -> Estimate:
        """Estimate of ``tr f(A)`` from the undamped moments and the Chebyshev interpolant
        of ``f`` of degree ``num_moments - 1`` on the interval (for smooth ``f``).

        ``quadrature_error`` is the mean over probes of the part of the series carried by
        the upper half of the coefficients, the analogue of the Lanczos step difference.
        """
        N = self.num_moments
        coef = C.chebinterpolate(lambda x: np.asarray(f(self.center + self.half_width * x),
                                                      dtype=np.float64), N - 1)
        if not np.all(np.isfinite(coef)):
            raise FloatingPointError("f returned NaN or Inf on the KPM interval")
        per = self.probe_scales * (self.chebyshev_moments @ coef) * self.n
        tail = self.probe_scales * np.abs(self.chebyshev_moments[:, N // 2:] @ coef[N // 2:])
        return estimate_from_samples(per, float(np.mean(tail)) * self.n)

    def fraction_negative(self, tol: float | None = None) -> float:
        """Estimated fraction of eigenvalues below ``-tol`` (the smoothed CDF there).

        ``tol=None`` (the default) is 0: the KPM density is a polynomial smoothed by its
        kernel, with no Ritz values whose rounding a tolerance would absorb (SLQ's
        default is twice its rounding floor: :meth:`SpectralDensity.negative_tolerance`).
        Its mass below zero includes the kernel's spread of an atom at zero."""
        if tol is None:
            tol = 0.0
        tol = float(tol)
        if not (np.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0; got {tol}")
        return float(self.cdf(-tol))

    def bounds(self) -> SpectralBounds:
        """The interval the density lives on (residuals 0: it is a chosen interval)."""
        return SpectralBounds(self.center - self.half_width, self.center + self.half_width,
                              0.0, 0.0)

    def __repr__(self) -> str:
        return (f"KPMDensity(n={self.n}, num_probes={self.num_probes}, "
                f"num_moments={self.num_moments}, kernel={self.kernel!r}, "
                f"interval=[{self.center - self.half_width:.6g}, "
                f"{self.center + self.half_width:.6g}], resolution={self.resolution():.3g}, "
                f"matvecs={self.matvecs}, wall_time={self.wall_time:.3g}s)")


# Smallest half-width: below it 1 / half_width (the density's scale) comes within a
# factor 1 / eps of overflowing, and the grid spacing of a kernel width underflows.
_MIN_HALF = float(np.finfo(float).tiny / np.finfo(float).eps)


def _widened(lower: float, upper: float, widen: float) -> tuple[float, float]:
    """Centre and half-width of the KPM interval around ``[lower, upper]``.

    A collapsed interval (all Ritz values equal, e.g. a multiple of the identity) gets
    the half-width ``1e-8 |centre|``; the zero operator, which has no scale at all, the
    unit half-width (its density is then the kernel centred at 0, as for any atom).
    """
    center = 0.5 * (lower + upper)
    half = 0.5 * (upper - lower)
    scale = max(abs(lower), abs(upper))
    if scale == 0.0:
        half = 1.0
    half = max(half, 1e-8 * scale, _MIN_HALF)
    return center, half * (1.0 + widen)


def kpm(
    op: Any,
    num_moments: int,
    num_probes: int = 10,
    *,
    seed: int = 0,
    probes: str = "rademacher",
    kernel: str = "jackson",
    bounds: tuple[float, float] | None = None,
    bound_steps: int = 40,
    widen: float = 0.01,
    dtype: Any = None,
    block_size: int | None = None,
) -> KPMDensity:
    """Estimate the eigenvalue density by the kernel polynomial method.

    Parameters
    ----------
    op
        A symmetric operator (anything :func:`specdens.aslinearoperator` accepts).
    num_moments
        Chebyshev moments ``N`` (at least 2); resolution ``~ pi (b - a) / (2 (N + 1))``.
        Costs ``floor(N / 2)`` products per probe.
    num_probes
        Random probes (probe ``i`` is the same vector as :func:`specdens.slq`'s for the same
        ``seed`` and kind).
    seed, probes
        Probe seed and kind (``"rademacher"``, ``"gaussian"`` or ``"sphere"``).
    kernel
        ``"jackson"`` (default; a non-negative kernel) or ``"dirichlet"`` (no damping:
        Gibbs oscillations, negative values).
    bounds
        An interval ``(a, b)`` containing the spectrum (then widened by ``widen``);
        default: found by a Lanczos run of ``bound_steps`` steps from each of two
        Gaussian probes (see the module notes).
    bound_steps
        Lanczos steps for the bounds (``2 * bound_steps`` products).
    widen
        Relative widening of the half-width (Weiße et al. use 0.01), so that the spectrum
        lies strictly inside ``(-1, 1)`` after the map.
    dtype
        Working dtype (``"float64"`` default where available).
    block_size
        Probes per block of products (default: all).

    Returns
    -------
    KPMDensity

    Raises
    ------
    ValueError
        For bad arguments, or when the Chebyshev moments show that the spectrum is not
        inside the interval (``|mu_k| > 1``, or a recurrence that overflows): pass wider
        ``bounds``.
    FloatingPointError
        When the operator returns NaN or Inf for a vector of the recurrence that is still
        of norm at most 1 (up to rounding), i.e. not because of the interval.
    """
    t0 = time.perf_counter()
    op, n = _checks.operator_of(op)
    N = _checks.positive_int(num_moments, "num_moments")
    if N < 2:
        raise ValueError(f"num_moments must be at least 2; got {N}")
    num_probes = _checks.positive_int(num_probes, "num_probes")
    seed = check_seed(seed)
    if probes not in PROBE_KINDS:
        raise ValueError(f"probes={probes!r}; choose one of {', '.join(PROBE_KINDS)}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; choose one of {', '.join(KERNELS)}")
    widen = float(widen)
    if not (np.isfinite(widen) and widen >= 0):
        raise ValueError(f"widen must be finite and >= 0; got {widen}")
    xp, device = op.xp, op.device
    _array.check_supported_dtype(op.dtype)
    work = _checks.work_dtype(dtype, op)
    wdt = _array.xp_dtype(xp, work)
    block = num_probes if block_size is None else min(_checks.positive_int(block_size,
                                                                           "block_size"),
                                                      num_probes)
    _checks.agree_on_run(op, "kpm", num_moments=N, num_probes=num_probes, block_size=block,
                         seed=seed, probes=probes, dtype=work, bounds=bounds is not None,
                         bound_steps=bound_steps if bounds is None else None)
    matvecs = 0
    lanczos_bounds = None
    if bounds is None:
        r = _lanczos(op, _checks.positive_int(bound_steps, "bound_steps"),
                     num_probes=_BOUND_PROBES, probes="gaussian", seed=seed,
                     first_probe=_BOUND_PROBE, dtype=work)
        lanczos_bounds = SpectralDensity.from_lanczos(r).bounds()
        lo, hi = lanczos_bounds.interval
        matvecs += r.matvecs
    else:
        try:
            lo, hi = (float(v) for v in bounds)
        except (TypeError, ValueError):
            raise ValueError(f"bounds must be two numbers (a, b); got {bounds!r}") from None
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ValueError(f"bounds must be finite with a < b; got {bounds!r}")
    center, half = _widened(lo, hi, widen)
    K = N // 2
    eps = _array.finfo_eps(work)
    tol = 1e3 * N * eps  # |mu_k| <= 1 and ||T_k(B) u||^2 <= 1 up to this, when inside

    def outside(what: str) -> ValueError:
        return ValueError(
            f"the spectrum is not inside the KPM interval [{center - half:.6g}, "
            f"{center + half:.6g}]: {what}. Pass bounds=(a, b) enclosing the spectrum, more "
            "bound_steps, or a larger widen.")

    # the rounding the products carry (a float32 operator under float64 arithmetic)
    eps_eff = max(eps, _array.finfo_eps(_checks.product_dtype(op)))
    warned = False
    mus, scales = [], []
    for start in range(0, num_probes, block):
        idx = range(start, min(start + block, num_probes))
        U, sc = probe_block(probes, n, seed, idx, xp, device, wdt)
        mu, used, bad_product, input_norms, direct = _moments_block(op, U, N, K, center,
                                                                    half, wdt)
        matvecs += used
        if not warned:
            warned = _warn_if_asymmetric(mu, direct, input_norms, eps_eff)
        if bad_product is not None:
            # The j-th product's input is t_j = T_j(B) u with ||t_j||^2 <= 1 when the
            # spectrum is inside the interval: a non-finite product of a vector that had
            # not grown is the operator's doing; of one that had, the interval's.
            grown = input_norms[:, : bad_product + 1]
            if np.all(np.isfinite(grown)) and float(np.max(grown)) <= 1 + tol:
                raise FloatingPointError(
                    "the operator returned NaN or Inf during the Chebyshev recurrence "
                    f"(product {bad_product + 1}, of a vector of norm <= 1); specdens never "
                    "averages such values in. Check the operator.")
            raise outside("the Chebyshev recurrence T_k(B) u grew until the operator's "
                          "products overflowed")
        if not np.all(np.isfinite(mu)):
            raise outside("the Chebyshev recurrence T_k(B) u overflowed (the operator's "
                          "products were finite)")
        mus.append(mu)
        scales.append(sc)
    mu = np.concatenate(mus, axis=0)
    excess = float(np.max(np.abs(mu)))
    if excess > 1 + tol:
        raise outside(f"a Chebyshev moment has |mu_k| = {excess:.3g} > 1")
    return KPMDensity(
        chebyshev_moments=mu, probe_scales=np.concatenate(scales), center=float(center),
        half_width=float(half), n=n, num_moments=N, kernel=kernel, seed=seed,
        probe_kind=probes, matvecs=matvecs, wall_time=time.perf_counter() - t0,
        lanczos_bounds=lanczos_bounds,
    )


def _warn_if_asymmetric(mu: np.ndarray, direct: np.ndarray, sq: np.ndarray, eps: float
                        ) -> bool:
    """Warn (:class:`LanczosWarning`) when the doubled moments ``mu_k`` (from ``<t_j,
    t_j>`` and ``<t_{j+1}, t_j>``) differ from the direct ``<u, t_k>``, ``2 <= k <=
    min(K, _SYMMETRY_K)``, by more than ``sqrt(eps)`` relative to the largest
    ``||t_j||^2``: the doubling trick
    holds for a symmetric ``B`` only (for a symmetric one they agree to ``~ k eps``).
    Returns whether it warned."""
    k = direct.shape[1]
    if k == 0:
        return False
    with np.errstate(invalid="ignore"):
        diff = np.abs(mu[:, 2:2 + k] - direct)
        scale = np.maximum(1.0, np.max(np.where(np.isfinite(sq), sq, 0.0), axis=1))
        rel = diff / scale[:, None]
    rel = rel[np.isfinite(rel)]
    worst = float(np.max(rel)) if rel.size else 0.0
    if worst <= math.sqrt(eps):
        return False
    warnings.warn(
        f"the Chebyshev moments reveal an operator that is not symmetric (u^T T_k(B) u "
        f"computed directly and by the doubling trick differ by {worst:.2e} relative, "
        f"expected ~{eps:.1e}); KPM assumes a symmetric operator (the doubling trick, "
        "and a spectrum on the real interval), so the moments and the density are not "
        "meaningful. Symmetrise it, e.g. (A + A.T) * 0.5.",
        LanczosWarning, stacklevel=3)
    return True


def _moments_block(op: Any, U: Any, N: int, K: int, center: float, half: float, wdt: Any
                   ) -> tuple[np.ndarray, int, int | None, np.ndarray, np.ndarray]:
    """Chebyshev moments ``mu_0 .. mu_{N-1}`` of the rows of ``U`` (unit probes), the
    products used, the index of the first product whose output (the operator's, before
    the map to ``B``) was not finite (None if all were), ``||t_j||^2`` per row for
    ``j = 0 .. K`` (``t_j``, the input of product ``j``), and the moments ``<u, t_k>``
    computed directly for ``k = 2 .. min(K, N - 1, _SYMMETRY_K)`` (one dot for each of
    these products, for the symmetry check)."""
    xp = op.xp
    finite = []  # per product: were the operator's values finite? (read once, at the end)

    def apply(T: Any) -> Any:  # B T for rows T: (A T^T)^T
        AT = _array.detached(op.matmat(xp.astype(xp.matrix_transpose(T), op.dtype, copy=False)))
        AT = xp.matrix_transpose(xp.astype(AT, wdt, copy=False))
        finite.append(xp.all(xp.isfinite(AT)))
        return (AT - center * T) / half

    def rowdot(a: Any, b: Any) -> Any:
        return xp.sum(a * b, axis=1)

    k_rows = int(U.shape[0])
    t_prev = U
    t = apply(U)
    used = k_rows
    dots_sq = [rowdot(U, U)]        # <t_j, t_j>, j = 0..K
    dots_adj = []                   # <t_j, t_{j-1}>, j = 1..K
    dots_sq.append(rowdot(t, t))
    dots_adj.append(rowdot(t, t_prev))
    dots_dir = []                   # <u, t_k>, k = 2..min(K, N - 1, _SYMMETRY_K)
    for k in range(2, K + 1):
        t_prev, t = t, 2 * apply(t) - t_prev
        used += k_rows
        dots_sq.append(rowdot(t, t))
        dots_adj.append(rowdot(t, t_prev))
        if k < N and k <= _SYMMETRY_K:
            dots_dir.append(rowdot(U, t))
    sq = _array.to_numpy(xp.stack(dots_sq, axis=1))
    adj = _array.to_numpy(xp.stack(dots_adj, axis=1))
    ok = _array.to_numpy(xp.stack(finite), bool)
    direct = (_array.to_numpy(xp.stack(dots_dir, axis=1)) if dots_dir
              else np.zeros((k_rows, 0)))
    bad = None if bool(np.all(ok)) else int(np.argmin(ok))
    mu = np.zeros((k_rows, N))
    mu0 = sq[:, 0]
    mu[:, 0] = mu0
    mu[:, 1] = adj[:, 0]
    for k in range(1, K + 1):
        if 2 * k < N:
            mu[:, 2 * k] = 2 * sq[:, k] - mu0
        if 2 * k + 1 < N and k + 1 <= K:
            mu[:, 2 * k + 1] = 2 * adj[:, k] - mu[:, 1]
    return mu, used, bad, sq, direct
