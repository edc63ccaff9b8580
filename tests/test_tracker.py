"""SpectrumTracker: exact round trip, crash safety (SIGKILL and torn lines), restarts,
schedules, and the PyTorch hook leaving the model unchanged."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

import specdens
from specdens.analysis import gradient_concentration, spectrum_stats
from specdens.examples import hessian_like
from specdens.tracker import (
    SpectrumRecord,
    SpectrumTracker,
    TrackerFileError,
    TrackerFileWarning,
    log_spaced_steps,
    read_header,
    read_records,
    series,
)

FAST = {"num_steps": 25, "num_probes": 2, "k": 3}


@pytest.fixture(scope="module")
def op():
    return hessian_like(400)


def grad_vec(n, seed=0):
    return np.random.default_rng(seed).standard_normal(n)


def test_round_trip_is_exact(tmp_path, op):
    path = tmp_path / "s.jsonl"
    tr = SpectrumTracker(path, run="a", meta={"lr": 0.1}, **FAST)
    g = grad_vec(400)
    rec = tr.record(3, op, g, loss=0.25, accuracy=np.float64(0.5), extra={"lr": 0.1, "x": None})
    assert isinstance(rec, SpectrumRecord)
    (back,) = read_records(path)
    for name in ("nodes", "weights", "residuals", "lengths", "probe_scales", "probe_indices",
                 "breakdown"):
        assert np.array_equal(getattr(back.density, name), getattr(rec.density, name)), name
    assert rec.density.probe_indices is not None
    assert np.array_equal(back.eigenvalues, rec.eigenvalues)
    assert np.array_equal(back.eigenvalue_residuals, rec.eigenvalue_residuals)
    assert np.array_equal(back.concentration.overlaps, rec.concentration.overlaps)
    assert back.concentration.fraction == rec.concentration.fraction
    assert back.concentration.error_estimate == rec.concentration.error_estimate
    assert back.stats.outliers == rec.stats.outliers and back.stats.bulk == rec.stats.bulk
    assert (back.run, back.step, back.loss, back.accuracy) == ("a", 3, 0.25, 0.5)
    assert back.extra == {"lr": 0.1, "x": None}
    assert back.to_json() == rec.to_json()
    # the record holds what the analysis functions compute directly
    ref = gradient_concentration(op, g, 3)
    assert rec.concentration.fraction == ref.fraction
    assert np.array_equal(rec.eigenvalues, ref.eigenvalues)
    assert rec.stats.negative_mass == spectrum_stats(rec.density, ref.eigenvalues).negative_mass
    # every line is plain JSON: no pickle anywhere
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(isinstance(json.loads(ln), dict) for ln in lines)
    header = read_header(path)
    assert header["format"] == "specdens.SpectrumTracker" and header["meta"] == {"lr": 0.1}
    assert SpectrumTracker.load(path)[0].to_json() == rec.to_json()
    assert "SpectrumRecord(run='a', step=3" in repr(rec)


def test_breakdown_flags_round_trip(tmp_path):
    """Five distinct eigenvalues and num_steps=5: the probes break down at the last step,
    so their rules are exact (quadrature_error 0); the record keeps the flags that say
    so."""
    ev = np.repeat([1.0, 2.0, 3.0, 4.0, 5.0], 20)
    path = tmp_path / "s.jsonl"
    rec = SpectrumTracker(path, k=2, num_steps=5, num_probes=2).record(0, np.diag(ev))
    (back,) = read_records(path)
    assert back.density.moments(10).value == pytest.approx(np.mean(ev**10), rel=1e-12)
    assert back.density.moments(10).quadrature_error == 0.0
    assert rec.density.breakdown.tolist() == [True, True]
    np.testing.assert_array_equal(back.density.breakdown, rec.density.breakdown)


def test_progress_reaches_the_callback(tmp_path, op):
    ticks = []
    tr = SpectrumTracker(tmp_path / "s.jsonl", k=2, num_steps=15, num_probes=2,
                         progress=lambda done, total: ticks.append((done, total)))
    tr.record(0, op)
    assert ticks and ticks[-1] == (15, 15)  # the probes advance in one block


def test_nan_loss_is_stored_as_missing_not_averaged(tmp_path, op):
    path = tmp_path / "s.jsonl"
    tr = SpectrumTracker(path, k=2, num_probes=0)
    tr.record(0, op, loss=float("nan"))
    tr.record(1, op, loss=1.0)
    assert '"loss": null' in path.read_text()
    steps, loss = series(read_records(path), "loss")
    assert steps.tolist() == [0, 1] and np.isnan(loss[0]) and loss[1] == 1.0
    (rec,) = [r for r in read_records(path) if r.step == 1]
    assert rec.density is None and rec.stats is None and rec.concentration is None
    assert rec.eigenvalues.size == 2


CHILD = textwrap.dedent("""
    import sys, numpy as np
    from specdens.examples import hessian_like
    from specdens.tracker import SpectrumTracker
    import specdens.tracker as T
    path, mode = sys.argv[1], sys.argv[2]
    op = hessian_like(400)
    g = np.random.default_rng(0).standard_normal(400)
    tr = SpectrumTracker(path, run="r", num_steps=25, num_probes=2, k=3)
    if mode == "torn":
        real = T._append
        def half_then_die(p, line):
            # a crash in the middle of the write of the third record
            if tr.recorded_steps == {0, 1}:
                import os, signal
                fd = os.open(p, os.O_WRONLY | os.O_APPEND)
                os.write(fd, line.encode()[: len(line) // 2])
                os.fsync(fd)
                os.kill(os.getpid(), signal.SIGKILL)
            real(p, line)
        T._append = half_then_die
    for step in range(10**6):
        if tr.due(step):
            tr.record(step, op, g, loss=1.0 / (step + 1))
            print(step, flush=True)
""")


def _child(tmp_path, path, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), str(path), mode],
                            stdout=subprocess.PIPE, text=True)


def test_sigkill_while_recording_keeps_every_returned_record(tmp_path):
    path = tmp_path / "s.jsonl"
    proc = _child(tmp_path, path, "loop")
    printed = []
    try:
        while len(printed) < 3:  # three records returned (and fsync'd)
            line = proc.stdout.readline()
            assert line, "the child died early"
            printed.append(int(line))
        time.sleep(0.05)  # let it be somewhere inside the next record
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # the kill may or may not have torn a line: at most a TrackerFileWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = read_records(path)
    assert all(issubclass(w.category, TrackerFileWarning) for w in caught), caught
    steps = [r.step for r in recs]
    assert steps[: len(printed)] == printed  # every returned record is there, intact
    assert steps == list(range(len(steps)))
    # a restarted run continues the file: recorded steps are not done again
    tr = SpectrumTracker(path, run="r", **FAST)
    assert tr.recorded_steps == frozenset(steps)
    assert not tr.due(0) and tr.due(len(steps))
    tr.record(len(steps), hessian_like(400), grad_vec(400), loss=0.0)
    again = read_records(path)
    assert [r.step for r in again] == list(range(len(steps) + 1))


def test_torn_line_from_a_crash_mid_write_is_ignored_then_cut_off(tmp_path):
    path = tmp_path / "s.jsonl"
    proc = _child(tmp_path, path, "torn")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert out.split() == ["0", "1"]
    raw = path.read_bytes()
    assert not raw.endswith(b"\n")  # the torn third record
    intact = raw[: raw.rindex(b"\n") + 1]
    with pytest.warns(TrackerFileWarning, match="torn last line"):
        recs = read_records(path)
    assert [r.step for r in recs] == [0, 1]
    with pytest.warns(TrackerFileWarning, match="cutting off"):
        tr = SpectrumTracker(path, run="r", **FAST)
    assert path.read_bytes() == intact  # cut back to the last complete record
    tr.record(2, hessian_like(400), grad_vec(400), loss=1 / 3)
    recs = read_records(path)  # no warning: the file is intact again
    assert [r.step for r in recs] == [0, 1, 2]
    assert path.read_bytes().startswith(intact)


def test_torn_partial_line_written_by_hand(tmp_path, op):
    path = tmp_path / "s.jsonl"
    tr = SpectrumTracker(path, k=2, num_probes=1, num_steps=10)
    tr.record(0, op)
    good = path.read_bytes()
    line = json.dumps(tr.record(1, op).to_json())
    # a complete-looking line that is not valid JSON, with its newline, is torn too
    path.write_bytes(good + line[:40].encode() + b"\n")
    with pytest.warns(TrackerFileWarning, match="not valid JSON"):
        assert [r.step for r in read_records(path)] == [0]
    with pytest.warns(TrackerFileWarning):
        tr2 = SpectrumTracker(path, k=2, num_probes=1, num_steps=10)
    assert path.read_bytes() == good and tr2.due(1)


def test_damaged_middle_line_and_foreign_files_are_refused(tmp_path, op):
    path = tmp_path / "s.jsonl"
    tr = SpectrumTracker(path, k=2, num_probes=1, num_steps=10)
    tr.record(0, op)
    tr.record(1, op)
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:30]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(TrackerFileError, match="line 2 is damaged"):
        read_records(path)
    with pytest.raises(TrackerFileError, match="line 2 is damaged"):
        SpectrumTracker(path)
    other = tmp_path / "other.jsonl"
    other.write_text('{"hello": 1}\n')
    with pytest.raises(TrackerFileError, match="not a specdens tracker file"):
        read_records(other)
    old = tmp_path / "old.jsonl"
    old.write_text('{"format": "specdens.SpectrumTracker", "version": 99}\n')
    with pytest.raises(TrackerFileError, match="version 99"):
        read_records(old)
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert read_records(empty) == []


@pytest.mark.parametrize("content", [
    json.dumps({"accuracy": 0.97, "epochs": 30}).encode(),  # json.dump: no final newline
    b"important notes",
    b"hello\n",  # not JSON, with its newline
    b"[1, 2]\n",
], ids=["json-dump", "text", "text-newline", "json-list"])
def test_foreign_one_line_file_is_refused_and_left_unchanged(tmp_path, content):
    """A user's one-line file is not a torn tracker header: refused, never cut off."""
    path = tmp_path / "results.json"
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackerFileWarning)
        with pytest.raises(TrackerFileError, match="not a specdens tracker file"):
            SpectrumTracker(path, **FAST)
        with pytest.raises(TrackerFileError, match="not a specdens tracker file"):
            read_records(path)
    assert path.read_bytes() == content


def test_torn_header_is_cut_off_and_rewritten(tmp_path, op):
    """A prefix of a header line (a crash while creating the file) is still a torn
    header: cut off with a warning, and a fresh header written."""
    path = tmp_path / "s.jsonl"
    SpectrumTracker(path, **FAST)
    header = path.read_bytes()
    for cut in (5, 40, len(header) - 1):
        path.write_bytes(header[:cut])
        with pytest.warns(TrackerFileWarning, match="torn last line"):
            assert read_records(path) == [] and read_header(path) is None
        with pytest.warns(TrackerFileWarning, match="cutting off"):
            tr = SpectrumTracker(path, **FAST)
        assert read_header(path)["format"] == "specdens.SpectrumTracker"
        assert tr.due(0)


def test_meta_of_another_experiment_is_refused(tmp_path, op):
    path = tmp_path / "s.jsonl"
    SpectrumTracker(path, meta={"lr": 0.1, "width": 64}, **FAST)
    SpectrumTracker(path, meta={"lr": 0.1, "width": 64}, **FAST)  # same: continues
    SpectrumTracker(path, **FAST)  # no meta: no check
    with pytest.raises(ValueError, match=r"lr: 0.1 in the file, 0.2 now"):
        SpectrumTracker(path, meta={"lr": 0.2, "width": 64}, **FAST)


@pytest.mark.parametrize("change, key", [
    ({"k": 4}, "k"), ({"which": "SA"}, "which"), ({"num_steps": 30}, "num_steps"),
    ({"num_probes": 3}, "num_probes"), ({"seed": 1}, "seed"), ({"reorth": "none"}, "reorth"),
    ({"eigsh_options": {"tol": 1e-6}}, "eigsh_options"),
    ({"outlier_options": {"tail": 0.05}}, "outlier_options"),
])
def test_tracker_settings_of_another_kind_are_refused(tmp_path, op, change, key):
    """A restart with other tracker settings would append records of another kind (before:
    only ``meta`` was compared). The settings are in the header and a mismatch raises, for
    any run; the same settings continue the file, also with another schedule or run."""
    path = tmp_path / "s.jsonl"
    tr = SpectrumTracker(path, run="a", meta={"lr": 0.1}, **FAST)
    tr.record(0, op, grad_vec(400))
    assert read_header(path)["settings"] == {
        "k": 3, "which": "LA", "num_steps": 25, "num_probes": 2, "seed": 0, "reorth": "full",
        "eigsh_options": {},
        "outlier_options": {"tail": 0.01, "gap": 0.5, "rtol": 1e-6, "negative_tol": 0.0}}
    before = path.read_bytes()
    again = SpectrumTracker(path, run="b", meta={"lr": 0.1}, steps=[5], **FAST)  # continues
    assert again.due(5) and again.recorded_steps == frozenset()
    with pytest.raises(ValueError, match=rf"other tracker settings \({key}: "):
        SpectrumTracker(path, run="a", meta={"lr": 0.1}, **{**FAST, **change})
    with pytest.raises(ValueError, match=rf"{key}: .* in the file, .* now"):
        SpectrumTracker(path, run="b", **{**FAST, **change})  # no meta: settings still checked
    assert path.read_bytes() == before


def test_tracker_settings_round_trip_and_old_files_open(tmp_path, op):
    """Settings JSON cannot hold (a dtype object) are stored as text and compare equal on
    reopening; a file whose header predates the settings is continued without a check."""
    path = tmp_path / "s.jsonl"
    opts = {"tol": 1e-10, "dtype": np.float64}
    SpectrumTracker(path, eigsh_options=opts, outlier_options={"tail": 0.02}, **FAST)
    assert read_header(path)["settings"]["eigsh_options"] == {"tol": 1e-10,
                                                              "dtype": "float64"}
    SpectrumTracker(path, eigsh_options=dict(opts), outlier_options={"tail": 0.02}, **FAST)
    # the same settings spelled differently continue the file: a dtype as a class, an
    # object or a name; an option left at None (the default); the outlier rule's defaults
    # written out; numpy integers
    for eigsh_options, outlier_options in (
            ({"tol": 1e-10, "dtype": "float64"}, {"tail": 0.02}),
            ({"tol": 1e-10, "dtype": np.dtype("float64"), "ncv": None},
             {"tail": 0.02, "gap": 0.5, "rtol": 1e-6})):
        SpectrumTracker(path, eigsh_options=eigsh_options, outlier_options=outlier_options,
                        **{**FAST, "seed": np.int64(FAST.get("seed", 0))})
    old = tmp_path / "old.jsonl"
    SpectrumTracker(old, run="a", **FAST).record(0, op, grad_vec(400))
    lines = old.read_text().splitlines()
    header = json.loads(lines[0])
    del header["settings"]
    old.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    tr = SpectrumTracker(old, run="a", **{**FAST, "k": 5})  # no settings stored: no check
    assert tr.recorded_steps == frozenset({0})


def test_schedule_due_and_duplicates(tmp_path, op):
    assert log_spaced_steps(1024, 12) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert log_spaced_steps(3, 10) == [0, 1, 2, 3]
    assert log_spaced_steps(0, 5) == [0]
    path = tmp_path / "s.jsonl"
    tr = SpectrumTracker(path, run="a", steps=[0, 2, 5], k=2, num_probes=1, num_steps=10)
    calls = []

    def factory():
        calls.append(1)
        return op, grad_vec(400)

    got = [tr.maybe_record(s, factory, loss=lambda: 1.0) for s in range(7)]
    assert [r.step for r in got if r is not None] == [0, 2, 5] and len(calls) == 3
    assert got[2].loss == 1.0 and got[2].concentration is not None
    t3 = SpectrumTracker(tmp_path / "t.jsonl", steps=[0], k=2, num_probes=1, num_steps=10)
    with pytest.raises(ValueError, match="length 3"):
        t3.maybe_record(0, lambda: (op, None, None))
    with pytest.raises(TypeError, match="factory"):
        t3.maybe_record(0, op)
    assert t3.maybe_record(0, lambda: op).concentration is None  # an operator alone
    assert not tr.due(2) and not tr.due(3)
    with pytest.raises(ValueError, match="already in"):
        tr.record(2, op)
    tr.record(2, op, loss=9.0, replace=True)
    recs = read_records(path)
    assert [r.step for r in recs] == [0, 5, 2] and recs[-1].loss == 9.0
    assert len(read_records(path, latest=False)) == 4
    # another run in the same file keeps its own schedule
    tb = SpectrumTracker(path, run="b", steps=[0], k=2, num_probes=1, num_steps=10)
    assert tb.due(0)
    tb.record(0, op)
    assert [r.run for r in read_records(path, run="b")] == ["b"]
    steps, conc = series(read_records(path), "concentration", run="a")
    assert steps.tolist() == [0, 2, 5] and np.isnan(conc[1]) and np.isfinite(conc[0])


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"run": ""}, ValueError, "run"),
        ({"steps": "0,1"}, TypeError, "iterable"),
        ({"steps": [0, -1]}, ValueError, ">= 0"),
        ({"which": "BE"}, ValueError, "which"),
        ({"k": 0, "num_probes": 0}, ValueError, "nothing to record"),
        ({"eigsh_options": {"v0": 1}}, ValueError, "eigsh_options"),
        ({"outlier_options": {"side": "upper"}}, ValueError, "outlier_options"),
    ],
)
def test_bad_settings(tmp_path, kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        SpectrumTracker(tmp_path / "s.jsonl", **kwargs)


def test_operator_nan_raises_and_writes_nothing(tmp_path):
    path = tmp_path / "s.jsonl"
    tr = SpectrumTracker(path, k=2, num_probes=1, num_steps=5)
    A = np.diag(np.arange(1.0, 21.0))
    A[3, 3] = np.nan
    size = path.stat().st_size
    with pytest.raises(FloatingPointError):
        tr.record(0, A)
    assert path.stat().st_size == size and tr.due(0)
    with pytest.raises(TypeError, match="extra"):
        tr.record(0, np.eye(20), extra=[1])
    with pytest.raises(TypeError, match="loss"):
        tr.record(0, np.diag(np.arange(20.0)), loss="low")


# -- the PyTorch hook ------------------------------------------------------------------------
torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small products: one thread is fastest (threads mostly wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_net():
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data[:300] / 16.0, dtype=torch.float64)
    y = torch.tensor(d.target[:300])
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.ReLU(), torch.nn.Linear(6, 10)).double()
    return model, torch.nn.CrossEntropyLoss(), X, y


