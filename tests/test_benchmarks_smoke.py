"""The benchmark scripts run end to end at tiny sizes (``--smoke``); no timing is checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# The first columns of each script's Markdown table header.
HEADERS = {
    "bench_engine_overhead.py": ["implementation", "median s", "min s", "max s"],
    "bench_scale.py": ["mode", "wall s", "peak RSS GiB"],
    # competitors that are not installed become "not run" rows, never a failure
    "bench_torch.py": ["tool", "ms / step", "total s"],
    # the GPU script runs its tiny models on the CPU with --smoke
    "bench_gpu.py": ["product", "ms"],
    # W1 at each budget: one column per budget of matvecs (--smoke: 20 and 80)
    "bench_accuracy.py": ["problem", "tool", "20 matvecs", "80 matvecs"],
    "bench_scaling.py": ["n", "mode", "steps", "probes", "wall s", "ms / step"],
}


def _header_cells(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in stdout.splitlines() if line.startswith("|")]


@pytest.mark.parametrize("script", sorted(HEADERS))
def test_benchmark_smoke(script: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCHMARKS.parent,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    want = HEADERS[script]
    assert any(cells[: len(want)] == want for cells in _header_cells(proc.stdout)), proc.stdout
