"""Plots of spectral densities with matplotlib (an optional dependency).

matplotlib is imported when a plot is drawn, never when specdens is imported, and this
module never selects a backend: with ``ax=None`` it draws on pyplot's current axes,
otherwise only on the axes it is given (the command line draws on a
``matplotlib.figure.Figure`` with the Agg canvas, without pyplot).

The default view is the paper's: the Gaussian-smoothed density on a log density axis,
where outliers a few eigenvalues strong stay visible next to the bulk (Ghorbani,
Krishnan & Xiao, 2019, An investigation into neural net optimization via Hessian
eigenvalue density, ICML, figures 1-6).

Over training (records of :class:`specdens.tracker.SpectrumTracker`):
:func:`plot_densities_over_time` (the density on a log axis at several steps),
:func:`plot_density_heatmap` (the density over steps and eigenvalues),
:func:`plot_top_eigenvalues` (the top eigenvalues, the bulk edge and the outlier
threshold), :func:`plot_gradient_concentration` (one curve per run), and
:func:`plot_runs`, a figure with the runs side by side. Steps are drawn on a
``symlog`` axis (linear below 1), so step 0 shows next to log-spaced later steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import vector_1d
from .density import (
    GRID_GROWTH,
    GRID_MAX_UNIFORM,
    GRID_MIN_POINTS,
    GRID_PAD,
    GRID_POINTS_PER_SIGMA,
    KERNELS,
    SpectralDensity,
    _graded_points,
    check_sigma,
    window_grid,
)

__all__ = [
    "RUN_VIEWS",
    "plot_densities_over_time",
    "plot_density",
    "plot_density_heatmap",
    "plot_gradient_concentration",
    "plot_runs",
    "plot_series",
    "plot_top_eigenvalues",
    "require_matplotlib",
    "smoothed_eigenvalue_density",
]

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

    On an evenly spaced grid whose step ``h`` is at most ``sigma / 3`` (``BIN_MAX_STEP``
    kernel widths; the grids of :func:`plot_density` are) the eigenvalues within half a
    grid step of it are first binned to the grid and the bins convolved with the kernel by
    FFT, so a million eigenvalues cost little. Binning moves each eigenvalue by at most
    ``h / 2 <= sigma / 6``, which changes the density by at most ``(h / 2) sup|k'|``:
    ``exp(-1/2) / 6 = 0.101`` of the kernel's peak ``k(0)`` for the Gaussian and
    ``3 sqrt(3) / 48 = 0.108`` of it for the Lorentzian (the density itself is at most
    ``k(0)``). A coarser even grid would move an eigenvalue by up to ``h / 2`` and draw it
    at full height far from where it is, so there, and on any other grid, the whole sum
    is computed exactly. Eigenvalues outside a binned grid are never binned to its ends
    (that drew false peaks there): a few add their exact kernel values; many (a zoom into
    a large spectrum) are binned on the grid extended at the same step as far as they
    reach, up to 2**21 points, and the rest summed exactly. For the Gaussian only
    eigenvalues within ``40 sigma`` of a grid point count, binned or summed exactly: a
    term farther away is below ``exp(-800)``, zero in float64.

    Parameters
    ----------
    eigenvalues
        The spectrum, 1-D, finite.
    grid
        Points to evaluate at, 1-D.
    sigma, kernel
        Kernel width and ``"gaussian"`` or ``"lorentzian"``.

    Returns
    -------
    numpy.ndarray
        The density at ``grid``.

    Raises
    ------
    ValueError
        For an unknown kernel, a ``sigma`` that is not positive and finite, or NaN or
        infinite eigenvalues (they have no place on the axis; drop them first).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; choose one of {', '.join(KERNELS)}")
    sigma = check_sigma(sigma)
    lam = vector_1d(eigenvalues, "eigenvalues", "the spectrum (e.g. numpy.linalg.eigvalsh(A) "
                  "or op.eigenvalues), not the matrix")
    x = vector_1d(grid, "grid", "the points to evaluate at")
    bad = np.count_nonzero(~np.isfinite(lam))
    if bad:
        raise ValueError(f"eigenvalues hold {bad} NaN or infinite value(s) of {lam.size}; "
                         "drop them (e.g. eigenvalues[numpy.isfinite(eigenvalues)]) or fix "
                         "the computation that produced them")
    if lam.size == 0 or x.size == 0:
        return np.zeros(x.shape)
    steps = np.diff(x)
    uniform = x.size > 2 and steps[0] > 0 and np.allclose(steps, steps[0], rtol=1e-6, atol=0)
    # the same slack as the uniformity test, for the rounding of numpy.linspace
    if not uniform or steps[0] > BIN_MAX_STEP * sigma * (1 + 1e-6):
        return _direct_sum(x, lam, sigma, kernel) / lam.size
    from scipy.signal import fftconvolve

    h = float(steps[0])
    # Binning an eigenvalue outside the grid to an end bin would draw a false peak there.
    # Few of them (a sum of at most DIRECT_TERMS terms) add their exact kernel values;
    # many (a zoom into a spectrum of a million eigenvalues) are binned on the grid
    # extended at the same step as far as they reach (40 sigma for the Gaussian: a term
    # farther away is below exp(-800), zero in float64), up to EXTENDED_POINTS points,
    # and only those beyond it are summed exactly.
    reach = GAUSSIAN_REACH * sigma if kernel == "gaussian" else np.inf
    near = (lam > x[0] - reach) & (lam < x[-1] + reach)
    pos = np.rint((lam - x[0]) / h)
    outside = near & ((pos < 0) | (pos > x.size - 1))
    left = right = 0
    if np.count_nonzero(outside) * x.size > DIRECT_TERMS:
        span = lam[outside]
        left = int(np.ceil(max(0.0, x[0] - span.min()) / h))
        right = int(np.ceil(max(0.0, span.max() - x[-1]) / h))
        spare = max(0, EXTENDED_POINTS - x.size)
        if left + right > spare:
            left, right = (left * spare) // (left + right), (right * spare) // (left + right)
    size = x.size + left + right
    pos = pos + left
    binned = near & (pos >= 0) & (pos <= size - 1)
    rest = lam[near & ~binned]
    out = np.zeros(x.shape)
    if np.any(binned):
        counts = np.bincount(pos[binned].astype(np.int64), minlength=size).astype(np.float64)
        offsets = np.arange(-(size - 1), size) * h
        full = fftconvolve(counts / lam.size, _kernel(offsets, sigma, kernel), mode="full")
        out = np.maximum(full[size - 1 + left: size - 1 + left + x.size], 0.0)
    if rest.size:
        out = out + _direct_sum(x, rest, sigma, kernel) / lam.size
    return out


# See smoothed_eigenvalue_density: the most kernel terms summed exactly for eigenvalues
# outside an evenly spaced grid (about 0.1 s), and the most points of the grid extended to
# bin the others (an FFT of twice that length, well under a second).
DIRECT_TERMS = 2**24
EXTENDED_POINTS = 2**21
BIN_MAX_STEP = 1.0 / 3.0
"""The largest step of an even grid, in kernel widths, on which
:func:`smoothed_eigenvalue_density` bins the eigenvalues (each then moves by at most a
sixth of ``sigma``); on a coarser grid it sums the kernel exactly."""
GAUSSIAN_REACH = 40.0
"""Kernel widths beyond which a Gaussian term is ``exp(-800)``, zero in float64."""
_CHUNK_TERMS = 2**22


def _direct_sum(x: np.ndarray, lam: np.ndarray, sigma: float, kernel: str) -> np.ndarray:
    """``sum_i k_sigma(x - lambda_i)`` at each ``x``, in chunks of about 4M terms.

    For the Gaussian only the eigenvalues within ``GAUSSIAN_REACH`` widths of a chunk of
    (sorted) points are summed: the others' terms are exactly zero in float64, so the sum
    is the same up to the order of its additions, and a wide grid of many points costs
    about the points near the spectrum times its size, not all points times its size.
    """
    out = np.zeros(x.shape)
    if x.size == 0 or lam.size == 0:
        return out
    if kernel != "gaussian":
        chunk = max(1, _CHUNK_TERMS // lam.size)
        for s in range(0, x.size, chunk):
            out[s:s + chunk] = _kernel(x[s:s + chunk, None] - lam[None, :], sigma,
                                       kernel).sum(1)
        return out
    lam = np.sort(lam)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    reach = GAUSSIAN_REACH * sigma
    first = np.searchsorted(lam, xs - reach, side="left")
    stop = np.searchsorted(lam, xs + reach, side="right")
    s = 0
    while s < xs.size:
        e = min(xs.size, s + max(1, _CHUNK_TERMS // max(1, int(stop[s] - first[s]))))
        while e - s > 1 and (e - s) * int(stop[e - 1] - first[s]) > _CHUNK_TERMS:
            e = s + (e - s) // 2
        a, b = int(first[s]), int(stop[e - 1])
        if b > a:
            out[order[s:e]] = _kernel(xs[s:e, None] - lam[None, a:b], sigma, kernel).sum(1)
        s = e
    out[np.isnan(x)] = np.nan  # as the full sum gives (searchsorted puts NaN past the end)
    return out


def _integer(value: Any, name: str) -> int:
    """``value`` as an int when it is integral (``1.7`` was truncated to step 1)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be integers; got {value!r}")
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be integers; got {value!r}") from None
    if as_int != value:
        raise ValueError(f"{name} must be integers; got {value!r}")
    return as_int


