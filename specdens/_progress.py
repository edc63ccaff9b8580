"""A dependency-free progress bar on stderr that appears only on runs longer than a few seconds."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

ProgressCallback = Callable[[int, int], None]


class ProgressBar:
    """Call with ``(done, total)``; draws nothing until ``delay`` seconds have passed."""

    def __init__(self, desc: str = "lanczos", *, delay: float = 2.0, stream: Any = None,
                 width: int = 30):
        self.desc, self.delay, self.width = desc, delay, width
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.shown = False
        self.finished = False

    def __call__(self, done: int, total: int) -> None:
        if self.finished:
            return
        self.finished = done >= total
        elapsed = time.perf_counter() - self.start
        if elapsed < self.delay and done < total:
            return
        if not self.shown and done >= total and elapsed < self.delay:
            return
        self.shown = True
        frac = done / total if total else 1.0
        filled = int(round(self.width * frac))
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        self.stream.write(
            f"\r{self.desc} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} "
            f"{elapsed:5.1f}s elapsed, {eta:5.1f}s left"
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
