"""Estimators beyond plain SLQ: deflation, trace estimators and KPM, at equal matvec counts.

Three tables, each at an equal budget of products with single vectors (matvecs):

1. **Deflated SLQ against plain SLQ** on outlier-dominated spectra
   (``specdens.examples.hessian_like``: a bulk in [-0.15, 1] and ten outliers in [4, 40];
   ``marchenko_pastur``: three spikes above the bulk; ``tiny_bulk_hessian``: the spectrum
   of ``_common.hessian_like_diagonal``, a bulk of size ~1e-3 and ten outliers in
   [10, 100], in the random basis of ``specdens.examples.SpectrumOperator``: a diagonal
   matrix would be a degenerate case, where Rademacher probes have no variance at all).
   The deflated run spends ``eigsh``'s products, ``k`` products checking the reused
   eigenpairs and ``probes x steps``, all counted (the results' own ``matvecs`` plus
   ``eigsh``'s); plain SLQ gets the probe count whose ``probes x steps`` is nearest to
   that total (rounded, so the two differ by less than ``steps / 2`` products; the
   ``matvecs`` column shows both counts). ``s / run`` of the deflated row leaves out
   ``eigsh``'s time: its eigenpairs are computed once and reused by every seed. Reported:
   the standard error of ``tr(A)/n`` and ``tr(A^2)/n`` as the estimator reports it (mean
   over repetitions), the spread of the estimates over ``--reps`` seeds (the honest
   check of the reported one), and the largest bias in standard errors
   (``|mean - exact| / (spread / sqrt(reps))``, exact from the known spectrum).
2. **Trace estimators** (Hutchinson, Hutch++, XTrace, XNysTrace) at ``--trace-matvecs``
   products: root-mean-square error over seeds against the exact trace and the mean
   reported standard error, on the same spectra (XNysTrace only where the operator is
   positive semi-definite).
3. **KPM against SLQ** at the same products per probe: the Wasserstein-1 distance
   between the two density estimates, next to the sum of their documented accuracies
   (the Jackson resolution ``pi (b - a) / (2 (N + 1))`` and the Gauss-rule bound
   ``pi (b - a) / (4 m)``).

    python benchmarks/bench_estimators.py              # n = 3000, 90 steps, ~1-2 min
    python benchmarks/bench_estimators.py --reps 40    # tighter spreads
    python benchmarks/bench_estimators.py --smoke      # tiny, for the tests
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import _common


def deflation_rows(name: str, op: Any, k: int, args: argparse.Namespace) -> list[list[Any]]:
    import numpy as np

    import specdens

    lam = op.eigenvalues
    exact = np.array([lam.mean(), np.mean(lam**2)])
    eig = specdens.eigsh(op, k=k, which="LA", seed=0)

    def run(kw: dict[str, Any], probes: int) -> tuple[list[Any], float, list[int]]:
        """Every seed's estimate with ``probes`` probes: (estimates, s / run, counted
        products per run: the result's ``matvecs``, plus eigsh's for the deflated run,
        which reuses ``eig``: its own ``matvecs`` are the k products checking it)."""
        ests, counted = [], []
        t0 = time.perf_counter()
        for rep in range(args.reps):
            d = specdens.slq(op, num_steps=args.steps, num_probes=probes, seed=rep, **kw)
            ests.append(d.moments([1, 2]))
            counted.append(int(d.matvecs) + (int(eig.matvecs) if kw else 0))
        return ests, (time.perf_counter() - t0) / args.reps, counted

    # the deflated run first: what it really spends (counted) sets the plain run's
    # probes, the nearest whole number of steps x probes to the same total
    deflated = run({"deflate": eig}, args.probes)
    total = max(deflated[2])
    plain_probes = max(1, round(total / args.steps))
    plain = run({}, plain_probes)
    rows = []
    for label, probes, (ests, wall, counted) in (
        ("plain SLQ", plain_probes, plain),
        (f"deflated k={k}", args.probes, deflated),
    ):
        values = np.asarray([np.asarray(e.value) for e in ests])
        reported = np.asarray([np.asarray(e.stderr) for e in ests])
        spread = values.std(axis=0, ddof=1) if args.reps > 1 else np.full(2, np.nan)
        bias = np.abs(values.mean(axis=0) - exact) / (spread / np.sqrt(args.reps))
        lo, hi = min(counted), max(counted)
        rows.append([name, label, probes, f"{lo}" if lo == hi else f"{lo}-{hi}",
                     f"{reported[:, 0].mean():.3e}",
                     f"{reported[:, 1].mean():.3e}", f"{spread[0]:.3e}", f"{spread[1]:.3e}",
                     f"{np.nanmax(bias):.2f}", f"{wall:.2f}"])
    # the reduction, at equal products
    r1 = float(rows[0][4]) / float(rows[1][4])
    r2 = float(rows[0][5]) / float(rows[1][5])
    rows.append([name, "reduction (plain / deflated)", "", "", f"{r1:.1f}x", f"{r2:.1f}x",
                 _ratio(rows[0][6], rows[1][6]), _ratio(rows[0][7], rows[1][7]), "", ""])
    return rows


def _ratio(a: str, b: str) -> str:
    try:
        return f"{float(a) / float(b):.1f}x"
    except (ValueError, ZeroDivisionError):
        return "n/a"


def trace_rows(name: str, op: Any, args: argparse.Namespace) -> list[list[Any]]:
    import numpy as np

    import specdens

    lam = op.eigenvalues
    exact = float(lam.sum())
    psd = bool(lam.min() >= 0)
    rows = []
    for method in ("hutchinson", "hutch++", "xtrace", "xnystrace"):
        if method == "xnystrace" and not psd:
            rows.append([name, method, args.trace_matvecs, "n/a (indefinite)", "", "", ""])
            continue
        errors, ses = [], []
        t0 = time.perf_counter()
        for rep in range(args.reps):
            e = specdens.trace(op, num_matvecs=args.trace_matvecs, method=method, seed=rep)
            errors.append(e.value - exact)
            ses.append(e.stderr)
        wall = (time.perf_counter() - t0) / args.reps
        rmse = float(np.sqrt(np.mean(np.square(errors))))
        rows.append([name, method, args.trace_matvecs, f"{rmse / abs(exact):.3e}",
                     f"{np.sqrt(np.mean(np.square(ses))) / abs(exact):.3e}",
                     f"{abs(np.mean(errors)) / abs(exact):.1e}", f"{wall:.3f}"])
    return rows


def kpm_rows(name: str, op: Any, args: argparse.Namespace) -> list[list[Any]]:
    import numpy as np

    import specdens

    moments = 2 * args.steps  # floor(N / 2) = steps products per probe, as SLQ
    k = specdens.kpm(op, moments, args.probes, seed=0)
    d = specdens.slq(op, num_steps=args.steps, num_probes=args.probes, seed=0)
    lo, hi = k.center - k.half_width, k.center + k.half_width
    edges = np.linspace(lo, hi, 20001)
    mid = 0.5 * (edges[1:] + edges[:-1])
    w1 = float(np.sum(np.abs(k.cdf(mid) - d.cdf(mid))) * (edges[1] - edges[0]))
    lam = op.eigenvalues
    slq_bound = np.pi * (lam.max() - lam.min()) / (4 * args.steps)
    exact = [lam.mean(), np.mean(lam**2)]
    km, dm = k.moments([1, 2]), d.moments([1, 2])
    return [[name, moments, args.steps, args.probes, k.matvecs, d.matvecs, f"{w1:.3e}",
             f"{k.resolution():.3e}", f"{slq_bound:.3e}",
             f"{abs(km.value[1] - exact[1]) / km.stderr[1]:.2f}",
             f"{abs(dm.value[1] - exact[1]) / dm.stderr[1]:.2f}"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--steps", type=int, default=90)
    p.add_argument("--probes", type=int, default=10, help="probes of the deflated run")
    p.add_argument("--reps", type=int, default=20, help="seeds per estimator")
    p.add_argument("--trace-matvecs", type=int, default=300)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (for the tests)")
    args = p.parse_args()
    if args.smoke:
        args.n, args.steps, args.probes, args.reps, args.trace_matvecs = 200, 12, 3, 3, 24
    _common.set_threads(args.threads)
    from specdens.examples import SpectrumOperator, hessian_like, marchenko_pastur

    print(_common.environment_line())
    spectra = [
        ("hessian_like", hessian_like(args.n, seed=0), 10),
        ("marchenko_pastur", marchenko_pastur(args.n, seed=0), 3),
        ("tiny_bulk_hessian", SpectrumOperator(_common.hessian_like_diagonal(args.n), seed=0),
         10),
    ]
    print(f"\n## Deflated vs plain SLQ at equal matvecs (n = {args.n}, {args.steps} steps, "
          f"{args.reps} seeds; standard errors of tr(A)/n and tr(A^2)/n)\n")
    rows = []
    for name, op, k in spectra:
        rows += deflation_rows(name, op, k, args)
    print(_common.markdown_table(
        ["spectrum", "method", "probes", "matvecs", "stderr tr(A)/n", "stderr tr(A^2)/n",
         "spread tr(A)/n", "spread tr(A^2)/n", "max bias / se", "s / run"], rows))

    print(f"\n## Trace estimators at {args.trace_matvecs} matvecs ({args.reps} seeds; errors "
          "relative to |tr(A)|)\n")
    rows = []
    for name, op, _ in spectra:
        rows += trace_rows(name, op, args)
    print(_common.markdown_table(
        ["spectrum", "method", "matvecs", "rms error", "rms reported stderr", "mean error",
         "s / run"], rows))

    print(f"\n## KPM against SLQ ({args.probes} probes, the same products per probe)\n")
    rows = []
    for name, op, _ in spectra:
        rows += kpm_rows(name, op, args)
    print(_common.markdown_table(
        ["spectrum", "KPM moments", "SLQ steps", "probes", "KPM matvecs", "SLQ matvecs",
         "W1(KPM, SLQ)", "KPM resolution", "SLQ W1 bound", "KPM tr(A^2) err / se",
         "SLQ tr(A^2) err / se"], rows))


if __name__ == "__main__":
    main()
