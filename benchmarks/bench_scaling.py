"""Scaling: time and peak memory of the Lanczos engine against n, steps and probes, per
reorthogonalisation mode, and its overhead over the products themselves.

The operator is a cheap but realistic one whose product cost is known and measured on
its own: a symmetric banded Toeplitz matrix (``--band`` diagonals, default 21, i.e. 21
multiply-adds = 42 flops per row, the ~20-50 flops per parameter the issue names for an
HVP) plus a Hessian-like diagonal (``_common.hessian_like_diagonal``), in float32 (a
network's dtype; the Lanczos arithmetic is float64, the engine's default). Its product is
one ``scipy.ndimage.correlate1d`` pass and one multiply-add over the ``(n, k)`` block.

Every configuration runs in its own subprocess, so that its peak memory is its own (the
child's ``VmHWM``; *engine GiB* is that minus the resident set just before
``specdens.lanczos``, which holds the operator). After the Lanczos run the child times
single block products (median of several) and reports

    overhead = (Lanczos wall time - steps x product time) / (steps x product time),

the engine's own cost (recurrence, reorthogonalisation, bookkeeping) relative to the
products. A configuration whose basis and working vectors would not fit in 90 % of the
free memory is a "skipped" row instead of a run into the OOM killer.

Four parts:

* ``n``: n from 1e4 to 1e7 (2.5e7 with ``--full``), 90 steps, 1 probe, every mode;
* ``steps``: 30 to 300 steps at n = 1e6;
* ``probes``: 1 to 32 probes (one block) at n = 1e5;
* ``claim``: the target "engine overhead < 10 % at 90 steps for n >= 1e6 with the basis
  in float32", alternating Lanczos runs with runs of the same number of products alone
  (``--repeats`` pairs, paired ratios), for the ``--band`` operator and for one whose
  product costs as much per parameter as a real HVP measured in the same run (the
  digits MLP 64-512-512-10, 301,066 parameters, 1,797 samples, PyTorch, one thread:
  ``--no-calibrate`` skips it). The part also reports the break-even product cost: the
  product time per parameter above which the overhead is below 10 %;
* ``real``: the same claim on real networks of n >= 1e6 (``--real-models``): the Hessian
  of the digits MLP 64-1024-1024-10 (1,126,410 parameters, 1,797 samples) and of a digits
  CNN (1,156,458 parameters, 256 samples; a convolution weight works at every position,
  so its product costs more per parameter), PyTorch, ``--threads``; ``specdens.lanczos``
  (full, float32 basis) alternating with the same number of its products alone,
  ``--repeats`` pairs, in a child process per model. Each repetition also runs
  ``dtype="float32"`` (float32 vector arithmetic instead of the default float64), which
  shows what the float64 arithmetic's conversions cost. The part measures the machine's
  read bandwidth and reports the floor it sets: full reorthogonalisation reads the basis
  twice per step, so below some product cost per parameter no engine meets 10 %.

Modes are ``REORTH[:BASIS_DTYPE]``: ``full``, ``partial``, ``local`` (window
``--window``), ``none``, with a float32 or float64 basis.

    python benchmarks/bench_scaling.py                  # default grid, 12-18 min on 2 cores
    python benchmarks/bench_scaling.py --full           # the whole grid (hours; 24 GiB host)
    python benchmarks/bench_scaling.py --parts claim --claim-n 1e6,1e7
    python benchmarks/bench_scaling.py --smoke          # tiny, in-process, for the tests
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

ALL_MODES = ("full:float32", "full:float64", "partial:float32", "partial:float64",
             "local:float32", "local:float64", "none")
PARTS = ("n", "steps", "probes", "claim", "real")
TARGET_OVERHEAD = 0.10
WORKING_VECTORS = 10  # float64 vectors of size n per probe the engine holds besides the basis
HEADERS = ["n", "mode", "steps", "probes", "wall s", "ms / step", "products s", "overhead",
           "peak RSS GiB", "engine GiB", "basis GiB"]
CLAIM_HEADERS = ["n", "mode", "band", "product ns / param", "products s", "Lanczos s",
                 "engine s", "overhead (median)", "overhead (min)", "< 10 %"]


def parse_mode(token: str) -> tuple[str, str | None]:
    reorth, _, dtype = token.strip().partition(":")
    if reorth not in ("full", "partial", "local", "none"):
        raise SystemExit(f"unknown mode {token!r}: use full, partial, local or none, "
                         "optionally :float32 or :float64")
    if dtype and dtype not in ("float32", "float64"):
        raise SystemExit(f"unknown basis dtype in {token!r}: use float32 or float64")
    if reorth == "none" and dtype:
        raise SystemExit(f"{token!r}: reorth='none' keeps no basis; write 'none'")
    return reorth, dtype or None


def parse_floats(text: str) -> list[int]:
    try:
        return [int(float(t)) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"expected a comma list of numbers, got {text!r}") from None


def basis_bytes(cfg: dict[str, Any]) -> int:
    reorth, dtype = parse_mode(cfg["mode"])
    rows = {"full": cfg["steps"], "partial": cfg["steps"], "local": min(cfg["window"],
                                                                        cfg["steps"])}
    itemsize = 4 if dtype == "float32" else 8
    return rows.get(reorth, 0) * cfg["probes"] * cfg["n"] * itemsize


def needed_bytes(cfg: dict[str, Any]) -> int:
    """Basis, working vectors and the operator (diagonal and band output), estimated."""
    n, k = cfg["n"], cfg["probes"]
    return basis_bytes(cfg) + WORKING_VECTORS * k * n * 8 + 4 * n * 4 + 2 * k * n * 4


# --------------------------------------------------------------------------- operator


def banded_operator(n: int, band: int, dtype: str = "float32", seed: int = 0) -> Any:
    """``A = T + diag(d)``: ``T`` a symmetric banded Toeplitz matrix with ``band`` (odd)
    diagonals of small random weights, ``d`` the Hessian-like diagonal; float32 or float64
    numpy vectors. A block product costs one ``correlate1d`` pass (``band``
    multiply-adds per entry) and one multiply-add."""
    import array_api_compat.numpy as npx
    import numpy as np
    from scipy.ndimage import correlate1d

    import specdens

    if band < 1 or band % 2 == 0:
        raise ValueError(f"band must be a positive odd number of diagonals, got {band}")
    rng = np.random.default_rng(seed)
    w = 1e-3 * rng.standard_normal(band)
    w = (0.5 * (w + w[::-1])).astype(dtype)  # symmetric weights: a symmetric matrix
    d = _common.hessian_like_diagonal(n, seed).astype(dtype)

    class BandedOperator(specdens.LinearOperatorBase):
        def __init__(self) -> None:
            super().__init__((n, n), np.dtype(dtype), npx, "cpu")
            self.symmetric = True
            self.band = band

        def _matmat(self, V: Any) -> Any:
            V = np.asarray(V, dtype=dtype)
            out = correlate1d(V, w, axis=0, mode="constant")
            out += d[:, None] * V
            return out

        def _matvec(self, v: Any) -> Any:
            return self._matmat(np.asarray(v).reshape(-1, 1))[:, 0]

    return BandedOperator()


def product_seconds(op: Any, probes: int, reps: int) -> float:
    """Median seconds of one ``op.matmat`` on an ``(n, probes)`` block (after a warm-up)."""
    import numpy as np

    V = np.random.default_rng(1).standard_normal((op.shape[0], probes)).astype(op.dtype)
    op.matmat(V)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        op.matmat(V)
        ts.append(time.perf_counter() - t0)
    return _common.median(ts)


# --------------------------------------------------------------------------- one config


def run_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process; a dict of its figures."""
    import numpy as np

    import specdens

    out = dict(cfg)
    avail = _common.available_bytes() or 0
    out["available"] = avail
    out["needs"] = needed_bytes(cfg)
    out["basis"] = basis_bytes(cfg)
    if out["needs"] > 0.9 * avail:
        out["status"] = "skipped: does not fit"
        return out
    reorth, basis_dtype = parse_mode(cfg["mode"])
    op = banded_operator(cfg["n"], cfg["band"], cfg["op_dtype"])
    kwargs: dict[str, Any] = {"reorth": reorth, "num_probes": cfg["probes"]}
    if reorth == "local":
        kwargs["window"] = cfg["window"]
    if basis_dtype:
        kwargs["basis_dtype"] = basis_dtype
    reps = 3 if cfg["n"] * cfg["probes"] >= 5e6 else 7
    if cfg.get("claim"):
        return _claim(op, cfg, kwargs, out)
    rss_before = _common.proc_status_bytes("VmRSS")
    t0 = time.perf_counter()
    res = specdens.lanczos(op, cfg["steps"], **kwargs)
    wall = time.perf_counter() - t0
    peak = _common.peak_rss_bytes()
    steps_run = int(np.max(res.lengths))
    prod = product_seconds(op, cfg["probes"], reps)
    products = steps_run * prod
    out.update(status="ok", wall=wall, steps_run=steps_run, product=prod, products=products,
               overhead=(wall - products) / products, peak=peak, rss_before=rss_before,
               engine_bytes=None if rss_before is None else peak - rss_before,
               ran_as=res.reorth, basis_dtype=res.basis_dtype)
    return out


