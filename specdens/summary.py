"""Summaries of a :class:`~specdens.SpectralDensity`: outliers and a JSON-ready digest.

The outlier rule
----------------
A Ritz value ``theta`` (a node of one probe's Gauss rule) is reported as an outlier when

1. it has **converged**: its residual bound ``beta_m |s_mj|`` (floored at the run's
   rounding, see :func:`specdens.algorithms.quadrature.quadrature_rules`; the distance from
   ``theta`` to the nearest eigenvalue is at most this) is ``<= rtol * scale``, with
   ``scale`` the largest ``|theta|`` over all probes; and
2. it lies **well outside the bulk**: with ``lo`` and ``hi`` the quantiles of the SLQ
   distribution (its step CDF) at ``tail`` and ``1 - tail`` and ``width = hi - lo``,
   ``theta > hi + gap * width`` (an upper outlier) or ``theta < lo - gap * width`` (a
   lower one). ``width`` is floored at ``sqrt(eps) * scale`` so that a spectrum whose
   bulk is a single point (a low-rank matrix) still has a threshold.

Step 2 is iterated, as in sigma clipping: the quadrature mass of the outliers found so
far is removed, ``lo``, ``hi`` and ``width`` are recomputed from what is left
(renormalised), and the search repeats until it finds nothing new. So outliers holding
more than ``tail`` of the spectrum (more than ``n / 100`` of them by default) do not
hide each other, and the bulk's extent is that of the bulk alone. The first round still
needs ``1 - tail`` to fall below the threshold of the largest outlier: with the default
``tail`` the outliers must hold less than about 3% of the spectrum (``n >= 350`` for ten
outliers). Raise ``tail`` for small matrices with many outliers; too large a ``tail``
narrows the bulk and reports its edges as outliers.

:func:`bulk` returns what the last round measured: the bulk's edges ``lo`` and ``hi``
(outliers removed), its ``width`` and the two thresholds ``lo - gap * width`` and
``hi + gap * width``. :func:`specdens.analysis.spectrum_stats` uses ``hi`` as the bulk
edge in the ratio of the largest eigenvalue to the bulk.

The eigenvalues a deflated estimate holds apart (``deflated_eigenvalues``) take part as
atoms of mass ``1/n`` with their residual norms, like Ritz values of one more probe.

Converged candidates of all probes (and ghost copies within a probe, after Lanczos
without reorthogonalisation) are then **deduplicated**: two candidates closer than the
sum of their residual bounds (or than ``1e-12 * scale``) are one eigenvalue, reported
with the value of the smallest residual. Lanczos from one start vector sees one copy of
a repeated eigenvalue, so an outlier of multiplicity ``k`` is reported once; its
``mass`` (about ``k / n``) tells them apart.

With the defaults it finds the ten outliers of
:func:`specdens.examples.hessian_like` and the three spikes of
:func:`specdens.examples.marchenko_pastur` at ``n = 3000`` (90 steps, 10 probes), and
nothing on spectra without outliers (Marchenko-Pastur, semicircle, uniform).

References
----------
B. N. Parlett (1998), The Symmetric Eigenvalue Problem, SIAM, section 13.2 (the residual
bound of a Ritz pair). B. Ghorbani, S. Krishnan, Y. Xiao (2019), An investigation into
neural net optimization via Hessian eigenvalue density, ICML (outliers of the Hessian).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .density import SpectralDensity

__all__ = ["Bulk", "Outlier", "bulk", "outliers", "summarize"]

SIDES = ("both", "upper", "lower")
_MAX_CLIPPING_ROUNDS = 1000


@dataclass(frozen=True)
class Outlier:
    """One isolated eigenvalue found by :func:`outliers`.

    Attributes
    ----------
    value : float
        The Ritz value (of the probe where its residual is smallest).
    residual : float
        Its residual bound: an eigenvalue lies within ``residual`` of ``value``.
    num_probes : int
        How many probes found it converged (0 for an eigenvalue removed by deflation,
        which counts as an exact atom of mass ``1/n``).
    mass : float
        Its estimated share of the spectrum (SLQ mass of the merged Ritz values), about
        ``multiplicity / n``, noisy.
    side : str
        ``"upper"`` (above the bulk) or ``"lower"`` (below it).
    """

    value: float
    residual: float
    num_probes: int
    mass: float
    side: str


def _valid(density: SpectralDensity) -> np.ndarray:
    """Mask of the Ritz values each probe reached."""
    return np.arange(density.nodes.shape[1])[None, :] < np.asarray(density.lengths)[:, None]


def _masked_quantiles(loc: np.ndarray, mass: np.ndarray, ps: tuple[float, ...]) -> list[float]:
    """Quantiles of the discrete measure ``sum mass_i delta(loc_i)``, normalised: the
    smallest ``x`` with ``F(x) >= p``."""
    order = np.argsort(loc, kind="stable")
    loc, cum = loc[order], np.cumsum(mass[order])
    cum = cum / cum[-1]
    idx = np.searchsorted(cum, np.asarray(ps) - 1e-14, side="left")
    return [float(loc[min(int(i), loc.size - 1)]) for i in idx]


def quantile(density: SpectralDensity, p: float) -> float:
    """The ``p``-quantile of the SLQ distribution: the smallest Ritz value ``x`` with
    estimated CDF ``F(x) >= p`` (masses normalised to sum to 1)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a quantile needs 0 <= p <= 1; got {p}")
    loc, mass = density.atoms()
    return _masked_quantiles(loc, mass, (p,))[0]


