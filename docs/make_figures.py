"""Make the figures of the documentation with specdens's own commands.

    python docs/make_figures.py              # into docs/figures/ (about 3 minutes)
    python docs/make_figures.py --small --out /tmp/figs   # small sizes, for the tests

Every PNG under ``docs/figures/`` comes from here: the command line (``specdens
spectrum``, ``specdens investigate``), :mod:`specdens.plotting`, and one Lanczos
convergence diagram drawn from :func:`specdens.lanczos`. Rerun it after a change that
alters what the figures show, and commit the PNGs.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def specdens_cli(*args: str, cwd: Path) -> None:
    """``python -m specdens ARGS`` (the ``specdens`` command), failing loudly."""
    subprocess.run([sys.executable, "-m", "specdens", *args, "-q"], cwd=cwd, check=True)


def figure(width: float = 6.4, height: float = 3.6, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def cli_density(out: Path, n: int, work: Path) -> None:
    """The plot ``specdens spectrum --example hessian_like`` writes."""
    specdens_cli("spectrum", "--example", "hessian_like", "--n", str(n), "--out",
                 str(work / "spectrum"), cwd=work)
    (made,) = (work / "spectrum").glob("*-density.png")
    shutil.copyfile(made, out / "hessian-like-density.png")


def slq_vs_exact(out: Path, n: int) -> None:
    """SLQ against the exact spectrum, on the paper's log axis and on a linear one."""
    import specdens
    from specdens.examples import marchenko_pastur
    from specdens.plotting import plot_density

    A = marchenko_pastur(n)
    density = specdens.slq(A, num_steps=90, num_probes=10)
    fig, (ax_log, ax_lin) = figure(9.6, 3.6, ncols=2)
    plot_density(density, ax_log, reference=A.eigenvalues)
    plot_density(density, ax_lin, reference=A.eigenvalues, log_density=False)
    ax_log.set_title("log density axis (the paper's view)", fontsize="medium")
    ax_lin.set_title("linear density axis", fontsize="medium")
    fig.savefig(out / "slq-vs-exact.png", dpi=110)


def bandwidth(out: Path, n: int) -> None:
    """One estimate smoothed with the default kernel width and with others."""
    import specdens
    from specdens.examples import hessian_like
    from specdens.plotting import plot_density

    A = hessian_like(n)
    density = specdens.slq(A, num_steps=90, num_probes=10)
    sigma = density.default_sigma()
    fig, (ax_bulk, ax_all) = figure(9.6, 3.8, ncols=2)
    bulk = np.linspace(-0.4, 1.3, 1500)
    for factor, style in ((0.2, ":"), (1.0, "-"), (5.0, "--")):
        plot_density(density, ax_bulk, sigma=factor * sigma, grid=bulk, log_density=False,
                     ls=style, label=f"{factor:g} x default ({factor * sigma:.2g})")
    _, default_curve = density.density(bulk, sigma=sigma)
    ax_bulk.set_ylim(0.0, 1.1 * float(default_curve.max()))
    ax_bulk.set_title("the bulk, three kernel widths", fontsize="medium")
    ax_bulk.legend(loc="upper right", fontsize="small", title="sigma",
                   title_fontsize="small")
    plot_density(density, ax_all, mark_outliers=True, label="default sigma")
    ax_all.legend(loc="center right", fontsize="small")
    ax_all.set_title("the whole spectrum, default width", fontsize="medium")
    fig.savefig(out / "bandwidth.png", dpi=110)


def ghost_eigenvalues(out: Path, n: int) -> None:
    """Ghost eigenvalues: Ritz values of one probe step by step, and how many of them sit
    on the top eigenvalue under each reorthogonalisation mode."""
    import specdens
    from specdens.examples import hessian_like

    A = hessian_like(n, num_outliers=3)
    top, steps = A.eigenvalues[-1], 80
    fig, (ax_ritz, ax_count) = figure(9.6, 3.8, ncols=2)
    for reorth, style in (("none", "-"), ("local", "-."), ("partial", "--"), ("full", ":")):
        result = specdens.lanczos(A, steps, num_probes=1, reorth=reorth)
        alpha, beta = result.tridiagonal(0)
        counts = []
        for m in range(1, len(alpha) + 1):
            T = np.diag(alpha[:m]) + np.diag(beta[:m - 1], 1) + np.diag(beta[:m - 1], -1)
            theta = np.linalg.eigvalsh(T)
            counts.append(int(np.sum(np.abs(theta - top) <= 1e-6 * top)))
            if reorth == "none":
                ax_ritz.plot(np.full(theta.shape, m), theta, ls="none", marker="_", ms=4,
                             color="k")
        ax_count.plot(np.arange(1, len(counts) + 1), counts, ls=style, lw=1.5,
                      label=f'reorth="{reorth}"')
    for lam in A.outliers:
        ax_ritz.axhline(lam, color="tab:red", lw=0.6)
    ax_ritz.set_ylim(1.5, 1.08 * top)
    ax_ritz.set_title('Ritz values of one probe, reorth="none"', fontsize="medium")
    ax_ritz.set_xlabel("Lanczos step")
    ax_ritz.set_ylabel("Ritz value (outlier region)")
    ax_count.set_title("Ritz values at the top eigenvalue", fontsize="medium")
    ax_count.set_xlabel("Lanczos step")
    ax_count.set_ylabel("copies")
    ax_count.legend(loc="upper left", fontsize="small")
    fig.savefig(out / "ghost-eigenvalues.png", dpi=110)


def investigation(out: Path, small: bool, work: Path) -> None:
    """The figures of ``specdens investigate`` (the paper's study on digits)."""
    args = ["investigate", "--out", str(work / "investigate")]
    if small:
        args += ["--steps", "16", "--records", "3", "--width", "12", "--lanczos-steps", "15",
                 "--probes", "1", "--k", "3"]
    specdens_cli(*args, cwd=work)
    for name in ("top_eigenvalues", "densities", "gradient_concentration"):
        shutil.copyfile(work / "investigate" / f"{name}.png",
                        out / f"investigate-{name.replace('_', '-')}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "figures",
                        help="output folder (default docs/figures)")
    parser.add_argument("--small", action="store_true",
                        help="small sizes, for a quick check that every figure is made")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    n = 400 if args.small else 3000
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cli_density(out, n, work)
        slq_vs_exact(out, n)
        bandwidth(out, n)
        ghost_eigenvalues(out, n)
        investigation(out, args.small, work)
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