def _plot_grid(density: SpectralDensity, sigma: float,
               reference: np.ndarray | None = None) -> np.ndarray:
    """The grid :func:`plot_density` draws on: the Ritz values' range padded by ``5 sigma``
    or 2% of the range on each side, whichever is more, so that extreme outliers do not
    sit on the frame.

    Where an even grid of step ``sigma / 3`` takes at most ``GRID_MAX_UNIFORM`` (20001)
    points that is the grid (at least ``GRID_MIN_POINTS``, 1001). A wider range takes
    :meth:`SpectralDensity.default_grid` (fine windows of step ``sigma / 3`` around every
    Ritz value, graded spacing between them) extended to the padding by graded points: an
    even grid capped at 20001 points would step over the kernel's peaks and lose them.

    ``reference`` (exact eigenvalues, finite) widens the range to cover them too, and on a
    wide range gets fine windows of its own: an eigenvalue that SLQ did not resolve would
    otherwise fall between the graded points and its peak vanish from the overlay, where
    it should show what SLQ missed.
    """
    b = density.bounds()
    lower, upper = b.lower, b.upper
    if reference is not None and reference.size:
        lower, upper = min(lower, float(reference.min())), max(upper, float(reference.max()))
    pad = max(5 * sigma, 0.02 * (upper - lower))
    lo, hi = lower - pad, upper + pad
    fine = sigma / GRID_POINTS_PER_SIGMA
    num = int(np.ceil((hi - lo) / fine)) + 1  # a step of at most sigma / 3
    if num <= GRID_MAX_UNIFORM:
        return np.linspace(lo, hi, max(num, GRID_MIN_POINTS))
    coarse = (hi - lo) / (GRID_MAX_UNIFORM - 1)
    loc = density.atoms()[0]
    if reference is not None:
        loc = np.concatenate([loc, reference])
    if loc.size == 0:
        loc = np.array([lower, upper])
    grid = window_grid(loc, GRID_PAD * sigma, fine, coarse)
    pieces = [grid]
    if lo < grid[0]:
        pieces += [[lo], _graded_points(lo, float(grid[0]), fine, coarse, GRID_GROWTH)]
    if hi > grid[-1]:
        pieces += [_graded_points(float(grid[-1]), hi, fine, coarse, GRID_GROWTH), [hi]]
    return np.unique(np.concatenate(pieces))


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
        whichever is more: an even grid of step at most ``sigma / 3`` when that takes
        1001 to 20001 points, else the graded grid of
        :meth:`SpectralDensity.default_grid`, with a step of ``sigma / 3`` within 8.5
        sigma of every Ritz value, extended to the padding, so that no peak falls
        between grid points).
    floor
        Relative floor of the log axis, in ``(0, 1)``.
    reference
        Known eigenvalues to overlay, smoothed by the same kernel
        (:func:`smoothed_eigenvalue_density`), e.g. ``op.eigenvalues`` of an example.
    reference_label
        Legend label of ``reference``.
    mark_outliers
        Mark the outliers of :func:`specdens.summary.outliers` with triangles above
        the curve (near the top of the axis, also when the curve is zero throughout);
        they get a legend entry only when there are some.
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
    sigma = density.default_sigma() if sigma is None else check_sigma(sigma)
    lam = None
    if reference is not None:
        lam = vector_1d(reference, "reference", "the known eigenvalues (e.g. "
                      "numpy.linalg.eigvalsh(A) or op.eigenvalues), not the matrix")
        bad = np.count_nonzero(~np.isfinite(lam))
        if bad:
            raise ValueError(f"reference holds {bad} NaN or infinite value(s) of {lam.size}; "
                             "drop them first")
    if grid is None:
        grid = _plot_grid(density, sigma, lam)
    else:
        grid = vector_1d(grid, "grid", "the points to evaluate at")
        if grid.size == 0:
            raise ValueError("grid is empty; pass the points to evaluate at, or leave it "
                             "out")
    x, values = density.density(grid, sigma=sigma, kernel=kernel)
    ref = None
    if lam is not None:
        ref = smoothed_eigenvalue_density(lam, x, sigma=sigma, kernel=kernel)
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
        ylim = (lowest, top * 4 if top > 0 else 1.0)
    else:
        ylim = (0.0, top * 1.1 if top > 0 else 1.0)
    ax.plot(x, values, **kwargs)
    labelled = bool(kwargs["label"]) and not str(kwargs["label"]).startswith("_")
    if ref is not None:
        ax.plot(x, ref, color="0.35", lw=0.9, ls="--", label=reference_label, zorder=1)
        labelled = True
    if mark_outliers:
        from .summary import outliers

        found = np.array([o.value for o in outliers(density)])
        if found.size:
            # 1.8 top on a log axis up to 4 top, 1.04 top on a linear one up to 1.1 top;
            # the same fraction of the axis when the curve is 0 (not 0 itself, which a
            # log axis cannot show)
            at = ylim[1] * (0.45 if log_density else 1.04 / 1.1)
            ax.plot(found, np.full(found.shape, at), ls="none", marker="v", ms=5,
                    color="tab:red", label=f"outliers ({found.size})")
            labelled = True
    if log_density:
        ax.set_yscale("log")
    ax.set_ylim(*ylim)
    ax.set_xlim(float(np.min(x)), float(np.max(x)))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)" if log_density else "density")
    if labelled:
        ax.legend(loc="best", fontsize="small")
    return ax