@dataclass(frozen=True)
class _Atoms:
    """Every Ritz value of every probe (and deflated eigenvalue) as flat arrays."""

    loc: np.ndarray
    res: np.ndarray
    mass: np.ndarray
    probe: np.ndarray  # probe index; -1 for a deflated eigenvalue


def _atoms(density: SpectralDensity) -> _Atoms:
    valid = _valid(density)
    mass = density.weights * density.probe_scales[:, None] / density.num_probes
    probe = np.broadcast_to(np.arange(density.num_probes)[:, None], valid.shape)
    loc, res, m, pr = density.nodes[valid], density.residuals[valid], mass[valid], probe[valid]
    # A deflated estimate holds its top eigenvalues apart, as exact atoms of mass 1/n.
    defl = np.asarray(getattr(density, "deflated_eigenvalues", np.zeros(0)), dtype=np.float64)
    if defl.size:
        dres = np.asarray(getattr(density, "deflated_residuals", np.zeros(defl.size)),
                          dtype=np.float64)
        loc, res = np.concatenate([loc, defl]), np.concatenate([res, dres])
        m = np.concatenate([m, np.full(defl.size, 1.0 / density.n)])
        pr = np.concatenate([pr, np.full(defl.size, -1)])
    return _Atoms(loc=loc, res=res, mass=m, probe=pr)


@dataclass(frozen=True)
class _Clipping:
    """The result of the sigma-clipping rounds of the outlier rule."""

    atoms: _Atoms
    flagged: np.ndarray
    lower: float
    upper: float
    width: float
    scale: float


