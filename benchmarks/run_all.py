"""Every benchmark in one run: one Markdown report with the tables and the plots.

Runs each comparison side by side (every script alternates its competitors on the same
workload, repeats, and reports medians and ratios) and collects the results into
``REPORT.md`` in ``--out`` (default ``benchmarks/results``), with PNG plots of the time per
Lanczos step, the total SLQ time, the peak memory and the accuracy against the dense
spectrum. Parts (``--only`` selects some, ``--skip`` leaves some out):

========== ==================================================================================
engine     ``bench_engine_overhead.py``: the Lanczos engine on a diagonal operator (n = 1e6,
           90 steps) against a hand-written numpy loop and matfree
torch      ``bench_torch.bench`` on four PyTorch workloads: the digits MLP in one batch and in
           four, the small CNN in one batch and in four; specdens against PyHessian,
           hessian-eigenthings and curvlinops, W1 against the dense spectrum
memory     peak memory of one SLQ run of every tool on the same workloads (and of the JAX
           contenders), each in a fresh process
jax        ``bench_jax.py``: the JAX digits MLP, specdens (compiled and eager) against matfree
tf         ``bench_tf.py``: the TensorFlow backend against the PyTorch one (MLP and CNN)
estimators ``bench_estimators.py``: deflation, trace estimators and KPM on operators with a
           known spectrum
accuracy   ``bench_accuracy.py``: W1 error per budget of matvecs, every tool
scaling    ``bench_scaling.py``: time, memory and engine overhead against n, steps, probes
scale      ``bench_scale.py``: every reorth mode at n = 2.5e7 (only with ``--full`` or
           ``--only scale``: ~15 min and 10+ GiB)
gpu        ``bench_gpu.py``: only where PyTorch sees a CUDA device (skipped with a note
           otherwise)
========== ==================================================================================

Each part runs in its own process (the frameworks' thread pools and allocators stay out
of each other's way), one after the other, single-threaded by default (``--threads 1``:
the development machines have 2 shared cores, where a second BLAS thread that gets no
core slows a run down several times; ``--threads 0`` keeps the libraries' defaults). A
part that fails is reported as failed, and the others still run.

    python benchmarks/run_all.py                        # ~1 hour on 2 cores
    python benchmarks/run_all.py --only torch,memory --repeats 5
    python benchmarks/run_all.py --full                 # bigger grids, + bench_scale.py
    python benchmarks/run_all.py --smoke --out /tmp/r   # tiny, for the test suite
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common

HERE = Path(__file__).resolve().parent
PARTS = ("engine", "torch", "memory", "jax", "tf", "estimators", "accuracy", "scaling",
         "scale", "gpu")
DEFAULT_SKIP = ("scale",)  # runs with --full or --only scale
TORCH_WORKLOADS = ("mlp-1batch", "mlp-4batches", "cnn-1batch", "cnn-4batches")
JAX_CONTENDERS = ("specdens (compiled)", "specdens (compiled, partial)",
                  "specdens (eager engine)", "matfree")
SUMMARY_HEADERS = ["workload", "tool", "ms / step / probe", "total s", "peak MiB",
                   "W1 / range", "/ specdens"]


# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    heading: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def column(self, name: str) -> int | None:
        return self.headers.index(name) if name in self.headers else None

    def get(self, row: list[str], name: str) -> str | None:
        i = self.column(name)
        return row[i] if i is not None and i < len(row) else None


def parse_tables(text: str) -> list[Table]:
    """The Markdown tables of a script's output, each with the last heading above it."""
    tables: list[Table] = []
    heading = ""
    current: Table | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = Table(heading, cells)
                tables.append(current)
            elif not all(set(c) <= {"-", ":"} for c in cells):
                current.rows.append(cells)
        else:
            current = None
    return tables


