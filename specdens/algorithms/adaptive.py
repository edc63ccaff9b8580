"""Adaptive probe counts: add probes in blocks until the standard error meets a tolerance.

``slq(op, num_probes="auto", ...)`` runs rounds of ``probe_block`` probes (probe indices
continue from round to round, so the result equals ``slq(op, num_probes=K)`` for the
``K`` probes used) and stops after the first round where, for every component ``c`` of
the watched functional,

``t_{K-1} * stderr_c <= max(atol, rtol * |value_c|)``

with ``t_{K-1}`` the two-sided Student-t quantile of the confidence level with ``K - 1``
degrees of freedom (it tends to the normal quantile ``z`` as ``K`` grows and, for few
probes, accounts for the uncertainty of the standard error itself: a normal quantile with
10 probes would make a nominal 95% interval cover about 92%). For a density the
tolerance is ``max(atol, rtol * max_x density(x))`` at every grid point. The interval
covers the SLQ estimate's *expectation*; the quadrature (bias) error is reported apart,
by :attr:`specdens.Estimate.quadrature_error`.

The rule is evaluated on the per-probe values in units of each component's largest
``|value|`` (see :func:`scaled_ratio`), so that it does not depend on the target's scale:
``f = c x`` stops after the same rounds for ``c = 1``, ``1e160`` or ``1e-300`` (on the raw
values the squares in the standard error overflow to Inf or underflow to 0). NaN or Inf
per-probe values raise ``FloatingPointError``.

Stopping when the estimated standard error first falls below the tolerance favours
rounds whose standard error happens to be underestimated, so the coverage of the final
interval is somewhat below the nominal level when the run stops after few rounds; the
Student-t quantile and a first round of at least ``probe_block >= 2`` probes reduce this
but do not remove it: in the review's experiments a nominal 95% interval covered 0.837 at
``rtol=0.12`` with ``probe_block=3`` (about 6 points below the same probe counts fixed in
advance), and the loss is largest when the run stops after one or two rounds. For the
nominal coverage, choose a larger ``probe_block`` (the first round), a smaller ``rtol``
than needed, or fix ``num_probes`` from a pilot run (``tests/test_adaptive.py`` measures
the coverage).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import t as student_t

from ..density import ProbeConvergence, SpectralDensity, normal_quantile


class ProbeCountWarning(UserWarning):
    """An adaptive probe count reached ``max_probes`` before meeting its tolerance."""


TARGETS = ("moments", "trace", "density")


def describe_target(target: Any) -> str:
    if isinstance(target, str):
        if target == "moments":
            return "moments [1, 2]"
        if target == "trace":
            return "moments [1]"
        if target == "density":
            return "density"
        raise ValueError(f"target={target!r}; choose one of {', '.join(TARGETS)}, a sequence of "
                         "moment powers, or a function f (for tr f(A) / n)")
    if callable(target):
        return f"trace of {getattr(target, '__name__', repr(target))}"
    try:
        powers = [int(p) for p in target]
    except (TypeError, ValueError):
        raise ValueError(f"target={target!r}; choose one of {', '.join(TARGETS)}, a sequence "
                         "of moment powers, or a function f (for tr f(A) / n)") from None
    if not powers or any(p < 0 for p in powers) or any(
            float(p) != float(q) for p, q in zip(powers, target, strict=True)):
        raise ValueError(f"target moments must be non-negative integers; got {target!r}")
    return f"moments {powers}"


def _evaluator(target: Any) -> tuple[Callable[[SpectralDensity, dict], np.ndarray], bool]:
    """A function (density, memo) -> per-probe values (probes x components), and whether
    the tolerance is relative to each component (moments, traces) or to the largest
    (a density: ``rtol * max_x density(x)``)."""
    desc = describe_target(target)
    if desc.startswith("moments"):
        if isinstance(target, str):  # first: == on an array target compares entrywise
            powers = [1] if target == "trace" else [1, 2]
        else:
            powers = [int(p) for p in target]

        def moments(d: SpectralDensity, memo: dict) -> np.ndarray:
            return np.stack([d._per_probe(lambda t, q=q: t**q) for q in powers], axis=1)
        return moments, True
    if desc == "density":
        def density(d: SpectralDensity, memo: dict) -> np.ndarray:
            if "grid" not in memo:  # fixed by the first round
                memo["sigma"] = d.default_sigma()
                memo["grid"] = d.default_grid(memo["sigma"])
            return per_probe_density(d, memo["grid"], memo["sigma"])
        return density, False

    def trace_of_f(d: SpectralDensity, memo: dict) -> np.ndarray:
        return d._per_probe(target)[:, None]  # tr f(A) / n per probe
    return trace_of_f, True


def scaled_ratio(per: np.ndarray, *, relative: bool, rtol: float, atol: float,
                 quantile: float) -> np.ndarray:
    """``quantile * stderr / max(atol, rtol * scale)`` per component, from per-probe values
    (probes x components; ``scale`` is ``|value|``, or ``max |value|`` over components when
    not ``relative``).

    Computed in units of each component's largest ``|per-probe value|``, where the mean
    and the standard error cannot overflow (squares of values beyond 1e154 would, and an
    Inf standard error never met the tolerance) nor underflow; the ratio does not depend
    on the units. Non-finite per-probe values raise ``FloatingPointError``."""
    per = np.asarray(per, dtype=np.float64)
    if not np.all(np.isfinite(per)):
        raise FloatingPointError(
            "a per-probe estimate is NaN or Inf (the function returned non-finite values at "
            "some Ritz values or nodes?); specdens never averages such values in")
    k = per.shape[0]
    unit = np.max(np.abs(per), axis=0)
    unit = np.where(unit > 0, unit, 1.0)
    x = per / unit
    value = x.mean(axis=0)
    stderr = x.std(axis=0, ddof=1) / np.sqrt(k)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if relative:
            tol = np.maximum(atol / unit, rtol * np.abs(value))
        else:
            # the largest |value| is at most the largest |per-probe value|: finite
            tol = np.maximum(atol, rtol * float(np.max(np.abs(value) * unit))) / unit
        return np.where(tol > 0, quantile * stderr / np.where(tol > 0, tol, 1.0),
                        np.where(stderr > 0, np.inf, 0.0))


def per_probe_density(d: SpectralDensity, grid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smoothed density of each probe's estimate (with the deflated atoms), shape
    ``(num_probes, len(grid))``; their mean is ``d.density(grid, sigma=sigma)``."""
    grid = np.asarray(grid, dtype=np.float64)
    valid = d._valid()
    out = np.empty((d.num_probes, grid.size))
    norm = 1.0 / (sigma * np.sqrt(2 * np.pi))
    for i in range(d.num_probes):
        loc = d.nodes[i, valid[i]]
        mass = d.weights[i, valid[i]] * d.probe_scales[i]
        z = (grid[:, None] - loc[None, :]) / sigma
        out[i] = (np.exp(-0.5 * z * z) * norm) @ mass
    if d.num_deflated:
        z = (grid[:, None] - d.deflated_eigenvalues[None, :]) / sigma
        out += (np.exp(-0.5 * z * z) * norm).sum(axis=1)[None, :] / d.n
    return out


