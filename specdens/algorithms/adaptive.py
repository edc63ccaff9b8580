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

Stopping when the estimated standard error first falls below the tolerance favours
rounds whose standard error happens to be underestimated, so the coverage of the final
interval is somewhat below the nominal level when the run stops after few rounds; the
Student-t quantile and a first round of at least ``probe_block >= 2`` probes keep this
small (``tests/test_adaptive.py`` measures it).
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


def _evaluator(target: Any) -> Callable[[SpectralDensity, dict], tuple[np.ndarray, np.ndarray,
                                                                         np.ndarray]]:
    """A function (density, memo) -> (value, stderr, tolerance scale) over components."""
    desc = describe_target(target)
    if desc.startswith("moments"):
        if isinstance(target, str):  # first: == on an array target compares entrywise
            powers = [1] if target == "trace" else [1, 2]
        else:
            powers = [int(p) for p in target]

        def moments(d: SpectralDensity, memo: dict) -> tuple:
            est = d.moments(np.asarray(powers))
            v = np.atleast_1d(np.asarray(est.value, dtype=float))
            return v, np.atleast_1d(np.asarray(est.stderr, dtype=float)), np.abs(v)
        return moments
    if desc == "density":
        def density(d: SpectralDensity, memo: dict) -> tuple:
            if "grid" not in memo:  # fixed by the first round
                memo["sigma"] = d.default_sigma()
                memo["grid"] = d.default_grid(memo["sigma"])
            per = per_probe_density(d, memo["grid"], memo["sigma"])
            k = per.shape[0]
            v = per.mean(axis=0)
            se = per.std(axis=0, ddof=1) / np.sqrt(k)
            return v, se, np.full_like(v, np.max(np.abs(v)))
        return density

    def trace_of_f(d: SpectralDensity, memo: dict) -> tuple:
        est = d.trace(target)
        v = np.atleast_1d(np.asarray(est.value, dtype=float)) / d.n
        return v, np.atleast_1d(np.asarray(est.stderr, dtype=float)) / d.n, np.abs(v)
    return trace_of_f


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
    evaluate = _evaluator(target)
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
        value, stderr, scale = evaluate(d, memo)
        q = float(student_t.ppf(0.5 + 0.5 * confidence, used - 1))
        tol = np.maximum(atol, rtol * scale)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(tol > 0, q * stderr / np.where(tol > 0, tol, 1.0),
                             np.where(stderr > 0, np.inf, 0.0))
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