def number(cell: str | None) -> float | None:
    """The leading number of a table cell ('1.23', '4.5e-03', '12 %'), else None."""
    if cell is None:
        return None
    m = re.match(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", cell)
    if not m:
        return None
    value = float(m.group(1))
    return value if value == value else None  # NaN -> None


# --------------------------------------------------------------------------- workloads


def torch_workload(key: str, smoke: bool) -> tuple[str, str, Any, list[Any], int, int]:
    """``(target key, title, model, batches, steps, probes)`` of a PyTorch workload, built
    from bench_torch's workloads: the digits MLP (all samples in one batch, or four equal
    batches) and the small CNN (one batch of 64 CIFAR-shaped images, or four of 32)."""
    import bench_torch

    if key.startswith("mlp"):
        model, data = bench_torch.mlp_workload(smoke)
        x, y = data[0]
        if key == "mlp-4batches":
            m = len(x) // 4 * 4
            data = list(zip(x[:m].chunk(4), y[:m].chunk(4), strict=True))
        steps, probes = (6, 2) if smoke else (90, 10)
        n = sum(p.numel() for p in model.parameters())
        title = (f"MLP 64-32-10 on digits ({n} parameters), {len(data)} batch(es) of "
                 f"{len(data[0][0])}")
        return "mlp", title, model, data, steps, probes
    if key.startswith("cnn"):
        model, data = bench_torch.cnn_workload(smoke)
        if key == "cnn-1batch":
            data = data[:1]
        else:
            data = [(x[:32], y[:32]) for x, y in data[:4]]
        steps, probes = (4, 1) if smoke else (20, 2)
        x = data[0][0]
        title = (f"CNN conv 3-8-16 ({sum(p.numel() for p in model.parameters())} parameters), "
                 f"{len(data)} batch(es) of {x.shape[0]} images {tuple(x.shape[1:])}")
        return "cnn", title, model, data, steps, probes
    raise ValueError(f"unknown workload {key!r}; choose from {TORCH_WORKLOADS}")


def child_torch(args: argparse.Namespace) -> int:
    """The torch part: bench_torch.bench on every workload, in this (child) process."""
    import bench_torch
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print("# PyTorch Hessian SLQ on four workloads, side by side\n")
    print(_common.environment_line() + f", torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}")
    tools = list(bench_torch.TOOLS)
    for key in TORCH_WORKLOADS:
        target, title, model, data, steps, probes = torch_workload(key, args.smoke)
        reference = not args.no_reference and not (args.smoke and len(data) > 1)
        bench_torch.bench(target, f"{key}: {title}", model, data, steps, probes,
                          args.repeats, tools, reference)
    return 0


def child_memory(args: argparse.Namespace) -> int:
    """Peak memory of one SLQ run per (workload, tool) named in ``args.pairs``; prints one
    JSON line per pair. Run one pair per process for figures of its own."""
    import bench_torch
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    for pair in args.pairs.split(";"):
        workload, tool = pair.split("|")
        out: dict[str, Any] = {"workload": workload, "tool": tool}
        try:
            if workload == "jax-mlp":
                out.update(_jax_memory(tool, args.smoke))
            else:
                _, _, model, data, steps, probes = torch_workload(workload, args.smoke)
                module, runner = bench_torch.RUNNERS[tool]
                why = bench_torch.importable(module)
                if why is not None:
                    out["status"] = f"not run ({why})"
                    print(json.dumps(out), flush=True)
                    continue
                model = copy.deepcopy(model)
                before = _common.proc_status_bytes("VmRSS")
                t0 = time.perf_counter()
                runner(model, data, steps, probes)
                out.update(seconds=time.perf_counter() - t0, before=before,
                           peak=_common.peak_rss_bytes(), status="ok")
        except Exception as exc:  # reported in the table
            out["status"] = f"failed ({type(exc).__name__}: {exc})".splitlines()[0][:120]
        print(json.dumps(out), flush=True)
    return 0


def _jax_memory(tool: str, smoke: bool) -> dict[str, Any]:
    import jax

    jax.config.update("jax_enable_x64", True)
    import bench_jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from specdens.algorithms.probes import probe_block

    steps, probes = (6, 2) if smoke else (90, 10)
    loss_fn, params, batch = bench_jax.workload(smoke)
    n = int(ravel_pytree(params)[0].size)
    rows_v, _ = probe_block("rademacher", n, 0, range(probes), jnp, None, jnp.float64)
    V = rows_v.T
    if tool == "matfree":
        hvp, x0 = bench_jax.flat_hvp(loss_fn, params, batch)
        call = bench_jax.make_matfree(hvp, x0, steps)
        if call is None:
            return {"status": "not run (matfree not installed)"}
    else:
        call = bench_jax.make_specdens(loss_fn, params, batch, steps, "compiled" in tool,
                                       "partial" if "partial" in tool else "full")
    before = _common.proc_status_bytes("VmRSS")
    t0 = time.perf_counter()
    call(V)
    return {"seconds": time.perf_counter() - t0, "before": before,
            "peak": _common.peak_rss_bytes(), "status": "ok",
            "note": "first call, compilation included"}


# --------------------------------------------------------------------------- parts


@dataclass
class Part:
    name: str
    title: str
    command: list[str]
    status: str = "not run"
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""
    tables: list[Table] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def script(name: str, *argv: str) -> list[str]:
    return [sys.executable, str(HERE / name), *argv]


def plan(args: argparse.Namespace, out: Path) -> list[Part]:
    """The parts to run, with their command lines."""
    smoke, full = args.smoke, args.full
    # always passed on, 0 included: the scripts' own defaults differ (several are 1), and
    # every one of them takes 0 as "leave the libraries' thread settings alone"
    thr = ["--threads", str(args.threads)]
    reps = lambda default: str(args.repeats or default)  # noqa: E731
    cmds: dict[str, tuple[str, list[str]]] = {
        "engine": ("Engine overhead (diagonal operator)",
                   script("bench_engine_overhead.py", *(["--smoke"] if smoke else
                          ["--n", "1e6", "--repeats", reps(7 if full else 5)]), *thr)),
        "torch": ("PyTorch: specdens against PyHessian, hessian-eigenthings, curvlinops",
                  script("run_all.py", "--child", "torch", "--repeats",
                         "1" if smoke else reps(5 if full else 3), *thr,
                         *(["--smoke"] if smoke else []))),
        "memory": ("Peak memory of one SLQ run per tool", []),
        "jax": ("JAX: specdens against matfree",
                script("bench_jax.py", *(["--smoke"] if smoke else
                       ["--repeats", reps(5 if full else 3), "--paper-steps",
                        "90" if full else "30"]), *thr)),
        "tf": ("TensorFlow backend against the PyTorch one",
               script("bench_tf.py", *(["--smoke"] if smoke else
                      ["--repeats", reps(5 if full else 3)]), *thr)),
        "estimators": ("Estimators: deflation, trace estimators, KPM",
                       script("bench_estimators.py", *(["--smoke"] if smoke else
                              ["--reps", "40" if full else "20"]), *thr)),
        "accuracy": ("Accuracy per cost (W1 against matvecs)",
                     script("bench_accuracy.py", *(["--smoke"] if smoke else
                                                   (["--full"] if full else [])),
                            *thr,
                            "--json", str(out / "accuracy.json"),
                            "--plot", str(out / "accuracy_vs_matvecs.png"))),
        "scaling": ("Scaling: time, memory and overhead against n, steps, probes",
                    script("bench_scaling.py", *(["--smoke"] if smoke else
                           (["--full"] if full else [])), *thr,
                           "--json", str(out / "scaling.json"),
                           "--plot", str(out / "scaling.png"))),
        "scale": ("Scale: every reorth mode at n = 2.5e7",
                  script("bench_scale.py", *(["--smoke"] if smoke else []), *thr)),
        "gpu": ("GPU (ResNet-18, transformer block)",
                script("bench_gpu.py", *(["--smoke", "--device", "cuda"] if smoke else []))),
    }
    only = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else None
    skip = [p.strip() for p in args.skip.split(",") if p.strip()] if args.skip else []
    bad = [p for p in (only or []) + skip if p not in PARTS]
    if bad:
        raise SystemExit(f"unknown parts {bad}; choose from {list(PARTS)}")
    names = only if only else [p for p in PARTS if p not in DEFAULT_SKIP or full]
    return [Part(n, cmds[n][0], cmds[n][1]) for n in PARTS if n in names and n not in skip]


def cuda_available() -> tuple[bool, str]:
    """Whether PyTorch sees a CUDA device (asked in a child: importing torch here would
    keep its thread pool in every part's parent)."""
    code = "import torch; print(int(torch.cuda.is_available()))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return False, "checking for CUDA timed out"
    if proc.returncode != 0:
        return False, "PyTorch does not import"
    return proc.stdout.strip().endswith("1"), "no CUDA device visible to PyTorch"


def run_command(cmd: list[str], env: dict[str, str],
                label: str | None = None) -> tuple[int, str, str, float]:
    """Run ``cmd``; its stdout is captured, its stderr too and, with ``label``, also
    passed on line by line (the scripts report their progress there)."""
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=HERE.parent, env=env)
    err: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)
            if label:
                print(f"[{label}] {line.rstrip()}", file=sys.stderr, flush=True)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    assert proc.stdout is not None
    out = proc.stdout.read()
    rc = proc.wait()
    thread.join()
    return rc, out, "".join(err), time.perf_counter() - t0


