"""Plots of spectral densities with matplotlib (an optional dependency).

matplotlib is imported when a plot is drawn, never when specdens is imported, and this
module never selects a backend: with ``ax=None`` it draws on pyplot's current axes,
otherwise only on the axes it is given (the command line draws on a
``matplotlib.figure.Figure`` with the Agg canvas, without pyplot).

The default view is the paper's: the Gaussian-smoothed density on a log density axis,
where outliers a few eigenvalues strong stay visible next to the bulk (Ghorbani,
Krishnan & Xiao, 2019, An investigation into neural net optimization via Hessian
eigenvalue density, ICML, figures 1-6).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .density import KERNELS, SpectralDensity

__all__ = ["plot_density", "require_matplotlib", "smoothed_eigenvalue_density"]

INSTALL_HINT = "pip install 'specdens[plot]'"


def require_matplotlib() -> Any:
    """Import matplotlib, or raise an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            f"plotting needs matplotlib, which is not installed ({exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    return matplotlib


def _kernel(diff: np.ndarray, sigma: float, kernel: str) -> np.ndarray:
    z = diff / sigma
    if kernel == "gaussian":
        return np.exp(-0.5 * z * z) / (sigma * np.sqrt(2 * np.pi))
    return 1.0 / (np.pi * sigma * (1.0 + z * z))


