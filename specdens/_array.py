"""Array-library helpers: the small subset of the array API standard the engine uses.

The engine never imports an ML framework. It reaches the array library of an
operator through :func:`array_api_compat.array_namespace` and uses only:

``asarray, zeros, arange, astype, matmul, matrix_transpose, sum, sqrt, abs, max, maximum,
where, stack, concat, isfinite, reshape`` plus slicing, broadcasting, the arithmetic
operators and the ``float32``/``float64``/``bool`` dtypes. Writes into a preallocated
array go through :func:`set_rows`, which falls back to ``x.at[...].set(...)`` for
immutable arrays (JAX). TensorFlow, which array-api-compat does not cover, gets the same
subset from ``specdens.backends.tf._namespace``, imported only when a TensorFlow tensor
is seen (recognised by the module of its type, without importing TensorFlow).
"""

from __future__ import annotations

import sys
from typing import Any

import array_api_compat
import numpy as np

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")
"""Operator dtypes the engine accepts. Lanczos vectors are float32 or float64."""


def namespace(*arrays: Any) -> Any:
    """Array-API namespace of ``arrays``, with an error that names the libraries."""
    if arrays and all(_is_tensorflow(a) for a in arrays):
        return _tf_namespace()
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as exc:
        kinds = ", ".join(sorted({library_name(a) for a in arrays}))
        raise TypeError(
            f"cannot mix or use these array types together: {kinds} ({exc}). Pass arrays of one "
            "array library (numpy, torch, jax, cupy or any array-API library)."
        ) from None


def _is_tensorflow(x: Any) -> bool:
    """A TensorFlow tensor or variable, recognised without importing TensorFlow."""
    return type(x).__module__.startswith("tensorflow.") and hasattr(x, "dtype")


def _tf_namespace() -> Any:
    from specdens.backends.tf import _namespace

    return _namespace


def library_name(x: Any) -> str:
    """Short name of the library an array or namespace comes from (``numpy``, ``torch``...)."""
    mod = getattr(x, "__name__", None) if _is_module(x) else type(x).__module__
    mod = mod or ""
    for prefix, name in (
        ("array_api_compat.numpy", "numpy"),
        ("array_api_compat.torch", "torch"),
        ("array_api_compat.cupy", "cupy"),
        ("array_api_compat.dask", "dask"),
        ("array_api_strict", "array_api_strict"),
        ("jax", "jax"),
        ("jaxlib", "jax"),
        ("torch", "torch"),
        ("cupy", "cupy"),
        ("tensorflow", "tensorflow"),
        ("specdens.backends.tf", "tensorflow"),
        ("numpy", "numpy"),
        ("scipy", "scipy"),
    ):
        if mod.startswith(prefix):
            return name
    return mod.split(".")[0] or type(x).__name__


def _is_module(x: Any) -> bool:
    return type(x).__name__ == "module" or hasattr(x, "__array_api_version__")


def device_of(x: Any) -> Any:
    """Device of an array (``"cpu"`` for numpy)."""
    if _is_tensorflow(x):
        return x.device
    return array_api_compat.device(x)


def same_device(a: Any, b: Any) -> bool:
    """Whether two devices (objects or names) are the same; a name without an index
    (``"cuda"``) matches index 0 (``"cuda:0"``), or torch's current CUDA device for
    ``"cuda"`` where torch is loaded and has CUDA, and no other index.

    JAX shardings (multi-device arrays) compare by their device sets and whether they are
    replicated, not by their repr (``P()`` and ``P(None, None)`` are the same placement).
    """
    pa, pb = _placement(a), _placement(b)
    if pa is not None and pb is not None:
        return pa == pb
    sa, sb = str(a), str(b)
    if sa == sb:
        return True
    if ":" in sb and ":" not in sa:
        sa, sb = sb, sa
    if ":" in sa and ":" not in sb:
        kind, index = sa.split(":", 1)
        return kind == sb and index == _default_index(sb)
    return False


def _default_index(kind: str) -> str:
    """The index a device name without one means: torch's current CUDA device for
    ``"cuda"`` (where torch is loaded and CUDA is available), else ``"0"``."""
    if kind == "cuda" and framework_loaded("torch"):
        torch = sys.modules["torch"]
        try:
            if torch.cuda.is_available():
                return str(torch.cuda.current_device())
        except Exception:  # a torch without working CUDA: the bare name means index 0
            pass
    return "0"


def _placement(d: Any) -> tuple[frozenset, bool] | None:
    """A JAX sharding or device as (device set, fully replicated); None for others. A
    single device is a replicated placement on itself, as is a one-device mesh's
    sharding (whose arrays report that device)."""
    ds = getattr(d, "device_set", None)
    if ds is not None:
        return frozenset(ds), bool(getattr(d, "is_fully_replicated", True))
    if type(d).__module__.startswith("jax"):  # a jax Device (jaxlib)
        return frozenset([d]), True
    return None