def memory_command(group: list[str], args: argparse.Namespace) -> list[str]:
    """The command line of the memory child for ``group`` of "workload|tool" pairs."""
    return script("run_all.py", "--child", "memory", "--pairs", ";".join(group),
                  "--threads", str(args.threads), *(["--smoke"] if args.smoke else []))


def run_memory(part: Part, args: argparse.Namespace, env: dict[str, str]) -> None:
    """One child per (workload, tool) (all in one child with --smoke: the figures then are
    not each run's own)."""
    import bench_torch

    workloads = TORCH_WORKLOADS[:1] if args.smoke else TORCH_WORKLOADS
    pairs = [f"{w}|{t}" for w in workloads for t in bench_torch.TOOLS]
    pairs += [f"jax-mlp|{t}" for t in (JAX_CONTENDERS[:1] if args.smoke else JAX_CONTENDERS)]
    groups = [pairs] if args.smoke else [[p] for p in pairs]
    results, t0, errors = [], time.perf_counter(), []
    for group in groups:
        cmd = memory_command(group, args)
        rc, stdout, stderr, _ = run_command(cmd, env)
        got = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
        if rc != 0 or len(got) != len(group):
            tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
            errors.append(f"{group}: exit {rc} {' '.join(tail)}")
        results += got
    part.seconds = time.perf_counter() - t0
    rows = []
    for r in results:
        if r.get("status") == "ok":
            grew = r["peak"] - r["before"] if r.get("before") is not None else None
            rows.append([r["workload"], r["tool"], f"{(grew or 0) / 2**20:.1f}",
                         f"{r['peak'] / 2**20:.0f}", f"{r['seconds']:.3g}", r.get("note", "")])
        else:
            rows.append([r["workload"], r["tool"], "", "", "", r.get("status", "?")])
    lines = ["# Peak memory of one SLQ run per tool\n",
             _common.environment_line(), "",
             "Each (workload, tool) in a fresh process" + (" (--smoke: all in one process)"
                                                          if args.smoke else "")
             + ": *peak above start* is the process's peak resident set (VmHWM) minus its "
             "resident set after building the workload and importing the tool, i.e. what "
             "the run itself allocated; *s* is that single run (setup included, cold).", "",
             _common.markdown_table(["workload", "tool", "peak above start MiB",
                                     "peak RSS MiB", "s", "note"], rows)]
    for e in errors:
        lines.append(f"\n* failed: {e}")
    part.stdout = "\n".join(lines) + "\n"
    part.status = "ok" if not errors else "failed"
    part.extra["memory"] = results


