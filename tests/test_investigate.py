"""``specdens investigate`` end to end on a tiny setting (torch, JAX and TensorFlow),
resuming, usage errors, the backends' agreement at the same weights, and the same
investigation on a user's own model in a few lines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from specdens.cli import main
from specdens.investigate import (
    CRITERIA,
    FIGURES,
    RUNS,
    InvestigationConfig,
    run_investigation,
    torch_default_weights,
)
from specdens.tracker import read_header, read_records

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small products: one thread is fastest (threads mostly wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = ["--width", "6", "--depth", "1", "--steps", "6", "--records", "3",
        "--lanczos-steps", "12", "--probes", "2", "--k", "2", "--batch-size", "256"]
# JAX and TensorFlow: two records (steps 0 and 6) and one probe, since JAX compiles the
# product kernel of every block size anew for every record (one probe shares eigsh's
# single-vector block); and full-batch steps, so that the sample order (drawn by torch on
# torch, by numpy elsewhere) changes only the order of sums: from the same weights the
# backends then train the same trajectory, up to rounding.
BACKEND_TINY = ["--width", "6", "--depth", "1", "--steps", "6", "--records", "2",
                "--lanczos-steps", "12", "--probes", "1", "--k", "2", "--batch-size", "1536"]
BACKEND_STEPS = (0, 6)

EXTRA_KEYS = {"test_accuracy", "epoch", "minibatch_loss", "data_gradient_norm",
              "weight_decay_gradient_norm", "param_norm"}
SUMMARY_KEYS = {"backend", "config", "criteria", "environment", "notes", "runs", "schedule",
                "timings", "verdicts"}
RUN_KEYS = {"batchnorm", "diverged_at", "final", "hessian_batches", "median_after_step_0",
            "parameters", "records"}
ROW_KEYS = {"accuracy", "bulk_edge", "concentration", "concentration_error_estimate",
            "concentration_gap", "data_gradient_norm", "edge_ratio", "eigsh_converged",
            "gradient_norm", "loss", "negative_mass", "negative_mass_bounds",
            "negative_mass_stderr", "num_lower_outliers", "num_outliers", "num_top_above",
            "outlier_threshold", "outliers", "step", "test_accuracy", "top_eigenvalue",
            "top_eigenvalues", "wall_time", "weight_decay_gradient_norm"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("investigate")
    rc = main(["investigate", *TINY, "--out", str(out), "-q"])
    return rc, out


def check_outputs(out, steps, backend, probes=2):
    """Every output file of a tiny run (``TINY``'s sizes), with the record and summary
    schema; returns the records and the summary."""
    for name in ["records.jsonl", "summary.json", "report.md", *FIGURES.values()]:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in FIGURES.values():
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    records = read_records(out / "records.jsonl")
    assert sorted((r.run, r.step) for r in records) == sorted(
        (run, s) for run in RUNS for s in steps)
    header = read_header(out / "records.jsonl")
    assert header["meta"]["width"] == 6 and header["meta"]["k"] == 2
    assert header["meta"]["backend"] == backend
    for r in records:
        assert r.density.num_probes == probes and r.density.num_steps == 12
        assert r.eigenvalues.size == 2 and r.concentration.k == 2
        assert 0.0 <= r.concentration.fraction <= 1.0 + 1e-12
        assert math.isfinite(r.loss) and 0.0 <= r.accuracy <= 1.0
        assert set(r.extra) == EXTRA_KEYS
        assert 0.0 <= r.extra["test_accuracy"] <= 1.0
        assert r.extra["data_gradient_norm"] > 0 and r.extra["param_norm"] > 0
    # the BatchNorm runs have the BatchNorm parameters (2 per hidden unit) on top
    n = {r.run: r.density.n for r in records}
    assert n["no-bn"] == 64 * 6 + 6 + 6 * 10 + 10 and n["bn-batch"] == n["no-bn"] + 12
    assert n["bn-population"] == n["bn-batch"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert set(summary["runs"]) == set(RUNS)
    assert set(summary["verdicts"]) == set(CRITERIA)
    assert summary["backend"]["name"] == summary["environment"]["backend"] == backend
    for run in RUNS:
        rows = summary["runs"][run]["records"]
        assert set(summary["runs"][run]) == RUN_KEYS
        recs = sorted((r for r in records if r.run == run), key=lambda r: r.step)
        assert [row["step"] for row in rows] == [r.step for r in recs]
        for row, r in zip(rows, recs, strict=True):
            assert set(row) == ROW_KEYS
            assert row["loss"] == r.loss and row["concentration"] == r.concentration.fraction
            assert row["num_outliers"] == r.stats.num_outliers
        assert summary["runs"][run]["parameters"] == n[run]
    for v in summary["verdicts"].values():
        assert v["verdict"] in ("reproduces", "partly reproduces", "does not reproduce",
                                "not tested")
    assert summary["timings"]["total_s"] > 0
    report = (out / "report.md").read_text()
    assert report.startswith("# Hessian spectra through training")
    for needle in ("## Findings", "## Over training", "### no-bn", "### bn-batch",
                   "### bn-population", "## Interpretation and caveats", "Criteria:",
                   f"- Backend: `{backend}` ("):
        assert needle in report, needle
    final = summary["runs"]["no-bn"]["final"]
    assert f"| {final['step']} | {final['loss']:.4g} |" in report
    for name in FIGURES.values():
        assert f"]({name})" in report
    return records, summary


def test_cli_end_to_end_writes_every_output(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    # three runs, recorded at steps 0, 1 and 6 (log-spaced up to --steps)
    check_outputs(out, (0, 1, 6), "torch")


def test_existing_records_need_resume(tiny_run, capsys):
    rc, out = tiny_run
    before = (out / "records.jsonl").read_bytes()
    assert main(["investigate", *TINY, "--out", str(out), "-q"]) == 2
    assert "--resume" in capsys.readouterr().err
    # resuming with the same settings recomputes nothing: the record file is unchanged
    assert main(["investigate", *TINY, "--out", str(out), "-q", "--resume"]) == 0
    assert (out / "records.jsonl").read_bytes() == before
    # other settings are refused, naming the difference
    assert main(["investigate", *TINY[:-2], "--batch-size", "128", "--out", str(out), "-q",
                 "--resume"]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_resume_on_another_backend_is_refused(tiny_run, capsys):
    pytest.importorskip("jax")
    rc, out = tiny_run
    before = (out / "records.jsonl").read_bytes()
    assert main(["investigate", *TINY, "--backend", "jax", "--out", str(out), "-q",
                 "--resume"]) == 2
    assert "backend: 'torch' in the file, 'jax' now" in capsys.readouterr().err
    assert (out / "records.jsonl").read_bytes() == before


# -- JAX and TensorFlow ------------------------------------------------------------------
FRAMEWORK = {"jax": "jax", "tf": "tensorflow"}


@pytest.fixture(scope="module", params=["jax", "tf"])
def backend_run(request, tmp_path_factory):
    """``specdens investigate --backend jax|tf`` on BACKEND_TINY; JAX's x64 flag before and
    after."""
    backend = request.param
    pytest.importorskip(FRAMEWORK[backend])
    if backend == "tf":
        pytest.importorskip("keras")
    x64 = None
    if backend == "jax":
        import jax

        x64 = jax.config.jax_enable_x64
    out = tmp_path_factory.mktemp(f"investigate-{backend}")
    rc = main(["investigate", "--backend", backend, *BACKEND_TINY, "--out", str(out), "-q"])
    if backend == "jax":
        x64 = (x64, jax.config.jax_enable_x64)
    return backend, rc, out, x64


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    """The torch investigation of BACKEND_TINY from the weights JAX and TensorFlow start
    from (numpy draws of PyTorch's default distribution)."""
    cfg = InvestigationConfig(width=6, depth=1, steps=6, records=2, lanczos_steps=12,
                              probes=1, k=2, batch_size=1536)
    out = tmp_path_factory.mktemp("investigate-torch-reference")
    res = run_investigation(cfg, out, progress=False, figures=False,
                            initial_weights=torch_default_weights(cfg))
    return res


def test_backend_cli_end_to_end(backend_run):
    """The same outputs and schema as torch's, and JAX's float64 switch scoped to the run."""
    backend, rc, out, x64 = backend_run
    assert rc == 0
    records, summary = check_outputs(out, BACKEND_STEPS, backend, probes=1)
    assert read_header(out / "records.jsonl")["meta"]["batch_size"] == 1536
    # every step is one whole epoch (full batch), and the run trained
    by_run = {(r.run, r.step): r for r in records}
    for run in RUNS:
        assert by_run[run, 6].extra["epoch"] == 5
        assert by_run[run, 6].loss < by_run[run, 0].loss
    assert summary["runs"]["bn-batch"]["hessian_batches"] == 1
    assert summary["runs"]["bn-population"]["batchnorm"] == "population"
    if backend == "jax":
        before, after = x64
        assert before == after  # jax.enable_x64 only around the investigation
        assert summary["environment"]["x64"] is True


def test_backends_agree_with_torch_at_the_same_weights(backend_run, torch_reference):
    """From the same weights, with full-batch steps, torch and JAX / TensorFlow record the
    same numbers up to float64 rounding, at step 0 and after 6 SGD steps (momentum, weight
    decay and BatchNorm's running statistics included), for the three runs.

    Tolerances: the loss is a mean over 1536 samples summed in another order (rounding
    below n * eps = 2e-13 relative; 1e-12); each top eigenvalue is a Ritz value within its
    residual norm of an eigenvalue, so two backends' values differ by at most the sum of
    their residuals plus rounding (1e-12 of the largest); the concentration is within
    its Davis-Kahan ``error_estimate`` of the exact one on each backend. JAX and
    TensorFlow hand the engine flat vectors ordered as torch's (TensorFlow permutes its
    ``(in, out)`` Dense kernels), so the SLQ probes are the same vectors and the
    densities' nodes and weights agree too (to 1e-8, sqrt(eps): Lanczos amplifies the
    rounding of the products), and with them the numbers derived from the densities: the
    outlier count (equal), the bulk edge (a Ritz value: 1e-8 of the largest eigenvalue),
    the negative mass (a sum of at most ``lanczos_steps`` = 12 weights of the one probe:
    12e-8) and the edge ratio (the largest eigenvalue, from the density or eigsh, over the
    bulk edge: their relative errors added)."""
    backend, rc, out, _ = backend_run
    assert rc == 0
    ref = {(r.run, r.step): r for r in read_records(torch_reference.files["records"])}
    got = {(r.run, r.step): r for r in read_records(out / "records.jsonl")}
    assert set(ref) == set(got) == {(run, s) for run in RUNS for s in BACKEND_STEPS}
    for key, a in ref.items():
        b = got[key]
        assert b.loss == pytest.approx(a.loss, rel=1e-12, abs=0), key
        lam1 = abs(a.top_eigenvalue)
        tol = a.eigenvalue_residuals + b.eigenvalue_residuals + 1e-12 * lam1
        assert np.all(np.abs(b.eigenvalues - a.eigenvalues) <= tol), (key, a.eigenvalues,
                                                                       b.eigenvalues)
        ca, cb = a.concentration, b.concentration
        assert abs(cb.fraction - ca.fraction) <= ca.error_estimate + cb.error_estimate \
            + 1e-12, key
        assert b.accuracy == a.accuracy, key  # argmax of logits equal to rounding
        assert b.extra["test_accuracy"] == a.extra["test_accuracy"], key
        for name in ("data_gradient_norm", "param_norm", "weight_decay_gradient_norm"):
            assert b.extra[name] == pytest.approx(a.extra[name], rel=1e-12), (key, name)
        assert b.extra["epoch"] == a.extra["epoch"]
        if key[1] > 0:
            assert b.extra["minibatch_loss"] == pytest.approx(a.extra["minibatch_loss"],
                                                              rel=1e-12), key
        assert b.density.n == a.density.n
        assert np.allclose(b.density.nodes, a.density.nodes, rtol=0, atol=1e-8 * lam1), key
        assert np.allclose(b.density.weights, a.density.weights, rtol=0, atol=1e-8), key
        sa, sb = a.stats, b.stats
        assert sb.num_outliers == sa.num_outliers, key
        assert abs(sb.bulk.upper - sa.bulk.upper) <= 1e-8 * lam1, key
        assert abs(sb.negative_mass - sa.negative_mass) <= 12 * 1e-8, key
        # the largest eigenvalue: the larger of the top Ritz value of the density and
        # eigsh's (tolerances above)
        d_largest = float(np.max(tol)) + 1e-8 * lam1
        assert abs(sb.largest - sa.largest) <= d_largest, key
        rel = d_largest / abs(sa.largest) + 1e-8 * lam1 / abs(sa.bulk.upper)
        assert sb.edge_ratio == pytest.approx(sa.edge_ratio, rel=rel, abs=0), key
    # the schema of the summaries is the same (check_outputs checked the keys); only the
    # backend's own entries differ
    ref_summary = torch_reference.summary
    got_summary = json.loads((out / "summary.json").read_text())
    assert got_summary["config"] == {**ref_summary["config"], "backend": backend}
    assert got_summary["schedule"] == ref_summary["schedule"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--steps", "0"], "positive integer"),
        (["--lr", "-1"], "positive finite"),
        (["--dtype", "float16"], "invalid choice"),
        (["--backend", "mxnet"], "invalid choice"),
    ],
)
def test_usage_errors(tmp_path, capsys, argv, needle):
    assert main(["investigate", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specdens: error:") and needle in err


@pytest.mark.parametrize("backend, extra", [("jax", "specdens[jax]"),
                                            ("tf", "specdens[tf]")])
def test_a_missing_framework_is_a_usage_error(tmp_path, capsys, monkeypatch, backend, extra):
    import importlib.util

    module = {"jax": "jax", "tf": "tensorflow"}[backend]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == module else find_spec(name, *a))
    assert main(["investigate", "--backend", backend, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specdens: error:") and f"pip install '{extra}'" in err
    assert not (tmp_path / "records.jsonl").exists()


def test_config_validation():
    assert InvestigationConfig().schedule()[:3] == [0, 1, 2]
    with pytest.raises(ValueError, match="runs"):
        InvestigationConfig(runs=("no-bn", "layernorm"))
    with pytest.raises(ValueError, match="lr"):
        InvestigationConfig(lr=0.0)
    with pytest.raises(ValueError, match="backend"):
        InvestigationConfig(backend="mxnet")


def test_initial_weights_are_checked(tmp_path):
    cfg = InvestigationConfig(width=4, depth=1, steps=1, records=1, lanczos_steps=4,
                              probes=1, k=1, runs=("no-bn",))
    good = torch_default_weights(cfg)
    assert [(W.shape, b.shape) for W, b in good] == [((4, 64), (4,)), ((10, 4), (10,))]
    bad = [(good[0][0].T, good[0][1]), good[1]]  # Keras' (in, out) layout
    with pytest.raises(ValueError, match=r"\(4, 64\)"):
        run_investigation(cfg, tmp_path, initial_weights=bad, progress=False, figures=False)
    with pytest.raises(ValueError, match="2 \\(weight, bias\\) pairs"):
        run_investigation(cfg, tmp_path, initial_weights=good[:1], progress=False,
                          figures=False)
    nan = [(np.full((4, 64), np.nan), good[0][1]), good[1]]
    with pytest.raises(ValueError, match="NaN"):
        run_investigation(cfg, tmp_path, initial_weights=nan, progress=False, figures=False)
    assert not (tmp_path / "records.jsonl").exists()


def test_one_run_without_figures(tmp_path):
    cfg = InvestigationConfig(width=4, depth=1, steps=2, records=2, lanczos_steps=8, probes=1,
                              k=1, batch_size=512, runs=("bn-population",))
    ticks = []
    res = run_investigation(cfg, tmp_path, progress=lambda done, total: ticks.append(
        (done, total)), figures=False)
    assert ticks[-1] == (2, 2) and [d for d, _ in ticks] == sorted(d for d, _ in ticks)
    assert set(res.files) == {"records", "summary", "report"}
    assert res.summary["verdicts"]["population_returns"]["verdict"] == "not tested"
    assert [r.step for r in read_records(res.files["records"])] == [0, 2]


def test_the_investigation_on_your_own_model(tmp_path):
    """The README snippet: the same investigation on a user's model in a few lines."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data[:512] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:512])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 10))
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=64,
                                         shuffle=True)
    fixed_batches = [(X[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)]
    path = tmp_path / "spectra.jsonl"

    # --- the snippet ---------------------------------------------------------------
    from specdens.backends.torch.tracking import track

    from specdens.plotting import plot_runs
    from specdens.tracker import SpectrumTracker, log_spaced_steps

    tracker = SpectrumTracker(path, run="mine", steps=log_spaced_steps(40, 4), k=10,
                              num_steps=30, num_probes=2)
    step = 0
    for _epoch in range(5):
        for xb, yb in loader:
            track(tracker, model, criterion, fixed_batches, step=step)  # only when due
            optimizer.zero_grad()
            criterion(model(xb), yb).backward()
            optimizer.step()
            step += 1
    track(tracker, model, criterion, fixed_batches, step=step)
    plot_runs(SpectrumTracker.load(path), "overview").savefig(tmp_path / "spectra.png")
    # --------------------------------------------------------------------------------
    assert step == 40
    records = SpectrumTracker.load(path)
    assert [r.step for r in records] == log_spaced_steps(40, 4) == [0, 1, 6, 40]
    assert all(r.concentration.k == 10 and r.stats is not None for r in records)
    assert records[-1].loss < records[0].loss  # it trained
    assert np.isfinite([r.concentration.fraction for r in records]).all()
    assert (tmp_path / "spectra.png").read_bytes()[:8] == PNG_MAGIC


# -- divergence ---------------------------------------------------------------------------
def test_a_run_diverging_at_a_recorded_step_is_noted_not_fatal(tmp_path):
    """lr=1e30 in float32: the first update leaves finite parameters (~1e29) but a NaN
    loss on the Hessian's data (no-bn, bn-population) or infinite parameters (bn-batch),
    so the state at a scheduled step cannot be recorded. Each run is noted as diverged
    there, its earlier records are kept, and the summary and report are still written
    (before: FloatingPointError "the loss of the first batch is not finite")."""
    cfg = InvestigationConfig(width=8, depth=1, steps=8, records=3, lanczos_steps=20,
                              probes=2, lr=1e30, dtype="float32")
    assert cfg.schedule() == [0, 1, 8]
    ticks = []
    res = run_investigation(cfg, tmp_path, figures=False,
                            progress=lambda done, total: ticks.append((done, total)))
    summary = json.loads(res.files["summary"].read_text())
    report = res.files["report"].read_text()
    records = read_records(res.files["records"])
    total = len(cfg.schedule()) * len(RUNS)
    assert ticks[-1] == (total, total) and [d for d, _ in ticks] == sorted(d for d, _ in ticks)
    for run in RUNS:
        at = summary["runs"][run]["diverged_at"]
        assert at is not None and at >= 1
        steps = [r.step for r in records if r.run == run]
        assert steps == [s for s in cfg.schedule() if s < at]
        for r in records:
            assert math.isfinite(r.loss) and np.isfinite(r.eigenvalues).all()
        assert any(f"run {run} diverged" in note for note in summary["notes"])
    assert summary["runs"]["no-bn"]["diverged_at"] == 1  # a recorded step
    assert report.count("Diverged (non-finite loss or parameters) at step") == len(RUNS)


DIVERGING = dict(width=4, depth=1, steps=4, records=3, lanczos_steps=10, probes=1, k=2,
                 lr=1e30, runs=("bn-population",))


def test_a_huge_finite_loss_is_left_out_of_the_log_axes(tmp_path):
    """lr=1e30 in float64: the loss grows to ~1e265 and stays finite, so the run is not
    diverged, but a log axis spanning 265 decades overflowed in matplotlib and no summary
    or report was written (OverflowError). The values outside LOG_AXIS_RANGE are left out
    of loss.png with a note; every output is written."""
    cfg = InvestigationConfig(**DIVERGING)
    res = run_investigation(cfg, tmp_path, progress=False)
    from specdens.investigate import LOG_AXIS_RANGE

    records = read_records(res.files["records"])
    losses = [r.loss for r in records]
    assert max(losses) > 1e250 and all(math.isfinite(v) for v in losses)  # the premise
    for name in ["summary.json", "report.md", *FIGURES.values()]:
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / FIGURES["loss"]).read_bytes()[:8] == PNG_MAGIC
    summary = json.loads(res.files["summary"].read_text())
    left_out = sum(1 for v in losses if not LOG_AXIS_RANGE[0] <= v <= LOG_AXIS_RANGE[1])
    note = [n for n in summary["notes"] if n.startswith("loss.png:")]
    assert len(note) == 1 and f"{left_out} value(s) of the loss" in note[0]
    assert note[0] in res.files["report"].read_text()
    assert summary["runs"]["bn-population"]["final"]["loss"] == losses[-1]  # kept in full


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_a_figure_that_cannot_be_drawn_is_skipped_with_a_note(tmp_path, monkeypatch):
    """Top eigenvalues of ~1e276 on the log axis of top_eigenvalues.png: matplotlib
    cannot draw it (OverflowError); the figure is skipped with a note in the summary and
    the report, the other figures, the summary and the report are written."""
    import dataclasses

    from specdens import investigate

    def huge(path, **kw):
        return [dataclasses.replace(r, eigenvalues=r.eigenvalues * 1e276) if r.step else r
                for r in read_records(path, **kw)]

    monkeypatch.setattr(investigate, "read_records", huge)
    cfg = InvestigationConfig(**{**DIVERGING, "lr": 0.1})
    res = run_investigation(cfg, tmp_path, progress=False)
    assert "top_eigenvalues" not in res.files
    assert not (tmp_path / FIGURES["top_eigenvalues"]).exists()
    for role in ("densities", "heatmap", "concentration", "loss"):
        assert res.files[role].read_bytes()[:8] == PNG_MAGIC, role
    summary = json.loads(res.files["summary"].read_text())
    (note,) = [n for n in summary["notes"] if "top_eigenvalues.png" in n]
    assert note.startswith("figure top_eigenvalues.png skipped: matplotlib could not draw")
    report = res.files["report"].read_text()
    assert note in report and "](top_eigenvalues.png)" not in report
    assert "](densities.png)" in report


def test_a_floating_point_error_of_a_finite_state_is_not_a_divergence(tmp_path, monkeypatch):
    """Only a non-finite state counts as divergence: a FloatingPointError raised by the
    recording of a finite state (a bug) propagates."""
    from specdens import _investigate_torch

    def broken(self, tracker, step, extra):
        assert self.finite()
        raise FloatingPointError("a bug in the recording")

    monkeypatch.setattr(_investigate_torch.Run, "record", broken)
    cfg = InvestigationConfig(width=4, depth=1, steps=1, records=1, lanczos_steps=4,
                              probes=1, k=1, runs=("no-bn",))
    with pytest.raises(FloatingPointError, match="a bug in the recording"):
        run_investigation(cfg, tmp_path, progress=False, figures=False)


@pytest.mark.parametrize("backend", ["torch", "jax", "tf"])
@pytest.mark.parametrize("name", ["no-bn", "bn-batch"])
def test_run_finite_sees_non_finite_parameters_and_loss(backend, name):
    """Every backend's ``Run.finite()``: True after construction, False once a parameter
    is NaN and, without BatchNorm, False for finite parameters whose loss on the Hessian's
    data overflows (float32 weights scaled by 1e30 are finite, the logits, ~1e30 times the
    hidden units of ~1e29, are not)."""
    from specdens.investigate import _digits, load_backend

    pytest.importorskip({"torch": "torch", "jax": "jax", "tf": "tensorflow"}[backend])
    if backend == "tf":
        pytest.importorskip("keras")
    cfg = InvestigationConfig(width=4, depth=1, steps=1, records=1, lanczos_steps=4,
                              probes=1, k=1, backend=backend, runs=(name,), dtype="float32")
    data = _digits(0)
    weights = torch_default_weights(cfg, data["classes"])
    trainer = load_backend(backend)
    cases = [(1.0, True), (np.nan, False)] + ([(1e30, False)] if name == "no-bn" else [])
    for scale, expect in cases:
        w = [(W * scale, b * scale) for W, b in weights]
        assert all(np.isfinite(W.astype(np.float32)).all() for W, _ in w) == (scale == scale)
        with trainer.session(cfg):
            run = trainer.Run(name, cfg, data, w)
            assert run.finite() is expect, (scale, expect)


# -- k, batch sizes and leftover record files -------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "jax", "tf"])
def test_parameter_count_is_that_of_the_model(backend):
    """InvestigationConfig.parameters, computed from the layer shapes before any
    training, is each backend's model's count."""
    from specdens.investigate import _digits, load_backend

    pytest.importorskip({"torch": "torch", "jax": "jax", "tf": "tensorflow"}[backend])
    data = _digits(0)
    for width, depth in [(1, 1), (3, 2)]:
        cfg = InvestigationConfig(width=width, depth=depth, k=1, backend=backend)
        trainer = load_backend(backend)
        with trainer.session(cfg):
            for name in RUNS:
                run = trainer.Run(name, cfg, data, torch_default_weights(cfg))
                assert cfg.parameters(name) == run.parameters, (width, depth, name)
    assert InvestigationConfig(width=1, depth=1, k=1).parameters("no-bn") == 64 + 1 + 10 + 10


def test_k_not_below_the_parameter_count_is_a_usage_error(tmp_path, capsys):
    """--k 85 for the 85 parameters of width 1, depth 1 (no-bn): one line, exit 2, no
    file (before: a ValueError traceback from eigsh after training had started, and a
    header-only records.jsonl)."""
    argv = ["investigate", "--width", "1", "--depth", "1", "--steps", "2", "--records", "2",
            "--lanczos-steps", "10", "--probes", "2", "--out", str(tmp_path), "-q"]
    assert main([*argv, "--k", "85"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specdens: error: k=85 must be smaller than the number of "
                          "parameters") and "run no-bn has 85" in err
    assert err.count("\n") == 1 and not (tmp_path / "records.jsonl").exists()
    InvestigationConfig(width=1, depth=1, k=84)  # one below: allowed
    InvestigationConfig(width=1, depth=1, k=86, runs=("bn-batch",))  # 87 with BatchNorm
    with pytest.raises(ValueError, match="run bn-batch has 87"):
        InvestigationConfig(width=1, depth=1, k=87, runs=("bn-batch", "bn-population"))


@pytest.mark.parametrize("resume", [False, True])
def test_a_record_file_without_records_does_not_block_a_rerun(tmp_path, resume):
    """A run that fails before its first record leaves a records.jsonl holding only the
    header (of its settings): a rerun, with or without resume and with other settings,
    starts afresh (before: "exists; pass --resume", or with --resume "records another
    experiment")."""
    from specdens.tracker import SpectrumTracker

    path = tmp_path / "records.jsonl"
    SpectrumTracker(path, run="no-bn", k=100, num_steps=10, num_probes=2,
                    meta={"k": 100, "width": 1})
    assert read_header(path) is not None and read_records(path) == []
    cfg = InvestigationConfig(width=4, depth=1, steps=1, records=2, lanczos_steps=4,
                              probes=1, k=1, runs=("no-bn",))
    res = run_investigation(cfg, tmp_path, resume=resume, progress=False, figures=False)
    assert read_header(path)["meta"]["k"] == 1
    assert [r.step for r in read_records(path)] == cfg.schedule() == [0, 1]
    assert res.summary["runs"]["no-bn"]["records"][0]["step"] == 0
    # a file with records still needs resume, and a foreign file is not removed
    with pytest.raises(FileExistsError, match="pass resume=True"):
        run_investigation(cfg, tmp_path, progress=False, figures=False)
    path.write_text('{"accuracy": 0.97}')
    with pytest.raises(FileExistsError):
        run_investigation(cfg, tmp_path, progress=False, figures=False)
    assert path.read_text() == '{"accuracy": 0.97}'


def test_hessian_batches_merge_a_one_sample_remainder():
    from specdens.investigate import hessian_batches

    assert hessian_batches(1536, 128) == [(i, i + 128) for i in range(0, 1536, 128)]
    assert hessian_batches(1536, 307) == [(0, 307), (307, 614), (614, 921), (921, 1228),
                                          (1228, 1536)]
    assert hessian_batches(1536, 1535) == [(0, 1536)]
    assert hessian_batches(1536, 2000) == [(0, 1536)]
    assert hessian_batches(1536, 10) == [(i, min(i + 10, 1536)) for i in range(0, 1536, 10)]
    for bs in (2, 5, 7, 307, 512, 1535):
        b = hessian_batches(1536, bs)
        assert b[0][0] == 0 and b[-1][1] == 1536
        assert all(x[1] == y[0] for x, y in zip(b, b[1:], strict=False))
        assert min(stop - start for start, stop in b) >= 2


@pytest.mark.parametrize("backend", ["torch", "jax", "tf"])
def test_every_backend_takes_the_same_hessian_batches(backend):
    """bs=5: 1536 = 307 * 5 + 1; every backend merges the one-sample remainder (torch
    kept it and BatchNorm refused it; JAX normalised one sample by itself)."""
    from specdens.investigate import _digits, load_backend

    pytest.importorskip({"torch": "torch", "jax": "jax", "tf": "tensorflow"}[backend])
    cfg = InvestigationConfig(width=4, depth=1, k=1, batch_size=5, backend=backend,
                              runs=("bn-batch",))
    data = _digits(0)
    trainer = load_backend(backend)
    with trainer.session(cfg):
        run = trainer.Run("bn-batch", cfg, data, torch_default_weights(cfg))
    sizes = [int(np.shape(x)[0]) for x, _ in run.hess_data]
    assert sizes == [5] * 306 + [6] and run.hessian_batches == 307
    x_all = np.concatenate([np.asarray(x) for x, _ in run.hess_data])
    np.testing.assert_array_equal(x_all, np.asarray(data["x_train"], dtype=x_all.dtype))


def test_a_batch_size_leaving_one_sample_runs_on_torch(tmp_path):
    """bs=307 (1536 = 5 * 307 + 1) on torch: the bn-batch Hessian's last batch of one
    sample raised "Expected more than 1 value per channel when training"."""
    cfg = InvestigationConfig(width=4, depth=1, steps=1, records=2, lanczos_steps=6,
                              probes=1, k=1, batch_size=307, runs=("bn-batch",))
    res = run_investigation(cfg, tmp_path, progress=False, figures=False)
    run = res.summary["runs"]["bn-batch"]
    assert run["hessian_batches"] == 5 and [r["step"] for r in run["records"]] == [0, 1]
    assert all(math.isfinite(r["loss"]) for r in run["records"])


def test_batch_size_one_is_a_usage_error(tmp_path, capsys):
    assert main(["investigate", "--batch-size", "1", "--out", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specdens: error: batch_size must be at least 2")
    assert not (tmp_path / "records.jsonl").exists()
    InvestigationConfig(batch_size=1, runs=("no-bn",))  # no BatchNorm: one sample is fine
    with pytest.raises(ValueError, match="at least 2"):
        InvestigationConfig(batch_size=1, runs=("no-bn", "bn-population"))


def test_numpy_integers_are_stored_as_python_ints(tmp_path):
    """numpy integers pass the checks and are stored converted: np.int64 seed used to
    crash torch's ``Generator.manual_seed``, and ``meta()`` (the record header) was not
    JSON-serialisable."""
    ints = dict(width=np.int64(4), depth=np.int32(1), steps=np.int64(1),
                records=np.int64(2), lanczos_steps=np.int64(4), probes=np.uint8(1),
                k=np.int64(1), batch_size=np.int64(512), threads=np.int64(1),
                seed=np.int64(0))
    cfg = InvestigationConfig(runs=("no-bn",), **ints)
    for name in ints:
        assert type(getattr(cfg, name)) is int, name
    assert cfg == InvestigationConfig(runs=("no-bn",), **{k: int(v) for k, v in ints.items()})
    meta = json.loads(json.dumps(cfg.meta()))
    assert meta["seed"] == 0 and meta["width"] == 4
    res = run_investigation(cfg, tmp_path, progress=False, figures=False)
    assert read_header(res.files["records"])["meta"]["batch_size"] == 512
    assert [r["step"] for r in res.summary["runs"]["no-bn"]["records"]] == [0, 1]


def test_a_seed_beyond_64_bits_is_refused(tmp_path, capsys):
    """torch's generators take 64-bit seeds: 2**64 used to pass the config and crash the
    run (a traceback from the command line)."""
    InvestigationConfig(seed=2**64 - 1)
    with pytest.raises(ValueError, match=r"seed must be at most 2\*\*64 - 1"):
        InvestigationConfig(seed=2**64)
    assert main(["investigate", "--seed", str(2**64), "--out", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specdens: error: seed must be at most 2**64 - 1")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "records.jsonl").exists()


def test_a_batch_size_above_the_training_set_is_refused(tmp_path, capsys):
    """The digits' training split has 1536 samples and an epoch is cut into full batches:
    a larger batch size used to train full-batch silently, with the header recording the
    larger size and the epoch counter one too high."""
    from specdens.investigate import _digits

    n_train = len(_digits(0)["y_train"])
    assert n_train == 1536
    InvestigationConfig(batch_size=n_train)
    with pytest.raises(ValueError, match=f"batch_size={n_train + 1} is larger than the "
                                         f"training set \\({n_train} samples\\)"):
        InvestigationConfig(batch_size=n_train + 1)
    assert main(["investigate", "--batch-size", "5000", "--out", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specdens: error: batch_size=5000 is larger than the training "
                          "set (1536 samples)")
    assert not (tmp_path / "records.jsonl").exists()


def test_the_training_loop_refuses_a_batch_larger_than_the_run_data():
    """The loop's own guard, for a run with fewer samples than the config allows."""
    from specdens.investigate import _train_run

    class Tiny:
        n_train = 100

        def permutation(self):
            raise AssertionError("not reached")

    cfg = InvestigationConfig(batch_size=128, runs=("no-bn",))
    with pytest.raises(ValueError, match=r"batch_size=128 is larger than the training set "
                                         r"\(100 samples\)"):
        _train_run(Tiny(), cfg, None, [0], None, 0, 1)


# -- verdicts -----------------------------------------------------------------------------
def _run_summary(num_outliers, edge_ratio, concentration):
    row = {"step": 1, "num_outliers": num_outliers, "top_eigenvalue": 1.0, "bulk_edge": 1.0,
           "edge_ratio": edge_ratio, "concentration": concentration, "loss": 1.0}
    med = {"num_outliers": float(num_outliers), "edge_ratio": edge_ratio,
           "concentration": concentration, "negative_mass": 0.0, "top_eigenvalue": 1.0,
           "num_top_above": 0.0}
    return {"records": [row], "median_after_step_0": med, "final": row}


@pytest.mark.parametrize("no_bn, bn, verdict, outlier_note", [
    # no outliers without BatchNorm: nothing to suppress (before: 0 <= 0.5 * 0 was "met")
    ((0, 30.0, 0.9), (0, 2.0, 0.1), "partly reproduces",
     "outlier count: 0 with BatchNorm vs 0 without (not met: no outliers without BatchNorm)"),
    ((0, 30.0, 0.9), (0, 20.0, 0.8), "does not reproduce", "(not met: no outliers"),
    ((4, 30.0, 0.9), (1, 2.0, 0.1), "reproduces",
     "outlier count: 1 with BatchNorm vs 4 without (met)"),
    ((4, 30.0, 0.9), (3, 2.0, 0.1), "partly reproduces",
     "outlier count: 3 with BatchNorm vs 4 without (not met)"),
])
def test_batchnorm_suppresses_needs_outliers_without_batchnorm(no_bn, bn, verdict,
                                                               outlier_note):
    from specdens.investigate import _verdicts

    cfg = InvestigationConfig(steps=10, runs=("no-bn", "bn-batch"))
    v = _verdicts({"no-bn": _run_summary(*no_bn), "bn-batch": _run_summary(*bn)},
                  cfg)["batchnorm_suppresses"]
    assert v["verdict"] == verdict
    assert outlier_note in v["why"]
    assert v["why"].count("(met") + v["why"].count("(not met") == 3


def test_a_diverged_run_is_compared_over_the_steps_both_runs_recorded():
    """bn-population diverged after step 2 (its last finite record): its "final" loss at
    step 2 was compared with bn-batch's at step 8 and the blow-up counted as slower
    training, with medians over different stretches; now both over steps 1 and 2, and the
    reason says so."""
    from specdens.investigate import _verdicts

    def run(losses, outliers, diverged_at=None):
        rows = [{"step": s, "loss": loss, "num_outliers": o, "edge_ratio": 3.0 * o + 1,
                 "concentration": 0.5, "top_eigenvalue": 1.0, "bulk_edge": 1.0}
                for s, loss, o in zip((1, 2, 4, 8)[:len(losses)], losses, outliers, strict=True)]
        full = _run_summary(0, 1.0, 0.5)
        full.update(records=[{**rows[0], "step": 0}] + rows, final=rows[-1],
                    diverged_at=diverged_at)
        full["median_after_step_0"] = {
            "num_outliers": float(np.median([r["num_outliers"] for r in rows])),
            "edge_ratio": float(np.median([r["edge_ratio"] for r in rows])),
            "concentration": 0.5, "negative_mass": 0.0, "top_eigenvalue": 1.0,
            "num_top_above": 0.0}
        return full

    cfg = InvestigationConfig(steps=10, runs=("bn-batch", "bn-population"))
    batch = run([3.0, 2.8, 2.0, 1.0], [0, 0, 0, 0])
    population = run([3.0, 2.9], [0, 5], diverged_at=4)
    v = _verdicts({"bn-batch": batch, "bn-population": population}, cfg)["population_returns"]
    assert "final loss 2.9 vs 2.8 (not slower)" in v["why"]
    assert ("(compared over the 2 step(s) after step 0 that both runs recorded, up to step "
            "2; bn-population diverged at step 4)") in v["why"]
    assert "median outlier count 2.5 vs 0" in v["why"]
    # runs that recorded the same steps read as before, without a note
    v = _verdicts({"bn-batch": batch, "bn-population": run([3.0, 2.9, 2.5, 2.4],
                                                            [0, 5, 5, 5])},
                  cfg)["population_returns"]
    assert "final loss 2.4 vs 1 (slower)" in v["why"] and "compared over" not in v["why"]


def test_k_of_n_minus_1_has_no_gap_and_the_report_says_what_k_is(tmp_path):
    """k = n - 1 computes no (k+1)-th eigenvalue: the error estimate is NaN, which the
    report read as "the k-th and (k+1)-th eigenvalues are close"; and it called any k
    "the number of classes"."""
    cfg = InvestigationConfig(width=1, depth=1, steps=1, records=2, lanczos_steps=8,
                              probes=1, k=84, batch_size=512, runs=("no-bn",))
    res = run_investigation(cfg, tmp_path, progress=False, figures=False)
    rows = res.summary["runs"]["no-bn"]["records"]
    assert res.summary["runs"]["no-bn"]["parameters"] == 85
    assert all(math.isnan(r["concentration_error_estimate"]) for r in rows)
    report = res.files["report"].read_text()
    assert "ill-determined" not in report
    assert "k = 84." in report and "k = 84 (the number of classes)" not in report


def test_numpy_floats_are_accepted_and_stored_as_python_floats():
    """np.float32 lr was refused with "must be a finite number >= 0; got 0.1"."""
    cfg = InvestigationConfig(lr=np.float32(0.25), momentum=np.int64(0),
                              weight_decay=np.float16(0.5), runs=("no-bn",))
    for name, value in (("lr", 0.25), ("momentum", 0.0), ("weight_decay", 0.5)):
        assert type(getattr(cfg, name)) is float and getattr(cfg, name) == value
    assert json.loads(json.dumps(cfg.meta()))["lr"] == 0.25
    with pytest.raises(TypeError, match="lr must be a real number"):
        InvestigationConfig(lr="0.1")
    with pytest.raises(TypeError, match="momentum must be a real number"):
        InvestigationConfig(momentum=True)
    with pytest.raises(ValueError, match="weight_decay must be a finite number"):
        InvestigationConfig(weight_decay=np.float32("nan"))


def test_bad_arguments_are_refused_before_the_output_folder_is_touched(tmp_path):
    """out_dir naming a file raised a bare "[Errno 17] File exists"; a bad progress made
    the folder (and could delete an empty record file) before it was refused."""
    cfg = InvestigationConfig(width=1, depth=1, steps=1, records=2, lanczos_steps=4,
                              probes=1, k=1, runs=("no-bn",))
    afile = tmp_path / "out.txt"
    afile.write_text("mine")
    with pytest.raises(NotADirectoryError, match="out.txt' is a file"):
        run_investigation(cfg, afile, progress=False, figures=False)
    assert afile.read_text() == "mine"
    folder = tmp_path / "new"
    with pytest.raises(TypeError, match="progress must be"):
        run_investigation(cfg, folder, progress="yes", figures=False)
    assert not folder.exists()