# -- over training --------------------------------------------------------------------
RUN_VIEWS = ("densities", "heatmap", "top_eigenvalues", "concentration", "overview")
"""Views of :func:`plot_runs`."""


def _gca(ax: Any) -> Any:
    require_matplotlib()
    if ax is None:
        import matplotlib.pyplot as plt

        ax = plt.gca()
    return ax


def _run_records(records: Any, run: str | None, *, need_density: bool = False) -> list:
    """The records of one run, sorted by step; refuses a mix of runs without ``run``."""
    recs = list(records)
    runs = sorted({r.run for r in recs})
    if run is None:
        if len(runs) > 1:
            raise ValueError(f"the records hold several runs ({', '.join(runs)}); pick one "
                             "with run=...")
    else:
        recs = [r for r in recs if r.run == run]
        if not recs:
            raise ValueError(f"no records of run {run!r}; the runs are {', '.join(runs)}")
    if need_density:
        recs = [r for r in recs if r.density is not None]
    if not recs:
        raise ValueError("no records to plot" + (" with a density" if need_density else ""))
    return sorted(recs, key=lambda r: r.step)


def _step_axis(ax: Any, steps: Any, label: str = "training step") -> None:
    """A ``symlog`` step axis from just left of 0 to just right of the last step (the
    default margins of a symlog axis would reach into negative decades)."""
    ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
    last = float(np.max(steps)) if np.size(steps) else 1.0
    ax.set_xlim(-0.3, max(last, 1.0) * 1.3)
    ax.set_xlabel(label)


