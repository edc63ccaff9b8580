"""benchmarks/bench_estimators.py runs end to end at tiny sizes (``--smoke``) and prints
its three tables; the deflated rows report a variance reduction. No timing is checked.
The script runs once, in ``run_all.py --smoke`` (the session fixture ``run_all_smoke``)."""

from __future__ import annotations

from conftest import run_all_part

HEADERS = [
    ["spectrum", "method", "probes", "matvecs", "stderr tr(A)/n", "stderr tr(A^2)/n"],
    ["spectrum", "method", "matvecs", "rms error", "rms reported stderr"],
    ["spectrum", "KPM moments", "SLQ steps", "probes", "KPM matvecs", "SLQ matvecs"],
]


def _rows(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in stdout.splitlines() if line.startswith("|")]


def test_bench_estimators_smoke(run_all_smoke) -> None:
    stdout = run_all_part(run_all_smoke, "estimators")  # bench_estimators.py --smoke
    rows = _rows(stdout)
    for want in HEADERS:
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
