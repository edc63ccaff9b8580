"""Plots: drawn on given axes without pyplot, log axis floored, clear error without
matplotlib, and no matplotlib import at ``import specdens``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import specdens
from specdens.examples import hessian_like, uniform
from specdens.plotting import INSTALL_HINT, plot_density, smoothed_eigenvalue_density

matplotlib = pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def density():
    return specdens.slq(hessian_like(800), num_steps=40, num_probes=3, seed=0)


def new_axes():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    return fig.add_subplot()


def test_log_plot_on_given_axes(density):
    ax = new_axes()
    out = plot_density(density, ax)
    assert out is ax
    assert ax.get_yscale() == "log"
    (line,) = ax.get_lines()
    y = line.get_ydata()
    lo, hi = ax.get_ylim()
    assert np.all(y > 0) and y.min() >= lo * (1 - 1e-12)
    assert lo == pytest.approx(1e-8 * y.max())
    assert hi > y.max()
    assert ax.get_xlabel() == "eigenvalue"
    # the grid covers the outliers with room to spare
    b = density.bounds()
    assert line.get_xdata().min() < b.lower and line.get_xdata().max() > b.upper
    ax.figure.canvas.draw()


def test_floor_and_linear_axis(density):
    ax = new_axes()
    plot_density(density, ax, floor=1e-3)
    y = ax.get_lines()[0].get_ydata()
    assert y.min() == pytest.approx(1e-3 * y.max())
    ax = new_axes()
    plot_density(density, ax, log_density=False, sigma=0.05, kernel="lorentzian", color="k")
    assert ax.get_yscale() == "linear"
    y = ax.get_lines()[0].get_ydata()
    assert y.min() < 1e-3 * y.max()  # no floor on a linear axis
    with pytest.raises(ValueError, match="floor"):
        plot_density(density, new_axes(), floor=0)
    with pytest.raises(ValueError, match="kernel"):
        plot_density(density, new_axes(), kernel="box")


def test_reference_and_outlier_marks(density):
    op = hessian_like(800)
    ax = new_axes()
    plot_density(density, ax, reference=op.eigenvalues, mark_outliers=True)
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["SLQ", "exact", "outliers (10)"]
    slq_y, exact_y = ax.get_lines()[0].get_ydata(), ax.get_lines()[1].get_ydata()
    # SLQ and the smoothed exact spectrum agree at the bulk's peak to a few percent
    assert slq_y.max() == pytest.approx(exact_y.max(), rel=0.2)
    np.testing.assert_allclose(ax.get_lines()[2].get_xdata(), op.outliers, rtol=1e-10)
    assert ax.get_legend() is not None


def test_spectral_density_plot_method(density):
    ax = new_axes()
    assert density.plot(ax, sigma=0.02) is ax
    assert ax.get_yscale() == "log"


def test_plot_without_axes_uses_pyplot(density):
    import matplotlib.pyplot as plt

    fig = plt.figure()
    try:
        ax = plot_density(density)
        assert ax.figure is fig
    finally:
        plt.close(fig)


def test_missing_matplotlib_names_the_extra(density, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'specdens\[plot\]'"):
        plot_density(density)
    with pytest.raises(ImportError, match="matplotlib"):
        density.plot()
    assert INSTALL_HINT == "pip install 'specdens[plot]'"


def test_smoothed_eigenvalue_density_matches_exact_sum():
    lam = uniform(2000).eigenvalues
    sigma = 0.05
    grid = np.linspace(-1.5, 1.5, 901)
    exact = np.exp(-0.5 * ((grid[:, None] - lam[None, :]) / sigma) ** 2).sum(1) / (
        lam.size * sigma * np.sqrt(2 * np.pi))
    binned = smoothed_eigenvalue_density(lam, grid, sigma=sigma)
    np.testing.assert_allclose(binned, exact, atol=0.02 * exact.max())
    assert np.trapezoid(binned, grid) == pytest.approx(1.0, rel=1e-3)
    uneven = np.sort(np.concatenate([grid[::3], [0.0001, 0.0002]]))
    np.testing.assert_allclose(
        smoothed_eigenvalue_density(lam, uneven, sigma=sigma),
        np.exp(-0.5 * ((uneven[:, None] - lam[None, :]) / sigma) ** 2).sum(1)
        / (lam.size * sigma * np.sqrt(2 * np.pi)), rtol=1e-12, atol=1e-300)
    lor = smoothed_eigenvalue_density(lam, grid, sigma=sigma, kernel="lorentzian")
    assert np.all(lor > 0)
    with pytest.raises(ValueError, match="sigma"):
        smoothed_eigenvalue_density(lam, grid, sigma=0)


def test_importing_specdens_imports_no_plotting_or_framework():
    code = (
        "import sys, specdens, specdens.examples, specdens.summary, specdens.matrix_io, "
        "specdens.plotting, specdens.cli\n"
        "bad = [m for m in ('matplotlib', 'torch', 'jax', 'tensorflow') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""