def _pick(recs: list, max_curves: int) -> list:
    """At most ``max_curves`` records, evenly spread over the list (first and last kept)."""
    if len(recs) <= max_curves:
        return recs
    idx = np.unique(np.round(np.linspace(0, len(recs) - 1, max_curves)).astype(int))
    return [recs[i] for i in idx]


def plot_densities_over_time(records: Any, ax: Any = None, *, run: str | None = None,
                             steps: Any = None, max_curves: int = 6,
                             sigma: float | None = None, floor: float = 1e-8,
                             log_density: bool = True, cmap: str = "viridis") -> Any:
    """The density at several training steps on one axes (the paper's log-density view).

    Parameters
    ----------
    records
        :class:`~specdens.tracker.SpectrumRecord` objects (e.g.
        :func:`specdens.tracker.read_records`), of one run or with ``run`` given.
    ax
        matplotlib axes (default: pyplot's current axes, taken only once the input has
        been checked, so a refused call leaves no new figure open).
    run
        The run to draw.
    steps
        The steps to draw (default: at most ``max_curves`` spread over the records).
    max_curves
        Curves drawn when ``steps`` is not given.
    sigma
        Kernel width for every curve (default: each density's own,
        :meth:`SpectralDensity.default_sigma`).
    floor, log_density
        As in :func:`plot_density`; the floor is relative to the highest curve. Each
        curve is drawn on its density's grid of :func:`plot_density`.
    cmap
        Colour map from the earliest (dark) to the latest step.

    Returns
    -------
    matplotlib.axes.Axes
    """
    matplotlib = require_matplotlib()
    if not 0.0 < floor < 1.0:
        raise ValueError(f"floor must be in (0, 1); got {floor}")
    sigma = None if sigma is None else check_sigma(sigma)
    colour_map = matplotlib.colormaps[cmap]
    recs = _run_records(records, run, need_density=True)
    if steps is not None:
        wanted = {_integer(s, "steps") for s in steps}
        if not wanted:
            raise ValueError("steps is empty; pass the steps to draw, or leave it out for "
                             "max_curves of them")
        missing = sorted(wanted - {r.step for r in recs})
        if missing:
            raise ValueError(f"no density recorded at steps {missing}")
        recs = [r for r in recs if r.step in wanted]
    else:
        count = _integer(max_curves, "max_curves")
        if count < 1:
            raise ValueError(f"max_curves must be at least 1; got {max_curves}")
        recs = _pick(recs, count)
    colours = colour_map(np.linspace(0.0, 0.9, len(recs)))
    curves = []
    for r in recs:
        d = r.density
        sg = d.default_sigma() if sigma is None else sigma
        x, y = d.density(_plot_grid(d, sg), sigma=sg)
        curves.append((r.step, x, y))
    top = max(float(np.max(y)) for _, _, y in curves)
    lowest = floor * top if top > 0 else floor
    ax = _gca(ax)
    for (step, x, y), c in zip(curves, colours, strict=True):
        ax.plot(x, np.maximum(y, lowest) if log_density else y, color=c, lw=1.1,
                label=f"step {step}")
    if log_density:
        ax.set_yscale("log")
        ax.set_ylim(lowest, top * 4 if top > 0 else 1.0)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)" if log_density else "density")
    ax.legend(loc="best", fontsize="small")
    return ax


