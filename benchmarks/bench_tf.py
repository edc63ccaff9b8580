"""TensorFlow Hessian SLQ against the PyTorch backend: per-step Lanczos time, side by side.

The same model with the same float32 weights, the same data and the same probes run
through ``specdens.lanczos`` on the TensorFlow backend (``specdens.backends.tf.hessian``,
every product method: back-over-back or forward-over-back, the block of probes looped or
vectorised) and on the PyTorch backend (``specdens.backends.torch.hessian``, its defaults),
in one process, alternately (the order rotates every repetition); the tables report
medians. Workloads, as in ``bench_torch.py``:

* ``mlp``: MLP 64-32-10 (2410 parameters) on scikit-learn's digits, 1797 samples in one
  batch, cross-entropy, 90 steps x 10 probes (one block of 10 per step);
* ``cnn``: conv 3-8-16 with 3x3 kernels, ReLU, 2x2 max pooling, global average pooling,
  linear (1562 parameters), over 8 batches of 64 random 3x32x32 images, 10 steps x 2
  probes. Keras runs it channels-last on the same images transposed and the same
  kernels permuted.

Columns: *ms / step* is the Lanczos run divided by the number of steps (each step one
block product of all probes: one pass over the data, plus the recurrence); *block
product ms* is one ``op.matmat(V)`` of that block alone (the product floor); *engine ms /
step* is ``specdens.lanczos`` of the same size on a diagonal operator in the same
library (the recurrence and reorthogonalisation alone, on TensorFlow through specdens's
TensorFlow namespace); *first run s* is the first Lanczos run after construction, which
for TensorFlow includes tracing its functions; *setup s* is the construction of the
operator (a pass over the data, and for TensorFlow a determinism check) at the second
construction, when the traces exist. *d alpha* is the largest difference of the
tridiagonal's diagonal from the torch run's, relative to its largest entry (float32
arithmetic in the products: ~1e-6 expected).

Threads: both libraries run single-threaded by default (``--threads 1``). TensorFlow's
and torch's thread pools in one process contend for the cores: on the 2-core development
machine, with the libraries' default thread counts, one torch product of the MLP took
262 ms next to TensorFlow against 0.45 ms single-threaded (``--threads 0`` keeps the
libraries' defaults, to see it).

    python benchmarks/bench_tf.py                      # MLP + CNN, 3 repetitions
    python benchmarks/bench_tf.py --workloads mlp --repeats 5 --threads 2
    python benchmarks/bench_tf.py --variants reverse/loop,forward/loop
    python benchmarks/bench_tf.py --smoke              # tiny, for the test suite
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import _common

VARIANTS = ("reverse/loop", "reverse/batched", "forward/loop", "forward/batched")
TORCH = "torch (graph/loop)"


# --------------------------------------------------------------------------- workloads


def mlp_workload(smoke: bool) -> tuple[Any, ...]:
    """(torch model, keras model, torch batches, tf batches, perm) with the same weights;
    ``perm`` maps the torch parameter vector to the Keras one."""
    import keras
    import numpy as np
    import tensorflow as tf
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    if smoke:
        x, y = x[:200], y[:200]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 10))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # not a random network's Hessian
    for _ in range(5 if smoke else 200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    km = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="tanh"),
                           keras.layers.Dense(10)])
    layouts = [_transpose, _same, _transpose, _same]
    perm = _copy_weights(model, km, layouts)
    return model, km, [(xt, yt)], [(tf.constant(x), tf.constant(y))], perm


def cnn_workload(smoke: bool) -> tuple[Any, ...]:
    import keras
    import numpy as np
    import tensorflow as tf
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
    km = keras.Sequential([
        keras.Input((px, px, 3)), keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])

    layouts = [_conv_kernel, _same, _conv_kernel, _same, _transpose, _same]
    perm = _copy_weights(model, km, layouts)
    tf_data = [(tf.constant(np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))),
                tf.constant(y.numpy())) for x, y in data]
    return model, km, data, tf_data, perm


def _same(a: Any) -> Any:
    return a


def _transpose(a: Any) -> Any:  # torch Linear (out, in) -> Keras Dense (in, out)
    return a.T


def _conv_kernel(a: Any) -> Any:  # torch (out, in, kh, kw) -> Keras (kh, kw, in, out)
    return a.transpose(2, 3, 1, 0)


def _copy_weights(model: Any, km: Any, layouts: list[Callable[[Any], Any]]) -> Any:
    """Copy the torch weights into the Keras model; return the permutation ``perm`` with
    ``keras_vector = torch_vector[perm]`` (the same parameters, other layouts)."""
    import numpy as np

    weights, index, offset = [], [], 0
    for p, layout in zip(model.parameters(), layouts, strict=True):
        weights.append(np.ascontiguousarray(layout(p.detach().numpy())))
        ids = np.arange(offset, offset + p.numel()).reshape(tuple(p.shape))
        index.append(np.ascontiguousarray(layout(ids)).ravel())
        offset += p.numel()
    km.set_weights(weights)
    return np.concatenate(index)


# --------------------------------------------------------------------------- tools


def tf_builder(km: Any, data: Any, variant: str) -> Callable[[], Any]:
    import keras
    from specdens.backends.tf import hessian

    method, block = variant.split("/")
    batches = data[0] if len(data) == 1 else data

    def build() -> Any:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return hessian(km, loss, batches, method=method, block=block)

    return build


def torch_builder(model: Any, data: Any) -> Callable[[], Any]:
    import torch
    from specdens.backends.torch import hessian

    batches = data[0] if len(data) == 1 else data
    return lambda: hessian(model, torch.nn.CrossEntropyLoss(), batches)


def diagonal(n: int, library: str) -> Any:
    """A float32 diagonal operator on TensorFlow or torch tensors: one elementwise product,
    so that ``specdens.lanczos`` on it costs the engine alone."""
    import numpy as np

    import specdens

    host = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    if library == "tensorflow":
        import tensorflow as tf
        from specdens.backends.tf import _namespace as xp

        d, dtype = tf.constant(host), tf.float32
    else:
        import array_api_compat.torch as xp
        import torch

        d, dtype = torch.from_numpy(host), torch.float32

    class Diagonal(specdens.LinearOperatorBase):
        def __init__(self) -> None:
            super().__init__((n, n), dtype, xp, specdens._array.device_of(d))
            self.symmetric = True

        def _matmat(self, V: Any) -> Any:
            return d[:, None] * V

    return Diagonal()


def timed_run(build: Callable[[], Any], steps: int, probes: Any) -> dict[str, Any]:
    """Build the operator and run Lanczos on it from the start vectors ``probes`` (a
    float64 numpy ``(n, k)`` array); times and the diagonal of T."""
    import specdens
    from specdens import _array

    t0 = time.perf_counter()
    op = build()
    t1 = time.perf_counter()
    V = _array.from_numpy(probes, op.xp, op.device, op.dtype)
    r = specdens.lanczos(op, steps, probes=V)
    t2 = time.perf_counter()
    return {"op": op, "setup": t1 - t0, "lanczos": t2 - t1, "alpha": r.alpha}


def block_product(op: Any, probes: int, reps: int) -> float:
    """Median seconds of one ``op.matmat(V)`` with ``V`` of ``probes`` columns."""
    import numpy as np

    V = np.random.default_rng(1).standard_normal((op.shape[0], probes)).astype(np.float32)
    V = _to_library(op, V)
    op.matmat(V)
    ts = []
    for _ in range(reps):  # eager TensorFlow and torch on the CPU run synchronously
        t0 = time.perf_counter()
        op.matmat(V)
        ts.append(time.perf_counter() - t0)
    return _common.median(ts)


def _to_library(op: Any, V: Any) -> Any:
    from specdens import _array

    return _array.from_numpy(V, op.xp, op.device, op.dtype)


def engine_per_step(op: Any, steps: int, probes: int, reps: int) -> float:
    import specdens

    specdens.lanczos(op, 3, num_probes=probes)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        specdens.lanczos(op, steps, num_probes=probes, seed=0)
        ts.append(time.perf_counter() - t0)
    return _common.median(ts) / steps


def fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


# --------------------------------------------------------------------------- benchmark


def bench(name: str, workload: tuple[Any, ...], steps: int, probes: int, repeats: int,
          variants: list[str]) -> dict[str, float]:
    import numpy as np

    model, km, t_data, tf_data, perm = workload
    n = sum(p.numel() for p in model.parameters())
    # the same start vectors for every tool: Rademacher in torch's parameter order
    start = np.where(np.random.default_rng(0).random((n, probes)) < 0.5, -1.0, 1.0)
    starts = {TORCH: start}
    nsamp = sum(len(x) for x, _ in t_data)
    print(f"\n## {name}: n = {n} parameters, {len(t_data)} batch(es), {nsamp} samples, "
          f"{steps} steps x {probes} probes, float32, {repeats} alternating repetitions\n")
    builders: dict[str, Callable[[], Any]] = {TORCH: torch_builder(model, t_data)}
    for v in variants:
        builders["tf " + v] = tf_builder(km, tf_data, v)
        starts["tf " + v] = start[perm]
    tools = list(builders)
    first, results, ops = {}, {t: {"setup": [], "lanczos": []} for t in tools}, {}
    for tool in tools:  # warm-up: traces, page faults; the first run is reported
        out = timed_run(builders[tool], steps, starts[tool])
        first[tool] = out["lanczos"]
    alphas: dict[str, Any] = {}
    for rep in range(repeats):
        shift = rep % len(tools)
        for tool in tools[shift:] + tools[:shift]:
            out = timed_run(builders[tool], steps, starts[tool])
            results[tool]["setup"].append(out["setup"])
            results[tool]["lanczos"].append(out["lanczos"])
            alphas[tool], ops[tool] = out["alpha"], out["op"]
    reps = max(3, min(steps, 9))
    floors = {t: block_product(ops[t], probes, reps) for t in tools}
    engine_tf = engine_per_step(diagonal(n, "tensorflow"), steps, probes, max(1, repeats))
    engine_torch = engine_per_step(diagonal(n, "torch"), steps, probes, max(1, repeats))
    ref = alphas[TORCH]
    scale = float(np.abs(ref).max())
    per_step = {t: _common.median(results[t]["lanczos"]) / steps for t in tools}
    headers = ["tool", "ms / step", "block product ms", "engine ms / step", "first run s",
               "setup s", "/ torch", "d alpha"]
    rows = []
    for t in tools:
        eng = engine_torch if t == TORCH else engine_tf
        rows.append([t, fmt(1e3 * per_step[t]), fmt(1e3 * floors[t]), fmt(1e3 * eng),
                     fmt(first[t]), fmt(_common.median(results[t]["setup"])),
                     f"{per_step[t] / per_step[TORCH]:.2f}",
                     f"{float(np.abs(alphas[t] - ref).max()) / scale:.1e}"])
    print(_common.markdown_table(headers, rows))
    best = min((t for t in tools if t != TORCH), key=per_step.get, default=None)
    if best is not None:
        print(f"\n{name}: fastest TensorFlow variant {best}, "
              f"{per_step[best] / per_step[TORCH]:.2f} x torch per step")
    return per_step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="mlp,cnn", help="comma list of mlp, cnn")
    p.add_argument("--steps", type=int, default=90, help="MLP Lanczos steps (default 90)")
    p.add_argument("--probes", type=int, default=10, help="MLP probes (default 10)")
    p.add_argument("--cnn-steps", type=int, default=10, help="CNN steps (default 10)")
    p.add_argument("--cnn-probes", type=int, default=2, help="CNN probes (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma list of TensorFlow method/block: " + ", ".join(VARIANTS))
    p.add_argument("--threads", type=int, default=1,
                   help="threads for TensorFlow (intra- and inter-op), torch and BLAS "
                        "(default 1: see the module docstring)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (200 digits, 2 CNN batches of 8 at 8x8 px, 4 steps)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.probes, args.cnn_steps, args.cnn_probes, args.repeats = 4, 2, 3, 1, 1
        args.variants = "reverse/loop"
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    _common.set_threads(args.threads or None)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf
    import torch

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        torch.set_num_threads(args.threads)
    import keras

    if keras.backend.backend() != "tensorflow":
        p.error(f"Keras runs on {keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow")
    print("# TensorFlow Hessian SLQ against the PyTorch backend, side by side\n")
    print(_common.environment_line() + f", tensorflow {tf.__version__}, keras "
          f"{keras.__version__}, torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}, TF intra-op threads "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}")
    for w in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        if w == "mlp":
            bench("MLP 64-32-10 on digits, one full batch", mlp_workload(args.smoke),
                  args.steps, args.probes, args.repeats, variants)
        elif w == "cnn":
            bench("CNN over CIFAR-shaped batches", cnn_workload(args.smoke), args.cnn_steps,
                  args.cnn_probes, args.repeats, variants)
        else:
            p.error(f"unknown workload {w!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
