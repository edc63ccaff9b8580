"""The two products of full reorthogonalisation with the Lanczos basis, which dominate the
engine's own time: the projection ``h = Q w`` and the combination ``Q^T h``.

Both read the whole filled basis (``(k, j, n)``) once, so they are memory-bound; each
library gets the call that reads memory fastest.

* numpy and others: a batched matrix-vector product over the ``k`` probes.
* torch, on any device: ``(k, 1, n) @ (k, n, j)`` for the projection. Its CPU batched
  matmul runs ``(k, j, n) @ (k, n, 1)`` through a kernel that reads memory 5x slower (9.4
  ms against 1.7 ms at n = 3e5, j = 40, k = 2).
* torch on the CPU with several threads: MKL's matrix-vector product uses one thread (32
  GB/s at n = 1.1e6 with one thread or two on the development machine). Split along
  ``n`` into one chunk per thread, as a batch of chunks (a strided view, no copy), the
  batched matmul runs the chunks in parallel: 66 GB/s for the projection and 61 GB/s for
  the combination with two threads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from specdens import _array

# below this many basis entries (of one probe) per chunk, splitting costs more than it
# saves
_MIN_CHUNK = 1 << 16


def project(xp: Any, Qs: Any, w: Any) -> Any:
    """``h[p] = Qs[p] @ w[p]``: the coefficients of each row of ``w`` (``(k, n)``) on its
    probe's basis ``Qs`` (``(k, j, n)``), as a ``(k, j)`` array."""
    if _array.library_name(xp) != "torch":
        return xp.matmul(Qs, w[:, :, None])[:, :, 0]
    chunks = _torch_chunks(Qs)
    if chunks == 1:
        return xp.matmul(w[:, None, :], xp.matrix_transpose(Qs))[:, 0, :]
    import torch

    n = Qs.shape[-1]
    main = n - n % chunks
    rows = []
    for p in range(Qs.shape[0]):
        Qc = _chunked(Qs[p], chunks, main)
        wc = w[p, :main].view(chunks, 1, main // chunks)
        h = torch.matmul(wc, Qc.mT).sum(0)[0]
        if main < n:
            h = h + Qs[p, :, main:] @ w[p, main:]
        rows.append(h)
    return torch.stack(rows)


def combine(xp: Any, h: Any, Qs: Any, *, out: Any = None) -> Any:
    """``c[p] = h[p] @ Qs[p]``: the combination of each probe's basis rows with
    coefficients ``h`` (``(k, j)``), as a ``(k, n)`` array (written into ``out``, a
    C-contiguous ``(k, n)`` array of the basis's dtype, with numpy and torch)."""
    if _array.library_name(xp) != "torch":
        if out is not None and isinstance(out, np.ndarray):
            np.matmul(h[:, None, :], Qs, out=out[:, None, :])
            return out
        return xp.matmul(h[:, None, :], Qs)[:, 0, :]
    import torch

    k, j, n = Qs.shape
    if out is None:
        out = torch.empty((k, n), dtype=Qs.dtype, device=Qs.device)
    return _torch_combination(h, Qs, out, subtract=False)


def subtract_combination(xp: Any, w: Any, h: Any, Qs: Any, *, scratch: Any = None) -> Any:
    """``w[p] - h[p] @ Qs[p]``: each row of ``w`` (``(k, n)``, the caller's own array) less
    the combination of its probe's basis rows with coefficients ``h`` (``(k, j)``),
    returned, in ``w``'s dtype.

    torch with ``w`` and the basis in one dtype subtracts in place (``baddbmm_``, per
    chunk on the CPU): no ``(k, n)`` temporary, whose fresh pages cost a third of the
    combination itself at n = 1.1e6, and no separate subtraction pass. Otherwise the
    combination is written into ``scratch`` (a C-contiguous ``(k, n)`` numpy or torch
    array of the basis's dtype that may be overwritten) when one is given.
    """
    if _array.library_name(xp) != "torch" or w.dtype != Qs.dtype:
        return _array.subtract_rows(w, combine(xp, h, Qs, out=scratch))
    return _torch_combination(h, Qs, w, subtract=True)


def _torch_combination(h: Any, Qs: Any, out: Any, *, subtract: bool) -> Any:
    """``out = h @ Qs`` per probe, or ``out -= h @ Qs`` with ``subtract`` (in place,
    ``baddbmm_``), chunked along ``n`` on the CPU (see :func:`_torch_chunks`)."""
    import torch

    def into(o: Any, hh: Any, Q: Any) -> None:
        if subtract:
            o.baddbmm_(hh, Q, alpha=-1)
        else:
            torch.matmul(hh, Q, out=o)

    k, j, n = Qs.shape
    chunks = _torch_chunks(Qs)
    if chunks == 1:
        into(out[:, None, :], h[:, None, :], Qs)
        return out
    main = n - n % chunks
    for p in range(k):
        into(out[p, :main].view(chunks, 1, main // chunks),
             h[p].expand(chunks, j)[:, None, :], _chunked(Qs[p], chunks, main))
        if main < n:
            rest = h[p] @ Qs[p, :, main:]
            if subtract:
                out[p, main:] -= rest
            else:
                out[p, main:] = rest
    return out


def _chunked(Q: Any, chunks: int, main: int) -> Any:
    """The first ``main`` columns of one probe's ``(j, n)`` basis as ``chunks`` blocks of
    ``(j, main // chunks)``: a strided view, no copy."""
    return Q[:, :main].unflatten(-1, (chunks, main // chunks)).transpose(0, 1)


def _torch_chunks(Qs: Any) -> int:
    """How many chunks of ``n`` to split a torch basis into: one per thread on the CPU
    when each is large enough, else 1 (and always 1 off the CPU)."""
    if Qs.device.type != "cpu":
        return 1
    import torch

    threads = torch.get_num_threads()
    if threads < 2:
        return 1
    return max(1, min(threads, Qs.shape[1] * Qs.shape[2] // _MIN_CHUNK))
