"""GPU figures in one short run: ResNet-18 and a transformer block on one card.

Made to fit in one 8-minute run of a lent GPU machine (the development machines have
none). First it checks the device against the CPU in float64 (dense Hessians of a small
MLP and a BatchNorm CNN for every product method, SLQ nodes and weights, the model left
bit for bit, and no host synchronisation per Lanczos step: the count at 40 steps is at
most the count at 10); then, for each model, on
CIFAR-shaped random data (ResNet-18, batch 256) and random token embeddings (a
transformer encoder block), it prints Markdown tables of:

* **products**: a gradient, a Hessian-vector product on the kept first-order graph
  (specdens' default), by double backward (``graph_memory=0``: the graph is rebuilt in
  every product) and by ``torch.func`` forward-over-reverse (``method="forward"``);
* **SLQ**: time per Lanczos step of ``specdens.slq`` (90 steps, 1 probe, full
  reorthogonalisation), with and without building the operator, and of the engine alone
  (a diagonal operator of the same size), against our own product and against
  PyHessian's ``density`` (when installed), alternating, medians. PyHessian puts its
  copy of the model in eval mode (BatchNorm on its running statistics), so every
  specdens operator of this table is built with ``batchnorm="population"`` (the same
  Hessian; no effect on models without BatchNorm): like for like;
* **block of probes**: ``op.matmat`` on k vectors (one pass over the data) against k
  single ``op.matvec`` calls, with graphs rebuilt per product (where a block saves k - 1
  forward and backward passes) and with ``block="batched"`` (one vectorised backward);
* **memory**: peak GPU memory of ``specdens.slq`` for each reorthogonalisation mode
  (``torch.cuda.max_memory_allocated`` above what the operator itself holds), next to
  the size of the float32 basis the mode keeps (full: every step; local: the last 20
  steps, the default window; none: no basis).

The products, block and memory tables compare specdens with itself, on specdens's
default ``batchnorm="batch"`` (BatchNorm on the statistics of the batch, as in training);
every table heading states the BatchNorm mode it ran in.

Every table names the card. ``--smoke`` runs tiny versions on the CPU (the test suite
does, so that the script never rots); figures from the CPU mean nothing.

    python benchmarks/bench_gpu.py                 # about 6 minutes on an H100
    python benchmarks/bench_gpu.py --models resnet18-torchvision --parts checks,slq
    python benchmarks/bench_gpu.py --smoke         # CPU, seconds
"""

from __future__ import annotations

import argparse
import collections
import copy
import time
from collections.abc import Callable
from typing import Any

import _common

# ----------------------------------------------------------------------------- models


def resnet18(num_classes: int = 10, width: int = 64) -> Any:
    """ResNet-18 for 32x32 images (3x3 stem, no max-pool), as in the CIFAR literature.

    Written out here because torchvision's wheel would pull a different torch build.
    """
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = nn.Sequential()
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                           nn.BatchNorm2d(cout))

        def forward(self, x: Any) -> Any:
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + self.short(x))

    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU()]
    cin = width
    for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
        stride = 1 if i == 0 else 2
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def transformer_block(d_model: int, heads: int, num_classes: int = 10) -> Any:
    """One pre-norm transformer encoder block, mean-pooled, with a linear classifier."""
    import torch
    from torch import nn

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0,
                                                    batch_first=True, norm_first=True)
            self.head = nn.Linear(d_model, num_classes)

        def forward(self, x: Any) -> Any:
            return self.head(torch.mean(self.block(x), dim=1))

    return Model()


