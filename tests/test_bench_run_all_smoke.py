"""``benchmarks/run_all.py --smoke``: its report, its plots and its tables, and the output
of every benchmark script it runs as a part.

run_all runs once for this module (the fixture ``run_all_smoke``) and keeps each part's
stdout verbatim in ``raw/<part>.md``; the checks of the scripts it runs (engine, jax, tf,
estimators, accuracy, scaling) read them there, so that no script runs twice. The
scripts run_all --smoke does not run are in ``test_benchmarks_smoke.py``.

No time is asserted (the development machines are shared): the tests check that every
part ran (or was skipped with a reason: the GPU part without CUDA), that the report has
each summary table with its header and a section per part, that the plots are PNG files,
and what each script's output must say. The parsing helpers that build the summary are
checked on their own first.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import run_all  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("jax")
pytest.importorskip("tensorflow")
pytest.importorskip("keras")

PNG = b"\x89PNG\r\n\x1a\n"

PLOTS = ["time_per_step.png", "total_time.png", "peak_memory.png", "accuracy.png",
         "accuracy_vs_matvecs.png", "scaling.png"]


def _tables(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]


def test_parse_tables_and_numbers() -> None:
    text = ("# Title\n\n## mlp-1batch: MLP, 90 steps x 10 probes\n\n"
            "| tool | ms / step | W1 / range |\n| --- | --- | --- |\n"
            "| specdens | 0.91 | 3.6e-04 |\n| curvlinops | 3.7 | nan |\n\nafter\n"
            "| a | b |\n| - | - |\n| 1 | 2 % |\n")
    first, second = run_all.parse_tables(text)
    assert first.heading == "mlp-1batch: MLP, 90 steps x 10 probes"
    assert first.headers == ["tool", "ms / step", "W1 / range"]
    assert first.rows == [["specdens", "0.91", "3.6e-04"], ["curvlinops", "3.7", "nan"]]
    assert first.get(first.rows[0], "W1 / range") == "3.6e-04"
    assert second.heading == first.heading and second.rows == [["1", "2 %"]]
    assert run_all.number("3.6e-04") == pytest.approx(3.6e-4)
    assert run_all.number("12 %") == 12.0
    assert run_all.number("nan") is None and run_all.number("n/a") is None
    assert run_all.number("") is None and run_all.number(None) is None


def _args(**kw):
    import argparse

    base = dict(smoke=False, full=False, threads=1, repeats=None, only=None, skip=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_threads_reach_every_part(tmp_path: Path, threads: int) -> None:
    """--threads N, 0 ("the libraries' defaults") included, is on every part's command
    line: the parts' own defaults differ (bench_accuracy, bench_scaling and run_all's
    children default to 1 thread)."""
    args = _args(threads=threads, only=",".join(run_all.PARTS))
    for part in run_all.plan(args, tmp_path):
        if part.name in ("memory", "gpu"):  # memory: below; gpu: no thread option
            continue
        i = part.command.index("--threads")
        assert part.command[i + 1] == str(threads), (part.name, part.command)
    cmd = run_all.memory_command(["mlp-1batch|specdens"], args)
    assert cmd[cmd.index("--threads") + 1] == str(threads)


def test_summary_time_is_per_step_and_probe_for_every_tool() -> None:
    """*ms / step / probe* is the total over steps x probes for every tool, also for
    curvlinops, whose own *ms / step* in the torch table divides by more products."""
    text = ("## mlp-1batch: MLP, n = 10 parameters, 1 batch(es), 9 samples, 10 steps x 2 "
            "probes, float32\n\n"
            "| tool | ms / step | total s | setup s | SLQ s | W1 / range | matvecs |\n"
            "| --- | --- | --- | --- | --- | --- | --- |\n"
            "| specdens | 10 | 0.2 | 0.01 | 0.19 | 1e-3 | 20 |\n"
            "| curvlinops | 10 | 0.4 | 0.01 | 0.39 | 1e-2 | 40 * |\n")
    part = run_all.Part("torch", "torch", [], tables=run_all.parse_tables(text))
    rows = {r[1]: r for r in run_all.torch_summary({"torch": part})}
    assert run_all.number(rows["specdens"][2]) == pytest.approx(10.0)
    assert run_all.number(rows["curvlinops"][2]) == pytest.approx(20.0)  # 0.4 s / 20
    assert rows["curvlinops"][6] == "2.00"


@pytest.fixture(scope="module")
def run_all_smoke(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``run_all.py --smoke``, once for the module: ``(out, proc)``."""
    out = tmp_path_factory.mktemp("run_all") / "report"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "run_all.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=900,
                          cwd=BENCHMARKS.parent)
    return out, proc


