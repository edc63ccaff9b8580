"""PyTorch Hessian SLQ: specdens against PyHessian, hessian-eigenthings and curvlinops.

Every tool estimates the Hessian eigenvalue density of the same model, loss and data with
the same number of Lanczos steps and probes, in the same process, alternately (the order
rotates every repetition); the table reports medians. Workloads:

* ``mlp``: MLP 64-32-10 (2410 parameters) on scikit-learn's digits, 1797 samples in one
  full batch, cross-entropy, 90 steps x 10 probes (small enough for a dense reference);
* ``mlp-wide``: the issue's timing workload, MLP 64-512-512-10 (301066 parameters, ReLU)
  on the same full batch, 60 steps x 2 probes; no dense reference at this size;
* ``cnn``: a small CNN (conv 3-8-16, global average pool, linear; 1562 parameters) over 8
  batches of 64 random CIFAR-shaped images (3x32x32), 20 steps x 2 probes.

Arithmetic is float32 (the model's dtype) for every tool: PyHessian builds its product
vectors in float32 whatever the model, so a float64 comparison would not be one. The
reference spectrum is ``numpy.linalg.eigvalsh`` of the dense Hessian of a float64 copy of
the model (``specdens.testing.dense_eigenvalues``). Accuracy is the Wasserstein-1 distance
between each tool's output and that spectrum, divided by the spectral range: on the
quadrature nodes and weights where the tool returns them (specdens, PyHessian,
hessian-eigenthings), else on its smoothed density sampled on its grid (curvlinops, whose
Gaussian smoothing adds its own share). A faster tool that is wrong does not win.

Equal work: specdens and PyHessian return nodes and weights; hessian-eigenthings's
``spectral_density`` also evaluates a Gaussian-smoothed density on ``num_grid_points``
points (10,000 by default, about 4 % of its time on the MLP), so it runs with
``num_grid_points=1``: its time is that of its Lanczos runs and their nodes and weights.
curvlinops returns only its smoothed density, which stays in its time.

Rows: ``specdens`` is ``specdens.slq(hessian(model, criterion, data), ...)`` (full
reorthogonalisation, the default), ``specdens-partial`` the same with
``reorth="partial"``; ``HVP floor``
is ``op.matmat(V)`` of that operator (graphs already built) on a block of as many vectors
as probes, per vector: the cost of the products alone. It is measured right after each
specdens run, so that both see the same machine load, and ``specdens / HVP floor`` is the
median of these paired ratios. Every tool's products are counted (a wrapper on its
Hessian-vector product, or specdens's ``matvecs``) and shown in the ``matvecs`` column;
time per step (``ms / step``) is (operator construction + SLQ) / matvecs, the time per
product made, which for every tool but curvlinops is steps x probes (one product per
Lanczos step).

curvlinops's ``lanczos_approximate_spectrum`` first estimates the spectral boundaries
(for its grid and its Gaussian smoothing) with ``scipy.sparse.linalg.eigsh``, ARPACK's
implicitly restarted Lanczos, whose products (tens to hundreds) come on top of the
steps x probes of its Lanczos runs. Those products are part of its algorithm, so they
stay in its clock and in its ``total s``; dividing that total by steps x probes would
charge them as dearer Lanczos steps, hence the division by the products it made, and a
note below the table gives how many products and seconds the boundary estimate took.
(Passing boundaries computed outside the clock would hide that cost.) ARPACK's default
start vector comes from a generator whose state carries over between calls in a process
(the product count then depends on what ran before), so the script makes curvlinops's
own call (``eigsh(k=2, which="BE", tol=1e-2)``) with a seeded start vector inside the
clock and passes the result as ``boundaries=``, which curvlinops accepts; its Lanczos
start vectors are seeded too (:func:`curvlinops_spectrum`).

    python benchmarks/bench_torch.py                    # both workloads, 3 repetitions
    python benchmarks/bench_torch.py --workloads mlp --repeats 5
    python benchmarks/bench_torch.py --smoke            # tiny, for the test suite

Competitors that are not installed are reported as "not run" rows: ``pip install pyhessian
hessian-eigenthings curvlinops-for-pytorch`` (pip may then want to replace a CPU-only torch
by a CUDA one through torchvision; ``--no-deps`` plus ``backpack-for-pytorch einconv
linear_operator unfoldNd einops opt_einsum tqdm`` avoids it). PyHessian 0.1 calls
``torch.eig``, removed from torch; this script installs a shim (``torch.linalg.eigh`` in
the legacy format) in its own process only.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable
from typing import Any

import _common

TOOLS = ("specdens", "specdens-partial", "PyHessian", "hessian-eigenthings", "curvlinops")
OURS = ("specdens", "specdens-partial")
# workload: (target over our own product, target over the fastest competitor)
TARGETS = {"mlp": (1.1, 1.0), "mlp-wide": (1.1, 1.0), "cnn": (None, 0.7)}


def install_torch_eig_shim() -> None:
    """``torch.eig(A, eigenvectors=True)`` (removed in torch 2) for PyHessian's symmetric T."""
    import torch

    try:  # torch 2 keeps a stub that raises
        torch.eig(torch.eye(1), eigenvectors=True)
        return
    except (AttributeError, RuntimeError):
        pass

    def eig(a: Any, eigenvectors: bool = False) -> tuple[Any, Any]:
        w, v = torch.linalg.eigh(a)
        vals = torch.stack([w, torch.zeros_like(w)], dim=1)
        return vals, (v if eigenvectors else torch.empty(0, dtype=a.dtype))

    torch.eig = eig
    warnings.filterwarnings("ignore", message="Using backward.. with create_graph=True")