def canonical_device(xp: Any, device: Any = None) -> Any:
    """The device object that arrays of ``xp`` report for ``device``.

    ``None`` gives the library's default device (``"cpu"`` for numpy, ``CpuDevice(id=0)``
    for jax, ``Device('CPU_DEVICE')`` for array-api-strict). A name the library does not
    take as a device (``"cpu"`` for jax) maps to the default device when they match.
    """
    try:
        default = device_of(xp.zeros((0,)))
    except Exception:
        return "cpu" if device is None else device
    if device is None:
        return default
    try:
        return device_of(xp.zeros((0,), device=device))
    except Exception:
        return default if same_device(default, device) else device


def is_numpy(x: Any) -> bool:
    return isinstance(x, np.ndarray)


def is_host_namespace(xp: Any) -> bool:
    """True when arrays of ``xp`` live in host memory with no asynchronous execution.

    Only numpy qualifies: reading a scalar back from it costs no synchronisation.
    """
    return library_name(xp) == "numpy"


def dtype_name(dtype: Any) -> str:
    """Canonical name of a dtype of any library: ``float32``, ``float64``, ``bfloat16``..."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        pass
    name = str(dtype)
    for prefix in ("<dtype: '", "dtype("):
        name = name.replace(prefix, "")
    # Drop a library prefix: "torch.float32", "tf.float32", "array_api_strict.float64".
    return name.strip("'\">)").rsplit(".", 1)[-1]


def finfo_eps(dtype: Any) -> float:
    """Machine epsilon of a floating dtype given by any library's dtype object or name."""
    return {
        "float16": 2.0**-10,
        "bfloat16": 2.0**-7,
        "float32": 2.0**-23,
        "float64": 2.0**-52,
    }[dtype_name(dtype)]


def check_supported_dtype(dtype: Any, what: str = "operator") -> str:
    """Return the dtype's name, or raise a TypeError that lists the supported dtypes."""
    name = dtype_name(dtype)
    if name.startswith("complex"):
        raise TypeError(
            f"{what} dtype {name} is complex; specdens handles real symmetric operators only. "
            f"Supported dtypes: {', '.join(SUPPORTED_DTYPES)}."
        )
    if name not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{what} dtype {name} is not supported. Supported dtypes: {', '.join(SUPPORTED_DTYPES)}"
            " (aslinearoperator converts integer matrices to float64, or to float32 where the"
            " library has no float64)."
        )
    return name


def xp_dtype(xp: Any, name: str) -> Any:
    """The dtype object called ``name`` in namespace ``xp``."""
    try:
        return getattr(xp, name)
    except AttributeError:
        raise TypeError(f"array library {library_name(xp)} has no dtype {name}") from None


def to_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """Copy an array of any supported library to a host numpy array of ``dtype``.

    numpy has no bfloat16: a torch bfloat16 tensor is widened to float32 (exactly) on its
    device first; JAX and TensorFlow hand numpy ``ml_dtypes.bfloat16`` arrays, which
    numpy converts to ``dtype`` exactly.
    """
    if isinstance(x, np.ndarray):
        return np.asarray(x, dtype=dtype)
    lib = library_name(x)
    if lib == "torch":
        x = x.detach()
        if dtype_name(x.dtype) == "bfloat16":
            x = x.float()  # torch refuses .numpy() on bfloat16
        return x.cpu().numpy().astype(dtype, copy=False)
    if lib == "cupy":
        return x.get().astype(dtype, copy=False)
    if lib == "array_api_strict":
        # array-api-strict supports the buffer protocol / __dlpack__ on the CPU device.
        return np.asarray(np.from_dlpack(x), dtype=dtype)
    if lib == "tensorflow":
        return np.asarray(x.numpy(), dtype=dtype)
    return np.asarray(x, dtype=dtype)


def from_numpy(x: np.ndarray, xp: Any, device: Any, dtype: Any) -> Any:
    """Move a host numpy array into namespace ``xp`` on ``device`` with ``dtype``."""
    if library_name(xp) == "numpy":
        return np.asarray(x, dtype=dtype)
    host_dtype = np.float32 if dtype_name(dtype) in ("bfloat16", "float16") else dtype_name(dtype)
    x = np.ascontiguousarray(x, dtype=host_dtype)
    if device is None:
        return xp.astype(xp.asarray(x), dtype)
    try:
        out = xp.asarray(x, device=device)
    except (TypeError, ValueError):
        out = xp.asarray(x)
    return xp.astype(out, dtype)


def detached(x: Any) -> Any:
    """``x`` cut from torch's autograd graph when it is part of one (a product computed
    from tensors that require grad), else ``x``: the engine's arithmetic is not to be
    differentiated, and a graph through every step would hold all of them in memory."""
    if getattr(x, "requires_grad", False) and library_name(x) == "torch":
        return x.detach()
    return x