def part_output(run_all_smoke, part: str) -> str:
    """The stdout of run_all's part ``part`` (its script's output), after checking that
    run_all, and so every part, succeeded (a failed part's stderr is in the report)."""
    out, proc = run_all_smoke
    report = out / "REPORT.md"
    assert proc.returncode == 0, (f"run_all.py --smoke failed:\n{proc.stdout}\n{proc.stderr}\n"
                                  + (report.read_text() if report.exists() else ""))
    return (out / "raw" / f"{part}.md").read_text()


def test_run_all_smoke(run_all_smoke) -> None:
    out, proc = run_all_smoke
    assert proc.returncode == 0, f"run_all.py failed:\n{proc.stdout}\n{proc.stderr}"
    report = (out / "REPORT.md").read_text()
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
        assert f"![{name}]({name})" in report, name
    for name in ("accuracy.json", "scaling.json"):
        assert (out / name).stat().st_size > 0, name
    tables = _tables(report)
    for header in (["part", "what", "status", "s"], run_all.SUMMARY_HEADERS,
                   ["problem", "tool", "20 matvecs", "80 matvecs"],
                   ["n", "mode", "band", "product ns / param"],
                   ["tool", "ms / step", "total s", "setup s", "SLQ s", "W1 / range"],
                   ["workload", "tool", "peak above start MiB"],
                   ["implementation", "median s", "min s", "max s"]):
        assert any(t[: len(header)] == header for t in tables), header
    parts = {row[0]: row[2] for row in tables if row and row[0] in run_all.PARTS}
    assert set(parts) == set(run_all.PARTS) - set(run_all.DEFAULT_SKIP), parts
    for name, status in parts.items():
        assert status == "ok" or (name == "gpu" and status.startswith("skipped")), (name, status)
        assert f"## Part `{name}`" in report
        assert (out / "raw" / f"{name}.md").exists()
    # the summary has every PyTorch workload and every tool of bench_torch
    summary = [t for t in tables if len(t) == len(run_all.SUMMARY_HEADERS)]
    for workload in run_all.TORCH_WORKLOADS:
        tools = {t[1] for t in summary if t[0] == workload}
        assert {"specdens", "PyHessian", "HVP floor (1 matvec)"} <= tools, (workload, tools)


# -- bench_jax.py: every contender reproduces specdens's Ritz values to rounding (the same
# probes, steps and float64 arithmetic give the same nodes; 1e-10 of the spectral range is
# far above rounding and far below any real difference of algorithm). The script itself
# checks nothing, so the test reads the node-difference columns.
def test_bench_jax(run_all_smoke) -> None:
    stdout = part_output(run_all_smoke, "jax")
    tables = _markdown_tables(stdout)
    assert len(tables) == 2, stdout
    main, paper = tables
    assert main[0][:5] == ["tool", "run s", "min s", "ms / step", "compile s"]
    assert paper[0][:3] == ["implementation", "compile s", "run s"]
    names = [row[0] for row in main[1:]]
    assert names[:3] == ["specdens (compiled)", "specdens (compiled, partial)",
                         "specdens (eager engine)"]
    for table, col in ((main, 5), (paper, 3)):
        for row in table[1:]:
            if row[1] != "not run":
                assert float(row[col]) <= 1e-10, row


# -- bench_tf.py: both tables (MLP and CNN), the same Lanczos recurrence as PyTorch
TF_HEADER = ["tool", "ms / step", "block product ms", "engine ms / step", "first run s",
             "setup s", "/ torch", "d alpha"]


