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
    so their rules are exact (the quadrature error is the run's rounding, not the last
    step difference); the record keeps the flags that say so."""
    ev = np.repeat([1.0, 2.0, 3.0, 4.0, 5.0], 20)
    path = tmp_path / "s.jsonl"
    rec = SpectrumTracker(path, k=2, num_steps=5, num_probes=2).record(0, np.diag(ev))
    (back,) = read_records(path)
    assert back.density.moments(10).value == pytest.approx(np.mean(ev**10), rel=1e-12)
    assert back.density.moments(10).quadrature_error == rec.density.moments(10).quadrature_error
    eps = np.finfo(float).eps
    rounding = 4 * eps * 5.0  # (PRODUCT_ROUNDINGS eps max|theta|)
    assert back.density.moments(10).quadrature_error <= 10 * 5.0**9 * rounding + 2 * eps * 5.0**10
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
        def half_then_die(p, line, **kw):
            # a crash in the middle of the write of the third record
            if tr.recorded_steps == {0, 1}:
                import os, signal
                fd = os.open(p, os.O_WRONLY | os.O_APPEND)
                os.write(fd, line.encode()[: len(line) // 2])
                os.fsync(fd)
                os.kill(os.getpid(), signal.SIGKILL)
            real(p, line, **kw)
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


def test_torn_line_from_a_crash_mid_write_is_ignored_then_terminated(tmp_path):
    """The torn line is never cut off (it could be the line of a writer still writing):
    the restarted tracker ends it with a newline, and readers skip it, naming it."""
    path = tmp_path / "s.jsonl"
    proc = _child(tmp_path, path, "torn")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert out.split() == ["0", "1"]
    raw = path.read_bytes()
    assert not raw.endswith(b"\n")  # the torn third record, line 4
    with pytest.warns(TrackerFileWarning, match="line 4 has no final newline"):
        recs = read_records(path)
    assert [r.step for r in recs] == [0, 1]
    with pytest.warns(TrackerFileWarning, match="terminating a torn last line"):
        tr = SpectrumTracker(path, run="r", **FAST)
    assert path.read_bytes() == raw + b"\n"  # nothing cut off
    assert tr.due(2)
    tr.record(2, hessian_like(400), grad_vec(400), loss=1 / 3)
    with pytest.warns(TrackerFileWarning, match=r"line 4 \(not valid JSON"):
        recs = read_records(path)
    assert [r.step for r in recs] == [0, 1, 2]
    assert path.read_bytes().startswith(raw + b"\n")


def test_torn_partial_line_written_by_hand(tmp_path, op):
    path = tmp_path / "s.jsonl"
    tr = SpectrumTracker(path, k=2, num_probes=1, num_steps=10)
    tr.record(0, op)
    good = path.read_bytes()
    line = json.dumps(tr.record(1, op).to_json())
    # a complete-looking line that is not valid JSON, with its newline, is torn too
    path.write_bytes(good + line[:40].encode() + b"\n")
    with pytest.warns(TrackerFileWarning, match=r"line 3 \(not valid JSON"):
        assert [r.step for r in read_records(path)] == [0]
    torn = path.read_bytes()
    tr2 = SpectrumTracker(path, k=2, num_probes=1, num_steps=10)  # ends with a newline
    assert path.read_bytes() == torn and tr2.due(1)
    tr2.record(1, op)
    with pytest.warns(TrackerFileWarning, match=r"line 3 \(not valid JSON"):
        assert [r.step for r in read_records(path)] == [0, 1]


def test_damaged_middle_line_is_skipped_and_foreign_files_are_refused(tmp_path, op):
    """A damaged line before the last can only be a torn write that a later writer ended
    with a newline: skipped with a warning naming it, the other records read."""
    path = tmp_path / "s.jsonl"
    tr = SpectrumTracker(path, k=2, num_probes=1, num_steps=10)
    tr.record(0, op)
    tr.record(1, op)
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:30]
    path.write_bytes(b"\n".join(lines))
    with pytest.warns(TrackerFileWarning, match=r"line 2 \(not valid JSON"):
        assert [r.step for r in read_records(path)] == [1]
    again = SpectrumTracker(path, k=2, num_probes=1, num_steps=10)
    assert again.recorded_steps == frozenset({1})
    not_a_record = tmp_path / "not_a_record.jsonl"
    not_a_record.write_bytes(b"\n".join([lines[0], b'{"type": "note"}', b""]))
    with pytest.raises(TrackerFileError, match="line 2 is not a valid record"):
        read_records(not_a_record)  # valid JSON is no torn write: still an error
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


def test_torn_header_is_terminated_and_rewritten(tmp_path, op):
    """A prefix of a header line (a crash while creating the file) is still a torn
    header: terminated with a warning (not cut off), and a fresh header written after it;
    readers skip the fragment. A header that only missed its newline is whole again."""
    path = tmp_path / "s.jsonl"
    SpectrumTracker(path, **FAST)
    header = path.read_bytes()
    for cut in (5, 40, len(header) - 1):
        path.write_bytes(header[:cut])
        with pytest.warns(TrackerFileWarning, match="line 1 has no final newline"):
            assert read_records(path) == [] and read_header(path) is None
        with pytest.warns(TrackerFileWarning, match="terminating a torn last line"):
            tr = SpectrumTracker(path, **FAST)
        raw = path.read_bytes()
        assert raw.startswith(header[:cut] + b"\n") and tr.due(0)
        if cut == len(header) - 1:
            assert raw == header
            assert read_records(path) == []
        else:
            with pytest.warns(TrackerFileWarning, match=r"line 1 \(not valid JSON"):
                assert read_records(path) == []
        tr.record(0, op)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TrackerFileWarning)
            assert read_header(path)["settings"] == tr.settings
            assert [r.step for r in read_records(path)] == [0]


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
        "outlier_options": {"tail": 0.01, "gap": 0.5, "rtol": 1e-6, "negative_tol": None}}
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


# -- shared files: torn lines of killed runs, locks, concurrent creation ----------------------
def _specdens_env() -> dict:
    """The environment of a child process that imports this specdens."""
    import os
    from pathlib import Path

    env = dict(os.environ)
    root = str(Path(specdens.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


SMALL = {"k": 2, "num_steps": 10, "num_probes": 1}
DIAG = np.diag(np.linspace(-1.0, 5.0, 40))

APPEND_CHILD = textwrap.dedent("""
    import sys, numpy as np
    from specdens.tracker import SpectrumTracker
    path, run, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tr = SpectrumTracker(path, run=run, k=2, num_steps=10, num_probes=1)
    tr.record(step, np.diag(np.linspace(-1.0, 5.0, 40)), loss=float(step))
    print("returned", flush=True)
