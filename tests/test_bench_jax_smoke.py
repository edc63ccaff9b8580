"""``benchmarks/bench_jax.py --smoke`` runs and prints both of its tables (run once, by
``run_all.py --smoke``: the session fixture ``run_all_smoke``).

Nothing here asserts a time (the development machines are shared); the script itself
checks nothing either, so the test reads the node-difference columns: every contender
must reproduce specdens's Ritz values to rounding (the same probes, steps and float64
arithmetic give the same nodes; 1e-10 of the spectral range is far above rounding and
far below any real difference of algorithm).
"""

from __future__ import annotations

import pytest
from conftest import run_all_part

pytest.importorskip("jax")
pytest.importorskip("sklearn")


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


def test_bench_jax_smoke(run_all_smoke) -> None:
    stdout = run_all_part(run_all_smoke, "jax")   # bench_jax.py --smoke, run by run_all
    tables = _tables(stdout)
    assert len(tables) == 2, stdout
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