def run_part(part: Part, args: argparse.Namespace, env: dict[str, str]) -> None:
    print(f"[run_all] {part.name}: {part.title} ...", file=sys.stderr, flush=True)
    if part.name == "gpu":
        ok, why = cuda_available()
        if not ok:
            part.status = f"skipped: {why}"
            part.stdout = (f"Skipped: {why}. `python benchmarks/bench_gpu.py` runs on a CUDA "
                           "machine (`--smoke` runs its tiny models on the CPU).\n")
            return
    if part.name == "memory":
        run_memory(part, args, env)
    else:
        label = part.name if args.verbose else None
        rc, part.stdout, part.stderr, part.seconds = run_command(part.command, env, label)
        part.status = "ok" if rc == 0 else f"failed (exit {rc})"
    part.tables = parse_tables(part.stdout)
    print(f"[run_all] {part.name}: {part.status} in {part.seconds:.0f} s", file=sys.stderr,
          flush=True)


# --------------------------------------------------------------------------- summary


def torch_summary(parts: dict[str, Part]) -> list[list[str]]:
    """One row per (workload, tool): time per step, total, memory, W1, ratio to specdens."""
    rows: list[list[str]] = []
    memory: dict[tuple[str, str], float] = {}
    if "memory" in parts:
        for r in parts["memory"].extra.get("memory", []):
            if r.get("status") == "ok" and r.get("before") is not None:
                memory[(r["workload"], r["tool"])] = (r["peak"] - r["before"]) / 2**20
    if "torch" in parts:
        for t in parts["torch"].tables:
            if t.headers[:2] != ["tool", "ms / step"]:
                continue
            workload = t.heading.split(":")[0].strip()
            # ms / step / probe: the total over steps x probes, for every tool alike
            # (bench_torch's own "ms / step" divides by the products each tool made, which
            # for curvlinops include its boundary estimate and determinism check)
            m = re.search(r"(\d+) steps x (\d+) probes", t.heading)
            probe_steps = int(m.group(1)) * int(m.group(2)) if m else None

            def per_probe_step(r: list[str], t: Table = t,
                               probe_steps: int | None = probe_steps) -> float | None:
                total = number(t.get(r, "total s"))
                return 1e3 * total / probe_steps if total and probe_steps else None

            ours = next((per_probe_step(r) for r in t.rows if r[0] == "specdens"), None)
            for r in t.rows:
                ms = per_probe_step(r)
                mem = memory.get((workload, r[0]))
                rows.append([workload, r[0], "" if ms is None else f"{ms:.4g}",
                             t.get(r, "total s") or "",
                             "" if mem is None else f"{mem:.1f}",
                             t.get(r, "W1 / range") or "",
                             f"{ms / ours:.2f}" if ms and ours else ""])
    if "jax" in parts:
        for t in parts["jax"].tables:
            if t.headers[:2] != ["tool", "run s"]:
                continue
            m = re.search(r"(\d+) steps x (\d+) probes", t.heading)
            probe_steps = int(m.group(1)) * int(m.group(2)) if m else None
            ours = next((number(t.get(r, "run s")) for r in t.rows
                         if r[0] == "specdens (compiled)"), None)
            for r in t.rows:
                run = number(t.get(r, "run s"))
                mem = memory.get(("jax-mlp", r[0]))
                rows.append(["jax-mlp", r[0],
                             f"{1e3 * run / probe_steps:.4g}" if run and probe_steps else "",
                             t.get(r, "run s") or "", "" if mem is None else f"{mem:.1f}", "",
                             f"{run / ours:.2f}" if run and ours else ""])
    if "engine" in parts:
        for t in parts["engine"].tables:
            if t.headers[:2] != ["implementation", "median s"]:
                continue
            ours = next((number(t.get(r, "median s")) for r in t.rows if r[0] == "specdens"),
                        None)
            for r in t.rows:
                med = number(t.get(r, "median s"))
                rows.append(["engine (diagonal)", r[0], t.get(r, "ms/step") or "",
                             t.get(r, "median s") or "", "", "",
                             f"{med / ours:.2f}" if med and ours else ""])
    return rows