""")


def test_torn_line_of_a_killed_run_does_not_swallow_another_runs_record(tmp_path):
    """Runs "a" and "b" share a file; "a" is killed in the middle of a write (its torn
    fragment written directly). The live run "b", another process, terminates the
    fragment before appending: its returned record stays readable, the fragment is
    skipped with a warning naming its line, and the restarted "a" continues the file
    without cutting anything off."""
    path = tmp_path / "shared.jsonl"
    a = SpectrumTracker(path, run="a", **SMALL)
    a.record(0, DIAG)
    SpectrumTracker(path, run="b", **SMALL).record(0, DIAG)
    fragment = b'{"type": "record", "run": "a", "step": 1, "ti'
    with open(path, "ab") as fh:
        fh.write(fragment)  # "a" killed mid-write: line 4 torn
    script = tmp_path / "append.py"
    script.write_text(APPEND_CHILD)
    for step in (1, 2):  # "b" is alive: two more records, each in a fresh process
        done = subprocess.run([sys.executable, str(script), str(path), "b", str(step)],
                              capture_output=True, text=True, env=_specdens_env(), timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["returned"]
    before = path.read_bytes()
    assert fragment + b"\n" in before  # terminated, its own (damaged) line
    with pytest.warns(TrackerFileWarning, match=r"line 4 \(not valid JSON") as caught:
        recs = read_records(path)
    assert len(caught) == 1
    assert [(r.run, r.step) for r in recs] == [("a", 0), ("b", 0), ("b", 1), ("b", 2)]
    assert [r.loss for r in recs[2:]] == [1.0, 2.0]
    restarted = SpectrumTracker(path, run="a", **SMALL)  # the shared file stays readable
    assert path.read_bytes() == before  # nothing cut off, nothing added
    assert restarted.due(1) and not restarted.due(0)
    restarted.record(1, DIAG)
    with pytest.warns(TrackerFileWarning, match="line 4"):
        assert [(r.run, r.step) for r in read_records(path, run="a")] == [("a", 0), ("a", 1)]


LOCK_HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    path, line = sys.argv[1], sys.argv[2].encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, line[:20])       # a writer in the middle of its line, holding the lock
    print("writing", flush=True)
    time.sleep(0.5)
    os.write(fd, line[20:] + b"\\n")
    os.fsync(fd)
    fcntl.flock(fd, fcntl.LOCK_UN)
""")


