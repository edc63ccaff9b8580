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