def bar_panels(series: dict[str, dict[str, float]], path: Path, xlabel: str, title: str,
               log: bool = False) -> bool:
    """Horizontal bars, one panel per workload; False when there is nothing to plot."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(series))
    rows = (len(series) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 0.5 + 2.6 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.ravel(), series.items(), strict=False):
        labels = list(values)
        colors = ["tab:blue" if lab.startswith("specdens") else
                  "tab:gray" if "floor" in lab or lab.startswith("numpy") else "tab:orange"
                  for lab in labels]
        ax.barh(range(len(labels)), [values[k] for k in labels], color=colors)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        if log:
            ax.set_xscale("log")
    for ax in axes.ravel()[len(series):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plots(parts: dict[str, Part], out: Path) -> list[tuple[str, str]]:
    """Writes the cross-part plots; returns (file name, caption) of those written."""
    per_step: dict[str, dict[str, float]] = {}
    total: dict[str, dict[str, float]] = {}
    w1: dict[str, dict[str, float]] = {}
    mem: dict[str, dict[str, float]] = {}
    for row in torch_summary(parts):
        workload, tool = row[0], row[1]
        for target, cell in ((per_step, row[2]), (total, row[3]), (mem, row[4]),
                             (w1, row[5])):
            v = number(cell)
            if v is not None and v > 0:
                target.setdefault(workload, {})[tool] = v
    if "tf" in parts:
        for t in parts["tf"].tables:
            if t.headers[:2] == ["tool", "ms / step"]:
                name = "TF vs torch, per block step: " + t.heading.split(",")[0][:24]
                for r in t.rows:
                    v = number(t.get(r, "ms / step"))
                    if v:
                        per_step.setdefault(name, {})[r[0]] = v
    written = []
    if bar_panels(per_step, out / "time_per_step.png", "ms", "Time per Lanczos step and "
                  "probe (TF panels: per step of the whole block), medians"):
        written.append(("time_per_step.png", "Time per Lanczos step and probe (the run's "
                        "total over steps x probes, as in the summary table), per workload "
                        "and tool (blue: specdens, orange: competitors, grey: product floor "
                        "or hand-written loop)."))
    if bar_panels(total, out / "total_time.png", "s", "Total SLQ time (medians)"):
        written.append(("total_time.png", "Total SLQ time (setup included) per workload."))
    if bar_panels(mem, out / "peak_memory.png", "MiB above start", "Peak memory of one run"):
        written.append(("peak_memory.png", "Peak memory of one SLQ run above the process's "
                        "resident set before it (one fresh process per bar)."))
    if bar_panels(w1, out / "accuracy.png", "W1 / spectral range (log)",
                  "Accuracy against the dense spectrum", log=True):
        written.append(("accuracy.png", "Wasserstein-1 distance to the dense spectrum over "
                        "the spectral range, per workload and tool (lower is better)."))
    for name, caption in (("accuracy_vs_matvecs.png", "W1 / range against matvecs "
                           "(bench_accuracy.py): best split per budget, median over seeds."),
                          ("scaling.png", "Scaling (bench_scaling.py): time, memory and "
                           "overhead against n, steps, probes; the overhead claim.")):
        if (out / name).exists():
            written.append((name, caption))
    return written


# --------------------------------------------------------------------------- report


def machine_lines() -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh
                        if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = next((int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("MemTotal")),
                       None)
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE.parent).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                           cwd=HERE.parent).stdout.strip()
    return [f"* machine: {cpu}, {os.cpu_count()} CPUs, "
            f"{_common.gib(mem)} GiB memory, {platform.system()} {platform.release()}",
            f"* code at the start: commit {commit}" + (" with uncommitted changes"
                                                       if dirty else ""),
            f"* {_common.environment_line().split(', load average')[0]}"]


def demote(text: str, levels: int = 2) -> str:
    """Headings of a part's output moved ``levels`` down, below the report's own."""
    return "\n".join(("#" * levels + line) if line.startswith("#") else line
                     for line in text.splitlines())


def write_report(parts: list[Part], out: Path, args: argparse.Namespace, started: str,
                 load_start: str, wall: float, machine: list[str]) -> Path:
    by_name = {p.name: p for p in parts}
    lines = ["# specdens benchmark report", "",
             f"`{' '.join(['python benchmarks/run_all.py'] + (args.argv or []))}`, started "
             f"{started}, {wall / 60:.1f} min", ""]
    lines += machine  # read at the start: the code the parts ran
    lines += [f"* load average at start: {load_start}; at end: {_common.loadavg()}",
              f"* threads per part: {args.threads or 'library defaults'}; parts run at once: "
              f"{args.jobs}" + (" (their timings disturb each other)" if args.jobs > 1 else ""),
              "",
              "Every comparison ran its competitors alternately on the same workload in the "
              "same process (medians of the repetitions); numbers from different runs or "
              "machines are not comparable. On a shared machine trust ratios within a table "
              "and look at minima as well as medians."]
    if args.smoke:
        lines += ["", "**--smoke: tiny sizes; the figures mean nothing.**"]
    lines += ["", "## Parts", ""]
    lines.append(_common.markdown_table(
        ["part", "what", "status", "s"],
        [[p.name, p.title, p.status, f"{p.seconds:.0f}"] for p in parts]))
    summary = torch_summary(by_name)
    if summary:
        lines += ["", "## Summary: time per step, total time, peak memory, accuracy", "",
                  "From the torch, jax, engine and memory parts. *ms / step / probe*: the run "
                  "(for PyTorch: setup + SLQ) over steps x probes (the engine part: 1 probe), "
                  "for every tool alike: curvlinops's products beyond steps x probes (its "
                  "boundary estimate, its determinism check) count in its time, not as "
                  "more steps (the torch part's own *ms / step* divides by the products "
                  "made); the HVP floor row is its time per product; "
                  "*total s*: that run; *peak MiB*: the memory part's peak above start; "
                  "*W1 / range*: Wasserstein-1 distance to the dense spectrum over its range; "
                  "*/ specdens*: ms / step / probe over specdens's (JAX: over specdens "
                  "compiled).", "",
                  _common.markdown_table(SUMMARY_HEADERS, summary)]
    acc = by_name.get("accuracy")
    if acc:
        for t in acc.tables:
            if t.headers[:2] == ["problem", "tool"]:
                lines += ["", "## Summary: accuracy per cost (W1 / range, best split per "
                          "budget)", "", _common.markdown_table(t.headers, t.rows)]
    sc = by_name.get("scaling")
    if sc:
        for t in sc.tables:
            if t.headers[:3] == ["n", "mode", "band"]:
                lines += ["", "## Summary: engine overhead claim (< 10 % at 90 steps, n >= "
                          "1e6, float32 basis)", "", _common.markdown_table(t.headers, t.rows)]
    figures = plots(by_name, out)
    if figures:
        lines += ["", "## Plots", ""]
        for name, caption in figures:
            lines += [f"![{name}]({name})", "", caption, ""]
    for p in parts:
        lines += ["", f"## Part `{p.name}`: {p.title}", "",
                  f"Status: {p.status}, {p.seconds:.0f} s."]
        if p.command:
            shown = [Path(c).name if c.startswith(str(HERE)) else c for c in p.command[1:]]
            lines += ["", f"`python benchmarks/{' '.join(shown)}`"]
        if p.stdout.strip():
            lines += ["", demote(p.stdout.strip())]
        if not p.status.startswith(("ok", "skipped")) and p.stderr.strip():
            tail = "\n".join(p.stderr.strip().splitlines()[-15:])
            lines += ["", "stderr (last lines):", "", "```", tail, "```"]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    raw = out / "raw"
    raw.mkdir(exist_ok=True)
    for p in parts:
        (raw / f"{p.name}.md").write_text(p.stdout)
        if p.stderr:
            (raw / f"{p.name}.stderr.txt").write_text(p.stderr)
    return path


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "results"),
                   help="folder of REPORT.md and the plots (default benchmarks/results)")
    p.add_argument("--only", default=None, help="comma list of parts: " + ", ".join(PARTS))
    p.add_argument("--skip", default=None, help="comma list of parts to leave out")
    p.add_argument("--repeats", type=int, default=None,
                   help="repetitions of every timed comparison (default: each part's own)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads of BLAS, torch, XLA, TensorFlow in every part (default 1; "
                        "0: the libraries' defaults)")
    p.add_argument("--full", action="store_true",
                   help="bigger grids (bench_accuracy/bench_scaling --full) and bench_scale.py")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (for the test suite)")
    p.add_argument("--jobs", type=int, default=None,
                   help="parts run at once (default 1, 2 with --smoke); more than 1 makes "
                        "the parts' timings disturb each other")
    p.add_argument("--quiet", dest="verbose", action="store_false",
                   help="do not pass the parts' progress messages (stderr) on")
    p.add_argument("--list", action="store_true", help="print the parts and exit")
    # internal: the parts run_all runs itself, in child processes
    p.add_argument("--child", choices=("torch", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--pairs", default="", help=argparse.SUPPRESS)
    p.add_argument("--no-reference", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _common.set_threads(args.threads or None)
    if args.child == "torch":
        return child_torch(args)
    if args.child == "memory":
        return child_memory(args)
    out = Path(args.out)
    parts = plan(args, out)
    if args.list:
        for part in parts:
            print(f"{part.name:11s} {part.title}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = _common.loadavg()
    machine = machine_lines()
    t0 = time.perf_counter()
    jobs = args.jobs or (2 if args.smoke else 1)
    if jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs) as pool:  # the work is in child processes
            list(pool.map(lambda part: run_part(part, args, env), parts))
    else:
        for part in parts:
            run_part(part, args, env)
    args.jobs = jobs
    path = write_report(parts, out, args, started, load_start, time.perf_counter() - t0,
                        machine)
    print(f"[run_all] report: {path}", file=sys.stderr)
    failed = [part.name for part in parts
              if not part.status.startswith(("ok", "skipped"))]
    if failed:
        print(f"[run_all] failed parts: {', '.join(failed)} (see the report)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