def workload(name: str, smoke: bool, device: Any) -> tuple[Any, tuple[Any, Any], str]:
    import torch

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "resnet18":
        batch, px, width = (4, 8, 2) if smoke else (256, 32, 64)
        model = resnet18(width=width)
        x = torch.randn(batch, 3, px, px, generator=g)
        desc = f"ResNet-18 (width {width}), batch {batch} of 3x{px}x{px}"
    elif name == "resnet18-torchvision":
        # torchvision's ImageNet ResNet-18 (7x7 stride-2 stem and max-pool) on 32x32
        # images: about 16x fewer operations than the CIFAR variant above
        from torchvision.models import resnet18 as tv_resnet18

        batch, px = (4, 32) if smoke else (256, 32)
        model = tv_resnet18(num_classes=10)
        x = torch.randn(batch, 3, px, px, generator=g)
        desc = f"torchvision ResNet-18, batch {batch} of 3x{px}x{px}"
    elif name == "transformer":
        batch, seq, d, h = (4, 8, 16, 2) if smoke else (32, 128, 256, 8)
        model = transformer_block(d, h)
        x = torch.randn(batch, seq, d, generator=g)
        desc = f"transformer block (d={d}, {h} heads), batch {batch} x {seq} tokens"
    else:
        raise ValueError(f"unknown model {name!r}; choose resnet18, resnet18-torchvision or "
                         "transformer")
    y = torch.randint(0, 10, (batch,), generator=g)
    return model.to(device), (x.to(device), y.to(device)), desc


# ----------------------------------------------------------------------------- timing


