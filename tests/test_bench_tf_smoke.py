"""benchmarks/bench_tf.py runs with --smoke and prints its tables (no time is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")
pytest.importorskip("torch")
pytest.importorskip("sklearn")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
HEADER = ["tool", "ms / step", "block product ms", "engine ms / step", "first run s",
          "setup s", "/ torch", "d alpha"]


def test_bench_tf_smoke() -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_tf.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300, cwd=BENCHMARKS.parent,
                          env=env)
    assert proc.returncode == 0, f"bench_tf.py failed:\n{proc.stdout}\n{proc.stderr}"
    tables = [[c.strip() for c in line.strip().strip("|").split("|")]
              for line in proc.stdout.splitlines() if line.startswith("|")]
    assert sum(cells == HEADER for cells in tables) == 2, proc.stdout  # MLP and CNN
    rows = [cells for cells in tables if cells[0] in ("torch (graph/loop)", "tf reverse/loop")]
    assert len(rows) == 4, proc.stdout
    # the two backends ran the same Lanczos recurrence (float32 products)
    assert all(float(cells[-1]) <= 1e-4 for cells in rows), proc.stdout
