"""``SpectralDensity``: the SLQ estimate of an operator's eigenvalue distribution.

The estimate is a mixture of Gauss quadrature rules, one per probe: probe ``i`` puts
weight ``w_ij`` at Ritz value ``theta_ij``. For any ``f``,
``tr f(A) / n ~ (1/k) sum_i s_i sum_j w_ij f(theta_ij)`` with ``s_i`` the probe's
Hutchinson scale (1 for Rademacher and sphere probes). See Ubaru, Chen & Saad (2017),
Fast estimation of tr(f(A)) via stochastic Lanczos quadrature, and Chen, Trogdon &
Ubaru (2021), Analysis of stochastic Lanczos quadrature for spectrum approximation.

A deflated estimate (``slq(..., deflate=k)``) adds ``k`` exact eigenvalues as atoms of
mass ``1/n`` each to the quadrature of the deflated operator, whose probe scales carry the
remaining ``(n - k)/n`` (see :mod:`specdens.algorithms.deflation`).

:class:`DensityEstimate` is the interface shared with the kernel polynomial method
(:class:`specdens.KPMDensity`), so that the two estimates can be swapped and compared.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy.special import ndtr, ndtri
from scipy.stats import t as student_t

from .algorithms.checkpoint import atomic_write_npz
from .algorithms.lanczos import LanczosResult
from .algorithms.quadrature import PRODUCT_ROUNDINGS, previous_rules, quadrature_rules

FORMAT_NAME = "specdens.SpectralDensity"
FORMAT_VERSION = 1
"""Version of files without deflated eigenvalues (readable by every specdens)."""
FORMAT_VERSION_DEFLATED = 2
"""Version of files holding deflated eigenvalues, which older readers would drop."""
READABLE_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_DEFLATED)
KERNELS = ("gaussian", "lorentzian")
GRID_PAD = float(np.sqrt(2.0 * np.log(1.0 / np.finfo(np.float64).eps)))
"""Half-width, in kernel widths, of the padding and of the windows of
:meth:`SpectralDensity.default_grid`: ``sqrt(2 ln(1/eps))`` (8.49 for float64), where
the Gaussian kernel ``exp(-t^2/2)`` has fallen to ``eps`` of its peak (the mass beyond is
``2e-17``)."""
GRID_POINTS_PER_SIGMA = 3
"""Grid points per kernel width where the default grid is fine (the trapezoid rule then
integrates a Gaussian to rounding: its error is about ``2 exp(-2 pi^2 9)``)."""
GRID_MIN_POINTS = 1001
GRID_MAX_UNIFORM = 20001
"""A uniform default grid has between ``GRID_MIN_POINTS`` and ``GRID_MAX_UNIFORM`` points;
a wider range gets a non-uniform grid (see :meth:`SpectralDensity.default_grid`)."""
GRID_GROWTH = 1.1
"""Ratio of consecutive spacings between the windows of a non-uniform default grid. The
trapezoid rule over a step from ``x`` to ``r x`` overestimates a Lorentzian's ``1/x^2``
tail by ``(r + 1/r)/2 - 1`` (0.45% for 1.1); the Gaussian is negligible there."""


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate: mean over probes, its standard error and its bias estimate.

    Attributes
    ----------
    value
        The mean over probes (a float, or an array for several functionals at once).
    stderr
        The sample standard deviation over probes divided by ``sqrt(num_probes)`` (NaN
        for a single probe): the *variance* part of the error.
    num_probes
        Number of probes averaged.
    quadrature_error
        The *bias* part: an a-posteriori estimate of the quadrature error, the mean over
        probes of ``|Q_m[f] - Q_{m-1}[f]|``, the change when the last Lanczos step is
        dropped. For probes whose rule is exact (a breakdown or ``num_steps = n``) it
        is instead how much ``f`` changes within each node's residual, the resolution of
        the run: rounding for ``f`` smooth on that scale, but large (or NaN where ``f`` is
        not defined there) for ``f`` steep within it, such as ``log`` or ``1/x`` over a
        spectrum spanning more than ~1/eps, whose smallest eigenvalues merge into one
        node; it was 0 there, beside a wrong value.
        It is a heuristic, not a bound: the difference of two consecutive rules
        approximates the error of the ``(m-1)``-step rule only when the error decays
        fast with ``m`` (geometrically, for ``f`` analytic on a neighbourhood of the
        spectrum that is wide relative to it; Ubaru, Chen & Saad, 2017). When the rules
        converge slowly (``f`` singular near the spectrum, e.g. ``log`` or ``1/x`` with
        a large condition number, or few steps) it can underestimate the error badly:
        ``tr log A`` for eigenvalues log-spaced over ``[1e-3, 1e2]`` with 4, 16 and 32
        steps had true errors 660, 240 and 112 against reported 118, 14.5 and 4.8. Check
        convergence by increasing ``num_steps``. For polynomials of degree ``<= 2m - 3``
        both rules are exact and it is rounding. NaN where no estimate exists.
    """

    value: Any
    stderr: Any
    num_probes: int
    quadrature_error: Any = float("nan")

    def __float__(self) -> float:
        return float(self.value)

    def interval(self, confidence: float = 0.95) -> tuple[Any, Any]:
        """Confidence interval ``value -/+ t * stderr`` over the probes.

        ``t`` is the two-sided Student-t quantile of ``confidence`` with ``num_probes - 1``
        degrees of freedom: ``stderr`` is itself estimated from the probes, and the normal
        quantile (1.96 for 95%) covered 0.64 to 0.70 of the true values with 2 probes
        (Student's 12.7 covers 0.95 for normal samples; it tends to the normal quantile as
        probes are added). It accounts for the probe variance only, not for
        ``quadrature_error``.

        Parameters
        ----------
        confidence
            The coverage, in (0, 1).

        Returns
        -------
        (lower, upper)
            Floats, or arrays of the shape of ``value``.

        Raises
        ------
        ValueError
            For a ``confidence`` outside (0, 1), or an estimate of a single probe: it has
            no standard error, hence no interval (run with ``num_probes >= 2``).
        """
        normal_quantile(confidence)  # validates
        if self.num_probes < 2:
            raise ValueError(
                f"an estimate of {self.num_probes} probe has no standard error, so no "
                "confidence interval; run with num_probes >= 2 (the interval uses the "
                "spread between probes)")
        t = float(student_t.ppf(0.5 + 0.5 * float(confidence), self.num_probes - 1))
        return (np.subtract(self.value, t * np.asarray(self.stderr)),
                np.add(self.value, t * np.asarray(self.stderr)))

    def __repr__(self) -> str:
        quad = ""
        if np.any(np.isfinite(np.asarray(self.quadrature_error, dtype=float))):
            quad = f", quadrature_error={_fmt(self.quadrature_error)}"
        return (f"Estimate(value={_fmt(self.value)}, stderr={_fmt(self.stderr)}, "
                f"num_probes={self.num_probes}{quad})")