def sync(device: Any) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any, reps: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call, synchronising the device."""
    fn()
    sync(device)
    ts = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return _common.median(ts)


# BatchNorm modes: PyHessian's comparison runs in eval mode (running statistics), the
# tables of specdens against itself in specdens's default (batch statistics)
BN_VS_PYHESSIAN = "population"
BN_OWN = "batch"
WINDOW = 20  # specdens.lanczos's default window of reorth="local"


def products(model: Any, batch: Any, device: Any, reps: int) -> dict[str, float]:
    """Milliseconds of a gradient and of each product method, ``batchnorm="batch"`` (the
    model is in train mode, so the gradient uses batch statistics too)."""
    import torch
    from specdens.backends.torch import hessian

    crit = torch.nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]

    def grad() -> Any:
        return torch.autograd.grad(crit(model(batch[0]), batch[1]), params)

    out = {"gradient": timed(grad, device, reps)}
    for label, kw in (("HVP, kept graph", {}), ("HVP, double backward", {"graph_memory": 0}),
                      ("HVP, forward-over-reverse", {"method": "forward"})):
        op = hessian(model, crit, batch, batchnorm=BN_OWN, **kw)
        v = torch.randn(op.shape[0], device=device)
        out[label] = timed(lambda op=op, v=v: op.matvec(v), device, reps)
        del op
    return out


def slq_per_step(model: Any, batch: Any, device: Any, steps: int, repeats: int,
                 pyhessian: bool) -> dict[str, float]:
    """Seconds per Lanczos step, medians of ``repeats`` alternating runs.

    ``specdens, end to end`` builds the operator (a forward and a backward pass that keeps
    the first-order graph) and runs ``specdens.slq``, like PyHessian's row; ``specdens,
    steps`` is ``specdens.slq`` on the built operator; ``engine alone`` is
    ``specdens.slq`` on a diagonal operator of the same size (one elementwise product),
    the engine's own time per step.

    PyHessian evaluates the Hessian of its copy of the model in eval mode (its constructor
    calls ``model.eval()``: BatchNorm on the running statistics), so the specdens
    operators here (the SLQ rows and ``own product``) are built with
    ``batchnorm="population"``, the same Hessian. specdens's default, ``"batch"``, is a
    different matrix on a model with BatchNorm.
    """
    import torch
    from specdens.backends.torch import hessian

    import specdens

    crit = torch.nn.CrossEntropyLoss()
    runs: dict[str, list[float]] = {"specdens, end to end": [], "specdens, steps": [],
                                    "engine alone": [], "own product": []}
    if pyhessian:
        runs["PyHessian"] = []
    n = sum(q.numel() for q in model.parameters() if q.requires_grad)
    diag = torch.linspace(-1.0, 10.0, n, device=device)
    cheap = specdens.aslinearoperator(lambda v: diag * v, shape=(n, n), dtype=torch.float32,
                                      xp="torch", device=device, symmetric=True)
    for rep in range(-1, repeats):  # rep -1 is an untimed warm-up
        sync(device)
        t0 = time.perf_counter()
        op = hessian(model, crit, batch, batchnorm=BN_VS_PYHESSIAN)
        sync(device)
        t1 = time.perf_counter()
        specdens.slq(op, num_steps=steps, num_probes=1, seed=rep + 1)
        sync(device)
        t2 = time.perf_counter()
        specdens.slq(cheap, num_steps=steps, num_probes=1, seed=rep + 1)
        sync(device)
        t_cheap = (time.perf_counter() - t2) / steps
        v = torch.randn(op.shape[0], device=device)
        t_op = timed(lambda op=op, v=v: op.matvec(v), device, 5)
        del op
        t_pyh = None
        if pyhessian:
            from pyhessian import hessian as pyh_hessian
            from torch.nn.attention import SDPBackend, sdpa_kernel

            m = copy.deepcopy(model)
            sync(device)
            t0p = time.perf_counter()
            # PyHessian needs the math attention kernel too (the fused ones have no
            # second derivative); specdens selects it itself
            with sdpa_kernel([SDPBackend.MATH]):
                h = pyh_hessian(m, crit, data=batch, cuda=str(device).startswith("cuda"))
                h.density(iter=steps, n_v=1)
            sync(device)
            t_pyh = (time.perf_counter() - t0p) / steps
            del h, m
        if rep >= 0:
            runs["specdens, end to end"].append((t2 - t0) / steps)
            runs["specdens, steps"].append((t2 - t1) / steps)
            runs["engine alone"].append(t_cheap)
            runs["own product"].append(t_op)
            if t_pyh is not None:
                runs["PyHessian"].append(t_pyh)
    return {k: _common.median(v) for k, v in runs.items() if v}


def block_speedup(model: Any, batch: Any, device: Any, k: int, reps: int) -> list[list[str]]:
    import torch
    from specdens.backends.torch import hessian

    crit = torch.nn.CrossEntropyLoss()
    rows = []
    for label, kw in (("graph rebuilt per product", {"graph_memory": 0}),
                      ("kept graph, block='batched'", {"block": "batched"}),
                      ("kept graph, block='loop'", {})):
        op = hessian(model, crit, batch, batchnorm=BN_OWN, **kw)
        V = torch.randn(op.shape[0], k, device=device)
        t_block = timed(lambda op=op, V=V: op.matmat(V), device, reps)
        t_single = timed(lambda op=op, V=V: [op.matvec(V[:, j]) for j in range(k)], device,
                         reps)
        rows.append([label, str(k), f"{1e3 * t_block:.1f}", f"{1e3 * t_single:.1f}",
                     f"{t_single / t_block:.2f}"])
        del op
    return rows


def memory_per_mode(model: Any, batch: Any, device: Any, steps: int,
                    probes: int) -> list[list[str]]:
    import torch
    from specdens.backends.torch import hessian

    import specdens

    rows = []
    cuda = str(device).startswith("cuda")
    for mode in ("full", "local", "none"):
        op = hessian(model, torch.nn.CrossEntropyLoss(), batch, batchnorm=BN_OWN)
        if cuda:
            sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        specdens.slq(op, num_steps=steps, num_probes=probes, reorth=mode)
        sync(device)
        wall = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else None
        # the basis each mode keeps: every step (full), the last WINDOW steps (local, the
        # default window), none
        rows_kept = {"full": steps, "local": min(WINDOW, steps), "none": 0}[mode]
        basis = rows_kept * probes * op.shape[0] * 4
        rows.append([mode, f"{wall:.2f}", _common.gib(peak), _common.gib(basis)])
        del op
    return rows


# ----------------------------------------------------------------------------- checks


def _check_models() -> list[tuple[str, Any, list[tuple[Any, Any]]]]:
    """Two float64 problems on the CPU: an MLP over uneven batches, a CNN with BatchNorm."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X = torch.randn(23, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                        nn.Linear(3 * 4 * 4, 4)).double()
    Xc = torch.randn(13, 2, 6, 6, generator=g, dtype=torch.float64)
    yc = torch.randint(0, 4, (13,), generator=g)
    return [("MLP 5-7-3, batches 10+10+3", mlp, [(X[:10], y[:10]), (X[10:20], y[10:20]),
                                               (X[20:], y[20:])]),
            ("CNN + BatchNorm (batch statistics), batches 8+5", cnn,
             [(Xc[:8], yc[:8]), (Xc[8:], yc[8:])])]