def test_torch_hook_records_and_leaves_the_model_unchanged(tmp_path):
    from specdens.backends.torch import ModelState, gradient, hessian
    from specdens.backends.torch.tracking import evaluate, track

    model, crit, X, y = small_net()
    model.train()
    crit(model(X), y).backward()  # a .grad field and updated running stats to preserve
    batches = [(X[:100], y[:100]), (X[100:], y[100:])]
    tr = SpectrumTracker(tmp_path / "s.jsonl", steps=[0, 5], num_steps=20, num_probes=2, k=3)
    before = ModelState.capture(model)
    assert track(tr, model, crit, None, step=1) is None  # not due: nothing built
    rec = track(tr, model, crit, batches, step=0, batchnorm="population", weight_decay=1e-3,
                extra={"note": "x"})
    assert before.differences(model) == []
    # loss and accuracy of the data, weighted by batch size, with running statistics
    model.eval()
    with torch.no_grad():
        out = model(X)
        loss = float(crit(out, y))
        acc = float((out.argmax(1) == y).double().mean())
    before.restore(model)
    assert rec.loss == pytest.approx(loss, rel=1e-13)
    assert rec.accuracy == pytest.approx(acc, abs=1e-15)
    assert evaluate(model, crit, batches, batchnorm="population", accuracy=False)[1] is None
    # the concentration is that of the backend's Hessian and gradient at this point
    H = hessian(model, crit, batches, batchnorm="population", weight_decay=1e-3)
    g = gradient(model, crit, batches, batchnorm="population", weight_decay=1e-3)
    ref = gradient_concentration(H, g, 3)
    assert rec.concentration.fraction == pytest.approx(ref.fraction, abs=1e-10)
    np.testing.assert_allclose(rec.eigenvalues, ref.eigenvalues, rtol=1e-10)
    assert rec.extra == {"note": "x"} and rec.density.n == H.shape[0]
    assert before.differences(model) == []
    with pytest.raises(TypeError, match="SpectrumTracker"):
        track(object(), model, crit, batches, step=5)


