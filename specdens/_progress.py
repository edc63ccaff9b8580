"""A dependency-free progress bar on stderr that appears only on runs longer than a few seconds."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

ProgressCallback = Callable[[int, int], None]


class ProgressBar:
    """Call with ``(done, total)``; draws nothing until ``delay`` seconds have passed.

    The time left is estimated from the work done in this session only: the rate is
    measured from the first call on (its ``done``, a run resumed from a checkpoint
    starts past 0, and its time), so that steps restored from a checkpoint do not count
    as if they had taken time here, and nor does the setup before the first step. A
    ``done`` below an earlier one is work done again (a block rerun): the bar goes back,
    says "again", adds no progress for the backward jump and keeps counting the rerun's
    steps as work (they take time like any other), so the rate stays that of the steps
    actually made and the time left is that of the ``total - done`` steps still ahead.
    """

    def __init__(self, desc: str = "lanczos", *, delay: float = 2.0, stream: Any = None,
                 width: int = 30):
        self.desc, self.delay, self.width = desc, delay, width
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.shown = False
        self.finished = False
        self._first: float | None = None  # time of the first call
        self._last = 0                    # the previous call's done
        self._high = 0                    # the largest done so far
        self._work = 0                    # steps made since the first call

    def __call__(self, done: int, total: int) -> None:
        if self.finished:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first, self._last, self._high = now, done, done
        elif done >= self._last:
            self._work += done - self._last
        else:  # a step of work done again: counts as one step made
            self._work += 1
        self._last = done
        self._high = max(self._high, done)
        self.finished = done >= total
        elapsed = now - self.start
        if elapsed < self.delay and done < total:
            return
        if not self.shown and done >= total and elapsed < self.delay:
            return
        self.shown = True
        frac = done / total if total else 1.0
        filled = int(round(self.width * min(max(frac, 0.0), 1.0)))
        spent = now - self._first
        if done >= total:
            left = "done"
        elif self._work > 0 and spent > 0:
            left = f"{(total - done) * spent / self._work:5.1f}s left"
        else:
            left = "  ?  s left"
        again = " (again)" if done < self._high else ""
        self.stream.write(
            f"\r{self.desc} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}"
            f"{again} {elapsed:5.1f}s elapsed, {left}"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def make_progress(progress: bool | ProgressCallback | None, desc: str) -> ProgressCallback | None:
    if progress is True:
        return ProgressBar(desc)
    if progress is False or progress is None:
        return None
    if callable(progress):
        return progress
    raise TypeError(f"progress must be True, False or a callable(done, total); got {progress!r}")