# --------------------------------------------------------------------------- workloads


def mlp_workload(smoke: bool, wide: bool = False,
                 width: int | None = None) -> tuple[Any, list[tuple[Any, Any]]]:
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    if smoke:
        x, y = x[:200], y[:200]
    torch.manual_seed(0)
    if wide:  # (``width`` overrides the hidden width of the wide MLP)
        width = width or (16 if smoke else 512)
        model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(),
                                    torch.nn.Linear(width, width), torch.nn.ReLU(),
                                    torch.nn.Linear(width, 10))
    else:
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 10))
    # a few steps of training, so the Hessian is not that of a random network
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5 if smoke else 200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, [(x, y)]


def cnn_workload(smoke: bool) -> tuple[Any, list[tuple[Any, Any]]]:
    import torch

    g = torch.Generator().manual_seed(0)
    nb, bs, px = (2, 8, 8) if smoke else (8, 64, 32)
    data = [(torch.randn(bs, 3, px, px, generator=g),
             torch.randint(0, 10, (bs,), generator=g)) for _ in range(nb)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    return model, data


# --------------------------------------------------------------------------- tools
# Each runner takes (model, data, steps, probes) and returns (setup s, slq s, nodes,
# weights, info) where nodes/weights are the pooled measure (weights summing to 1), or the
# tool's sampled density on its grid, and info a dict with ``matvecs``: the products the
# tool made, counted (curvlinops: also ``boundary_matvecs``, ``boundary_s`` and
# ``setup_matvecs``).


def _pool(nodes: list[Any], weights: list[Any]) -> tuple[Any, Any]:
    import numpy as np

    x = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in nodes])
    w = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in weights])
    keep = np.isfinite(x) & np.isfinite(w)
    x, w = x[keep], np.abs(w[keep])
    return x, w / w.sum()


def run_specdens(model: Any, data: Any, steps: int, probes: int,
                 reorth: str = "full") -> tuple[Any, ...]:
    import torch
    from specdens.backends.torch import hessian

    import specdens

    crit = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    op = hessian(model, crit, data[0] if len(data) == 1 else data)
    t1 = time.perf_counter()
    dens = specdens.slq(op, num_steps=steps, num_probes=probes, seed=0, reorth=reorth)
    t2 = time.perf_counter()
    x, w = dens.atoms()
    return t1 - t0, t2 - t1, *_pool([x], [w]), {"matvecs": int(dens.matvecs)}