def run_adaptive(run_round: Callable[[int, int], SpectralDensity], *, target: Any,
                 max_probes: int, probe_block: int, rtol: float, atol: float,
                 confidence: float, fixed_matvecs: int = 0) -> SpectralDensity:
    """Rounds of ``run_round(first_probe, count)`` until the tolerance is met.

    ``fixed_matvecs`` are products spent once for all rounds (a deflation's eigsh run);
    they are added to the result's ``matvecs`` once.
    """
    normal_quantile(confidence)  # validates
    evaluate, relative = _evaluator(target)
    desc = describe_target(target)
    memo: dict = {}
    parts: list[SpectralDensity] = []
    history: list[tuple[int, float]] = []
    used = 0
    converged = False
    worst = float("inf")
    q = float("nan")
    while used < max_probes:
        count = min(max(probe_block, 2) if used == 0 else probe_block, max_probes - used)
        parts.append(run_round(used, count))
        used += count
        d = SpectralDensity.concatenate(parts) if len(parts) > 1 else parts[0]
        q = float(student_t.ppf(0.5 + 0.5 * confidence, used - 1))
        ratio = scaled_ratio(evaluate(d, memo), relative=relative, rtol=rtol, atol=atol,
                             quantile=q)
        worst = float(np.max(ratio))
        history.append((used, worst))
        if worst <= 1.0:
            converged = True
            break
    info = ProbeConvergence(
        converged=converged, num_probes=used, max_probes=max_probes, probe_block=probe_block,
        target=desc, confidence=float(confidence), quantile=q, rtol=float(rtol),
        atol=float(atol), worst_ratio=worst, history=tuple(history),
    )
    if not converged:
        warnings.warn(
            f"slq: the {desc} did not reach the tolerance (rtol={rtol:g}, atol={atol:g}, "
            f"confidence {confidence:g}) with max_probes={max_probes}: quantile x stderr is "
            f"{worst:.3g} times the tolerance. Raise max_probes or loosen the tolerance; the "
            "result holds all probes run (see its .convergence).",
            ProbeCountWarning,
            stacklevel=3,
        )
    matvecs = int(sum(p.matvecs for p in parts)) + int(fixed_matvecs)
    wall = float(sum(p.wall_time for p in parts))
    return SpectralDensity.concatenate(parts, matvecs=matvecs, wall_time=wall,
                                       convergence=info)


def check_adaptive_options(max_probes: Any, probe_block: Any, rtol: Any, atol: Any,
                           confidence: Any) -> tuple[int, int, float, float, float]:
    """Validated adaptive settings (defaults filled in)."""
    from .. import _checks

    max_probes = 100 if max_probes is None else _checks.positive_int(max_probes, "max_probes")
    probe_block = 10 if probe_block is None else _checks.positive_int(probe_block, "probe_block")
    if max_probes < 2:
        raise ValueError(f"max_probes must be at least 2 (a standard error needs two probes); "
                         f"got {max_probes}")
    rtol = 1e-2 if rtol is None else float(rtol)
    atol = 0.0 if atol is None else float(atol)
    if not (np.isfinite(rtol) and rtol >= 0 and np.isfinite(atol) and atol >= 0):
        raise ValueError(f"rtol and atol must be finite and >= 0; got rtol={rtol}, atol={atol}")
    if rtol == 0 and atol == 0:
        raise ValueError("give a positive rtol or atol for num_probes='auto'")
    confidence = 0.95 if confidence is None else confidence
    normal_quantile(confidence)
    return max_probes, probe_block, rtol, atol, float(confidence)
