"""The benchmark scripts that ``run_all.py --smoke`` leaves out (PyTorch's, the GPU script
on the CPU, the scale script) run end to end at tiny sizes (``--smoke``); no timing is
checked. The scripts run_all runs are checked on its output, in
``test_bench_run_all_smoke.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# The first columns of each script's Markdown table header.
HEADERS = {
    "bench_scale.py": ["mode", "wall s", "peak RSS GiB"],
    # competitors that are not installed become "not run" rows, never a failure
    # matvecs: every tool's counted products (curvlinops makes more than steps x probes)
    "bench_torch.py": ["tool", "ms / step", "total s", "setup s", "SLQ s", "W1 / range",
                       "matvecs"],
    # the GPU script runs its tiny models on the CPU with --smoke
    "bench_gpu.py": ["product", "ms"],
}


# Lines each script must print (what it compares, and in which mode), checked in --smoke.
EXPECTED_LINES = {
    # specdens against PyHessian on the same (eval-mode BatchNorm) Hessian
    "bench_gpu.py": ['specdens with batchnorm="population"'],
    "bench_torch.py": ["*ms / step*: (setup + SLQ) / matvecs"],
}


def _header_cells(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in stdout.splitlines() if line.startswith("|")]


@pytest.mark.parametrize("script", sorted(HEADERS))
def test_benchmark_smoke(script: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"],
                          capture_output=True, text=True, timeout=300, cwd=BENCHMARKS.parent)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    want = HEADERS[script]
    assert any(cells[: len(want)] == want for cells in _header_cells(proc.stdout)), proc.stdout
    for line in EXPECTED_LINES.get(script, []):
        assert line in proc.stdout, (line, proc.stdout)
