"""``benchmarks/bench_jax.py --smoke`` runs and prints both of its tables.

Nothing here asserts a time (the development machines are shared); the script itself
checks nothing either, so the test reads the node-difference columns: every contender
must reproduce specdens's Ritz values to rounding (the same probes, steps and float64
arithmetic give the same nodes; 1e-10 of the spectral range is far above rounding and
far below any real difference of algorithm).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_jax.py"


def _tables(stdout: str) -> list[list[list[str]]]:
    tables, current = [], []
    for line in stdout.splitlines():
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def test_bench_jax_smoke() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True,
                          text=True, timeout=300, cwd=SCRIPT.parent.parent)
    assert proc.returncode == 0, f"bench_jax.py failed:\n{proc.stdout}\n{proc.stderr}"
    tables = _tables(proc.stdout)
    assert len(tables) == 2, proc.stdout
    main, paper = tables
    assert main[0][:5] == ["tool", "run s", "min s", "ms / step", "compile s"]
    assert paper[0][:3] == ["implementation", "compile s", "run s"]
    names = [row[0] for row in main[2:]]
    assert names[:3] == ["specdens (compiled)", "specdens (compiled, partial)",
                         "specdens (eager engine)"]
    for table, col in ((main, 5), (paper, 3)):
        for row in table[2:]:
            if row[1] != "not run":
                assert float(row[col]) <= 1e-10, row