def test_k_not_below_n_is_refused_before_any_product(tmp_path):
    """k >= n cannot be computed by eigsh: refused at once, not after the SLQ pass had
    spent its products."""
    calls = []

    def matvec(v):
        calls.append(1)
        return 2.0 * v

    from specdens import aslinearoperator

    op = aslinearoperator(matvec, shape=(3, 3), dtype="float64")
    tr = SpectrumTracker(tmp_path / "s.jsonl", k=3, num_steps=3, num_probes=1)
    with pytest.raises(ValueError, match="k=3 .* n=3"):
        tr.record(0, op)
    assert calls == []


def test_inf_edge_ratio_and_probe_seeds_round_trip(tmp_path):
    """A low-rank positive semi-definite matrix (a GGN's shape) has its bulk edge at 0 to
    rounding: its edge ratio is inf, which the record keeps apart from NaN (it was written
    as null and read back as NaN). A density concatenated from two seeds keeps each
    probe's seed through a record, so repeats are still refused after reading it back."""
    from specdens.tracker import _density_from_json, _density_to_json

    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.standard_normal((60, 3)))[0]
    A = (U * np.array([5.0, 3.0, 2.0])) @ U.T
    path = tmp_path / "s.jsonl"
    rec = SpectrumTracker(path, k=2, num_steps=10, num_probes=2).record(0, A)
    assert rec.stats.edge_ratio == np.inf
    (back,) = read_records(path)
    assert back.stats.edge_ratio == np.inf
    d = specdens.SpectralDensity.concatenate([specdens.slq(A, num_steps=5, seed=1),
                                              specdens.slq(A, num_steps=5, seed=2)])
    again = _density_from_json(json.loads(json.dumps(_density_to_json(d))))
    assert again.probe_seeds == d.probe_seeds == (1, 2)
    with pytest.raises(ValueError, match="probe 0 of seed 2 twice"):
        specdens.SpectralDensity.concatenate([again, specdens.slq(A, num_steps=5, seed=2)])
