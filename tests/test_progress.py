"""The progress bar: silent on short runs, drawn once past its delay, finished once."""

from __future__ import annotations

import io

import numpy as np

import specdens
from specdens._progress import ProgressBar


def test_silent_on_short_runs():
    out = io.StringIO()
    bar = ProgressBar("lanczos", delay=60.0, stream=out)
    for i in range(1, 11):
        bar(i, 10)
    assert out.getvalue() == ""


def test_drawn_past_the_delay_and_finished_once():
    out = io.StringIO()
    bar = ProgressBar("lanczos", delay=0.0, stream=out)
    specdens.lanczos(np.diag(np.arange(1.0, 41.0)), 12, num_probes=2, progress=bar)
    text = out.getvalue()
    assert "lanczos [" in text and "12/12" in text  # steps of the one block of 2 probes
    assert text.count("\n") == 1 and text.endswith("\n")  # the final line once


class _Clock:
    """A clock the test moves: the progress bar's ``time.perf_counter``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def _left_at(text: str, done: int, total: int) -> str:
    """The "... left" field of the bar's line at ``done/total``."""
    line = next(seg for seg in text.split("\r") if f" {done}/{total}" in seg)
    return line.rsplit(", ", 1)[1].strip()


def test_time_left_counts_only_the_steps_made_in_this_session(monkeypatch):
    """A run resumed at 60 of 100 steps: 10 steps in 10 s leave 30 steps, 30 s (the
    restored 60 took no time here; the elapsed-over-fraction estimate said 4.3 s)."""
    import specdens._progress as progress_module

    clock = _Clock()
    monkeypatch.setattr(progress_module, "time", clock)
    out = io.StringIO()
    bar = ProgressBar("lanczos", delay=0.0, stream=out)
    clock.now += 1.0          # setup before the first step (not a step's time)
    for done in range(61, 71):  # restored 60; one step per second from here
        clock.now += 1.0
        bar(done, 100)
    assert _left_at(out.getvalue(), 70, 100) == "30.0s left"


def test_time_left_after_a_checkpoint_resume(tmp_path, monkeypatch):
    """End to end: a Lanczos run interrupted after its checkpoint at step 40 of 80 and
    resumed with a bar whose clock moves 1 s per product: at 50/80 the bar says 30 s
    left (30 steps of 1 s each), not the committed estimate's 6 s."""
    import specdens._progress as progress_module

    clock = _Clock()
    monkeypatch.setattr(progress_module, "time", clock)
    d = np.linspace(1.0, 10.0, 300)
    calls = {"n": 0, "limit": 43}

    def mv(v):
        calls["n"] += 1
        if calls["limit"] and calls["n"] > calls["limit"]:
            raise KeyboardInterrupt("simulated interruption")
        clock.now += 1.0
        return d * v

    op = specdens.aslinearoperator(mv, shape=(300, 300), dtype=np.float64, symmetric=True)
    ck = str(tmp_path / "ck")
    try:
        specdens.lanczos(op, 80, num_probes=1, seed=0, checkpoint=ck, checkpoint_every=10)
    except KeyboardInterrupt:
        pass
    else:  # pragma: no cover - the operator raises
        raise AssertionError("the first run was not interrupted")
    calls["limit"] = 0
    out = io.StringIO()
    bar = ProgressBar("lanczos", delay=0.0, stream=out)
    specdens.lanczos(op, 80, num_probes=1, seed=0, checkpoint=ck, checkpoint_every=10,
                     progress=bar)
    text = out.getvalue()
    assert " 41/80" in text  # resumed at the checkpoint of step 40
    assert _left_at(text, 50, 80) == "30.0s left"


def test_a_rerun_block_goes_back_and_keeps_a_sensible_estimate(monkeypatch):
    """Steps reported again (a block rerun from its start) show "(again)", the bar goes
    back to them, and the time left is that of the steps still ahead at the measured
    rate, not a negative or frozen figure."""
    import specdens._progress as progress_module

    clock = _Clock()
    monkeypatch.setattr(progress_module, "time", clock)
    out = io.StringIO()
    bar = ProgressBar("lanczos", delay=0.0, stream=out)
    for done in range(1, 11):   # the block, 1 s a step
        clock.now += 1.0
        bar(done, 20)
    for done in range(1, 6):    # the same block again
        clock.now += 1.0
        bar(done, 20)
    line = [seg for seg in out.getvalue().split("\r") if " 5/20" in seg][-1]
    assert "(again)" in line
    assert line.rsplit(", ", 1)[1].strip() == "15.0s left"  # 15 steps ahead, 1 s each
    for done in range(6, 21):
        clock.now += 1.0
        bar(done, 20)
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    assert "(again)" not in text.rsplit("\r", 1)[1]