def _claim(op: Any, cfg: dict[str, Any], kwargs: dict[str, Any],
           out: dict[str, Any]) -> dict[str, Any]:
    """Alternate Lanczos runs with runs of as many products alone; paired overheads."""
    import numpy as np

    import specdens

    steps, k = cfg["steps"], cfg["probes"]
    V = np.random.default_rng(1).standard_normal((op.shape[0], k)).astype(op.dtype)

    def products_only() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            op.matmat(V)
        return time.perf_counter() - t0

    def lanczos_run() -> float:
        t0 = time.perf_counter()
        specdens.lanczos(op, steps, **kwargs)
        return time.perf_counter() - t0

    op.matmat(V)  # warm-up: first allocations, caches
    specdens.lanczos(op, min(steps, 5), **kwargs)
    walls, prods, ratios = [], [], []
    for r in range(cfg["repeats"]):
        if r % 2 == 0:
            w, p = lanczos_run(), products_only()
        else:
            p, w = products_only(), lanczos_run()
        walls.append(w)
        prods.append(p)
        ratios.append((w - p) / p)
    out.update(status="ok", wall=_common.median(walls), products=_common.median(prods),
               product=_common.median(prods) / steps, overhead=_common.median(ratios),
               overhead_min=min(ratios), overheads=ratios, walls=walls, prods=prods,
               peak=_common.peak_rss_bytes())
    return out