def _specdens_frame() -> str:
    """``file:line`` of the innermost specdens frame of the current Python stack."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-1]):
        if "specdens" in frame.filename and "bench_gpu" not in frame.filename:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "outside specdens"


def device_checks(device: Any) -> list[list[str]]:
    """The operator and the engine on ``device`` against the same run on the CPU (float64).

    The CPU operator is tested against ``torch.func.hessian`` in the test suite; here the
    device must give the same matrix and the same quadrature. Tolerance 1e-10 relative:
    both sides sum the same float64 terms in different orders (rounding ~1e-15), so only
    a wrong product, weight or device transfer exceeds it. Also: the model is left bit for
    bit as it was, and ``torch.cuda.set_sync_debug_mode("warn")`` counts the host
    synchronisations of an SLQ run at 10 and at 40 steps (none more at 40: none per step;
    the fixed ones move the probes in and the coefficients out).
    """
    import warnings

    import numpy as np
    import torch
    from specdens.backends.torch import ModelState, hessian

    import specdens

    crit = torch.nn.CrossEntropyLoss()
    rows = []

    def verdict(ok: bool) -> str:
        return "ok" if ok else "FAIL"

    for desc, model, batches in _check_models():
        dense_cpu = hessian(model, crit, batches).to_dense()
        dm = copy.deepcopy(model).to(device)
        db = [(x.to(device), t.to(device)) for x, t in batches]
        before = ModelState.capture(dm)
        for label, kw in (("kept graph", {}), ("graph rebuilt", {"graph_memory": 0}),
                          ("forward-over-reverse", {"method": "forward"}),
                          ("block='batched'", {"block": "batched"})):
            dense = hessian(dm, crit, db, **kw).to_dense().cpu()
            err = float(torch.linalg.norm(dense - dense_cpu) / torch.linalg.norm(dense_cpu))
            rows.append([desc, f"dense H, {label}", f"{err:.1e}", verdict(err <= 1e-10)])
        r_cpu = specdens.slq(hessian(model, crit, batches), num_steps=12, num_probes=3)
        r_dev = specdens.slq(hessian(dm, crit, db), num_steps=12, num_probes=3)
        spread = float(np.ptp(r_cpu.nodes))
        err = float(np.max(np.abs(r_dev.nodes - r_cpu.nodes)) / spread)
        werr = float(np.max(np.abs(r_dev.weights - r_cpu.weights)))
        rows.append([desc, "SLQ nodes / range, weights", f"{err:.1e}, {werr:.1e}",
                     verdict(err <= 1e-10 and werr <= 1e-10)])
        changed = before.differences(dm)
        rows.append([desc, "model unchanged (bit for bit)", "; ".join(changed) or "none",
                     verdict(not changed)])
    if str(device).startswith("cuda"):
        model, batch, _ = workload("resnet18", True, device)
        for label, kw in (("kept graph", {}), ("graph rebuilt", {"graph_memory": 0})):
            counts, sites = [], collections.Counter()
            for steps in (10, 40):
                op = hessian(model, crit, batch, **kw)
                torch.cuda.synchronize(device)
                found: list[str] = []
                with warnings.catch_warnings():
                    warnings.simplefilter("always")
                    warnings.showwarning = lambda msg, *a, found=found, **k: found.append(
                        _specdens_frame() if "synchroniz" in str(msg) else "")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        specdens.slq(op, num_steps=steps, num_probes=2)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                found = [f for f in found if f]
                counts.append(len(found))
                sites = collections.Counter(found)
            # fixed reads (probes in, coefficients out) are allowed; growth is not
            where = "" if counts[1] <= counts[0] else (
                "; most at " + ", ".join(f"{k} ({v})" for k, v in sites.most_common(2)))
            rows.append(["small ResNet-18, float32", f"host syncs in SLQ, {label}",
                         f"{counts[0]} at 10 steps, {counts[1]} at 40{where}",
                         verdict(counts[1] <= counts[0])])
    return rows


# ----------------------------------------------------------------------------- main

PARTS = ("checks", "products", "slq", "block", "memory")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,transformer",
                   help="comma list of resnet18, resnet18-torchvision (needs torchvision), "
                   "transformer")
    p.add_argument("--device", default=None, help="torch device (default cuda)")
    p.add_argument("--steps", type=int, default=90, help="Lanczos steps (default 90)")
    p.add_argument("--repeats", type=int, default=3, help="SLQ repetitions (default 3)")
    p.add_argument("--block", type=int, default=8, help="probes in a block (default 8)")
    p.add_argument("--no-pyhessian", action="store_true", help="skip PyHessian")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="comma list of " + ", ".join(PARTS) + " (default all)")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    import torch

    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run this on a GPU machine, or pass --smoke / --device cpu")
    if args.smoke:
        args.steps, args.repeats, args.block = 6, 1, 2
    card = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else "CPU (figures mean nothing)")
    reps = 3 if args.smoke else 10
    pyh = not args.no_pyhessian and _importable("pyhessian")
    if pyh:
        from bench_torch import install_torch_eig_shim

        install_torch_eig_shim()
    print("# specdens on one GPU\n")
    print(f"{_common.environment_line()}, torch {torch.__version__}, device {device}, "
          f"card: {card}")
    if "checks" in parts:
        print(f"\n## The operator and the engine on {device} against the CPU, card: {card}\n")
        print(_common.markdown_table(["problem", "check", "measured", ""],
                                     device_checks(device)))
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model, batch, desc = workload(name, args.smoke, device)
        n = sum(q.numel() for q in model.parameters() if q.requires_grad)
        print(f"\n## {desc}: n = {n} parameters, float32, card: {card}\n")
        t0 = time.perf_counter()
        if "products" in parts:
            prod = products(model, batch, device, reps)
            print(f"Products, {bn_note(model, BN_OWN)}:\n")
            print(_common.markdown_table(["product", "ms"],
                                         [[k, f"{1e3 * v:.2f}"] for k, v in prod.items()]))
        if "slq" in parts:
            slq = slq_per_step(model, batch, device, args.steps, args.repeats, pyh)
            rows = [[k, f"{1e3 * v:.2f}", f"{v / slq['own product']:.2f}",
                     f"{v / slq['PyHessian']:.2f}" if "PyHessian" in slq else "n/a"]
                    for k, v in slq.items()]
            same = bn_note(model, BN_VS_PYHESSIAN)
            same = ("no BatchNorm layer" if same.startswith("no") else
                    f"specdens with {same}, PyHessian in eval mode (the same)")
            print(f"\nSLQ, {args.steps} steps x 1 probe, medians of {args.repeats}; {same}; "
                  "like for like:\n")
            print(_common.markdown_table(["", "ms / step", "/ own product", "/ PyHessian"],
                                         rows))
        if "block" in parts:
            print(f"\nBlock of {args.block} probes against {args.block} single products, "
                  f"{bn_note(model, BN_OWN)}:\n")
            print(_common.markdown_table(
                ["operator", "k", "block ms", "k singles ms", "speed-up"],
                block_speedup(model, batch, device, args.block, reps)))
        if "memory" in parts:
            probes = 1 if args.smoke else 4
            print(f"\nPeak memory of slq ({args.steps} steps x {probes} probes) per mode, "
                  f"{bn_note(model, BN_OWN)}:\n")
            print(_common.markdown_table(
                ["reorth", "wall s", "peak above operator GiB",
                 "float32 basis kept GiB"],
                memory_per_mode(model, batch, device, args.steps, probes)))
        print(f"\n({name}: {time.perf_counter() - t0:.1f} s)")
    return 0


def bn_note(model: Any, mode: str) -> str:
    """The BatchNorm mode a table ran in, in words."""
    from torch.nn.modules.batchnorm import _BatchNorm

    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return "no BatchNorm layer"
    what = "running statistics" if mode == "population" else "batch statistics"
    return f'batchnorm="{mode}" (BatchNorm on {what})'


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
