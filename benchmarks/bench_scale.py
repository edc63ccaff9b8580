"""Scale: every reorthogonalisation mode at ResNet-50 size (n = 2.5e7) on this machine.

A diagonal operator with a Hessian-like spectrum (a tiny bulk of both signs, a small
positive tail, ten outliers between 10 and 100), 1 probe, float64 arithmetic. Each mode
runs in its own subprocess, so that its peak memory is its own: the child reports its
``VmHWM`` (peak resident set, /proc/self/status) and its resident set just before the
call, whose difference is what the engine allocated.

A mode is ``REORTH[:BASIS_DTYPE]``: ``full:float32`` stores the basis in float32 (the
arithmetic stays float64); ``auto`` uses the engine's default budget (half the free
host memory) and the table says what it picked. A mode whose basis alone cannot fit in
the free memory is reported and skipped rather than run into the OOM killer.

    python benchmarks/bench_scale.py                                  # n = 2.5e7, ~10 min
    python benchmarks/bench_scale.py --modes full:float64 --n 1e7
    python benchmarks/bench_scale.py --smoke                          # tiny, for the tests
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import _common

DEFAULT_MODES = "full:float32,local,none,auto"
OUTLIER = 5.0  # eigenvalues above this are the spectrum's ten outliers (10 ... 100)
WORKING_VECTORS = 8  # float64 vectors of size n the engine keeps besides the basis (estimate)


def parse_mode(token: str) -> tuple[str, str | None]:
    reorth, _, dtype = token.strip().partition(":")
    if reorth not in ("full", "local", "none", "auto"):
        raise SystemExit(f"unknown mode {token!r}: use full, local, none or auto[:float32|float64]")
    if dtype and dtype not in ("float32", "float64"):
        raise SystemExit(f"unknown basis dtype in {token!r}: use float32 or float64")
    return reorth, dtype or None


def child(args: argparse.Namespace) -> int:
    """Run one mode and print one JSON line."""
    import numpy as np

    import specdens

    reorth, basis_dtype = parse_mode(args.child)
    n, m = int(args.n), int(args.steps)
    itemsize = 4 if basis_dtype == "float32" else 8
    d = _common.hessian_like_diagonal(n)
    op = _common.diagonal_operator(d)
    avail = _common.available_bytes() or 0
    out: dict[str, Any] = {"mode": args.child, "n": n, "steps": m, "available": avail}
    basis_rows = {"full": m, "local": min(args.window, m), "none": 0}.get(reorth)
    if basis_rows is not None:
        need = basis_rows * n * itemsize + WORKING_VECTORS * n * 8
        out["needs"] = need
        if need > 0.95 * avail:
            out["status"] = "skipped: does not fit"
            print(json.dumps(out), flush=True)
            return 0
    rss_before = _common.proc_status_bytes("VmRSS")
    kwargs: dict[str, Any] = {"reorth": reorth, "window": args.window}
    if basis_dtype:
        kwargs["basis_dtype"] = basis_dtype
    t0 = time.perf_counter()
    res = specdens.lanczos(op, m, **kwargs)
    wall = time.perf_counter() - t0
    alpha, beta = res.tridiagonal(0)
    ritz = np.linalg.eigvalsh(np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1))
    out.update(
        status="ok",
        wall=wall,
        rss_before=rss_before,
        peak=_common.peak_rss_bytes(),
        picked=res.reorth,
        window=res.window,
        basis_dtype=res.basis_dtype,
        steps_run=int(res.lengths[0]),
        ritz_max=float(ritz[-1]),
        ritz_outliers=int(np.sum(ritz > OUTLIER)),
        true_outliers=int(np.sum(d > OUTLIER)),
        asymmetry=res.asymmetry,
        budget=avail // 2 if reorth == "auto" else None,
    )
    print(json.dumps(out), flush=True)
    return 0


def run_mode(token: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", token, "--n", str(args.n),
           "--steps", str(args.steps), "--window", str(args.window)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = "killed by SIGKILL (out of memory?)" if proc.returncode == -9 else \
            f"exit {proc.returncode}"
        tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
        return {"mode": token, "status": f"failed: {why} {' '.join(tail)}".strip(),
                "elapsed": elapsed}
    out = json.loads(lines[-1])
    out["elapsed"] = elapsed
    return out


def row(r: dict[str, Any]) -> list[str]:
    if r.get("status") != "ok":
        return [r["mode"], "-", "-", "-", "-", r.get("status", "?") +
                (f" (needs {_common.gib(r['needs'])} GiB, {_common.gib(r['available'])} free)"
                 if "needs" in r else "")]
    picked = r["picked"] + (f" (window {r['window']})" if r["window"] else "")
    if r["picked"] != "none":
        picked += f", basis {r['basis_dtype']}"
    if r["budget"] is not None:
        picked += f"; budget {_common.gib(r['budget'])} GiB"
    engine = r["peak"] - r["rss_before"] if r["rss_before"] is not None else None
    return [r["mode"], f"{r['wall']:.2f}", _common.gib(r["peak"]), _common.gib(engine), picked,
            f"{r['ritz_outliers']} ({r['true_outliers']})"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=float, default=2.5e7, help="operator size (default 2.5e7)")
    p.add_argument("--steps", type=int, default=90, help="Lanczos steps (default 90)")
    p.add_argument("--modes", default=DEFAULT_MODES,
                   help=f"comma-separated REORTH[:BASIS_DTYPE] (default {DEFAULT_MODES})")
    p.add_argument("--window", type=int, default=20, help="window of reorth='local'")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (n=5000, 12 steps)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.steps = 5000, 12
    _common.set_threads(args.threads)
    if args.child:
        return child(args)

    modes = [t.strip() for t in args.modes.split(",") if t.strip()]
    for t in modes:
        parse_mode(t)
    n = int(args.n)
    print(f"# Scale: n = {n:,}, {args.steps} steps, 1 probe, float64 arithmetic, diagonal "
          f"operator with a Hessian-like spectrum; one subprocess per mode")
    print(_common.environment_line())
    results = []
    for t in modes:
        r = run_mode(t, args)
        results.append(r)
        print(f"  {t}: {r.get('status')} in {r['elapsed']:.1f} s (incl. setup)", file=sys.stderr,
              flush=True)
    print()
    print(_common.markdown_table(
        ["mode", "wall s", "peak RSS GiB", "engine GiB", "ran as",
         f"Ritz values > {OUTLIER:g} (true count)"],
        [row(r) for r in results]))
    print()
    print("peak RSS: VmHWM of the child process; engine: peak RSS minus the resident set just "
          "before specdens.lanczos (the operator's diagonal and the interpreter are not in it).")
    print(f"Ritz values > {OUTLIER:g}: the outliers the run found; more than the true count are "
          "ghost copies (loss of orthogonality), fewer are outliers not yet converged.")
    print(f"load average at end: {_common.loadavg()}")
    return 0 if all(r.get("status", "").startswith(("ok", "skipped")) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