def plot_density_heatmap(records: Any, ax: Any = None, *, run: str | None = None,
                         num_points: int = 400, floor: float = 1e-6,
                         cmap: str = "magma", eigenvalue_range: Any = None) -> Any:
    """The density over training as a heat map: steps across, eigenvalues up, colour the
    log10 density.

    Every record's density is evaluated on one eigenvalue grid (``num_points`` points over
    the range of all records, or ``eigenvalue_range``) with its own kernel width, widened
    to at least 1.5 grid spacings so that no outlier falls between grid points. Columns
    are the records in step order (labelled with their steps). With ``ax=None`` pyplot's
    current axes are taken only once the input has been checked.

    Returns
    -------
    matplotlib.axes.Axes
    """
    matplotlib = require_matplotlib()
    if not 0.0 < floor < 1.0:
        raise ValueError(f"floor must be in (0, 1); got {floor}")
    matplotlib.colormaps[cmap]  # an unknown name fails here, before a figure is made
    recs = _run_records(records, run, need_density=True)
    if eigenvalue_range is None:
        lo = min(r.density.bounds().lower for r in recs)
        hi = max(r.density.bounds().upper for r in recs)
        pad = 0.03 * (hi - lo) if hi > lo else 1.0
        lo, hi = lo - pad, hi + pad
    else:
        lo, hi = (float(v) for v in eigenvalue_range)
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(f"eigenvalue_range must be (low, high), finite, with low < high; "
                             f"got {eigenvalue_range}")
    num_points = _integer(num_points, "num_points")
    if num_points < 2:
        raise ValueError(f"num_points must be at least 2; got {num_points}")
    grid = np.linspace(lo, hi, num_points)
    h = grid[1] - grid[0]
    image = np.empty((num_points, len(recs)))
    for j, r in enumerate(recs):
        sg = max(r.density.default_sigma(), 1.5 * h)
        image[:, j] = r.density.density(grid, sigma=sg)[1]
    top = float(np.max(image))
    image = np.log10(np.maximum(image, floor * top if top > 0 else floor))
    xedges = np.arange(len(recs) + 1) - 0.5
    yedges = np.concatenate([grid - h / 2, [grid[-1] + h / 2]])
    ax = _gca(ax)
    mesh = ax.pcolormesh(xedges, yedges, image, cmap=cmap, shading="flat")
    ax.figure.colorbar(mesh, ax=ax, label="log10 density")
    ticks = np.arange(len(recs))
    shown = ticks if len(recs) <= 12 else ticks[:: int(np.ceil(len(recs) / 12))]
    ax.set_xticks(shown)
    ax.set_xticklabels([str(recs[i].step) for i in shown], rotation=45, fontsize="small")
    ax.set_xlabel("training step (recorded steps)")
    ax.set_ylabel("eigenvalue")
    return ax


