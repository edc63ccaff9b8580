"""The benchmark scripts run end to end at tiny sizes (``--smoke``); no timing is checked.

The scripts that ``run_all.py --smoke`` runs as its parts are read from its output (the
session fixture ``run_all_smoke``) instead of running a second time; the others run here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_all_part

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# The first columns of each script's Markdown table header.
HEADERS = {
    "bench_engine_overhead.py": ["implementation", "median s", "min s", "max s"],
    "bench_scale.py": ["mode", "wall s", "peak RSS GiB"],
    # competitors that are not installed become "not run" rows, never a failure
    # matvecs: every tool's counted products (curvlinops makes more than steps x probes)
    "bench_torch.py": ["tool", "ms / step", "total s", "setup s", "SLQ s", "W1 / range",
                       "matvecs"],
    # the GPU script runs its tiny models on the CPU with --smoke
    "bench_gpu.py": ["product", "ms"],
    # W1 at each budget: one column per budget of matvecs (--smoke: 20 and 80)
    "bench_accuracy.py": ["problem", "tool", "20 matvecs", "80 matvecs"],
    "bench_scaling.py": ["n", "mode", "steps", "probes", "wall s", "ms / step"],
}


# The scripts run_all.py --smoke runs, with the name of their part.
RUN_ALL_PARTS = {"bench_engine_overhead.py": "engine", "bench_accuracy.py": "accuracy",
                 "bench_scaling.py": "scaling"}

# Lines each script must print (what it compares, and in which mode), checked in --smoke.
EXPECTED_LINES = {
    # the baseline loop does what specdens does (second pass only when the first cancelled)
    "bench_engine_overhead.py": ["tridiagonals agree: yes", "ran the second Gram-Schmidt pass",
                                 "| numpy loop, always 2 passes |"],
    # specdens against PyHessian on the same (eval-mode BatchNorm) Hessian
    "bench_gpu.py": ['specdens with batchnorm="population"'],
    "bench_torch.py": ["*ms / step*: (setup + SLQ) / matvecs"],
    "bench_accuracy.py": ["## Verdict per budget", "Speed is compared among the PyTorch "
                          "tools only"],
}


def _header_cells(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in stdout.splitlines() if line.startswith("|")]


@pytest.mark.parametrize("script", sorted(HEADERS))
def test_benchmark_smoke(script: str, request) -> None:
    if script in RUN_ALL_PARTS:
        stdout = run_all_part(request.getfixturevalue("run_all_smoke"), RUN_ALL_PARTS[script])
    else:
        proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"],
                              capture_output=True, text=True, timeout=300,
                              cwd=BENCHMARKS.parent)
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
        stdout = proc.stdout
    want = HEADERS[script]
    assert any(cells[: len(want)] == want for cells in _header_cells(stdout)), stdout
    for line in EXPECTED_LINES.get(script, []):
        assert line in stdout, (line, stdout)
    if script == "bench_accuracy.py":
        _check_accuracy_verdict(stdout)


def _check_accuracy_verdict(stdout: str) -> None:
    """No verdict names as most accurate a tool whose cell spent more than the budget, and
    matfree is never the "fastest" (its JAX times are not compared with PyTorch's)."""
    table = next(rows for rows in _tables(stdout) if rows[0][:2] == ["problem", "tool"])
    budgets = [int(h.split()[0]) for h in table[0][2:]]
    cell = {(r[0], r[1], b): c for r in table[1:] for b, c in zip(budgets, r[2:], strict=True)}
    verdicts = re.findall(r"^\* (\w+), (\d+) matvecs: most accurate (\S+) \(.*$", stdout,
                          flags=re.M)
    assert verdicts, stdout
    for problem, budget, tool in verdicts:
        assert "(over:" not in cell[(problem, tool, int(budget))], (problem, budget, tool)
    assert "fastest PyTorch tool within 2x of it: matfree" not in stdout
    # every tool but curvlinops (its boundary estimate and determinism check are its own)
    # stays within the budget, deflated specdens included: its eigsh's products come out
    # of the budget (the script also stops with an AssertionError if one does not)
    for (problem, tool, budget), c in cell.items():
        assert "(over:" not in c or tool == "curvlinops", (problem, tool, budget, c)
    deflated = [c for (problem, tool, _), c in cell.items() if tool == "specdens-deflated"]
    assert any(re.fullmatch(r"[\d.e+-]+", c) for c in deflated), deflated


def _tables(stdout: str) -> list[list[list[str]]]:
    """Each Markdown table of ``stdout`` as rows of cells (header first, no rule line)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in stdout.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(set(c) <= {"-", ":"} for c in cells):
                continue
            if current is None:
                current = []
                tables.append(current)
            current.append(cells)
        else:
            current = None
    return tables
