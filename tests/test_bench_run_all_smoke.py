"""``benchmarks/run_all.py --smoke`` writes its report, its plots and its tables.

No time is asserted (the development machines are shared): the test checks that every
part ran (or was skipped with a reason: the GPU part without CUDA), that the report has
each summary table with its header and a section per part, and that the plots are PNG
files. The parsing helpers that build the summary are checked on their own first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import run_all  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

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


def test_run_all_smoke(run_all_smoke) -> None:
    out, proc = run_all_smoke                   # run_all.py --smoke, once for the session
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