def _edge_lines(recs: list, which: str) -> list[tuple[str | None, str, np.ndarray]]:
    """``(label, linestyle, values)`` of the bulk edges and outlier thresholds drawn next
    to eigenvalues of kind ``which``: the upper ones for ``"LA"``, the lower ones for
    ``"SA"``, both for ``"LM"``; none when no record holds statistics."""
    def field(name: str) -> np.ndarray:
        return np.array([getattr(r.stats.bulk, name) if r.stats else np.nan for r in recs],
                        dtype=np.float64)

    sides = {"LA": ("upper",), "SA": ("lower",)}.get(which, ("upper", "lower"))
    lines: list[tuple[str | None, str, np.ndarray]] = []
    for i, side in enumerate(sides):
        edge = field(side)
        if not np.any(np.isfinite(edge)):
            return []
        plural = "s" if len(sides) > 1 else ""
        lines.append((f"bulk edge{plural}" if i == 0 else None, "--", edge))
        lines.append((f"outlier threshold{plural}" if i == 0 else None, ":",
                      field(f"{side}_threshold")))
    return lines


def _top_eigenvalue_data(recs: list, bulk_edge: bool) -> tuple:
    """``steps, vals, lines``: the records' eigenvalues (descending, one row per record,
    NaN-padded) and the edge lines of :func:`_edge_lines` (none without ``bulk_edge``)."""
    k = max((r.eigenvalues.size for r in recs), default=0)
    if k == 0:
        raise ValueError("the records hold no eigenvalues (tracker built with k=0)")
    steps = np.array([r.step for r in recs], dtype=float)
    vals = np.full((len(recs), k), np.nan)
    for i, r in enumerate(recs):
        desc = np.sort(r.eigenvalues)[::-1]
        vals[i, : desc.size] = desc
    lines = _edge_lines(recs, recs[-1].which) if bulk_edge else []
    return steps, vals, lines


def _auto_yscale(arrays: list) -> str:
    """``"log"`` when every finite value drawn is positive (and there is one), else
    ``"linear"``."""
    values = np.concatenate([np.ravel(v) for v in arrays]) if arrays else np.zeros(0)
    values = values[np.isfinite(values)]
    return "log" if values.size and np.all(values > 0) else "linear"


def plot_top_eigenvalues(records: Any, ax: Any = None, *, run: str | None = None,
                         bulk_edge: bool = True, yscale: str | None = None) -> Any:
    """The recorded extreme eigenvalues over training, with the bulk edge and the outlier
    threshold of :func:`specdens.summary.bulk` on their side (dashed and dotted).

    The side follows the records' ``which``: the upper edge and threshold next to the
    largest eigenvalues (``"LA"``), the lower ones next to the smallest (``"SA"``), and
    both edges and both thresholds next to the largest in magnitude (``"LM"``), which may
    lie on either side of the bulk.

    ``yscale``: ``"log"`` (default when every value drawn, edges included, is positive)
    or ``"linear"``. With ``ax=None`` pyplot's current axes are taken only once the input
    has been checked.

    Returns
    -------
    matplotlib.axes.Axes
    """
    matplotlib = require_matplotlib()
    if yscale is not None and yscale not in ("log", "linear"):
        raise ValueError(f"yscale={yscale!r}; choose 'log' or 'linear'")
    recs = _run_records(records, run)
    steps, vals, lines = _top_eigenvalue_data(recs, bulk_edge)
    if yscale is None:
        yscale = _auto_yscale([vals] + [y for _, _, y in lines])
    k = vals.shape[1]
    colours = matplotlib.colormaps["plasma"](np.linspace(0.0, 0.85, k))
    which = recs[-1].which
    name = {"LA": "largest", "SA": "smallest", "LM": "largest |.|"}.get(which, which)
    ax = _gca(ax)
    for i in range(k):
        ax.plot(steps, vals[:, i], color=colours[i], lw=1.0, marker=".", ms=3,
                label=f"{k} {name} eigenvalues" if i == 0 else None)
    for label, ls, y in lines:
        ax.plot(steps, y, color="0.3", ls=ls, lw=1.0, label=label)
    ax.set_yscale(yscale)
    _step_axis(ax, steps)
    ax.set_ylabel("eigenvalue")
    ax.legend(loc="best", fontsize="small")
    return ax


