"""The operator protocol every specdens algorithm accepts."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class LinearOperator(Protocol):
    """A square linear operator known through matrix-vector products.

    Required: ``shape`` (``(n, n)``), ``dtype`` and ``matvec(v)`` mapping a vector of
    shape ``(n,)`` to ``A @ v``. Optional: ``matmat(V)`` for a block ``V`` of shape
    ``(n, k)`` (the engine calls it once per Lanczos step for all probes), ``device``
    (where the vectors live) and ``rmatvec``. Vectors are arrays of any array-API
    library; the engine keeps them in that library and on that device.

    The engine reuses the memory of the vectors it passes (as scipy's ARPACK-based
    ``eigsh`` does): ``matvec`` and ``matmat`` must neither write into their input nor
    keep it, or a view of it, past the call (copy it if you need to). A write into the
    input is caught at the first product where reading it back is free (numpy, PyTorch
    on the CPU), by the Lanczos engine (``lanczos``, ``slq``) and by ``eigsh``.

    The algorithms of specdens assume the operator is symmetric; see
    ``lanczos(..., check_symmetry=True)`` for a cheap check.
    """

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> Any: ...

    def matvec(self, v: Any) -> Any: ...