def counted_pyhessian_products() -> tuple[Any, list[int], Callable[[], None]]:
    """PyHessian's module with its Hessian-vector products counted: ``(module, count,
    restore)``; ``count[0]`` grows by one per product (one batch,
    ``hessian_vector_product``, or a pass over a data loader, ``dataloader_hv_product``)
    until ``restore()``."""
    import importlib

    pyh = importlib.import_module("pyhessian.hessian")  # the module, not the class
    count = [0]
    original = pyh.hessian_vector_product
    original_loader = pyh.hessian.dataloader_hv_product

    def counted(*a: Any, **k: Any) -> Any:
        count[0] += 1
        return original(*a, **k)

    def counted_loader(self: Any, v: Any) -> Any:
        count[0] += 1
        return original_loader(self, v)

    pyh.hessian_vector_product = counted
    pyh.hessian.dataloader_hv_product = counted_loader

    def restore() -> None:
        pyh.hessian_vector_product = original
        pyh.hessian.dataloader_hv_product = original_loader

    return pyh, count, restore


def run_pyhessian(model: Any, data: Any, steps: int, probes: int) -> tuple[Any, ...]:
    import torch

    install_torch_eig_shim()
    crit = torch.nn.CrossEntropyLoss()
    pyh, count, restore = counted_pyhessian_products()
    try:
        t0 = time.perf_counter()
        if len(data) == 1:
            h = pyh.hessian(model, crit, data=data[0], cuda=False)
        else:
            h = pyh.hessian(model, crit, dataloader=data, cuda=False)
        t1 = time.perf_counter()
        nodes, weights = h.density(iter=steps, n_v=probes)
        t2 = time.perf_counter()
    finally:
        restore()
    return t1 - t0, t2 - t1, *_pool(nodes, weights), {"matvecs": count[0]}


def run_eigenthings(model: Any, data: Any, steps: int, probes: int) -> tuple[Any, ...]:
    import torch
    from hessian_eigenthings import HessianOperator, spectral_density, supervised_loss

    crit = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    op = HessianOperator(model, data, supervised_loss(crit))
    count = _common.count_matvecs(op)
    t1 = time.perf_counter()
    # nodes and weights only, as specdens and PyHessian return: a grid of one point makes
    # the Gaussian-smoothed density it also evaluates (10,000 points by default) free
    res = spectral_density(op, num_runs=probes, lanczos_steps=steps, seed=0,
                           num_grid_points=1)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, *_pool(list(res.raw_eigenvalues.cpu()),
                                    list(res.raw_weights.cpu())), {"matvecs": count[0]}


def counted_curvlinops_operator(model: Any, criterion: Any, data: Any) -> tuple[Any, list[int]]:
    """curvlinops's ``HessianLinearOperator`` with its products counted (columns):
    ``(op, count)``; construction's determinism check is in ``count`` too."""
    from curvlinops import HessianLinearOperator

    count = [0]

    class Counted(HessianLinearOperator):
        def _matmat(self, X: Any) -> Any:
            count[0] += int(X[0].shape[-1])
            return super()._matmat(X)

    params = [p for p in model.parameters() if p.requires_grad]
    return Counted(model, criterion, params, data), count