def run_child(cfg: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """Run ``cfg`` in a fresh Python process (clean peak RSS)."""
    # always passed on: the child's default is 1 thread, and 0 (the libraries' own
    # settings) must reach it as 0
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg),
           "--threads", str(threads or 0)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = ("killed by SIGKILL (out of memory?)" if proc.returncode == -9
               else f"exit {proc.returncode}")
        tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
        out = dict(cfg, status=f"failed: {why} {' '.join(tail)}".strip())
    else:
        out = json.loads(lines[-1])
    out["elapsed"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------- calibration


def calibration_child(threads: int) -> dict[str, Any]:
    """One Hessian-vector product of bench_torch's ``mlp-wide`` workload (digits MLP
    64-512-512-10, full batch): median seconds of 7 after a warm-up. ``threads`` torch
    threads (0: torch's own default)."""
    import bench_torch
    import torch
    from specdens.backends.torch import hessian

    if threads:
        torch.set_num_threads(threads)
    model, data = bench_torch.mlp_workload(False, wide=True)
    op = hessian(model, torch.nn.CrossEntropyLoss(), data[0])
    v = torch.randn(op.shape[0])
    op.matvec(v)
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        op.matvec(v)
        ts.append(time.perf_counter() - t0)
    return {"n": int(op.shape[0]), "samples": int(len(data[0][0])),
            "threads": torch.get_num_threads(), "seconds": _common.median(ts)}


REAL_MODELS = ("mlp", "cnn")


def digits_cnn_workload(smoke: bool) -> tuple[Any, list[tuple[Any, Any]], str]:
    """A CNN of n >= 1e6 on the first 256 digits images (1 x 8 x 8), trained a little:
    conv 1-64, conv 64-128, max-pool, conv 128-288, conv 288-288 (3 x 3, ReLU), global
    average pool, linear 288-10: 1,156,458 parameters. Its product reuses each
    convolution weight at every position of every image, so it costs several times the
    MLP's per parameter, as convolutional networks' do."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    count = 32 if smoke else 256
    x = torch.tensor(d.data[:count] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target[:count], dtype=torch.long)
    c1, c2, c3 = (4, 8, 8) if smoke else (64, 128, 288)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, c1, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(c1, c2, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(c2, c3, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(c3, c3, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c3, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2 if smoke else 30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, [(x, y)], f"digits CNN 1-{c1}-{c2}-{c3}-{c3} (3x3 convolutions)-10"


def read_bandwidth(n: int, rows: int, reps: int = 7) -> float:
    """Bytes per second at which torch reads a ``(rows, n)`` float32 array (a sum over
    it, median of ``reps``): the rate a Gram-Schmidt sweep through the basis cannot
    beat."""
    import torch

    a = torch.ones(rows, n, dtype=torch.float32)
    a.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    return rows * n * 4 / _common.median(times)


def real_claim_child(steps: int, repeats: int, smoke: bool, threads: int,
                     model_name: str = "mlp") -> dict[str, Any]:
    """Pairs of (``steps`` products alone, a ``steps``-step Lanczos run) on the Hessian of
    a real network of n >= 1e6 (``model_name``: the digits MLP 64-1024-1024-10, or
    :func:`digits_cnn_workload`), float32, full reorthogonalisation, float32 basis.

    Each Lanczos run also times its own products (a timer around the operator's
    ``matmat``, which the engine calls once per step), which splits the run into the
    products and the engine without the drift between two runs 10-20 s apart.

    ``threads`` torch threads (0: torch's own default). The pairs alternate their order
    (products alone first in even repetitions, the Lanczos run first in odd ones), as
    ``_claim`` does, so that a drift of the machine does not favour one side.

    Also measured: the rate at which torch reads a float32 array of ``steps / 2`` rows of
    ``n`` (the basis's average size), from which follows the floor of full
    reorthogonalisation: one Gram-Schmidt sweep reads the ``j`` rows of the basis twice
    (the projection and the combination), ``4 n steps (steps + 1)`` bytes in a run."""
    import bench_torch
    import numpy as np
    import torch
    from specdens.backends.torch import hessian

    import specdens

    if threads:
        torch.set_num_threads(threads)
    if model_name == "cnn":
        model, data, name = digits_cnn_workload(smoke)
        width = None
    else:
        width = 24 if smoke else 1024
        model, data = bench_torch.mlp_workload(smoke, wide=True, width=width)
        name = f"digits MLP 64-{width}-{width}-10"
    op = hessian(model, torch.nn.CrossEntropyLoss(), data[0])
    v = torch.randn(op.shape[0])
    op.matvec(v)
    specdens.lanczos(op, 3, basis_dtype="float32")  # warm-up
    product = op.matmat
    inside: list[float] = []

    def timed_matmat(V: Any) -> Any:
        t0 = time.perf_counter()
        out = product(V)
        inside.append(time.perf_counter() - t0)
        return out

    def timed_run(rep: int, dtype: str | None) -> tuple[float, float, Any]:
        """(wall seconds, seconds inside the products, result) of one Lanczos run."""
        inside.clear()
        op.matmat = timed_matmat  # (this instance only)
        try:
            t0 = time.perf_counter()
            r = specdens.lanczos(op, steps, reorth="full", basis_dtype="float32", seed=rep,
                                 dtype=dtype)
            return time.perf_counter() - t0, sum(inside), r
        finally:
            del op.matmat

    def products_alone() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            op.matvec(v)
        return time.perf_counter() - t0

    pairs, float32_runs, orders = [], [], []
    for rep in range(repeats):
        if rep % 2 == 0:
            t_products = products_alone()
            t_lanczos, t_inside, r = timed_run(rep, None)
        else:
            t_lanczos, t_inside, r = timed_run(rep, None)
            t_products = products_alone()
        orders.append("products first" if rep % 2 == 0 else "Lanczos first")
        pairs.append([t_lanczos, t_products, t_inside])
        t32, t32_inside, r32 = timed_run(rep, "float32")
        # the largest Ritz values of the two runs (same probe): what float32 arithmetic
        # changes in the result
        top = [float(np.linalg.eigvalsh(x.tridiagonal_matrix(0))[-1]) for x in (r, r32)]
        float32_runs.append([t32, t32_inside, *top])
    n = int(op.shape[0])
    return {"status": "ok", "n": n, "width": width, "model": name,
            "samples": int(len(data[0][0])),
            "threads": torch.get_num_threads(), "steps": steps, "basis": r.basis_dtype,
            "dtype": r.dtype, "pairs": pairs, "float32_runs": float32_runs,
            "orders": orders, "read_bytes_per_s": read_bandwidth(n, max(1, steps // 2))}


def real_claim(args: argparse.Namespace, model_name: str) -> dict[str, Any]:
    """``real_claim_child`` in a child process (in this one with ``--in-process``)."""
    if args.in_process:
        return real_claim_child(args.steps, args.repeats, args.smoke, args.threads,
                                model_name)
    cmd = [sys.executable, os.path.abspath(__file__), "--real-child", model_name, "--steps",
           str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
        return {"status": f"failed: exit {proc.returncode} {' '.join(tail)}".strip()}
    return json.loads(lines[-1])


def real_claim_table(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"real network: {r.get('status')}"
    rows = []
    # (results of before the float32 runs were added have none)
    nan = float("nan")
    f32 = r.get("float32_runs") or [[nan, nan, nan, nan]] * len(r["pairs"])
    # (results of before the order alternated ran the products first in every pair)
    orders = r.get("orders") or ["products first"] * len(r["pairs"])
    # the floor of full reorthogonalisation: two reads of the j-row basis at step j
    sweep_bytes = 4.0 * r["n"] * r["steps"] * (r["steps"] + 1)
    rate = r.get("read_bytes_per_s")
    floor = [sweep_bytes / rate / t_i if rate else nan for _, _, t_i in r["pairs"]]
    for i, ((t_lanczos, t_products, t_inside), (t32, t32_in, top64, top32), order, fl) in \
            enumerate(zip(r["pairs"], f32, orders, floor, strict=True)):
        rows.append([str(i + 1), order, fmt(1e3 * t_products / r["steps"]),
                     fmt(1e9 * t_products / r["steps"] / r["n"]), fmt(t_products),
                     fmt(t_lanczos), fmt(t_inside),
                     f"{100 * (t_lanczos - t_inside) / t_inside:.1f} %",
                     f"{100 * fl:.1f} %",
                     f"{100 * (t_inside / t_products - 1):+.1f} %",
                     f"{100 * (t_lanczos / t_products - 1):.1f} %",
                     f"{100 * (t32 - t32_in) / t32_in:.1f} %",
                     f"{abs(top32 - top64) / abs(top64):.1e}"])
    engine = [(t_l - t_i) / t_i for t_l, _, t_i in r["pairs"]]
    engine32 = [(t - t_i) / t_i for t, t_i, *_ in f32]
    slower = [t_i / t_p - 1 for _, t_p, t_i in r["pairs"]]
    over = [t_l / t_p - 1 for t_l, t_p, _ in r["pairs"]]
    model = r.get("model") or f"digits MLP 64-{r['width']}-{r['width']}-10"

    def verdict(x: list[float]) -> str:
        return "yes" if _common.median(x) < TARGET_OVERHEAD else "no"

    floor_line = ""
    if rate:
        floor_line = (
            f"- Floor of full reorthogonalisation: one Gram-Schmidt sweep per step reads the "
            f"basis twice, {sweep_bytes / 1e9:.1f} GB in the run; torch reads float32 at "
            f"{rate / 1e9:.1f} GB/s here (a sum over {r['steps'] // 2} rows of n), so the "
            f"sweeps alone cost at least {100 * _common.median(floor):.1f} % of the products "
            f"(median; the column *sweep floor*). Below 10 % needs products of at least "
            f"{1e9 * sweep_bytes / rate / TARGET_OVERHEAD / r['steps'] / r['n']:.0f} ns per "
            "parameter on this machine, before any other work of the engine.\n")
    return (_common.markdown_table(
        ["pair", "order", "product ms", "ns / param", "products alone s", "Lanczos s",
         "its products s", "engine / its products", "sweep floor / its products",
         "its products / alone", "Lanczos / products alone - 1",
         "engine / its products, float32 arithmetic",
         "largest Ritz value, float32 against float64 arithmetic"], rows)
            + f"\n\nHessian of the {model}: n = {r['n']:,}, "
            f"{r['samples']} samples, {r['threads']} thread(s), {r['steps']} steps, full "
            f"reorthogonalisation, {r['basis']} basis, {r.get('dtype', 'float64')} "
            "arithmetic (the default) unless the column says otherwise.\n\n"
            f"- Engine time over the products of the same run (no drift between runs): median "
            f"{100 * _common.median(engine):.1f} %, max {100 * max(engine):.1f} %; < 10 %: "
            f"{verdict(engine)}.\n"
            + floor_line +
            f"- The same with dtype='float32' (float32 vectors: no conversions between the "
            f"float32 products and basis and float64 vectors): median "
            f"{100 * _common.median(engine32):.1f} %; < 10 %: {verdict(engine32)}. Its "
            f"largest Ritz value differs from the float64 run's on the same probe by the "
            f"relative amount in the last column.\n"
            f"- The products inside the run against the same number alone (the engine's "
            f"sweeps through the basis evict the model's data from the caches, and the "
            f"machine drifts between runs): median {100 * _common.median(slower):+.1f} %.\n"
            f"- Whole run against the products alone (both effects): median "
            f"{100 * _common.median(over):.1f} %, min {100 * min(over):.1f} %; < 10 %: "
            f"{verdict(over)}.")


def calibrate_hvp(threads: int | None) -> dict[str, Any] | None:
    """ns per parameter of a real Hessian-vector product, measured in a child process;
    None (with a message) when PyTorch or scikit-learn is missing."""
    cmd = [sys.executable, os.path.abspath(__file__), "--calibration-child",
           "--threads", str(threads or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
        print(f"calibration failed ({' '.join(tail)}); the claim part runs with --band only",
              file=sys.stderr)
        return None
    out = json.loads(lines[-1])
    out["ns_per_param"] = 1e9 * out["seconds"] / out["n"]
    return out


def calibrated_band(base: dict[str, Any], target_ns: float, run: Any) -> int | None:
    """The odd number of diagonals whose product costs ``target_ns`` per parameter at
    ``base["n"]``: one secant step from ``base["band"]`` (the product's cost is affine in
    the band), each point measured by ``run`` on a 3-step configuration (in a child)."""
    n, band = base["n"], base["band"]

    def ns_at(b: int) -> float | None:
        r = run(dict(base, band=b, mode="none", steps=3, probes=1, claim=False))
        return 1e9 * r["product"] / n if r.get("status") == "ok" else None

    def odd(x: float) -> int:
        b = max(band, int(round(x)))
        return b + 1 - b % 2

    ns0 = ns_at(band)
    if ns0 is None:
        return None
    b1 = odd(band * target_ns / ns0)
    ns1 = ns_at(b1) if b1 != band else None
    if ns1 is None or ns1 <= ns0:
        return b1
    return odd(band + (b1 - band) * (target_ns - ns0) / (ns1 - ns0))


# --------------------------------------------------------------------------- tables


def fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def sweep_row(r: dict[str, Any]) -> list[str]:
    head = [f"{r['n']:.3g}", r["mode"], str(r["steps"]), str(r["probes"])]
    if r.get("status") != "ok":
        status = r.get("status", "?")
        if "needs" in r and status.startswith("skipped"):
            status += (f" (needs {_common.gib(r['needs'])} GiB, "
                       f"{_common.gib(r['available'])} free)")
        return head + [status, "", "", "", "", "", _common.gib(r.get("basis"))]
    return head + [fmt(r["wall"]), fmt(1e3 * r["wall"] / r["steps_run"]),
                   fmt(r["products"]), f"{100 * r['overhead']:.0f} %",
                   _common.gib(r["peak"]), _common.gib(r["engine_bytes"]),
                   _common.gib(r["basis"])]


def claim_row(r: dict[str, Any]) -> list[str]:
    head = [f"{r['n']:.3g}", r["mode"], str(r["band"])]
    if r.get("status") != "ok":
        return head + [r.get("status", "?")] + [""] * 6
    return head + [fmt(1e9 * r["product"] / (r["n"] * r["probes"])), fmt(r["products"]),
                   fmt(r["wall"]), fmt(r["wall"] - r["products"]),
                   f"{100 * r['overhead']:.1f} %", f"{100 * r['overhead_min']:.1f} %",
                   "yes" if r["overhead"] < TARGET_OVERHEAD else "no"]


# --------------------------------------------------------------------------- plot


def plot(results: dict[str, list[dict[str, Any]]], path: str, steps: int = 90) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ok = {k: [r for r in v if r.get("status") == "ok"] for k, v in results.items()}

    def by_mode(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(r["mode"], []).append(r)
        return groups

    panels = [
        (axes[0, 0], "n", "n", lambda r: r["wall"], f"Lanczos wall s ({steps} steps, 1 probe)"),
        (axes[0, 1], "n", "n", lambda r: r["engine_bytes"] / 2**30
         if r["engine_bytes"] else float("nan"), "engine peak memory GiB"),
        (axes[0, 2], "n", "n", lambda r: 100 * r["overhead"], "overhead over products %"),
        (axes[1, 0], "steps", "steps", lambda r: r["wall"], "wall s (n = steps part's n)"),
        (axes[1, 1], "probes", "probes", lambda r: r["wall"] / r["probes"],
         "wall s per probe (probes part)"),
    ]
    for ax, part, key, value, title in panels:
        rows = ok.get(part, [])
        for mode, group in sorted(by_mode(rows).items()):
            group = sorted(group, key=lambda r: r[key])
            ax.plot([r[key] for r in group], [value(r) for r in group], "o-", label=mode)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_title(title, fontsize=10)
        if rows:
            ax.legend(fontsize=7)
    # products alone, for comparison with the wall time
    rows = ok.get("n", [])
    if rows:
        prods = sorted({(r["n"], r["products"]) for r in rows if r["mode"] == rows[0]["mode"]})
        axes[0, 0].plot([p[0] for p in prods], [p[1] for p in prods], "k--",
                        label="products alone")
        axes[0, 0].legend(fontsize=7)
    axes[0, 2].axhline(100 * TARGET_OVERHEAD, color="k", ls=":", lw=1)
    ax = axes[1, 2]
    claim = ok.get("claim", [])
    if claim:
        labels = [f"{r['mode']}\nband {r['band']}, n={r['n']:.0e}" for r in claim]
        vals = [max(100 * r["overhead"], 0.1) for r in claim]  # log axis
        ax.barh(range(len(vals)), vals)
        ax.set_yticks(range(len(vals)), labels, fontsize=7)
        ax.axvline(100 * TARGET_OVERHEAD, color="k", ls=":", lw=1)
        ax.set_xscale("log")
    ax.set_title(f"claim: overhead % at {steps} steps (target < 10 %)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def build_grid(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    base = {"probes": 1, "steps": args.steps, "band": args.band, "window": args.window,
            "op_dtype": args.op_dtype}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    big_modes = [m.strip() for m in args.big_modes.split(",") if m.strip()]
    for m in modes + big_modes:
        parse_mode(m)
    grid: dict[str, list[dict[str, Any]]] = {p: [] for p in PARTS}
    for n in parse_floats(args.n_list):
        for m in (modes if n <= args.all_modes_max_n else big_modes):
            grid["n"].append(dict(base, n=n, mode=m))
    step_modes = [m.strip() for m in args.steps_modes.split(",") if m.strip()]
    for s in parse_floats(args.steps_list):
        for m in step_modes:
            grid["steps"].append(dict(base, n=int(args.steps_n), steps=s, mode=m))
    probe_modes = [m.strip() for m in args.probes_modes.split(",") if m.strip()]
    for k in parse_floats(args.probes_list):
        for m in probe_modes:
            grid["probes"].append(dict(base, n=int(args.probes_n), probes=k, mode=m))
    claim_modes = [m.strip() for m in args.claim_modes.split(",") if m.strip()]
    for n in parse_floats(args.claim_n):
        for m in claim_modes:
            grid["claim"].append(dict(base, n=n, mode=m, claim=True, repeats=args.repeats))
    for m in step_modes + probe_modes + claim_modes:
        parse_mode(m)
    return grid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    p.add_argument("--n-list", default="1e4,1e5,1e6,1e7", help="n of the n part")
    p.add_argument("--modes", default=",".join(ALL_MODES), help="modes of the n part")
    p.add_argument("--all-modes-max-n", type=float, default=1e6,
                   help="above this n the n part runs only --big-modes (default 1e6)")
    p.add_argument("--big-modes", default="full:float32,none",
                   help="modes of the n part above --all-modes-max-n")
    p.add_argument("--steps", type=int, default=90, help="steps of the n/probes/claim parts")
    p.add_argument("--steps-list", default="30,90,150,300", help="steps of the steps part")
    p.add_argument("--steps-n", type=float, default=1e6, help="n of the steps part")
    p.add_argument("--steps-modes", default="full:float32,partial:float32,none")
    p.add_argument("--probes-list", default="1,4,16,32", help="probes of the probes part")
    p.add_argument("--probes-n", type=float, default=1e5, help="n of the probes part")
    p.add_argument("--probes-modes", default="full:float32,none")
    p.add_argument("--claim-n", default="1e6", help="n of the claim part (comma list)")
    p.add_argument("--claim-modes", default="full:float32,partial:float32")
    p.add_argument("--repeats", type=int, default=3, help="claim part: alternating pairs")
    p.add_argument("--band", type=int, default=21, help="diagonals of the banded operator")
    p.add_argument("--no-calibrate", action="store_true",
                   help="claim part: skip the operator calibrated on a real HVP")
    p.add_argument("--window", type=int, default=20, help="window of reorth='local'")
    p.add_argument("--op-dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS threads (default 1; 0: the library default)")
    p.add_argument("--full", action="store_true",
                   help="the whole grid: n up to 2.5e7 in every mode, steps 30-300 and "
                        "probes 1-32 in every mode, the claim at n = 1e6 and 1e7")
    p.add_argument("--in-process", action="store_true",
                   help="run every configuration in this process (no clean peak RSS)")
    p.add_argument("--json", default=None, help="write every result to this JSON file")
    p.add_argument("--plot", default=None, help="write the figure to this PNG file")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, in-process (for tests)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--calibration-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--real-models", default=",".join(REAL_MODELS),
                   help="real part: comma list of " + ", ".join(REAL_MODELS))
    p.add_argument("--real-child", default=None, choices=REAL_MODELS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _common.set_threads(args.threads or None)
    if args.calibration_child:
        print(json.dumps(calibration_child(args.threads)), flush=True)
        return 0
    if args.real_child:
        print(json.dumps(real_claim_child(args.steps, args.repeats, False, args.threads,
                                          args.real_child)), flush=True)
        return 0
    if args.child:
        print(json.dumps(run_config(json.loads(args.child))), flush=True)
        return 0
    if args.full:
        args.n_list, args.all_modes_max_n = "1e4,1e5,1e6,1e7,2.5e7", 3e7
        args.steps_list, args.steps_modes = "30,60,90,150,300", ",".join(ALL_MODES)
        args.probes_list, args.probes_modes = "1,2,4,8,16,32", ",".join(ALL_MODES)
        args.claim_n = "1e6,1e7"
    if args.smoke:
        args.n_list, args.all_modes_max_n = "2000,10000", 1e9
        args.steps_list, args.steps_n, args.steps_modes = "6,12", 5000, "full:float32,none"
        args.probes_list, args.probes_n = "1,2", 5000
        args.claim_n, args.repeats, args.steps = "10000", 2, 12  # 2: both pair orders
        args.no_calibrate, args.in_process = True, True
    parts = [t.strip() for t in args.parts.split(",") if t.strip()]
    bad = [t for t in parts if t not in PARTS]
    if bad:
        p.error(f"unknown parts {bad}; choose from {list(PARTS)}")
    real_models = [t.strip() for t in args.real_models.split(",") if t.strip()]
    bad = [t for t in real_models if t not in REAL_MODELS]
    if bad or not real_models:
        p.error(f"--real-models {args.real_models!r}: choose from {list(REAL_MODELS)}")
    grid = build_grid(args)

    print("# Scaling of the Lanczos engine: time, peak memory and overhead over the products\n")
    print(_common.environment_line())
    print(f"\nOperator: symmetric banded Toeplitz ({args.band} diagonals) + Hessian-like "
          f"diagonal, {args.op_dtype}; Lanczos arithmetic float64; "
          + ("all configurations in this process (peak RSS is not per row)"
             if args.in_process else "one subprocess per configuration"))
    cache: dict[str, dict[str, Any]] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    calibration = None
    if "claim" in parts and not args.no_calibrate:
        calibration = calibrate_hvp(args.threads)

    def run(cfg: dict[str, Any]) -> dict[str, Any]:
        key = json.dumps(cfg, sort_keys=True)
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = run_config(cfg) if args.in_process else run_child(cfg, args.threads)
            cache[key].setdefault("elapsed", time.perf_counter() - t0)
            r = cache[key]
            print(f"  n={cfg['n']:.3g} {cfg['mode']} steps={cfg['steps']} "
                  f"probes={cfg['probes']} band={cfg['band']}: {r.get('status')} in "
                  f"{r['elapsed']:.1f} s", file=sys.stderr, flush=True)
        return cache[key]

    for part in parts:
        if part == "real":
            results[part] = [real_claim(args, name) for name in real_models]
            continue
        cfgs = grid[part]
        if part == "claim" and calibration is not None:
            # the band whose product costs as much per parameter as the real HVP
            cal_band = []
            for n in sorted({cfg["n"] for cfg in cfgs}):
                same_n = [cfg for cfg in cfgs if cfg["n"] == n]
                b = calibrated_band(same_n[0], calibration["ns_per_param"], run)
                if b is not None:
                    cal_band += [dict(cfg, band=b) for cfg in same_n]
            cfgs = cfgs + cal_band
        results[part] = [run(cfg) for cfg in cfgs]

    titles = {"n": f"## Time and memory against n ({args.steps} steps, 1 probe)",
              "steps": f"## Time against steps (n = {int(args.steps_n):.3g}, 1 probe)",
              "probes": f"## Time against probes (n = {int(args.probes_n):.3g}, "
                        f"{args.steps} steps, one block)"}
    for part in ("n", "steps", "probes"):
        if part in results:
            print(f"\n{titles[part]}\n")
            print(_common.markdown_table(HEADERS, [sweep_row(r) for r in results[part]]))
    if "claim" in results:
        print(f"\n## Claim: engine overhead < 10 % at {args.steps} steps, n >= 1e6, float32 "
              f"basis ({args.repeats} alternating pairs of a Lanczos run and "
              f"{args.steps} products alone)\n")
        print(_common.markdown_table(CLAIM_HEADERS, [claim_row(r) for r in results["claim"]]))
        print()
        if calibration is not None:
            print(f"Calibration: one HVP of the digits MLP 64-512-512-10 ({calibration['n']:,} "
                  f"parameters, {calibration['samples']} samples, PyTorch, "
                  f"{calibration['threads']} thread(s)) took "
                  f"{1e3 * calibration['seconds']:.1f} ms = "
                  f"{calibration['ns_per_param']:.0f} ns per parameter; the wider band "
                  "costs about as much per parameter.")
        print(f"Assumption: an HVP costs >= 20-50 flops per parameter (the {args.band}-diagonal"
              f" band: {2 * args.band} flops per parameter); a real one costs the forward and "
              "backward passes over the batch twice, i.e. grows with the batch.")
        for r in results["claim"]:
            if r.get("status") == "ok":
                own = (r["wall"] - r["products"]) / args.steps
                need = own / TARGET_OVERHEAD / (r["n"] * r["probes"]) * 1e9
                print(f"* n = {r['n']:.3g}, {r['mode']}, band {r['band']}: the engine's own "
                      f"time is {1e3 * own:.1f} ms per step; overhead < 10 % needs a product "
                      f"of >= {1e3 * own / TARGET_OVERHEAD:.0f} ms = {need:.0f} ns per "
                      "parameter")
    for r in results.get("real", []):
        print(f"\n## Claim on a real network: {r.get('model', 'failed')} ({args.repeats} "
              f"alternating pairs of {args.steps} products alone and a Lanczos run)\n")
        print(real_claim_table(r))
    print()
    print("overhead = (Lanczos wall - steps x product) / (steps x product); the product is "
          "the median of single block products timed after the run (claim: the same "
          "number of products timed alone, alternating with the Lanczos runs).")
    print("peak RSS: VmHWM of the configuration's process; engine: peak RSS minus the "
          "resident set just before specdens.lanczos; basis: steps x probes x n x itemsize.")
    print(f"load average at end: {_common.loadavg()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "calibration": calibration,
                       "environment": _common.environment_line()}, fh, indent=1)
    if args.plot:
        plot(results, args.plot, args.steps)
    failed = [r for rs in results.values() for r in rs
              if not str(r.get("status", "")).startswith(("ok", "skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