def shares_memory(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` may share memory (numpy, torch, and array-api-strict,
    through the numpy arrays it exposes on its CPU device), or are the same object
    (other libraries, whose arrays the engine does not change in place). An empty array
    shares memory with nothing."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(np.may_share_memory(a, b))
    la, lb = library_name(a), library_name(b)
    if la == "torch" and lb == "torch":
        if a.numel() == 0 or b.numel() == 0:
            return False
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    if la == "array_api_strict" and lb == "array_api_strict":
        try:
            na, nb = np.from_dlpack(a), np.from_dlpack(b)
        except Exception:  # a device without host memory, or no dlpack
            return a is b
        return bool(np.may_share_memory(na, nb))
    return a is b


def row_major(x: Any) -> Any:
    """``x`` itself when it is C-contiguous, else a C-contiguous copy (numpy and torch;
    other libraries choose their layouts themselves).

    torch calls a tensor contiguous whatever the strides of its size-1 dimensions: the
    transposed ``(n, 1)`` column is a ``(1, n)`` row with strides ``(1, 1)``, and its
    results keep them. Its copy kernels then take a slow path (a copy into a basis row
    ran 37x slower, a dot product 1.7x), so such a tensor is re-viewed with the standard
    strides (no copy).
    """
    lib = library_name(x)
    if lib == "numpy":
        return np.ascontiguousarray(x)
    if lib == "torch":
        return standard_strides(x.contiguous())
    return x


def standard_strides(x: Any) -> Any:
    """A torch tensor that torch calls contiguous, re-viewed with the standard strides (no
    copy; see :func:`row_major`); anything else as it is."""
    if library_name(x) == "torch" and x.dim() > 1 and x.is_contiguous():
        return x.view(-1).view(x.shape)
    return x


def subtract_scaled_rows(w: Any, c: Any, x: Any) -> Any:
    """``w - c[:, None] * x`` for ``(k, n)`` rows, in place where ``w`` is mutable (it must
    be the caller's own array), returned.

    torch fuses it (``addcmul_``: no ``(k, n)`` temporary, no allocation). numpy keeps
    its own expression: scipy's BLAS ``axpy`` is faster alone, but scipy links its own
    OpenBLAS, whose thread pool then competes with numpy's (the engine ran 2.7x slower
    with two threads on two cores).
    """
    if library_name(w) == "torch":
        return w.addcmul_(c[:, None], x, value=-1)
    w -= c[:, None] * x
    return w


def subtract_rows(w: Any, x: Any) -> Any:
    """``w - x``, in place where ``w`` is mutable (the caller's own array), returned, in
    ``w``'s dtype. numpy, torch and array-api-strict subtract a lower-precision ``x``
    without converting it first; other libraries convert it."""
    if (library_name(w) == "torch" and w.dtype != x.dtype and w.shape[0] > 1
            and w.device.type == "cpu"):
        # torch on the CPU subtracts a block of another dtype 8x slower than row by row
        # (11.1 ms against 1.4 ms for float32 from float64 at k = 4, n = 1.1e6)
        for wr, xr in zip(w, x, strict=True):
            wr -= xr
        return w
    if library_name(w) in ("numpy", "torch", "array_api_strict"):
        w -= x
        return w
    xp = namespace(w)
    w -= xp.astype(x, w.dtype)
    return w


def set_rows(x: Any, index: Any, value: Any) -> Any:
    """``x[index] = value``, returning the updated array (a new one for immutable arrays)."""
    if hasattr(x, "at") and library_name(x) == "jax":
        return x.at[index].set(value)
    if _is_tensorflow(x):
        return _tf_namespace().set_rows(x, index, value)
    x[index] = value
    return x


def supports_float64(xp: Any, device: Any) -> bool:
    """Whether ``xp`` can hold float64 arrays on ``device`` right now.

    False for JAX without ``jax_enable_x64`` and for PyTorch's MPS devices.
    """
    lib = library_name(xp)
    if lib == "jax":
        import jax

        return bool(jax.config.read("jax_enable_x64"))
    if lib == "torch":
        return not str(device).startswith("mps")
    return True


def check_float64_available(xp: Any, device: Any, dtype: Any, what: str) -> None:
    """A ``TypeError`` when ``dtype`` is float64 but ``xp`` has no float64 on ``device``
    right now (JAX without ``jax_enable_x64``, MPS): its vectors would silently be
    float32. ``what`` starts the message."""
    if dtype_name(dtype) != "float64" or supports_float64(xp, device):
        return
    if library_name(xp) == "jax":
        fix = ("enable it (jax.config.update('jax_enable_x64', True) at start-up, or build "
               "and use the operator inside `with jax.enable_x64(True):`), or use float32")
        raise TypeError(f"{what} but jax_enable_x64 is off, so JAX would silently compute "
                        f"in float32: {fix}")
    raise TypeError(f"{what} but {library_name(xp)} on {device} has no float64; use float32")


def framework_loaded(name: str) -> bool:
    """Whether a framework is already imported (never imports it)."""
    return name in sys.modules


def creation_device(op: Any) -> Any:
    """Device argument for creation functions (``None`` for numpy-like host arrays)."""
    return None if library_name(op.xp) == "numpy" else op.device