def plot_gradient_concentration(records: Any, ax: Any = None, *,
                                runs: Any = None) -> Any:
    """``||P_k g||^2 / ||g||^2`` over training, one curve per run.

    The step axis spans the steps of the runs drawn (``runs``, default all). With
    ``ax=None`` pyplot's current axes are taken only once the input has been checked.

    Returns
    -------
    matplotlib.axes.Axes
    """
    require_matplotlib()
    recs = [r for r in records if r.concentration is not None]
    if not recs:
        raise ValueError("the records hold no gradient concentration (recorded without a "
                         "gradient, or with k=0)")
    names = sorted({r.run for r in recs}) if runs is None else list(runs)
    curves = []
    for name in names:
        rs = sorted((r for r in recs if r.run == name), key=lambda r: r.step)
        if not rs:
            raise ValueError(f"no gradient concentration recorded for run {name!r}")
        curves.append((name, rs))
    ax = _gca(ax)
    for name, rs in curves:
        k = rs[-1].concentration.k
        ax.plot([r.step for r in rs], [r.concentration.fraction for r in rs], marker="o",
                ms=3, lw=1.2, label=f"{name} (k = {k})")
    ax.set_ylim(-0.02, 1.02)
    _step_axis(ax, [r.step for _, rs in curves for r in rs])
    ax.set_ylabel("gradient in top-k eigenspace")
    ax.legend(loc="best", fontsize="small")
    return ax


def plot_series(records: Any, name: str, ax: Any = None, *, runs: Any = None,
                yscale: str = "linear") -> Any:
    """One scalar of the records over training (:data:`specdens.tracker.SERIES`: ``loss``,
    ``accuracy``, ``top_eigenvalue``, ``edge_ratio``, ``num_outliers``,
    ``negative_mass``...), one curve per run; missing (NaN) values leave gaps.

    ``yscale``: ``"linear"`` or ``"log"``. With ``ax=None`` pyplot's current axes are
    taken only once the input has been checked.

    Returns
    -------
    matplotlib.axes.Axes
    """
    from .tracker import series

    require_matplotlib()
    if yscale not in ("log", "linear"):
        raise ValueError(f"yscale={yscale!r}; choose 'log' or 'linear'")
    recs = list(records)
    names = list(dict.fromkeys(r.run for r in recs)) if runs is None else list(runs)
    if not names:
        raise ValueError("no records to plot")
    curves = []
    for run in names:
        steps, values = series(recs, name, run=run)
        if steps.size == 0:
            raise ValueError(f"no records of run {run!r}")
        curves.append((run, steps, values))
    ax = _gca(ax)
    for run, steps, values in curves:
        ax.plot(steps, values, marker="o", ms=3, lw=1.2, label=run)
    ax.set_yscale(yscale)
    _step_axis(ax, [steps.max() for _, steps, _ in curves])
    ax.set_ylabel(name.replace("_", " "))
    ax.legend(loc="best", fontsize="small")
    return ax


# Keywords plot_runs sets itself, never passed on from its **kwargs.
_RUN_PANEL_OWN = ("records", "ax", "run", "runs")


def _panel_keywords(function: Any) -> set[str]:
    """The keywords of a panel function that :func:`plot_runs` passes on."""
    import inspect

    return {p.name for p in inspect.signature(function).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.name not in _RUN_PANEL_OWN}