def _check_rule(tail: float, gap: float, rtol: float, side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side={side!r}; choose one of {', '.join(SIDES)}")
    if not 0.0 < tail < 0.5:
        raise ValueError(f"tail must be in (0, 0.5); got {tail}")
    if not (gap >= 0 and math.isfinite(gap)):
        raise ValueError(f"gap must be non-negative and finite; got {gap}")
    if not rtol > 0:
        raise ValueError(f"rtol must be positive; got {rtol}")


def _clip(density: SpectralDensity, *, tail: float, gap: float, rtol: float,
          side: str) -> _Clipping | None:
    """Run the rounds of the rule (module documentation); ``None`` for a zero spectrum."""
    _check_rule(tail, gap, rtol, side)
    at = _atoms(density)
    nodes = at.loc
    scale = float(np.max(np.abs(nodes))) if nodes.size else 0.0
    if scale == 0.0:
        return None
    converged = at.res <= rtol * scale
    want_up, want_lo = side in ("both", "upper"), side in ("both", "lower")
    flagged = np.zeros(nodes.shape, dtype=bool)
    for _ in range(_MAX_CLIPPING_ROUNDS):
        keep = ~flagged
        lo, hi = _masked_quantiles(nodes[keep], at.mass[keep], (tail, 1 - tail))
        width = max(hi - lo, math.sqrt(np.finfo(np.float64).eps) * scale)
        new = converged & ~flagged & (
            (want_up & (nodes > hi + gap * width)) | (want_lo & (nodes < lo - gap * width)))
        if not new.any():
            break
        flagged |= new
    return _Clipping(atoms=at, flagged=flagged, lower=lo, upper=hi, width=width, scale=scale)


@dataclass(frozen=True)
class Bulk:
    """The extent of the bulk found by the outlier rule (see the module documentation).

    Attributes
    ----------
    lower, upper : float
        The ``tail`` and ``1 - tail`` quantiles of the SLQ distribution with the outliers
        removed: the bulk's edges.
    width : float
        ``upper - lower``, floored at ``sqrt(eps) * scale``.
    lower_threshold, upper_threshold : float
        ``lower - gap * width`` and ``upper + gap * width``: a converged Ritz value beyond
        them is an outlier.
    scale : float
        The largest ``|theta|`` over all probes.
    """

    lower: float
    upper: float
    width: float
    lower_threshold: float
    upper_threshold: float
    scale: float


def bulk(density: SpectralDensity, *, tail: float = 0.01, gap: float = 0.5,
         rtol: float = 1e-6, side: str = "both") -> Bulk:
    """The bulk's edges and the outlier thresholds of :func:`outliers`' rule.

    Parameters are those of :func:`outliers`; the edges are those of the last clipping
    round, so they describe the bulk without the outliers. For a zero spectrum every
    field is 0.
    """
    clip = _clip(density, tail=tail, gap=gap, rtol=rtol, side=side)
    if clip is None:
        return Bulk(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    return Bulk(lower=clip.lower, upper=clip.upper, width=clip.width,
                lower_threshold=clip.lower - gap * clip.width,
                upper_threshold=clip.upper + gap * clip.width, scale=clip.scale)


def outliers(density: SpectralDensity, *, tail: float = 0.01, gap: float = 0.5,
             rtol: float = 1e-6, side: str = "both") -> tuple[Outlier, ...]:
    """Isolated eigenvalues outside the bulk: converged Ritz values far from it.

    See the module documentation for the rule.

    Parameters
    ----------
    density
        An SLQ estimate (:func:`specdens.slq`).
    tail
        Mass in each tail left out of the bulk's extent: the bulk is
        ``[Q(tail), Q(1 - tail)]`` with ``Q`` the SLQ quantile function.
    gap
        How far outside the bulk an outlier must be, in bulk widths.
    rtol
        Convergence tolerance on the residual bound, relative to the largest ``|theta|``.
    side
        ``"both"``, ``"upper"`` (above the bulk) or ``"lower"`` (below it).

    Returns
    -------
    tuple of Outlier
        Sorted by value, ascending.
    """
    clip = _clip(density, tail=tail, gap=gap, rtol=rtol, side=side)
    if clip is None:
        return ()
    flagged, lo, hi, scale = clip.flagged, clip.lower, clip.upper, clip.scale
    at = clip.atoms
    found: list[Outlier] = []
    for flag, name in ((flagged & (at.loc < lo), "lower"), (flagged & (at.loc > hi), "upper")):
        if not flag.any():
            continue
        vals, rs, ms, ps = at.loc[flag], at.res[flag], at.mass[flag], at.probe[flag]
        order = np.argsort(vals, kind="stable")
        vals, rs, ms, ps = vals[order], rs[order], ms[order], ps[order]
        floor = 1e-12 * scale
        start = 0
        for i in range(1, vals.size + 1):
            if i < vals.size and vals[i] - vals[i - 1] <= rs[i] + rs[i - 1] + floor:
                continue
            group = slice(start, i)
            best = start + int(np.argmin(rs[group]))
            probes = ps[group]
            found.append(Outlier(value=float(vals[best]), residual=float(rs[best]),
                                 num_probes=int(np.unique(probes[probes >= 0]).size),
                                 mass=float(ms[group].sum()), side=name))
            start = i
    return tuple(sorted(found, key=lambda o: o.value))


def _num(x: Any) -> float | None:
    """A JSON-safe float: ``None`` for NaN and infinities."""
    x = float(x)
    return x if math.isfinite(x) else None


def summarize(density: SpectralDensity, **outlier_options: Any) -> dict:
    """A JSON-serialisable digest of an SLQ estimate.

    Parameters
    ----------
    density
        An SLQ estimate.
    **outlier_options
        Passed to :func:`outliers` (``tail``, ``gap``, ``rtol``, ``side``).

    Returns
    -------
    dict
        ``n``, ``steps``, ``probes``, ``reorth``, ``probe_kind``, ``seed``;
        ``range`` (``min``, ``max`` Ritz values and their residual bounds
        ``min_residual``, ``max_residual``, and ``interval``, the range widened by
        them); ``negative_fraction`` (the estimated fraction of eigenvalues below
        ``-tol``, as :meth:`SpectralDensity.fraction_negative` with its default ``tol``,
        twice the run's rounding floor, echoed as ``tol``: deflated eigenvalues count
        exactly)
        and ``moments`` (``"1"``: ``tr(A)/n``, ``"2"``:
        ``tr(A^2)/n``), each ``{"value", "stderr"}`` with the standard error over probes
        (``None`` for one probe); ``trace`` (``n`` times the first moment);
        ``outliers`` (a list of :class:`Outlier` as dicts) and ``outlier_rule`` (its
        parameters as Python floats, ``side`` a string); ``timings`` (``wall_time`` of
        the Lanczos run in seconds); ``matvecs``; ``sigma`` (the default kernel width).
    """
    b = density.bounds()
    m1, m2 = density.moments(1), density.moments(2)
    k = density.num_probes
    # The density's own functional ``tr(1[A < -tol]) / n``: the quadrature mass below
    # -tol plus the deflated eigenvalues below it (exact atoms of mass 1/n each), which a
    # sum over the quadrature nodes alone would leave out. ``tol`` is the default of
    # fraction_negative (twice the rounding floor: a zero eigenvalue's Ritz values are
    # rounding of either sign).
    neg_tol = density.negative_tolerance(None)
    neg_est = density.trace(lambda t: (np.asarray(t) < -neg_tol).astype(np.float64))
    neg = float(neg_est.value) / density.n
    neg_se = float(neg_est.stderr) / density.n
    rule = {"tail": 0.01, "gap": 0.5, "rtol": 1e-6, "side": "both"}
    rule.update(outlier_options)
    found = outliers(density, **rule)
    # echoed as plain floats and strings (numpy scalars such as float32 are not JSON)
    rule = {key: str(value) if key == "side" else float(value)
            for key, value in rule.items()}
    return {
        "n": int(density.n),
        "steps": int(density.num_steps),
        "probes": int(k),
        "reorth": density.reorth,
        "probe_kind": density.probe_kind,
        "seed": density.seed,
        "range": {
            "min": b.lower, "max": b.upper,
            "min_residual": b.lower_residual, "max_residual": b.upper_residual,
            "interval": list(b.interval),
        },
        "negative_fraction": {"value": neg, "stderr": _num(neg_se), "tol": neg_tol},
        "moments": {
            "1": {"value": _num(m1.value), "stderr": _num(m1.stderr)},
            "2": {"value": _num(m2.value), "stderr": _num(m2.stderr)},
        },
        "trace": {"value": _num(density.n * m1.value),
                  "stderr": _num(density.n * m1.stderr)},
        "outliers": [asdict(o) for o in found],
        "outlier_rule": rule,
        "timings": {"wall_time": _num(density.wall_time)},
        "matvecs": int(density.matvecs),
        "sigma": _num(density.default_sigma()),
    }