def test_reopening_never_cuts_the_line_of_a_writer_still_writing(tmp_path):
    """A writer (another process) is halfway through a line and holds the file's lock: a
    tracker opened on the file then waits for the lock instead of taking the half line
    for a crash's and cutting it off; the writer's record stays whole."""
    pytest.importorskip("fcntl")
    path = tmp_path / "s.jsonl"
    SpectrumTracker(path, run="a", **SMALL).record(0, DIAG)
    rec = json.loads(path.read_text().splitlines()[-1])
    line = json.dumps({**rec, "run": "w"})
    script = tmp_path / "holder.py"
    script.write_text(LOCK_HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(path), line],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        with warnings.catch_warnings():
            warnings.simplefilter("error", TrackerFileWarning)  # no torn line seen
            tr = SpectrumTracker(path, run="w", **SMALL)
            assert tr.recorded_steps == frozenset({0})  # the writer's line, whole
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackerFileWarning)
        assert [(r.run, r.step) for r in read_records(path)] == [("a", 0), ("w", 0)]


RACE_HELPER = textwrap.dedent("""
    import os, time
    from specdens.tracker import SpectrumTracker

    def create(folder, index, barrier, tries):
        real_open = os.open

        def slow_open(*args, **kwargs):
            # a slow file system: whatever a tracker checked before opening the file is
            # 50 ms old when it writes, so all the processes race on every try
            time.sleep(0.05)
            return real_open(*args, **kwargs)

        os.open = slow_open
        for t in range(tries):
            barrier.wait()
            SpectrumTracker(f"{folder}/{t}.jsonl", run=f"r{index}", k=1, num_probes=1,
                            num_steps=5)
""")