def normal_quantile(confidence: float) -> float:
    """The two-sided standard normal quantile ``z`` with ``P(|Z| <= z) = confidence``."""
    if not (isinstance(confidence, (int, float, np.floating)) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be a number in (0, 1); got {confidence!r}")
    return float(ndtri(0.5 + 0.5 * float(confidence)))


def check_sigma(sigma: Any) -> float:
    """A kernel width as a float; a ValueError unless it is positive and finite (a
    negative width would flip a CDF, and 0 or NaN would divide by zero or give NaN)."""
    sigma = float(sigma)
    if not (sigma > 0 and np.isfinite(sigma)):
        raise ValueError(f"sigma must be positive and finite; got {sigma}")
    return sigma


def pow2_units(amax: Any) -> Any:
    """Powers of two within a factor 2 of ``amax`` (elementwise; 1 where ``amax`` is 0 or
    not finite): dividing by them is exact, and brings ``amax`` into ``[1, 2)``, where
    squares neither overflow nor underflow. A float for a scalar ``amax``."""
    a = np.asarray(amax, dtype=np.float64)
    ok = (a > 0) & np.isfinite(a)
    out = np.where(ok, np.ldexp(1.0, np.frexp(np.where(ok, a, 1.0))[1] - 1), 1.0)
    return out if out.ndim else float(out)


def estimate_from_samples(per_probe: np.ndarray, quadrature_error: Any = None) -> Estimate:
    """:class:`Estimate` from per-probe values (first axis: probes).

    Refuses non-finite values: a NaN is never averaged in. The mean and standard error are
    computed in units of a power of two near each component's largest ``|value|``
    (:func:`pow2_units`): the same bits as without units wherever the squared deviations
    are normal numbers, and no overflow to Inf (values beyond 1e154) or underflow to 0
    (below 1e-154) elsewhere.
    """
    per_probe = np.asarray(per_probe, dtype=np.float64)
    if not np.all(np.isfinite(per_probe)):
        raise FloatingPointError(
            "a per-probe estimate is NaN or Inf (the function returned non-finite values at "
            "some Ritz values or nodes?); specdens never averages such values in"
        )
    k = per_probe.shape[0]
    unit = pow2_units(np.max(np.abs(per_probe), axis=0, initial=0.0))
    x = per_probe / unit
    mean = x.mean(axis=0) * unit
    stderr = (x.std(axis=0, ddof=1) / np.sqrt(k) * unit if k > 1
              else np.full_like(mean, np.nan))
    if quadrature_error is None:
        quadrature_error = np.full_like(mean, np.nan)
    quad = np.asarray(quadrature_error, dtype=np.float64)
    return Estimate(mean if mean.ndim else float(mean),
                    stderr if np.ndim(stderr) else float(stderr), k,
                    quad if quad.ndim else float(quad))


@dataclass(frozen=True)
class SpectralBounds:
    """Extreme Ritz values and their residual norms.

    Each Ritz value lies within its residual of an eigenvalue, and the Ritz values lie
    inside ``[lambda_min, lambda_max]``; ``interval`` widens them by the residuals.
    """

    lower: float
    upper: float
    lower_residual: float
    upper_residual: float

    @property
    def interval(self) -> tuple[float, float]:
        return (self.lower - self.lower_residual, self.upper + self.upper_residual)


def _real_values(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """``f(x)`` as float64, refusing complex values (a cast would drop their imaginary
    parts with a mere warning)."""
    fx = np.asarray(f(x))
    if np.iscomplexobj(fx):
        raise TypeError(
            f"the function returned complex values (dtype {fx.dtype}); specdens estimates "
            "traces of real functions of a symmetric operator. Return real values, e.g. "
            "numpy.sqrt(numpy.maximum(t, 0)) instead of numpy.emath.sqrt(t), or the real "
            "part explicitly")
    return np.asarray(fx, dtype=np.float64)


def _values_or_nan(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """``f(x)`` as float64 with NaN where it is not a finite real number (a complex value
    of ``numpy.emath.log`` below 0 included): for error estimates at points near the
    nodes, where ``f`` need not be defined."""
    fx = np.asarray(f(x))
    if np.iscomplexobj(fx):
        fx = np.where(fx.imag == 0, fx.real, np.nan)
    fx = np.asarray(fx, dtype=np.float64)
    return np.where(np.isfinite(fx), fx, np.nan)


def _fmt(x: Any) -> str:
    a = np.asarray(x)
    return f"{float(a):.6g}" if a.ndim == 0 else np.array2string(a, precision=6)


@runtime_checkable
class DensityEstimate(Protocol):
    """What :class:`SpectralDensity` (SLQ) and :class:`specdens.KPMDensity` (the kernel
    polynomial method) both offer, so that either can be used and they can be compared.

    ``density(grid)`` returns ``(grid, values)``; ``cdf(x)`` the estimated fraction of
    eigenvalues ``<= x``; ``moments(p)`` and ``trace(f)`` an :class:`Estimate` of
    ``tr(A^p)/n`` and ``tr f(A)``; ``bounds()`` a :class:`SpectralBounds`.
    """

    n: int

    def density(self, grid: Any = None) -> tuple[np.ndarray, np.ndarray]: ...

    def cdf(self, x: Any) -> np.ndarray: ...

    def moments(self, p: Any) -> Estimate: ...

    def trace(self, f: Callable[[np.ndarray], np.ndarray]) -> Estimate: ...

    def fraction_negative(self, tol: float | None = None) -> float: ...

    def bounds(self) -> SpectralBounds: ...


@dataclass(frozen=True)
class ProbeConvergence:
    """How an adaptive probe count (``slq(..., num_probes="auto")``) ended.

    Attributes
    ----------
    converged
        Whether ``quantile * stderr <= max(atol, rtol * |value|)`` held for every
        component of the target before ``max_probes`` was reached.
    num_probes, max_probes, probe_block
        Probes used, the cap, and the number added per round.
    target
        The functional watched: ``"moments [1, 2]"``, ``"trace of <f>"`` or ``"density"``.
    confidence, quantile
        The confidence level and the quantile that multiplied the standard error
        (Student's t with ``num_probes - 1`` degrees of freedom, which tends to the normal
        quantile as probes are added).
    rtol, atol
        The tolerances.
    worst_ratio
        ``max(quantile * stderr / tolerance)`` over the target's components at the end
        (``<= 1`` when converged).
    history
        ``(num_probes, worst_ratio)`` after each round.
    """

    converged: bool
    num_probes: int
    max_probes: int
    probe_block: int
    target: str
    confidence: float
    quantile: float
    rtol: float
    atol: float
    worst_ratio: float
    history: tuple = ()

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["history"] = [list(h) for h in self.history]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ProbeConvergence:
        d = dict(d)
        d["history"] = tuple(tuple(h) for h in d.get("history", ()))
        return cls(**d)


RITZ_RESOLUTION = 64
"""Exact atoms (Ritz values of probes that broke down) closer than ``RITZ_RESOLUTION *
eps(float32) * max|theta|`` count as one in :meth:`SpectralDensity.default_sigma` (the
rounding of a float32 run)."""
NEGATIVE_ROUNDINGS = 2
"""The default tolerance of the negative mass (:meth:`SpectralDensity.fraction_negative`,
:func:`specdens.analysis.negative_mass`), in units of :meth:`SpectralDensity.rounding_floor`.
Ritz values of an exactly zero eigenvalue (the null space of a Hessian or a GGN, most of
the spectrum) are rounding of either sign: the recurrence is exact for an operator about
one floor (``PRODUCT_ROUNDINGS eps max|theta|``) away from ``A``, and the eigenvalues of the
stored operator and of the tridiagonal carry a few ``eps max|theta|`` more. Measured: up to
5 ``eps max|theta|`` in float64 (dense rank-20 matrices, n = 2000 and 4000; the floor is 4),
up to 0.3 ``eps32 max|theta|`` for float32 products under either arithmetic; twice the
floor covers both."""


@dataclass(frozen=True, repr=False)
class SpectralDensity:
    """Stochastic Lanczos quadrature estimate of an eigenvalue density.

    Attributes
    ----------
    nodes, weights : numpy.ndarray, shape (num_probes, num_steps), float64
        Gauss quadrature rule of each probe; each row of ``weights`` sums to 1 and is 0
        past the step where the probe broke down.
    residuals : numpy.ndarray, shape (num_probes, num_steps)
        Residual bound of each Ritz value (distance bound to the spectrum):
        ``beta_m |s_mj|``, floored at the run's rounding (see
        :func:`specdens.algorithms.quadrature.quadrature_rules`).
    lengths : numpy.ndarray
        Lanczos steps each probe reached.
    probe_scales : numpy.ndarray
        Hutchinson scales of the probes (1 except for Gaussian probes; for a deflated
        estimate, the scale times the squared norm of the projected unit probe, whose
        mean is ``(n - k) / n``).
    n, num_steps, num_probes, seed, reorth, probe_kind, wall_time, matvecs
        Run metadata (``matvecs`` includes the eigensolver's products when deflated).
    deflated_eigenvalues, deflated_residuals : numpy.ndarray, shape (k,)
        Eigenvalues removed by deflation and their residual norms ``||A x - lambda x||``:
        exact atoms of mass ``1/n`` each in every functional (empty when not deflated).
    convergence : ProbeConvergence or None
        How the adaptive probe count ended (``num_probes="auto"``), else None.
    extra : dict
        Free-form metadata (JSON-serialisable), e.g. the deflation settings.
    probe_indices : numpy.ndarray or None
        Index of each probe in its seed's streams (random probe ``i`` of a seed is always
        the same vector), or None when unknown; with the probe's seed it identifies the
        probe, so that :meth:`concatenate` can refuse the same probe twice.
    probe_seeds : tuple of int or None
        The seed of each probe when the probes come from several seeds (a
        :meth:`concatenate` of runs with different seeds; ``seed`` is then None), else
        None: every random probe is then of ``seed``.
    breakdown : numpy.ndarray of bool or None
        Whether each probe's Lanczos recurrence broke down (its Krylov space became
        invariant, so its rule is exact: ``quadrature_error`` 0), or None when unknown
        (an estimate read from an older file); then a probe is taken to have broken
        down when it stopped before ``num_steps``, which misses a breakdown at the last
        step.
    """

    nodes: np.ndarray
    weights: np.ndarray
    residuals: np.ndarray
    lengths: np.ndarray
    probe_scales: np.ndarray
    n: int
    num_steps: int
    seed: int | None = None
    reorth: str = "full"
    probe_kind: str = "rademacher"
    wall_time: float = float("nan")
    matvecs: int = 0
    extra: dict = field(default_factory=dict)
    deflated_eigenvalues: np.ndarray = field(default_factory=lambda: np.zeros(0))
    deflated_residuals: np.ndarray = field(default_factory=lambda: np.zeros(0))
    convergence: ProbeConvergence | None = None
    probe_indices: np.ndarray | None = None
    breakdown: np.ndarray | None = None
    probe_seeds: tuple[int, ...] | None = None

    # -- construction -----------------------------------------------------------
    @classmethod
    def from_lanczos(cls, result: LanczosResult, **extra: Any) -> SpectralDensity:
        """Gauss quadrature rules of a :class:`~specdens.LanczosResult`."""
        nodes, weights, residuals = quadrature_rules(result)
        return cls(
            nodes=nodes,
            weights=weights,
            residuals=residuals,
            lengths=result.lengths.copy(),
            probe_scales=result.probe_scales.copy(),
            n=result.n,
            num_steps=result.num_steps,
            seed=result.seed,
            reorth=result.reorth,
            probe_kind=result.probe_kind,
            wall_time=result.wall_time,
            matvecs=result.matvecs,
            extra=dict(extra),
            probe_indices=np.asarray(result.probe_indices, dtype=np.int64).copy(),
            breakdown=np.asarray(result.breakdown, dtype=bool).copy(),
        )

    @classmethod
    def concatenate(cls, parts: list[SpectralDensity], **changes: Any) -> SpectralDensity:
        """The probes of several estimates of the same operator as one estimate.

        The parts must share ``n``, ``num_steps``, the probe kind and the deflated
        eigenvalues; wall times and matvecs add up (``changes`` overrides fields of the
        result, e.g. ``matvecs`` when the parts share an eigensolver run). Parts of
        different seeds give ``seed=None`` and keep each probe's seed in ``probe_seeds``
        (with ``probe_indices``), so that a later concatenation still recognises their
        probes.

        The probes must be distinct: a repeated probe is not an independent sample, and
        would shrink the standard errors for nothing. A ``ValueError`` is raised when the
        same estimate is passed twice, or when two parts hold the same random probe (the
        same ``seed`` and probe index; see ``first_probe`` of :func:`specdens.slq` for
        disjoint runs). Probes whose identity is not recorded (explicit start vectors,
        ``seed=None``, estimates read back without ``probe_indices``) cannot be checked.
        """
        if not parts:
            raise ValueError("concatenate needs at least one SpectralDensity")
        first = parts[0]
        _check_distinct_probes(parts)
        seed, probe_seeds, probe_indices = _merged_probe_identity(parts)
        for p in parts[1:]:
            if (p.n, p.num_steps, p.probe_kind) != (first.n, first.num_steps, first.probe_kind):
                raise ValueError("concatenate needs estimates with the same n, num_steps and "
                                 "probe kind")
            if not np.array_equal(p.deflated_eigenvalues, first.deflated_eigenvalues):
                raise ValueError("concatenate needs estimates with the same deflated eigenvalues")
        fields = dict(
            nodes=np.concatenate([p.nodes for p in parts]),
            weights=np.concatenate([p.weights for p in parts]),
            residuals=np.concatenate([p.residuals for p in parts]),
            lengths=np.concatenate([p.lengths for p in parts]),
            probe_scales=np.concatenate([p.probe_scales for p in parts]),
            n=first.n, num_steps=first.num_steps, seed=seed, reorth=first.reorth,
            probe_kind=first.probe_kind,
            wall_time=float(sum(p.wall_time for p in parts)),
            matvecs=int(sum(p.matvecs for p in parts)),
            extra=dict(first.extra),
            deflated_eigenvalues=first.deflated_eigenvalues.copy(),
            deflated_residuals=first.deflated_residuals.copy(),
            convergence=None,
            probe_indices=probe_indices,
            breakdown=(np.concatenate([p._breakdown_flags() for p in parts])
                       if any(p.breakdown is not None for p in parts) else None),
            probe_seeds=probe_seeds,
        )
        fields.update(changes)
        return cls(**fields)

    @property
    def num_probes(self) -> int:
        return int(self.nodes.shape[0])

    def _probe_seed_list(self) -> list[int] | None:
        """The seed of each random probe, or None when unknown (explicit probes)."""
        if self.probe_kind == "explicit":
            return None
        if self.probe_seeds is not None:
            return [int(s) for s in self.probe_seeds]
        if self.seed is None:
            return None
        return [int(self.seed)] * self.num_probes

    def _probe_keys(self) -> list[tuple[int, int]] | None:
        """``(seed, index)`` of each random probe, or None when not recorded."""
        seeds = self._probe_seed_list()
        if seeds is None or self.probe_indices is None:
            return None
        return list(zip(seeds, (int(i) for i in np.asarray(self.probe_indices)), strict=True))

    def _breakdown_flags(self) -> np.ndarray:
        """``breakdown``, or where it is unknown, whether each probe stopped early."""
        if self.breakdown is not None:
            return np.asarray(self.breakdown, dtype=bool)
        return np.asarray(self.lengths) < self.num_steps

    def _valid(self) -> np.ndarray:
        return np.arange(self.nodes.shape[1])[None, :] < self.lengths[:, None]

    @property
    def num_deflated(self) -> int:
        """Number of eigenvalues removed by deflation (exact atoms)."""
        return int(self.deflated_eigenvalues.size)

    def atoms(self) -> tuple[np.ndarray, np.ndarray]:
        """The estimate as one discrete measure: locations and masses (summing to the
        mean probe scale, 1 for Rademacher and sphere probes). A deflated estimate adds
        its exact eigenvalues with mass ``1/n`` each; the total mass is then exactly 1
        for sphere probes and 1 in expectation for the others."""
        mass = self.weights * self.probe_scales[:, None] / self.num_probes
        keep = self._valid() & (mass > 0)
        loc, mass = self.nodes[keep], mass[keep]
        if self.num_deflated:
            loc = np.concatenate([loc, self.deflated_eigenvalues])
            mass = np.concatenate([mass, np.full(self.num_deflated, 1.0 / self.n)])
        return loc, mass

    @property
    def spectral_range(self) -> float:
        """Largest minus smallest Ritz value."""
        b = self.bounds()
        return b.upper - b.lower

    def rounding_floor(self) -> float:
        """The rounding floor of the Ritz values: how far the run's rounding alone may move
        them.

        :func:`~specdens.algorithms.quadrature.quadrature_rules` floors every residual
        bound at ``PRODUCT_ROUNDINGS * eps * max|theta|`` (4 ``eps``; ``eps`` of the
        arithmetic or of the products, whichever is coarser), and a Ritz value that has
        converged (an outlier; every one of a probe that broke down) sits on that floor:
        the floor is the smallest residual bound. The estimate does not record its dtypes,
        so where no Ritz value has converged (few steps), the smallest residual bound is
        capped at the floor of float32, ``4 eps32 max|theta|`` (4.8e-7 of it), which no
        float32 or float64 run exceeds. (Half-precision products have a coarser floor that
        the cap misses unless a Ritz value converged.)

        Returns
        -------
        float
            ``>= 0``; 0 for an estimate whose Ritz values are all 0.
        """
        valid = self._valid()
        res = np.asarray(self.residuals, dtype=np.float64)[valid]
        if res.size == 0:
            return 0.0
        scale = float(np.max(np.abs(self.nodes[valid])))
        cap = PRODUCT_ROUNDINGS * float(np.finfo(np.float32).eps) * scale
        return float(min(float(np.min(res)), cap))

    def negative_tolerance(self, tol: float | None = None) -> float:
        """The tolerance of the negative mass: ``tol`` checked, or its default.

        Parameters
        ----------
        tol
            A threshold ``>= 0`` (``0``: the strict sign of the Ritz values), or None for
            the default, ``NEGATIVE_ROUNDINGS * rounding_floor()`` (twice the floor): Ritz
            values of an exactly zero eigenvalue, rounding of either sign, are then not
            counted as negative. In float64 that is about ``8 eps max|theta|`` (1.8e-15 of
            it), with float32 products or arithmetic ``8 eps32 max|theta|`` (9.5e-7 of it).

        Returns
        -------
        float

        Raises
        ------
        ValueError
            When ``tol`` is negative, NaN or infinite.
        """
        if tol is None:
            return NEGATIVE_ROUNDINGS * self.rounding_floor()
        if isinstance(tol, (bool, np.bool_)):
            raise ValueError(f"tol must be a number >= 0 or None; got {tol!r}")
        tol = float(tol)
        if not (tol >= 0 and np.isfinite(tol)):
            raise ValueError(f"tol must be finite and >= 0 (or None: the rounding floor); "
                             f"got {tol}")
        return tol

    # -- density ----------------------------------------------------------------
    def default_sigma(self) -> float:
        """The default kernel width: the median gap between consecutive Ritz values of
        one probe. Scale-free and shift-invariant, it resolves what the quadrature
        resolves (Gauss nodes are about one kernel width apart where the mass is).

        Probes whose Krylov space became invariant before it reached dimension ``n``
        (``breakdown`` with ``lengths < n``) see an operator with that few distinct
        eigenvalues: their Ritz values are exact atoms, not a quadrature of a continuous
        density, and are left out. When every probe broke down so, the width is an eighth
        of the smallest gap between two distinct Ritz values of a probe (distinct: further
        apart than :data:`RITZ_RESOLUTION` float32 epsilons of the largest), so that the
        closest atoms stay apart (Gaussians 8 widths apart fall to ``exp(-8)`` of their
        peaks at the midpoint), instead of a median gap that would merge them (atoms at
        0, 1 and 3 into one bump). A full-dimension run (``lengths == n``, a small
        matrix) keeps the median gap.

        The median gap is never taken below :meth:`rounding_floor`, the uncertainty of
        every Ritz value (``4 eps max|theta|``, ``eps`` of the coarser of the arithmetic
        and the products): the zero eigenvalue of a float32 operator (a float32 network's
        Hessian or GGN, mostly null space) comes out as dozens of Ritz values a fraction of
        a float32 rounding apart, whose median gap (7e-9 for a floor of 6e-7) drew that
        rounding as needles. The gaps below the floor are not dropped instead: in float32
        arithmetic a bulk 1e5 below the outliers has Ritz values ~0.4 floors apart that
        agree with a float64 run's, and without them the median would be the outliers'
        gap (a bulk in [0, 1] drawn 1e5 wide).
        """
        exact = self._breakdown_flags() & (np.asarray(self.lengths) < self.n)
        ran = ~exact if not np.all(exact) else exact
        scale = float(np.max(np.abs(self.nodes[self._valid()]))) if self.nodes.size else 0.0
        gaps = []
        for i in np.flatnonzero(ran):
            th = np.sort(self.nodes[i, : self.lengths[i]])
            g = np.diff(th)
            gaps.append(g[g > 64 * np.finfo(np.float64).eps * scale])
        gaps = np.concatenate(gaps) if gaps else np.zeros(0)
        if np.all(exact):
            # Ritz values of one probe closer than the rounding of a float32 run are one
            # eigenvalue: the estimate does not record its arithmetic, and a float32 run
            # of a low-rank operator leaves its zero eigenvalue as Ritz values ~1e-7 *
            # scale apart, which an eighth of their gap would draw as needles
            gaps = gaps[gaps > RITZ_RESOLUTION * float(np.finfo(np.float32).eps) * scale]
            if gaps.size:
                return float(np.min(gaps)) / 8
        elif gaps.size:
            return float(max(np.median(gaps), self.rounding_floor()))
        return 1e-3 * scale if scale > 0 else 1e-3

    def default_grid(self, sigma: float | None = None, *, num: int | None = None) -> np.ndarray:
        """The grid :meth:`density` uses by default: the Ritz values (and deflated
        eigenvalues) padded by ``GRID_PAD`` kernel widths (about 8.5), where the Gaussian
        kernel has fallen to ``eps`` (float64) of its peak.

        When a uniform grid of spacing ``sigma / 3`` takes at most 20001 points (at least
        1001), that is the grid. A wider range (a bulk near zero and far outliers: more
        than about 6700 kernel widths) gets a **non-uniform** grid instead: around every
        Ritz value a window of ``GRID_PAD`` widths on each side with uniform spacing
        ``sigma / 3`` (windows that overlap are merged), and between the windows, where the
        Gaussian kernel is below ``eps`` of its peak, points whose spacing grows
        geometrically (by ``GRID_GROWTH``) from ``sigma / 3`` up to the spacing of 20001
        uniform points, so that the rule's intervals never jump from a peak's flank to a
        coarse step. Integrate the values with the trapezoid rule
        (``numpy.trapezoid(values, grid)``), not ``sum(values) * (grid[1] - grid[0])``: on
        either kind of grid it gives the total mass of the Gaussian-smoothed density to
        about ``eps * max|theta| / sigma`` (the rounding of the grid points themselves).

        ``num`` asks for ``num`` uniform points over the same padded range instead.
        """
        sigma = self.default_sigma() if sigma is None else check_sigma(sigma)
        b = self.bounds()
        pad = GRID_PAD * sigma
        lo, hi = b.lower - pad, b.upper + pad
        if num is not None:
            return np.linspace(lo, hi, num)
        fine = sigma / GRID_POINTS_PER_SIGMA
        uniform = int(np.ceil((hi - lo) / fine)) + 1
        if uniform <= GRID_MAX_UNIFORM:
            return np.linspace(lo, hi, max(uniform, GRID_MIN_POINTS))
        # A wide range with a narrow kernel: fine windows around the Ritz values, graded
        # spacing in between (the kernel is negligible there, but an interval of the
        # coarse spacing next to a window's edge would still count its last value over
        # thousands of widths).
        coarse = (hi - lo) / (GRID_MAX_UNIFORM - 1)
        loc = self.atoms()[0]
        if loc.size == 0:
            loc = np.array([b.lower, b.upper])
        return window_grid(loc, pad, fine, coarse)

    def density(self, grid: Any = None, *, sigma: float | None = None,
                kernel: str = "gaussian") -> tuple[np.ndarray, np.ndarray]:
        """The smoothed density on a grid.

        Parameters
        ----------
        grid
            Points to evaluate at, finite (a NaN or Inf raises a ValueError; default:
            :meth:`default_grid`).
        sigma
            Kernel width: the Gaussian's standard deviation or the Lorentzian's half
            width (default: :meth:`default_sigma`).
        kernel
            ``"gaussian"`` or ``"lorentzian"``; both are normalised exactly on the real
            line, so the density integrates over the real line to the total mass (1 for
            Rademacher and sphere probes) with no renormalisation on the grid.

        Returns
        -------
        grid, values : numpy.ndarray
            The default grid is not always uniform (see :meth:`default_grid`): integrate
            with the trapezoid rule, ``numpy.trapezoid(values, grid)``.

        Notes
        -----
        On the default grid the trapezoid rule recovers the Gaussian-smoothed density's
        total mass to rounding (the grid reaches ``GRID_PAD`` widths past the extreme
        Ritz values, where the kernel is below ``eps`` of its peak). The Lorentzian's
        tails are heavy, ``1/(pi t^2)``, and no grid of a plottable extent holds them:
        the default grid holds the mass ``sum_i m_i (atan((b - x_i)/sigma) - atan((a -
        x_i)/sigma)) / pi`` of the atoms ``(x_i, m_i)`` of :meth:`atoms`, with ``a, b``
        the grid's ends: at least ``(2/pi) atan(GRID_PAD) = 0.925`` of the total mass
        (the minimum, for a single point spectrum; an atom ``d`` widths inside an end
        misses about ``1 / (pi d)`` of its mass beyond it). Pass a wider ``grid`` for
        more of it.
        """
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}; choose one of {', '.join(KERNELS)}")
        sigma = check_sigma(self.default_sigma() if sigma is None else sigma)
        grid = self.default_grid(sigma) if grid is None else np.asarray(grid, dtype=np.float64)
        if not np.all(np.isfinite(grid)):
            bad = int(np.sum(~np.isfinite(grid)))
            raise ValueError(f"grid has {bad} NaN or Inf point(s); pass finite points (or "
                             "grid=None for the default grid)")
        loc, mass = self.atoms()
        values = np.empty(grid.shape)
        flat_grid, flat_vals = grid.reshape(-1), values.reshape(-1)
        chunk = max(1, 2**22 // max(loc.size, 1))
        for s in range(0, flat_grid.size, chunk):
            diff = (flat_grid[s:s + chunk, None] - loc[None, :]) / sigma
            if kernel == "gaussian":
                k = np.exp(-0.5 * diff * diff) / (sigma * np.sqrt(2 * np.pi))
            else:
                k = 1.0 / (np.pi * sigma * (1.0 + diff * diff))
            flat_vals[s:s + chunk] = k @ mass
        return grid, values

    def cdf(self, x: Any, *, sigma: float | None = None) -> np.ndarray:
        """Estimated fraction of eigenvalues ``<= x``: the quadrature's step function, or
        its Gaussian smoothing of width ``sigma`` (positive and finite, else a
        ValueError). NaN where ``x`` is NaN."""
        if sigma is not None:
            sigma = check_sigma(sigma)
        x = np.asarray(x, dtype=np.float64)
        loc, mass = self.atoms()
        order = np.argsort(loc)
        loc, mass = loc[order], mass[order]
        if sigma is None:
            cum = np.cumsum(mass)
            idx = np.searchsorted(loc, x, side="right")
            # (searchsorted puts NaN after every location: it would read as 1)
            return np.where(np.isnan(x), np.nan,
                            np.where(idx > 0, cum[np.maximum(idx - 1, 0)], 0.0))
        flat = x.reshape(-1)
        vals = ndtr((flat[:, None] - loc[None, :]) / sigma) @ mass
        return vals.reshape(x.shape)

    # -- functionals ------------------------------------------------------------
    @staticmethod
    def _rule_sums(f: Callable[[np.ndarray], np.ndarray], nodes: np.ndarray, weights: np.ndarray,
                   valid: np.ndarray) -> np.ndarray:
        fx = _real_values(f, nodes)
        return np.sum(np.where(valid, weights * np.where(valid, fx, 0.0), 0.0), axis=1)

    def _per_probe(self, f: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Per-probe estimates of ``tr f(A) / n``: the probe's scaled quadrature plus the
        exact deflated atoms."""
        per = self.probe_scales * self._rule_sums(f, self.nodes, self.weights, self._valid())
        if self.num_deflated:
            per = per + float(np.sum(_real_values(f, self.deflated_eigenvalues))) / self.n
        return per

    @cached_property
    def _previous(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return previous_rules(self.nodes, self.weights, self.lengths, self.num_steps, self.n,
                              self._breakdown_flags())

    def _quadrature_error(self, f: Callable[[np.ndarray], np.ndarray]) -> float:
        """Mean over probes of ``scale * |Q_m[f] - Q_{m-1}[f]|`` (NaN if undefined); for a
        probe whose rule is exact (a breakdown, or ``num_steps = n``), the change of
        ``f`` within each node's residual (:meth:`_resolution_error`) instead of 0."""
        prev_nodes, prev_weights, defined = self._previous
        if not np.all(defined):
            return float("nan")
        now = self._rule_sums(f, self.nodes, self.weights, self._valid())
        before = self._rule_sums(f, prev_nodes, prev_weights, prev_weights > 0)
        diff = np.abs(now - before)
        exact = self._breakdown_flags() | (np.asarray(self.lengths) == self.n)
        if np.any(exact):
            diff = np.where(exact, self._resolution_error(f), diff)
        return float(np.mean(self.probe_scales * diff))

    def _resolution_error(self, f: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Per probe, ``sum_j w_j max |f(theta_j +- r_j) - f(theta_j)|`` with ``r_j`` the
        node's residual (at least the run's rounding): how much the rule can change for an
        operator within the run's resolution of ``A``.

        An "exact" rule is exact for an operator that far from ``A`` only: a breakdown
        stops a probe at ``beta <= breakdown_tol * ||T||``, and products round at ``eps
        ||A||``, so eigenvalues closer than that merge into one node. For ``f`` smooth on
        that scale this is rounding; for ``f`` steep there (``1/x`` or ``log`` on a
        spectrum spanning more than ~1/eps, where the smallest eigenvalues merge) it
        is large, or NaN where ``f`` is not defined within the resolution, where it used
        to be reported as 0."""
        valid = self._valid()
        theta, r = self.nodes, self.residuals
        with np.errstate(all="ignore"):
            f0 = _values_or_nan(f, theta)
            spread = np.maximum(np.abs(_values_or_nan(f, theta - r) - f0),
                                np.abs(_values_or_nan(f, theta + r) - f0))
        return np.sum(np.where(valid, self.weights * np.where(valid, spread, 0.0), 0.0),
                      axis=1)

    def _estimate(self, per_probe: np.ndarray, quadrature_error: Any = None) -> Estimate:
        return estimate_from_samples(per_probe, quadrature_error)

    def moments(self, p: int | Any) -> Estimate:
        """Estimate of ``tr(A^p) / n`` for an integer ``p`` or an array of them (exact per
        probe for ``p <= 2 * num_steps - 1``), with standard errors and quadrature-error
        estimates (see :class:`Estimate`)."""
        ps = np.asarray(p)
        if ps.dtype.kind not in "iu" or np.any(ps < 0):
            raise ValueError(f"moments need non-negative integer powers; got {p!r}")
        if ps.size == 0:
            raise ValueError(f"moments need at least one power; got an empty array {p!r} "
                             "(pass e.g. 2 or [1, 2])")
        flat = [int(q) for q in ps.reshape(-1)]
        per = np.stack([self._per_probe(lambda t, q=q: t**q) for q in flat], axis=1)
        quad = np.array([self._quadrature_error(lambda t, q=q: t**q) for q in flat])
        if ps.ndim:
            return self._estimate(per.reshape((-1,) + ps.shape), quad.reshape(ps.shape))
        return self._estimate(per[:, 0], quad[0])

    def trace(self, f: Callable[[np.ndarray], np.ndarray]) -> Estimate:
        """Estimate of ``tr f(A)`` for a vectorised function ``f`` (e.g. ``numpy.exp``),
        with its standard error over probes (variance) and ``quadrature_error`` (bias
        estimate from the last Lanczos step, see :class:`Estimate`).

        ``f`` must return real values: complex ones (``numpy.emath.sqrt`` or
        ``numpy.emath.log`` at a negative Ritz value, which rounding puts below a zero
        eigenvalue) raise a TypeError rather than lose their imaginary part."""
        per = self._per_probe(f) * self.n
        return self._estimate(per, self.n * self._quadrature_error(f))

    def fraction_negative(self, tol: float | None = None) -> float:
        """Estimated fraction of eigenvalues below ``-tol``.

        Parameters
        ----------
        tol
            A threshold ``>= 0``; ``0`` counts every Ritz value below zero. The default,
            None, is twice the run's :meth:`rounding_floor` (:meth:`negative_tolerance`):
            the Ritz values of an exactly zero eigenvalue, which carry most of the weight
            for a Hessian or GGN with a large null space, are rounding of either sign, and
            counting them made about half of that null space "negative".

        Returns
        -------
        float
            The mean over probes of the quadrature mass below ``-tol`` (deflated
            eigenvalues count exactly), as :func:`specdens.analysis.negative_mass`.

        Raises
        ------
        ValueError
            When ``tol`` is negative, NaN or infinite.
        """
        tol = self.negative_tolerance(tol)
        return float(self._estimate(self._per_probe(lambda t: (t < -tol).astype(float))).value)

    def bounds(self) -> SpectralBounds:
        """Smallest and largest Ritz values over all probes (and deflated eigenvalues),
        with their residual norms."""
        valid = self._valid()
        nodes = np.where(valid, self.nodes, np.nan)
        i_lo = np.unravel_index(np.nanargmin(nodes), nodes.shape)
        i_hi = np.unravel_index(np.nanargmax(nodes), nodes.shape)
        lo, lo_r = float(self.nodes[i_lo]), float(self.residuals[i_lo])
        hi, hi_r = float(self.nodes[i_hi]), float(self.residuals[i_hi])
        if self.num_deflated:
            ev, res = self.deflated_eigenvalues, self.deflated_residuals
            j_lo, j_hi = int(np.argmin(ev)), int(np.argmax(ev))
            if ev[j_lo] < lo:
                lo, lo_r = float(ev[j_lo]), float(res[j_lo])
            if ev[j_hi] > hi:
                hi, hi_r = float(ev[j_hi]), float(res[j_hi])
        return SpectralBounds(lo, hi, lo_r, hi_r)

    # -- files ------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write to an ``.npz`` file: the arrays plus a JSON ``meta`` entry, no pickle.

        Format: ``format`` = ``"specdens.SpectralDensity"``, ``version`` = 1; float64
        arrays ``nodes``, ``weights``, ``residuals`` (num_probes x num_steps),
        ``probe_scales`` (num_probes); int64 ``lengths``; ``meta`` a JSON object with
        n, num_steps, seed, reorth, probe_kind, wall_time, matvecs, ``extra`` and, for an
        adaptive probe count, ``convergence``. A deflated estimate is written as version 2
        with two more float64 arrays, ``deflated_eigenvalues`` and ``deflated_residuals``
        (version-1 readers refuse it rather than silently drop the atoms). An optional
        int64 array ``probe_indices`` (num_probes) identifies the random probes, with
        ``seed``, or, for probes of several seeds, with the list ``probe_seeds`` of
        ``meta`` (one seed per probe; older readers ignore it), and an optional bool
        array ``breakdown`` (num_probes) flags the probes that broke down.

        The file is replaced atomically (written to a temporary file in the same folder,
        then renamed over ``path``): when the metadata cannot be stored (``extra`` holding
        a value JSON cannot hold raises a TypeError) or the write fails, an existing file
        at ``path`` is left as it was.
        """
        meta = {
            "n": self.n, "num_steps": self.num_steps, "seed": self.seed, "reorth": self.reorth,
            "probe_kind": self.probe_kind, "wall_time": self.wall_time, "matvecs": self.matvecs,
            "extra": self.extra,
        }
        if self.convergence is not None:
            meta["convergence"] = self.convergence.to_dict()
        if self.probe_seeds is not None:
            meta["probe_seeds"] = [int(v) for v in self.probe_seeds]
        arrays = dict(
            nodes=self.nodes, weights=self.weights, residuals=self.residuals,
            lengths=self.lengths.astype(np.int64), probe_scales=self.probe_scales,
        )
        if self.probe_indices is not None:
            arrays["probe_indices"] = np.asarray(self.probe_indices, dtype=np.int64)
        if self.breakdown is not None:
            arrays["breakdown"] = np.asarray(self.breakdown, dtype=bool)
        version = FORMAT_VERSION
        if self.num_deflated:
            version = FORMAT_VERSION_DEFLATED
            arrays["deflated_eigenvalues"] = np.asarray(self.deflated_eigenvalues, np.float64)
            arrays["deflated_residuals"] = np.asarray(self.deflated_residuals, np.float64)
        # serialise first: metadata that JSON cannot hold raises before any file is touched
        meta_json = json.dumps(meta, default=_json_default)
        atomic_write_npz(path, {"format": np.array(FORMAT_NAME), "version": np.array(version),
                                "meta": np.array(meta_json), **arrays})

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpectralDensity:
        """Read a file written by :meth:`save`; refuses corrupt or foreign files."""
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise ValueError(f"{path} is not a readable specdens result file ({exc})") from None
        if "format" not in data or str(data["format"]) != FORMAT_NAME:
            raise ValueError(
                f"{path} is not a specdens SpectralDensity file (no '{FORMAT_NAME}' tag)"
            )
        try:
            version = int(data.get("version", -1))
        except (TypeError, ValueError):
            raise ValueError(f"{path} is a corrupt specdens file: bad version "
                             f"{data['version']!r}") from None
        if version not in READABLE_VERSIONS:
            raise ValueError(f"{path} has format version {version}; this specdens reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        required = {"nodes", "weights", "residuals", "lengths", "probe_scales", "meta"}
        if version == FORMAT_VERSION_DEFLATED:
            required |= {"deflated_eigenvalues", "deflated_residuals"}
        missing = required - set(data)
        if missing:
            raise ValueError(f"{path} is a corrupt specdens file: missing {sorted(missing)}")
        try:
            meta = json.loads(str(data["meta"]))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is a corrupt specdens file: bad meta ({exc})") from None
        _check_meta(meta, str(path))
        try:
            out = cls(**_fields_from_file(data, meta))
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{path} is a corrupt specdens file: bad meta ({exc})") from None
        out._validate(str(path))
        return out

    def _validate(self, where: str) -> None:
        k, m = self.nodes.shape if self.nodes.ndim == 2 else (-1, -1)
        shapes_ok = (
            self.nodes.ndim == 2 and self.weights.shape == (k, m) and self.residuals.shape == (k, m)
            and self.lengths.shape == (k,) and self.probe_scales.shape == (k,)
        )
        if self.probe_indices is not None:
            shapes_ok = shapes_ok and self.probe_indices.shape == (k,)
        if self.breakdown is not None:
            shapes_ok = shapes_ok and self.breakdown.shape == (k,)
        if self.probe_seeds is not None:
            shapes_ok = shapes_ok and len(self.probe_seeds) == k
        if not shapes_ok:
            raise ValueError(f"{where} is a corrupt specdens file: inconsistent array shapes")
        if self.num_steps != m:
            raise ValueError(f"{where} is a corrupt specdens file: num_steps={self.num_steps} "
                             f"but the rules have {m} steps")
        if not self.n >= int(np.max(self.lengths, initial=1)):
            raise ValueError(f"{where} is a corrupt specdens file: n={self.n} is smaller than "
                             "the rules' length (a Krylov space of R^n has at most n dimensions)")
        if not (np.all(np.isfinite(self.nodes)) and np.all(np.isfinite(self.weights))):
            raise ValueError(f"{where} is a corrupt specdens file: non-finite nodes or weights")
        if np.any(self.lengths < 1) or np.any(self.lengths > m) or np.any(self.weights < 0):
            raise ValueError(f"{where} is a corrupt specdens file: invalid lengths or weights")
        if not np.allclose(self.weights.sum(axis=1), 1.0, atol=1e-8):
            raise ValueError(f"{where} is a corrupt specdens file: weights do not sum to 1")
        if not np.all(np.isfinite(self.probe_scales) & (self.probe_scales >= 0)):
            raise ValueError(f"{where} is a corrupt specdens file: probe scales must be finite "
                             "and >= 0")
        if not np.all(self.residuals[self._valid()] >= 0):  # also refuses NaN
            raise ValueError(f"{where} is a corrupt specdens file: NaN or negative residuals")
        d, r = self.deflated_eigenvalues, self.deflated_residuals
        if d.ndim != 1 or r.shape != d.shape or not np.all(np.isfinite(d)) or d.size >= self.n:
            raise ValueError(f"{where} is a corrupt specdens file: invalid deflated eigenvalues")

    # -- plotting and display ---------------------------------------------------
    def plot(self, ax: Any = None, *, log_density: bool = True, sigma: float | None = None,
             kernel: str = "gaussian", **kwargs: Any) -> Any:
        """Plot the density with matplotlib (the paper's view: a log density axis)."""
        from .plotting import plot_density

        return plot_density(self, ax=ax, log_density=log_density, sigma=sigma, kernel=kernel,
                            **kwargs)

    def __repr__(self) -> str:
        b = self.bounds()
        more = f", deflated={self.num_deflated}" if self.num_deflated else ""
        if self.convergence is not None:
            more += f", converged={self.convergence.converged}"
        return (
            f"SpectralDensity(n={self.n}, num_probes={self.num_probes}, "
            f"num_steps={self.num_steps}, "
            f"reorth={self.reorth!r}, range=[{b.lower:.6g}, {b.upper:.6g}]{more}, "
            f"matvecs={self.matvecs}, wall_time={self.wall_time:.3g}s)"
        )


def _check_meta(meta: Any, where: str) -> None:
    """Refuse a result file's ``meta`` that is not an object with a positive integer ``n``
    and ``num_steps`` and, when present, a list of non-negative integer ``probe_seeds``."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where} is a corrupt specdens file: meta is not a JSON object")
    for name in ("n", "num_steps"):
        if name not in meta:
            raise ValueError(f"{where} is a corrupt specdens file: meta has no {name!r} field")
        value = meta[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where} is a corrupt specdens file: meta field {name!r} must be "
                             f"a positive integer; got {value!r}")
    seeds = meta.get("probe_seeds")
    if seeds is not None and not (isinstance(seeds, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in seeds)):
        raise ValueError(f"{where} is a corrupt specdens file: meta field 'probe_seeds' must be "
                         "a list of non-negative integers")


def _fields_from_file(data: dict, meta: dict) -> dict:
    """The constructor arguments of :class:`SpectralDensity` from a result file's arrays
    and its checked ``meta``."""
    seeds = meta.get("probe_seeds")
    return dict(
        nodes=np.asarray(data["nodes"], dtype=np.float64),
        weights=np.asarray(data["weights"], dtype=np.float64),
        residuals=np.asarray(data["residuals"], dtype=np.float64),
        lengths=np.asarray(data["lengths"], dtype=np.int64),
        probe_scales=np.asarray(data["probe_scales"], dtype=np.float64),
        n=meta["n"], num_steps=meta["num_steps"], seed=meta.get("seed"),
        reorth=meta.get("reorth", "full"), probe_kind=meta.get("probe_kind", "rademacher"),
        wall_time=float(meta.get("wall_time", float("nan"))),
        matvecs=int(meta.get("matvecs", 0)), extra=meta.get("extra", {}),
        deflated_eigenvalues=np.asarray(data.get("deflated_eigenvalues", np.zeros(0)),
                                        dtype=np.float64),
        deflated_residuals=np.asarray(data.get("deflated_residuals", np.zeros(0)),
                                      dtype=np.float64),
        convergence=(ProbeConvergence.from_dict(meta["convergence"])
                     if meta.get("convergence") else None),
        probe_indices=(np.asarray(data["probe_indices"], dtype=np.int64)
                       if "probe_indices" in data else None),
        breakdown=(np.asarray(data["breakdown"], dtype=bool)
                   if "breakdown" in data else None),
        probe_seeds=tuple(seeds) if seeds is not None else None,
    )


def window_grid(loc: np.ndarray, pad: float, fine: float, coarse: float) -> np.ndarray:
    """Windows of ``pad`` on each side of the points ``loc`` (non-empty, finite) at spacing
    ``fine`` (windows closer than ``2 pad`` are merged), and between the windows points
    whose spacing grows geometrically (by ``GRID_GROWTH``) from ``fine`` up to ``coarse``:
    the non-uniform grid of :meth:`SpectralDensity.default_grid`."""
    loc = np.unique(np.asarray(loc, dtype=np.float64))
    split = np.flatnonzero(np.diff(loc) > 2 * pad) + 1
    starts = np.concatenate([[loc[0]], loc[split]]) - pad
    ends = np.concatenate([loc[split - 1], [loc[-1]]]) + pad
    pieces = []
    for j, (a, c) in enumerate(zip(starts, ends, strict=True)):
        pieces.append(np.linspace(a, c, int(np.ceil((c - a) / fine)) + 1))
        if j + 1 < starts.size:
            pieces.append(_graded_points(c, starts[j + 1], fine, coarse, GRID_GROWTH))
    return np.unique(np.concatenate(pieces))


def _graded_points(a: float, b: float, first: float, largest: float,
                   growth: float) -> np.ndarray:
    """Points strictly between ``a < b`` whose spacing is ``first`` next to both ends and
    grows by ``growth`` per step towards the middle, up to ``largest``."""
    gap = b - a
    steps = [first]
    while steps[-1] < largest:
        steps.append(min(steps[-1] * growth, largest))
    offsets = np.cumsum(steps)
    offsets = offsets[offsets < gap / 2]
    left, right = a + offsets, b - offsets[::-1]
    # the middle, at the spacing the grading reached
    start = left[-1] if left.size else a
    end = right[0] if right.size else b
    step = steps[min(offsets.size, len(steps) - 1)]
    middle = np.linspace(start, end, int(np.ceil((end - start) / step)) + 1)[1:-1]
    return np.concatenate([left, middle, right])


def _check_distinct_probes(parts: list[SpectralDensity]) -> None:
    """Refuse parts that repeat an estimate, or a random probe (same seed and index)."""
    for i, p in enumerate(parts):
        for j in range(i):
            if parts[j] is p:
                raise ValueError(
                    f"concatenate got the same estimate twice (parts {j} and {i}): repeated "
                    "probes are not independent samples and would shrink the standard error"
                )
    seen: dict[tuple[int, int], int] = {}
    for i, p in enumerate(parts):
        for key in p._probe_keys() or ():
            if key in seen:
                raise ValueError(
                    f"concatenate got probe {key[1]} of seed {key[0]} twice (parts {seen[key]} "
                    f"and {i}): repeated probes are not independent samples and would shrink "
                    "the standard error. Use other seeds or disjoint first_probe ranges"
                )
            seen[key] = i


def _merged_probe_identity(
        parts: list[SpectralDensity]) -> tuple[Any, tuple[int, ...] | None, Any]:
    """``seed``, ``probe_seeds`` and ``probe_indices`` of the concatenation of ``parts``."""
    first = parts[0]
    indices = (np.concatenate([np.asarray(p.probe_indices, dtype=np.int64) for p in parts])
               if all(p.probe_indices is not None for p in parts) else None)
    if all(p.seed == first.seed and p.probe_seeds is None for p in parts):
        return first.seed, None, indices
    seeds = [p._probe_seed_list() for p in parts]
    if any(s is None for s in seeds):
        return None, None, None  # some probes' identity is unknown: none is kept
    flat = tuple(s for part in seeds for s in part)
    if len(set(flat)) == 1:
        return flat[0], None, indices
    return None, (flat if indices is not None else None), indices


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in a specdens result file's metadata; "
                    "convert it to a JSON value (str, number, bool, None, list or dict)")
