"""benchmarks/bench_tf.py runs with --smoke and prints its tables (no time is asserted; run
once, by ``run_all.py --smoke``: the session fixture ``run_all_smoke``)."""

from __future__ import annotations

import pytest
from conftest import run_all_part

pytest.importorskip("tensorflow")
pytest.importorskip("keras")
pytest.importorskip("torch")
pytest.importorskip("sklearn")

HEADER = ["tool", "ms / step", "block product ms", "engine ms / step", "first run s",
          "setup s", "/ torch", "d alpha"]


def test_bench_tf_smoke(run_all_smoke) -> None:
    stdout = run_all_part(run_all_smoke, "tf")    # bench_tf.py --smoke, run by run_all
    tables = [[c.strip() for c in line.strip().strip("|").split("|")]
              for line in stdout.splitlines() if line.startswith("|")]
    assert sum(cells == HEADER for cells in tables) == 2, stdout  # MLP and CNN
    rows = [cells for cells in tables if cells[0] in ("torch (graph/loop)", "tf reverse/loop")]
    assert len(rows) == 4, stdout
    # the two backends ran the same Lanczos recurrence (float32 products)
    assert all(float(cells[-1]) <= 1e-4 for cells in rows), stdout