def test_trackers_created_at_once_write_one_header(tmp_path, monkeypatch):
    """Processes released together by a barrier create trackers on the same new paths:
    each file gets exactly one header (before: several did, on a slow file system at
    every try, and the file could never be read again)."""
    import multiprocessing as mp

    (tmp_path / "race_helper.py").write_text(RACE_HELPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    import race_helper

    folder = tmp_path / "files"
    folder.mkdir()
    procs, tries = 3, 6
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    workers = [ctx.Process(target=race_helper.create, args=(str(folder), i, barrier, tries))
               for i in range(procs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * procs
    for t in range(tries):
        path = folder / f"{t}.jsonl"
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b"" and len(lines) == 2, (t, lines)  # one header line
        assert read_header(path)["settings"]["k"] == 1 and read_records(path) == []
        SpectrumTracker(path, run="r0", k=1, num_probes=1, num_steps=5).record(0, DIAG)
        assert [r.step for r in read_records(path)] == [0]


def test_without_locks_the_tracker_still_works(tmp_path, monkeypatch):
    """Where there is no fcntl (Windows) the tracker goes on without locks: it still
    creates, continues and terminates a torn line (never cuts it off)."""
    import specdens._tracker_file as F

    monkeypatch.setattr(F, "_fcntl", None)
    path = tmp_path / "s.jsonl"
    SpectrumTracker(path, run="a", **SMALL).record(0, DIAG)
    with open(path, "ab") as fh:
        fh.write(b'{"type": "rec')
    with pytest.warns(TrackerFileWarning, match="terminating"):
        tr = SpectrumTracker(path, run="a", **SMALL)
    tr.record(1, DIAG)
    with pytest.warns(TrackerFileWarning, match=r"line 3 \(not valid JSON"):
        assert [r.step for r in read_records(path)] == [0, 1]
    # a header without records is not replaced (here without locks either)
    empty = tmp_path / "e.jsonl"
    SpectrumTracker(empty, **SMALL)
    with pytest.raises(ValueError, match="other tracker settings"):
        SpectrumTracker(empty, **{**SMALL, "k": 3})


# -- settings checked before the header is written -------------------------------------------
@pytest.mark.parametrize("kwargs, exc, needle", [
    ({"reorth": "ful"}, ValueError, r"reorth='ful'; choose one of full"),
    ({"seed": -3}, ValueError, r"seed must be a non-negative integer; got -3"),
    ({"seed": None}, ValueError, r"k > 0 .*seed=None"),
    ({"seed": 1.5}, TypeError, r"seed must be"),
    ({"outlier_options": {"tail": 5.0}}, ValueError, r"outlier_options\['tail'\]=5.0: tail"),
    ({"outlier_options": {"tail": "0.1"}}, TypeError, r"outlier_options\['tail'\] must be"),
    ({"outlier_options": {"gap": -1.0}}, ValueError, r"outlier_options\['gap'\]"),
    ({"outlier_options": {"rtol": 0.0}}, ValueError, r"outlier_options\['rtol'\]"),
    ({"outlier_options": {"negative_tol": -1.0}}, ValueError,
     r"outlier_options\['negative_tol'\]"),
    ({"eigsh_options": {"tol": -1.0}}, ValueError, r"eigsh_options: tol must be finite"),
    ({"eigsh_options": {"tol": "1e-6"}}, TypeError, r"eigsh_options: tol must be a real"),
    ({"eigsh_options": {"dtype": "float16"}}, TypeError, r"eigsh_options: dtype=float16"),
    ({"eigsh_options": {"ncv": 2}}, ValueError, r"eigsh_options: ncv=2 must be larger than k=3"),
    ({"eigsh_options": {"ncv": 0}}, ValueError, r"eigsh_options: ncv must be at least 1"),
    ({"eigsh_options": {"maxiter": -1}}, ValueError, r"eigsh_options: maxiter must be >= 0"),
    ({"eigsh_options": [("tol", 1e-6)]}, TypeError, r"eigsh_options must be a dict"),
])
def test_bad_settings_are_refused_before_the_header_is_written(tmp_path, kwargs, exc, needle):
    """A typo in a setting failed only at the first record (for ``tail``, after the whole
    computation), and its header then made the corrected tracker refuse the file."""
    path = tmp_path / "s.jsonl"
    with pytest.raises(exc, match=needle):
        SpectrumTracker(path, **{**FAST, **kwargs})
    assert not path.exists()
    SpectrumTracker(path, **FAST).record(0, DIAG)  # the corrected tracker
    assert [r.step for r in read_records(path)] == [0]


def test_seed_none_needs_no_eigsh(tmp_path):
    """seed=None (fresh probes at every step) is refused only where eigsh needs a seed."""
    tr = SpectrumTracker(tmp_path / "s.jsonl", k=0, num_steps=5, num_probes=1, seed=None)
    assert tr.record(0, DIAG).density.seed is None


def test_header_without_records_is_not_replaced_by_other_settings(tmp_path):
    """A header holding settings but no records yet (e.g. a typo written by an older
    specdens) is not replaced by a tracker with other settings (it was, with a warning):
    the error says the file holds no records yet and how to start over."""
    path = tmp_path / "s.jsonl"
    SpectrumTracker(path, meta={"lr": 0.1}, **SMALL)
    header = json.loads(path.read_text())
    header["settings"]["reorth"] = "ful"  # as an older specdens wrote it, unchecked
    path.write_text(json.dumps(header) + "\n")
    before = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"reorth: 'ful' in the file.*holds no records "
                           r"yet.*delete the file \(or pass another path\) to start over"):
            SpectrumTracker(path, **{**SMALL, "k": 3})
    assert path.read_bytes() == before
    path.unlink()  # starting over, as the error says
    SpectrumTracker(path, **{**SMALL, "k": 3}).record(0, DIAG)
    assert read_header(path)["settings"]["k"] == 3
    with pytest.raises(ValueError, match="was recorded with other tracker settings"):
        SpectrumTracker(path, **SMALL)  # records now


def test_other_settings_cannot_hijack_a_file_whose_first_record_is_computing(tmp_path):
    """Tracker A has written its header and computes its first record (hours for a
    Hessian); tracker B with other settings opens the same file. B replaced A's header
    and A then failed at its append, after all its work: B is refused, A keeps its file
    and records."""
    path = tmp_path / "s.jsonl"
    a = SpectrumTracker(path, run="long_run", **SMALL)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="other tracker settings.*holds no records yet"):
        SpectrumTracker(path, run="other", **{**SMALL, "k": 3})
    assert path.read_bytes() == before
    a.record(0, DIAG)
    assert read_header(path)["settings"] == a.settings
    assert [(r.run, r.step) for r in read_records(path)] == [("long_run", 0)]


def test_a_file_created_again_with_other_settings_is_not_appended_to(tmp_path):
    """When the file is removed (to start over) and created again by a tracker with
    other settings, a tracker that opened the old file refuses to append to the new one,
    writing nothing."""
    path = tmp_path / "s.jsonl"
    old = SpectrumTracker(path, **SMALL)
    path.unlink()
    new = SpectrumTracker(path, **{**SMALL, "k": 3})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="was replaced by another tracker's file.*k: 3"):
        old.record(0, DIAG)
    assert path.read_bytes() == before
    new.record(0, DIAG)