def smoothed_eigenvalue_density(eigenvalues: Any, grid: Any, *, sigma: float,
                                kernel: str = "gaussian") -> np.ndarray:
    """``(1/n) sum_i k_sigma(x - lambda_i)`` on ``grid``: known eigenvalues smoothed by the
    kernel :meth:`SpectralDensity.density` uses, for a like-for-like comparison.

    On an evenly spaced grid the eigenvalues are first binned to the grid (an error of
    at most half a grid step in each location, a sixth of ``sigma`` on the default
    grid) and the bins convolved with the kernel by FFT, so a million eigenvalues cost
    little; otherwise the sum is computed exactly.

    Parameters
    ----------
    eigenvalues
        The spectrum, 1-D.
    grid
        Points to evaluate at, 1-D.
    sigma, kernel
        Kernel width and ``"gaussian"`` or ``"lorentzian"``.

    Returns
    -------
    numpy.ndarray
        The density at ``grid``.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; choose one of {', '.join(KERNELS)}")
    sigma = float(sigma)
    if not (sigma > 0 and np.isfinite(sigma)):
        raise ValueError(f"sigma must be positive and finite; got {sigma}")
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    x = np.asarray(grid, dtype=np.float64).reshape(-1)
    if lam.size == 0 or x.size == 0:
        return np.zeros(x.shape)
    steps = np.diff(x)
    uniform = x.size > 2 and steps[0] > 0 and np.allclose(steps, steps[0], rtol=1e-6, atol=0)
    if not uniform:
        out = np.empty(x.shape)
        chunk = max(1, 2**22 // lam.size)
        for s in range(0, x.size, chunk):
            out[s:s + chunk] = _kernel(x[s:s + chunk, None] - lam[None, :], sigma, kernel).sum(1)
        return out / lam.size
    from scipy.signal import fftconvolve

    h = float(steps[0])
    bins = np.clip(np.rint((lam - x[0]) / h).astype(np.int64), 0, x.size - 1)
    counts = np.bincount(bins, minlength=x.size).astype(np.float64) / lam.size
    offsets = np.arange(-(x.size - 1), x.size) * h
    full = fftconvolve(counts, _kernel(offsets, sigma, kernel), mode="full")
    return np.maximum(full[x.size - 1: 2 * x.size - 1], 0.0)


def _plot_grid(density: SpectralDensity, sigma: float) -> np.ndarray:
    """The default grid of :meth:`SpectralDensity.default_grid`, padded by 2% of the
    range on each side as well so that extreme outliers do not sit on the frame."""
    b = density.bounds()
    pad = max(5 * sigma, 0.02 * (b.upper - b.lower))
    lo, hi = b.lower - pad, b.upper + pad
    num = int(np.clip(np.ceil(3 * (hi - lo) / sigma), 1001, 20001))
    return np.linspace(lo, hi, num)


def plot_density(density: SpectralDensity, ax: Any = None, *, log_density: bool = True,
                 sigma: float | None = None, kernel: str = "gaussian", grid: Any = None,
                 floor: float = 1e-8, reference: Any = None, reference_label: str = "exact",
                 mark_outliers: bool = False, **kwargs: Any) -> Any:
    """Plot the smoothed eigenvalue density of an SLQ estimate.

    Parameters
    ----------
    density
        The estimate (:func:`specdens.slq`).
    ax
        matplotlib axes to draw on (default: pyplot's current axes).
    log_density
        Log scale on the density axis (the paper's view). Densities below
        ``floor * max`` are drawn at that floor, so the plot shows the bulk, the
        outliers and the empty gaps between them rather than the kernel's tails
        falling to 1e-300.
    sigma, kernel, grid
        Passed to :meth:`SpectralDensity.density` (defaults: the median Ritz-value gap,
        a Gaussian, and the Ritz values' range padded by 5 sigma or 2% of the range,
        whichever is more, with about 3 points per sigma, 1001 to 20001 points).
    floor
        Relative floor of the log axis, in ``(0, 1)``.
    reference
        Known eigenvalues to overlay, smoothed by the same kernel
        (:func:`smoothed_eigenvalue_density`), e.g. ``op.eigenvalues`` of an example.
    reference_label
        Legend label of ``reference``.
    mark_outliers
        Mark the outliers of :func:`specdens.summary.outliers` with triangles above
        the curve.
    **kwargs
        Passed to ``ax.plot`` for the SLQ curve (``color``, ``label``, ``lw``...).

    Returns
    -------
    matplotlib.axes.Axes

    Raises
    ------
    ImportError
        When matplotlib is not installed (``pip install 'specdens[plot]'``).
    """
    require_matplotlib()
    if not 0.0 < floor < 1.0:
        raise ValueError(f"floor must be in (0, 1); got {floor}")
    sigma = density.default_sigma() if sigma is None else float(sigma)
    if grid is None:
        grid = _plot_grid(density, sigma)
    x, values = density.density(grid, sigma=sigma, kernel=kernel)
    ref = None
    if reference is not None:
        ref = smoothed_eigenvalue_density(reference, x, sigma=sigma, kernel=kernel)
    if ax is None:
        import matplotlib.pyplot as plt

        ax = plt.gca()
    top = float(np.max(values)) if values.size else 0.0
    if ref is not None and ref.size:
        top = max(top, float(np.max(ref)))
    lowest = floor * top if top > 0 else floor
    kwargs.setdefault("label", "SLQ" if ref is not None else None)
    kwargs.setdefault("lw", 1.2)
    if log_density:
        values = np.maximum(values, lowest)
        ref = None if ref is None else np.maximum(ref, lowest)
    ax.plot(x, values, **kwargs)
    if ref is not None:
        ax.plot(x, ref, color="0.35", lw=0.9, ls="--", label=reference_label, zorder=1)
    if mark_outliers:
        from .summary import outliers

        found = np.array([o.value for o in outliers(density)])
        if found.size:
            at = 1.8 * top if log_density else 1.04 * top
            ax.plot(found, np.full(found.shape, at), ls="none", marker="v", ms=5,
                    color="tab:red", label=f"outliers ({found.size})")
    if log_density:
        ax.set_yscale("log")
        ax.set_ylim(lowest, top * 4 if top > 0 else 1.0)
    else:
        ax.set_ylim(0.0, top * 1.1 if top > 0 else 1.0)
    ax.set_xlim(float(np.min(x)), float(np.max(x)))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)" if log_density else "density")
    if ref is not None or mark_outliers or kwargs.get("label"):
        ax.legend(loc="best", fontsize="small")
    return ax