def test_bench_tf(run_all_smoke) -> None:
    stdout = part_output(run_all_smoke, "tf")
    tables = _tables(stdout)
    assert sum(cells == TF_HEADER for cells in tables) == 2, stdout  # MLP and CNN
    rows = [cells for cells in tables if cells[0] in ("torch (graph/loop)", "tf reverse/loop")]
    assert len(rows) == 4, stdout
    # the two backends ran the same Lanczos recurrence (float32 products)
    assert all(float(cells[-1]) <= 1e-4 for cells in rows), stdout


# -- bench_estimators.py: its three tables; the deflated rows report a variance reduction
ESTIMATOR_HEADERS = [
    ["spectrum", "method", "probes", "matvecs", "stderr tr(A)/n", "stderr tr(A^2)/n"],
    ["spectrum", "method", "matvecs", "rms error", "rms reported stderr"],
    ["spectrum", "KPM moments", "SLQ steps", "probes", "KPM matvecs", "SLQ matvecs"],
]


def test_bench_estimators(run_all_smoke) -> None:
    stdout = part_output(run_all_smoke, "estimators")
    rows = _tables(stdout)
    for want in ESTIMATOR_HEADERS:
        assert any(r[: len(want)] == want for r in rows), (want, stdout)
    # every table row has as many cells as its header (no stray "|" in a cell)
    widths = {len(r) for r in rows}
    assert widths == {10, 7, 11}, widths
    # plain and deflated SLQ at equal counted products: within half a step's worth of
    # probes (--smoke: 12 steps), the deflated count including its eigsh and its check
    for name in ("hessian_like", "marchenko_pastur", "tiny_bulk_hessian"):
        plain = next(r for r in rows if r[0] == name and r[1] == "plain SLQ")
        deflated = next(r for r in rows if r[0] == name and r[1].startswith("deflated"))
        assert abs(int(plain[3]) - int(deflated[3])) <= 12 // 2, (plain, deflated)
        assert int(plain[3]) == 12 * int(plain[2])  # counted: one product per step
    reductions = [r for r in rows if r[1] == "reduction (plain / deflated)"]
    assert [r[0] for r in reductions] == ["hessian_like", "marchenko_pastur",
                                          "tiny_bulk_hessian"]
    # on the Hessian-like spectra deflation reduces the standard error of tr(A^2)/n
    for r in reductions:
        if r[0] != "marchenko_pastur":
            assert float(r[5].rstrip("x")) > 10, r


# -- the other parts: the first columns of a table header, and lines each must print
PART_HEADERS = {
    "engine": ["implementation", "median s", "min s", "max s"],
    # W1 at each budget: one column per budget of matvecs (--smoke: 20 and 80)
    "accuracy": ["problem", "tool", "20 matvecs", "80 matvecs"],
    "scaling": ["n", "mode", "steps", "probes", "wall s", "ms / step"],
}
PART_LINES = {
    # the baseline loop does what specdens does (second pass only when the first cancelled)
    "engine": ["tridiagonals agree: yes", "ran the second Gram-Schmidt pass",
               "| numpy loop, always 2 passes |"],
    "accuracy": ["## Verdict per budget", "Speed is compared among the PyTorch tools only"],
    # the overhead claim on both real networks, each with the floor the machine's read
    # bandwidth sets to full reorthogonalisation
    "scaling": ["## Claim on a real network: digits MLP", "## Claim on a real network: "
                "digits CNN", "| sweep floor / its products |",
                "- Floor of full reorthogonalisation: one Gram-Schmidt sweep per step"],
}


@pytest.mark.parametrize("part", sorted(PART_HEADERS))
def test_part_tables_and_lines(run_all_smoke, part: str) -> None:
    stdout = part_output(run_all_smoke, part)
    want = PART_HEADERS[part]
    assert any(cells[: len(want)] == want for cells in _tables(stdout)), stdout
    for line in PART_LINES.get(part, []):
        assert line in stdout, (line, stdout)
    if part == "accuracy":
        _check_accuracy_verdict(stdout)


def _check_accuracy_verdict(stdout: str) -> None:
    """No verdict names as most accurate a tool whose cell spent more than the budget, and
    matfree is never the "fastest" (its JAX times are not compared with PyTorch's)."""
    table = next(rows for rows in _markdown_tables(stdout) if rows[0][:2] == ["problem", "tool"])
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


def _markdown_tables(stdout: str) -> list[list[list[str]]]:
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