# -- top_eigenvalue ----------------------------------------------------------------------------
def test_top_eigenvalue_is_the_largest_eigenvalue_or_nan(tmp_path):
    """diag(-10, ..., 9): ``top_eigenvalue`` estimates 9 for every kind. The "SA" values
    (-10, -9, -8) say nothing about it: NaN without a density (it was -8), the density's
    largest Ritz value with one. "LM" values (-10, -9, 9) hold it: also in
    ``stats.largest`` (it was the density's Ritz value alone). When all "LM" values are
    negative the largest eigenvalue is not among them: NaN without a density."""
    A = np.diag(np.arange(-10.0, 10.0))
    recs = {}
    for which in ("SA", "LM", "LA"):
        for probes in (0, 1):
            path = tmp_path / f"{which}{probes}.jsonl"
            rec = SpectrumTracker(path, k=3, which=which, num_steps=3,
                                  num_probes=probes).record(0, A)
            (back,) = read_records(path)
            assert back.top_eigenvalue == rec.top_eigenvalue or (
                np.isnan(back.top_eigenvalue) and np.isnan(rec.top_eigenvalue))
            recs[which, probes] = rec
    assert np.isnan(recs["SA", 0].top_eigenvalue)
    assert np.isnan(series([recs["SA", 0]], "top_eigenvalue")[1][0])
    for which in ("LM", "LA"):
        rec = recs[which, 0]
        # a Ritz value is within its residual norm of an eigenvalue
        assert abs(rec.top_eigenvalue - 9.0) <= rec.eigenvalue_residuals.max()
    # 3 Lanczos steps leave the density's largest Ritz value well below 9
    ritz = recs["SA", 1].stats.largest
    assert ritz < 9.0 - 1.0 and recs["SA", 1].top_eigenvalue == ritz
    for which in ("LM", "LA"):
        rec = recs[which, 1]
        assert rec.stats.largest == rec.top_eigenvalue == rec.eigenvalues.max()
        assert rec.stats.num_top_above is not None
    negative = SpectrumTracker(tmp_path / "neg.jsonl", k=3, which="LM", num_steps=3,
                               num_probes=0).record(0, np.diag(np.arange(-10.0, 2.0)))
    assert negative.eigenvalues.max() < 0 and np.isnan(negative.top_eigenvalue)


