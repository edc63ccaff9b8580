"""Helpers shared by the benchmark scripts (not part of the specdens package).

numpy, jax and specdens are imported inside the functions, so that a script can call
:func:`set_threads` first: BLAS and XLA read their thread settings at import time.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
from collections.abc import Sequence
from typing import Any


def set_threads(threads: int | None) -> None:
    """Limit BLAS and XLA threads (call before numpy/jax are imported to take effect)."""
    if not threads:
        return
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()


def hessian_like_diagonal(n: int, seed: int = 0) -> Any:
    """A float64 spectrum shaped like a trained network's Hessian.

    A bulk of tiny eigenvalues of both signs (97 %), a tail of small positive ones
    (3 %, log-normal) and ten outliers between 10 and 100 (the "class" outliers).
    Built in place so that peak memory stays at about two vectors of size ``n``.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    d = rng.standard_normal(n)
    d *= 1e-3
    tail = rng.random(n) < 0.03
    d[tail] = np.exp(rng.normal(-3.0, 1.0, int(tail.sum())))
    del tail
    k = min(10, n)
    d[rng.choice(n, size=k, replace=False)] = np.geomspace(10.0, 100.0, k)
    return d


def rademacher_probe(n: int, seed: int = 0) -> Any:
    """A unit Rademacher vector (float64 numpy), the start vector every competitor gets."""
    import numpy as np

    v = np.where(np.random.default_rng(seed).random(n) < 0.5, -1.0, 1.0)
    v /= np.sqrt(n)
    return v


def diagonal_operator(d: Any) -> Any:
    """``A = diag(d)`` as a specdens operator on numpy vectors: the cheapest product.

    A subclass of :class:`specdens.LinearOperatorBase` whose ``_matmat`` multiplies the
    ``(n, k)`` block by ``d[:, None]``.
    """
    import array_api_compat.numpy as npx

    import specdens

    class DiagonalOperator(specdens.LinearOperatorBase):
        def __init__(self, d: Any):
            super().__init__((d.size, d.size), d.dtype, npx, "cpu")
            self.d = d
            self.symmetric = True

        def _matvec(self, v: Any) -> Any:
            return self.d * v

        def _matmat(self, V: Any) -> Any:
            return self.d[:, None] * V

    return DiagonalOperator(d)


def count_matvecs(op: Any) -> list[int]:
    """Count ``op.matvec`` calls from now on (this instance only): ``count[0]`` grows by
    one per call of the returned list."""
    count = [0]
    matvec = op.matvec

    def counted(v: Any) -> Any:
        count[0] += 1
        return matvec(v)

    op.matvec = counted
    return count


def available_bytes() -> int:
    """Free host memory in bytes: what the engine's ``reorth="auto"`` budget halves."""
    from specdens._memory import host_available_bytes

    return host_available_bytes()


def proc_status_bytes(field: str) -> int | None:
    """``VmHWM``/``VmRSS`` of this process from /proc/self/status, in bytes."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (VmHWM, else ru_maxrss)."""
    hwm = proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def gib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**30:.2f}"


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def environment_line() -> str:
    """One line describing the machine and the libraries, printed above each table."""
    import numpy as np

    import specdens

    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    return (
        f"python {platform.python_version()}, numpy {np.__version__}, specdens "
        f"{specdens.__version__}, {os.cpu_count()} CPUs, BLAS threads: "
        f"{threads or 'library default'}, load average at start: {loadavg()}"
    )
