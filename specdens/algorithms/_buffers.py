"""The ``(k, n)`` arrays of a Lanczos step, reused from step to step with numpy and torch.

A fresh ``(k, n)`` array per step costs its pages again whenever the allocator has given
them back to the system, and converting copies make transposed layouts that later
operations read slowly. With these buffers the engine's own ``(k, n)`` arrays are made
in its first two steps, and every conversion is a copy into a row-major buffer (numpy
still makes a temporary in each of its two scaled-row updates, ``w -= c * x``, which it
cannot fuse). Engine alone, 90 steps of full reorthogonalisation at n = 1.1e6 (float32
operator, float64 vectors, float32 basis, two threads; development machine, medians of
alternating runs): torch 11.8 -> 10.9 ms per step with one probe and 78 -> 45 ms with
four; numpy 13.4 -> 12.9 and 74 -> 64 ms.

* the new vector ``w`` is written into the buffer of the vector of two steps ago;
* the product's input is the basis row itself when the operator's dtype is the basis's,
  else a buffer of the operator's dtype;
* ``w`` in the basis's dtype (for the projection) and the combination share one buffer.

Other libraries (JAX, TensorFlow, array-api-strict) make new arrays as before.

So the vectors an operator is given are memory the engine writes again later (as scipy's
ARPACK-based ``eigsh`` does with its workspace): an operator must neither change its input
nor keep it past the call. The first product is checked for the first (where reading the
values back is free).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from specdens import _array

# the libraries whose arrays the engine writes into
LIBRARIES = ("numpy", "torch")


class StepBuffers:
    """Buffers for one block of ``k`` probes of length ``n``.

    Parameters
    ----------
    xp
        The operator's array namespace.
    k, n
        Probes and vector length.
    wdt, bdt, op_dtype
        Working, basis and operator dtypes.
    device
        Where to make the buffers.
    prev_owned
        Whether the ``q_prev`` the block starts from is the engine's own to overwrite (its
        zero vector at a block's start). The start block ``q`` never is: a block may be
        rerun from it.
    host
        Whether reading values back is free (host memory, synchronous): then the first
        product is checked for writes into its input.
    """

    def __init__(self, xp: Any, k: int, n: int, wdt: Any, bdt: Any, op_dtype: Any,
                 device: Any, *, prev_owned: bool, host: bool = False) -> None:
        self.xp = xp
        self.enabled = _array.library_name(xp) in LIBRARIES
        self._host = host
        self._shape = (k, n)
        self._wdt, self._bdt, self._op_dtype = wdt, bdt, op_dtype
        self._device = device
        self._same_basis = _array.dtype_name(wdt) == _array.dtype_name(bdt)
        self._op_is_basis = _array.dtype_name(op_dtype) == _array.dtype_name(bdt)
        self._op_is_work = _array.dtype_name(op_dtype) == _array.dtype_name(wdt)
        self._spare: Any = None
        self._prev_owned = self.enabled and prev_owned
        self._q_owned = False
        self._op_buf: Any = None
        self._basis_buf: Any = None
        self._converted: Any = None

    # ------------------------------------------------------------------ product input

    def write_basis_row(self, Q: Any, slot: int, q: Any) -> Any:
        """``Q[:, slot] = q`` in the basis's dtype; returns ``Q``."""
        if self.enabled or self._same_basis:
            row = q  # (numpy and torch convert while copying)
        else:
            # (kept: the product's input when the operator's dtype is the basis's)
            row = self._converted = self.xp.astype(q, self._bdt)
        return _array.set_rows(Q, (slice(None), slot, slice(None)), row)

    def product_input(self, q: Any, Q: Any, slot: int | None) -> Any:
        """``q`` in the operator's dtype, as ``(k, n)`` rows; after :meth:`write_basis_row`
        for ``slot`` when there is a basis."""
        xp = self.xp
        if self._op_is_work:
            return q
        if Q is not None and self._op_is_basis:
            # (a float32 model's float32 basis row is the product's input: one conversion)
            return Q[:, slot, :] if self.enabled else self._converted
        if not self.enabled:
            return xp.astype(q, self._op_dtype)
        if self._op_buf is None:
            self._op_buf = xp.empty(self._shape, dtype=self._op_dtype, device=self._device)
        return _copy_into(self._op_buf, q)

    def snapshot(self, q_op: Any) -> Any:
        """A copy of the product's input to check the operator against, where the engine
        reuses that memory and reading it back is free (else ``None``)."""
        if not (self.enabled and self._host):
            return None
        return self.xp.asarray(q_op, copy=True)

    def check_unchanged(self, q_op: Any, before: Any) -> None:
        """Raise if the operator wrote into its input, or (``FloatingPointError``) if that
        input was not finite to begin with: NaN compares unequal to itself, so such an
        input would otherwise read as changed, and it is not the operator's fault."""
        if not bool(self.xp.all(self.xp.isfinite(before))):
            raise FloatingPointError(
                "the vectors given to the operator have NaN or Inf entries before the "
                "product (the start vectors or a restored state, not the operator's output)")
        if not bool(self.xp.all(q_op == before)):
            raise ValueError(
                "the operator changed the vectors it was given: specdens reuses their memory "
                "(as scipy's eigsh does), so an operator must neither write into its input "
                "nor keep it past the call; copy it inside matvec/matmat if you need to "
                "(v = v.copy(), or v.clone() for torch)")

    # ------------------------------------------------------------------ new vector

    def new_vector(self, rows: Any) -> Any:
        """``w``, the product's rows in the working dtype: a row-major array of the
        engine's own, sharing no memory with ``rows`` (the operator's array, which may be
        an output buffer it reuses, or its input)."""
        xp = self.xp
        if not self.enabled:
            w = _array.row_major(xp.astype(rows, self._wdt, copy=False))
            if _array.shares_memory(w, rows):
                w = _array.row_major(xp.asarray(w, copy=True))
            return w
        dst, self._spare = self._spare, None
        if dst is None or _array.shares_memory(dst, rows):
            dst = xp.empty(self._shape, dtype=self._wdt, device=self._device)
        # (a converting copy of the transposed block: 0.3 ms at k = 2, n = 1.1e6, where
        # torch's astype keeps the transposed layout and making it row-major takes 4.6 ms;
        # a transposed (n, 1) column is re-viewed first: from its (1, 1) strides a float32
        # copy took 3.6 ms against 0.05 ms)
        return _copy_into(dst, _array.standard_strides(rows))

    def in_basis_dtype(self, w: Any) -> Any:
        """``w`` in the basis's dtype (for the projection): ``w`` itself when that is its
        dtype, else a copy in a buffer that :meth:`scratch` shares."""
        if self._same_basis:
            return w
        if not self.enabled:
            return self.xp.astype(w, self._bdt)
        if self._basis_buf is None:
            self._basis_buf = self.xp.empty(self._shape, dtype=self._bdt, device=self._device)
        return _copy_into(self._basis_buf, w)

    @property
    def scratch(self) -> Any:
        """A ``(k, n)`` buffer of the basis's dtype for the combination, which may
        overwrite :meth:`in_basis_dtype`'s copy once the projection has read it; ``None``
        where none is needed (torch subtracts a combination in its own dtype in place)
        or kept (other libraries)."""
        if not self.enabled or (self._same_basis and _array.library_name(self.xp) == "torch"):
            return None
        if self._basis_buf is None:
            self._basis_buf = self.xp.empty(self._shape, dtype=self._bdt, device=self._device)
        return self._basis_buf

    def retire(self, q_prev: Any) -> None:
        """The step is over: ``q_prev`` (the vector of the step before) is no longer used,
        and ``w`` becomes ``q``. Call before rebinding ``q_prev, q = q, w``."""
        if self._prev_owned:
            self._spare = q_prev
        self._prev_owned, self._q_owned = self._q_owned, self.enabled


def _copy_into(dst: Any, src: Any) -> Any:
    """``dst[...] = src`` (converting the dtype) for numpy and torch; returns ``dst``."""
    if isinstance(dst, np.ndarray):
        np.copyto(dst, src, casting="same_kind")
        return dst
    return dst.copy_(src)