# -- loss, accuracy and gradient checked before any product ----------------------------------
def test_bad_loss_accuracy_and_gradient_are_refused_before_any_product(tmp_path):
    from specdens import aslinearoperator

    calls = []

    def matvec(v):
        calls.append(1)
        return DIAG @ v

    op = aslinearoperator(matvec, shape=(40, 40), dtype="float64")
    path = tmp_path / "s.jsonl"
    tr = SpectrumTracker(path, k=2, num_steps=10, num_probes=2)
    size = path.stat().st_size
    for kwargs, exc, needle in [
        ({"loss": np.array([1.0, 2.0])}, TypeError, r"loss must be a number or an array"),
        ({"loss": "0.5"}, TypeError, r"loss must be a number; got the string '0.5'"),
        ({"loss": 1 + 2j}, TypeError, r"loss must be a real number"),
        ({"accuracy": [0.5]}, TypeError, r"accuracy must be a number"),
        ({"gradient": np.ones(39)}, ValueError, r"gradient: g must have shape \(40,\)"),
        ({"gradient": np.full(40, np.nan)}, ValueError, r"gradient: g has 40 NaN"),
    ]:
        with pytest.raises(exc, match=needle):
            tr.record(0, op, **kwargs)
        assert calls == [] and path.stat().st_size == size, kwargs
    wide = SpectrumTracker(tmp_path / "w.jsonl", k=2, num_steps=10, num_probes=2,
                           eigsh_options={"ncv": 41})
    with pytest.raises(ValueError, match=r"eigsh_options: ncv=41 must satisfy k < ncv <= n"):
        wide.record(0, op)
    assert calls == []
    ok = SpectrumTracker(tmp_path / "t.jsonl", **SMALL)
    rec = ok.record(0, op, np.ones(40), loss=np.array([0.25]), accuracy=np.float32(0.5))
    assert (rec.loss, rec.accuracy) == (0.25, 0.5) and rec.concentration is not None


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


def test_dtype_spellings_are_one_setting(tmp_path):
    """``eigsh_options={"dtype": torch.float64}`` was stored as 'torch.float64' and the
    same dtype spelled "float64" or numpy.float64 could not continue the file."""
    path = tmp_path / "s.jsonl"
    H = torch.diag(torch.linspace(-1, 5, 30, dtype=torch.float64))
    SpectrumTracker(path, eigsh_options={"dtype": torch.float64}, **SMALL).record(0, H)
    assert read_header(path)["settings"]["eigsh_options"] == {"dtype": "float64"}
    for spelling in ("float64", np.float64, np.dtype("float64"), torch.float64):
        tr = SpectrumTracker(path, eigsh_options={"dtype": spelling}, **SMALL)
        assert tr.recorded_steps == frozenset({0})
    with pytest.raises(ValueError, match="eigsh_options"):
        SpectrumTracker(path, eigsh_options={"dtype": torch.float32}, **SMALL)


def test_two_concatenated_record_files_are_refused(tmp_path):
    """Two files concatenated, the first one cut off mid-line: the torn line swallowed
    the second file's header and was skipped as torn, and the second file's records were
    read under the first one's header (replacing its steps). Both forms are refused."""
    A = np.diag(np.linspace(1.0, 2.0, 30))
    parts = []
    for i in (1, 2):
        path = tmp_path / f"t{i}.jsonl"
        tr = SpectrumTracker(path, num_steps=5, num_probes=1, k=0, meta={"exp": i})
        for step in (0, 1):
            tr.record(step, A * i)
        parts.append(path.read_bytes())
    for name, data in (("torn", parts[0][:-1] + parts[1]), ("whole", parts[0] + parts[1])):
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(data)
        with pytest.raises(TrackerFileError, match="second tracker header at line"):
            read_records(path)
        assert path.read_bytes() == data