def plot_runs(records: Any, view: str = "overview", *, runs: Any = None,
              figsize: Any = None, **kwargs: Any) -> Any:
    """A figure with several runs side by side (one column per run).

    Parameters
    ----------
    records
        Records of one or several runs (one file may hold them all).
    view
        ``"densities"`` (:func:`plot_densities_over_time`), ``"heatmap"``
        (:func:`plot_density_heatmap`), ``"top_eigenvalues"``
        (:func:`plot_top_eigenvalues`): one panel per run with shared axes where the
        quantities compare; ``"concentration"``: one panel with a curve per run;
        ``"overview"``: a row of each of the three per-run views plus the concentration
        of the runs that recorded one (none: no concentration row).
        The top-eigenvalue panels share their y axis and so one scale: log only when
        every value drawn in every run is positive (or the ``yscale`` given).
    runs
        The runs, in column order (default: in order of first appearance).
    figsize
        Figure size in inches (default: 4.2 per column).
    **kwargs
        Keywords of the panel functions (e.g. ``floor``, ``cmap``, ``sigma``,
        ``yscale``), each passed to those panels whose function takes it (``floor`` and
        ``cmap`` to both the density curves and the heat map in the ``"overview"``);
        :func:`plot_gradient_concentration` takes none. ``run``, ``runs`` and ``ax`` are
        set by ``plot_runs``.

    Returns
    -------
    matplotlib.figure.Figure
        Drawn with the Agg canvas, without pyplot: save it with ``fig.savefig(path)``.

    Raises
    ------
    ValueError
        For an unknown view, no runs, or a keyword that no panel of the view takes.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if view not in RUN_VIEWS:
        raise ValueError(f"view={view!r}; choose one of {', '.join(RUN_VIEWS)}")
    per_run = {"densities": plot_densities_over_time, "heatmap": plot_density_heatmap,
               "top_eigenvalues": plot_top_eigenvalues}
    rows = [] if view == "concentration" else list(per_run) if view == "overview" else [view]
    accepted = {row: _panel_keywords(per_run[row]) for row in rows}
    taken = set().union(*accepted.values())
    unknown = sorted(set(kwargs) - taken)
    if unknown:
        takes = ", ".join(sorted(taken)) if taken else "no keywords"
        raise ValueError(f"plot_runs(view={view!r}) got keyword(s) {', '.join(unknown)} that "
                         f"no panel of the view takes; it takes {takes}")
    recs = list(records)
    if runs is None:
        runs = list(dict.fromkeys(r.run for r in recs))
    runs = list(runs)
    if not runs:
        raise ValueError("no records to plot")
    ncol = len(runs)
    if view == "concentration":
        fig = Figure(figsize=figsize or (6.5, 4.0), layout="constrained")
        FigureCanvasAgg(fig)
        plot_gradient_concentration(recs, fig.add_subplot(), runs=runs)
        return fig
    options = {row: {k: v for k, v in kwargs.items() if k in accepted[row]} for row in rows}
    if "top_eigenvalues" in options and options["top_eigenvalues"].get("yscale") is None:
        # shared y axes have one scale: log only if every run's values are positive
        bulk_edge = options["top_eigenvalues"].get("bulk_edge", True)
        drawn = []
        for name in runs:
            _, vals, lines = _top_eigenvalue_data(_run_records(recs, name), bulk_edge)
            drawn += [vals] + [y for _, _, y in lines]
        options["top_eigenvalues"]["yscale"] = _auto_yscale(drawn)
    # (records made without a gradient have no concentration row: the overview leaves it
    # out rather than failing after drawing every other panel)
    concentration = view == "overview" and any(
        r.concentration is not None and r.run in runs for r in recs)
    nrow = len(rows) + (1 if concentration else 0)
    fig = Figure(figsize=figsize or (4.2 * ncol, 3.4 * nrow), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(nrow, ncol)
    for i, row in enumerate(rows):
        first = None
        for j, name in enumerate(runs):
            share = first if row == "top_eigenvalues" else None
            ax = fig.add_subplot(grid[i, j], sharey=share)
            per_run[row](recs, ax, run=name, **options[row])
            ax.set_title(f"{name}", fontsize="medium")
            first = first or ax
    if concentration:
        plot_gradient_concentration(recs, fig.add_subplot(grid[nrow - 1, :]), runs=[
            name for name in runs if any(r.concentration is not None and r.run == name
                                         for r in recs)])
    return fig