def curvlinops_spectrum(op: Any, steps: int, probes: int, seed: int,
                        count: list[int]) -> tuple[Any, Any, dict[str, Any]]:
    """curvlinops's ``lanczos_approximate_spectrum``, made deterministic, with the cost of
    its boundary estimate measured: ``(grid, density, info)``.

    Left to itself, ``lanczos_approximate_spectrum`` first estimates the spectral
    boundaries with ``scipy.sparse.linalg.eigsh(k=2, which="BE", tol=1e-2)`` (its
    ``approximate_boundaries``) from ARPACK's own random start vector, whose generator
    state lives in ARPACK and carries over from earlier calls: its product count then
    depends on what ran before in the process. Here the same call runs with a start
    vector drawn from ``seed`` and its result goes in as ``boundaries=``, inside the
    caller's clock (it is part of curvlinops's algorithm and of its cost); the Lanczos
    start vectors (``torch.randn``) are seeded too. ``info``: ``boundary_matvecs``,
    ``boundary_s`` (products and seconds of the boundary estimate).
    """
    import numpy as np
    import torch
    from curvlinops import lanczos_approximate_spectrum
    from scipy.sparse.linalg import eigsh

    before = count[0]
    t0 = time.perf_counter()
    A = op.to_scipy()
    v0 = np.random.default_rng(seed).standard_normal(A.shape[0])
    lo, hi = eigsh(A, k=2, which="BE", tol=1e-2, return_eigenvectors=False, v0=v0)
    info = {"boundary_s": time.perf_counter() - t0, "boundary_matvecs": count[0] - before}
    torch.manual_seed(seed)
    grid, density = lanczos_approximate_spectrum(op, steps, num_repeats=probes,
                                                 boundaries=(float(lo), float(hi)))
    return grid, density, info


def run_curvlinops(model: Any, data: Any, steps: int, probes: int) -> tuple[Any, ...]:
    import torch

    crit = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    op, count = counted_curvlinops_operator(model, crit, data)
    t1 = time.perf_counter()
    setup_matvecs = count[0]
    grid, density, info = curvlinops_spectrum(op, steps, probes, 0, count)
    t2 = time.perf_counter()
    g = grid.double().cpu().numpy()
    info.update(matvecs=count[0], setup_matvecs=setup_matvecs)
    return (t1 - t0, t2 - t1,
            *_pool([g], [density.double().cpu().numpy() * (g[1] - g[0])]), info)


RUNNERS: dict[str, tuple[str, Callable[..., tuple[Any, ...]]]] = {
    "specdens": ("specdens", run_specdens),
    "specdens-partial": ("specdens", lambda *a: run_specdens(*a, reorth="partial")),
    "PyHessian": ("pyhessian", run_pyhessian),
    "hessian-eigenthings": ("hessian_eigenthings", run_eigenthings),
    "curvlinops": ("curvlinops", run_curvlinops),
}


def importable(module: str) -> str | None:
    """None if ``module`` imports, else the reason it does not."""
    try:
        __import__(module)
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:80]
    return None


# --------------------------------------------------------------------------- benchmark


def floor_per_step(model: Any, data: Any, probes: int, reps: int) -> float:
    """Median seconds per vector of ``op.matmat(V)`` on the specdens operator with
    ``probes`` columns, graphs built."""
    import torch
    from specdens.backends.torch import hessian

    op = hessian(model, torch.nn.CrossEntropyLoss(), data[0] if len(data) == 1 else data)
    V = torch.randn(op.shape[0], probes, dtype=torch.float32)
    op.matmat(V)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        op.matmat(V)
        ts.append(time.perf_counter() - t0)
    return _common.median(ts) / probes


def reference_eigenvalues(model: Any, data: Any) -> Any:
    import torch
    from specdens.backends.torch import hessian

    from specdens.testing import dense_eigenvalues

    m64 = copy.deepcopy(model).double()
    d64 = [(x.double(), y) for x, y in data]
    op = hessian(m64, torch.nn.CrossEntropyLoss(), d64[0] if len(d64) == 1 else d64,
                 block="batched")
    return dense_eigenvalues(op, symmetrize=True)


def w1_relative(x: Any, w: Any, lam: Any) -> float:
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(x, lam, u_weights=w)) / float(lam[-1] - lam[0])


def w1_cell(values: list[float]) -> str:
    import numpy as np

    finite = [v for v in values if np.isfinite(v)]
    return f"{np.median(finite):.2e}" if finite else "n/a"


def fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def bench(key: str, name: str, model: Any, data: Any, steps: int, probes: int, repeats: int,
          tools: list[str], reference: bool = True) -> list[str]:

    n = sum(p.numel() for p in model.parameters())
    nsamp = sum(len(x) for x, _ in data)
    print(f"\n## {name}: n = {n} parameters, {len(data)} batch(es), {nsamp} samples, "
          f"{steps} steps x {probes} probes, float32, {repeats} alternating repetitions after one "
          f"untimed warm-up\n")
    lam = None
    if reference:
        t0 = time.perf_counter()
        lam = reference_eigenvalues(model, data)
        print(f"dense reference: {n} eigenvalues in [{lam[0]:.4g}, {lam[-1]:.4g}] "
              f"({time.perf_counter() - t0:.1f} s)\n")

    notes: list[str] = []
    ready = []
    for tool in tools:
        module, _ = RUNNERS[tool]
        why = importable(module)
        if why is None:
            ready.append(tool)
        else:
            notes.append(f"{tool}: not run ({why})")
    results: dict[str, dict[str, list[float]]] = {
        t: {"setup": [], "slq": [], "w1": [], "matvecs": [], "boundary_matvecs": [],
            "boundary_s": [], "setup_matvecs": []} for t in ready}
    failed: dict[str, str] = {}
    floors: list[float] = []
    paired: dict[str, list[float]] = {t: [] for t in OURS}
    for rep in range(-1, repeats):  # rep -1 warms every tool up, untimed
        order = ready[rep % len(ready):] + ready[:rep % len(ready)] if ready else []
        for tool in order:
            if tool in failed:
                continue
            try:
                setup, slq, x, w, info = RUNNERS[tool][1](copy.deepcopy(model), data,
                                                          steps, probes)
            except Exception as exc:
                failed[tool] = f"{type(exc).__name__}: {exc}".splitlines()[0][:60]
                continue
            if rep < 0:
                continue
            r = results[tool]
            r["setup"].append(setup)
            r["slq"].append(slq)
            r["w1"].append(float("nan") if lam is None else w1_relative(x, w, lam))
            for k in ("matvecs", "boundary_matvecs", "boundary_s", "setup_matvecs"):
                if k in info:
                    r[k].append(info[k])
            if tool in OURS:
                floors.append(floor_per_step(model, data, probes, max(3, min(steps, 10))))
                paired[tool].append((setup + slq) / info["matvecs"] / floors[-1])
    if not floors:
        floors.append(floor_per_step(model, data, probes, max(3, min(steps, 10))))
    floor = _common.median(floors)
    mv = steps * probes

    headers = ["tool", "ms / step", "total s", "setup s", "SLQ s", "W1 / range", "matvecs",
               "/ HVP floor", "/ fastest competitor"]
    # time per product made (per Lanczos step: curvlinops's boundary estimate is made of
    # ARPACK's Lanczos steps), so that a tool that makes more products than steps x
    # probes is not charged them as dearer steps; its total s has them all
    made = {t: _common.median(r["matvecs"]) if r["matvecs"] else mv
            for t, r in results.items()}
    per_step = {t: (_common.median(r["setup"]) + _common.median(r["slq"])) / made[t]
                for t, r in results.items() if r["slq"]}
    comp = [per_step[t] for t in per_step if t not in OURS]
    fastest = min(comp) if comp else None
    rows = []
    for tool in tools:
        if tool in per_step:
            r = results[tool]
            ps = per_step[tool]
            rows.append([tool, fmt(1e3 * ps), fmt(ps * made[tool]),
                         fmt(_common.median(r["setup"])),
                         fmt(_common.median(r["slq"])), w1_cell(r["w1"]),
                         f"{made[tool]:.0f}" + ("" if made[tool] == mv else " *"),
                         f"{ps / floor:.2f}",
                         "n/a" if fastest is None else f"{ps / fastest:.2f}"])
        else:
            why = failed.get(tool) or next(
                (s.split(": ", 1)[1] for s in notes if s.startswith(tool + ":")), "skipped")
            rows.append([tool, "not run (see below)", "", "", "", "", "", "", ""])
    rows.append(["HVP floor (1 matvec)", fmt(1e3 * floor), fmt(floor * mv), "", "", "",
                 str(mv), "1.00", "n/a" if fastest is None else f"{floor / fastest:.2f}"])
    print(_common.markdown_table(headers, rows))
    print(f"\n*ms / step*: (setup + SLQ) / matvecs, the time per product the tool made "
          f"(counted); steps x probes = {mv}. *HVP floor*: specdens's own `op.matmat` on a "
          f"block of {probes} vector(s), graphs built, per vector. *: a tool that made "
          "more products than steps x probes.")
    if results.get("curvlinops", {}).get("boundary_matvecs"):
        r = results["curvlinops"]
        print(f"\n* curvlinops: {_common.median(r['boundary_matvecs']):.0f} of its "
              f"{made['curvlinops']:.0f} products ({fmt(_common.median(r['boundary_s']))} s "
              "of its SLQ s) went to its spectral-boundary estimate "
              "(`scipy.sparse.linalg.eigsh(k=2, which=\"BE\", tol=1e-2)`, the call of its "
              "`approximate_boundaries`, here with a seeded start vector) and "
              f"{_common.median(r['setup_matvecs']):.0f} to its determinism check at "
              f"construction; its Lanczos made the other steps x probes = {mv}. Its total s "
              "includes them all.")
    for note in notes:
        print(f"\n* {note}")
    for tool, why in failed.items():
        print(f"\n* {tool}: failed ({why})")
    lines = []
    t_floor, t_comp = TARGETS[key]
    for ours in [t for t in OURS if t in per_step]:
        if t_floor is not None:
            lines.append(f"{ours} / HVP floor = {_common.median(paired[ours]):.2f} (median "
                         f"of paired runs; target <= {t_floor})")
        if fastest is not None:
            lines.append(f"{ours} / fastest competitor = "
                         f"{per_step[ours] / fastest:.2f} (target <= {t_comp})")
    for line in lines:
        print(f"\n{name}: {line}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="mlp,mlp-wide,cnn",
                   help="comma list of mlp, mlp-wide, cnn")
    p.add_argument("--steps", type=int, default=90, help="MLP Lanczos steps (default 90)")
    p.add_argument("--probes", type=int, default=10, help="MLP probes (default 10)")
    p.add_argument("--wide-steps", type=int, default=60, help="wide MLP steps (default 60)")
    p.add_argument("--wide-probes", type=int, default=2, help="wide MLP probes (default 2)")
    p.add_argument("--cnn-steps", type=int, default=20, help="CNN steps (default 20)")
    p.add_argument("--cnn-probes", type=int, default=2, help="CNN probes (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma list of " + ", ".join(TOOLS))
    p.add_argument("--no-reference", action="store_true",
                   help="skip the dense Hessian (W1 column n/a); it costs n products")
    p.add_argument("--threads", type=int, default=None, help="torch/BLAS threads")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (200 digits, 2 CNN batches of 8 at 8x8 px, 8 steps)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.probes, args.cnn_steps, args.cnn_probes, args.repeats = 8, 2, 6, 1, 1
        args.wide_steps, args.wide_probes = 6, 1
    _common.set_threads(args.threads)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in RUNNERS]
    if bad:
        p.error(f"unknown tools {bad}; choose from {list(TOOLS)}")
    print("# PyTorch Hessian SLQ, side by side\n")
    print(_common.environment_line() + f", torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}")
    for w in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        if w == "mlp":
            model, data = mlp_workload(args.smoke)
            bench(w, "MLP 64-32-10 on digits, one full batch", model, data, args.steps,
                  args.probes, args.repeats, tools, not args.no_reference)
        elif w == "mlp-wide":
            model, data = mlp_workload(args.smoke, wide=True)
            bench(w, "MLP 64-512-512-10 on digits, one full batch", model, data,
                  args.wide_steps, args.wide_probes, args.repeats, tools, reference=False)
        elif w == "cnn":
            model, data = cnn_workload(args.smoke)
            bench(w, "CNN over CIFAR-shaped batches", model, data, args.cnn_steps,
                  args.cnn_probes, args.repeats, tools, not args.no_reference)
        else:
            p.error(f"unknown workload {w!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
