"""How much memory a device has free, for ``reorth="auto"``.

Host memory for CPUs. On a GPU the free memory of the device itself: torch
(``torch.cuda.mem_get_info``), cupy (``memGetInfo``), JAX (the device's
``memory_stats()``: ``bytes_limit - bytes_in_use`` of its allocator, summed over the
devices of a sharded array's placement, the smallest for a replicated one) and
TensorFlow (``bytes_limit`` of its allocator, read once per device from
``device_lib.list_local_devices``, minus ``tf.config.experimental.get_memory_info``'s
``current``). Where a GPU's memory cannot be read, host memory is used with a
``RuntimeWarning`` saying so (pass ``max_basis_bytes`` to set the budget).
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

from . import _array

_TF_LIMITS: dict[str, int] = {}  # TensorFlow GPU allocator limits, by "GPU:i"


def host_available_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo, else physical memory (POSIX), else 4 GiB."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def _host_instead(what: str, why: str) -> int:
    warnings.warn(f"the free memory of {what} could not be read ({why}); budgeting with the "
                  "host's available memory instead (pass max_basis_bytes to set the budget)",
                  RuntimeWarning, stacklevel=3)
    return host_available_bytes()


def _jax_free_bytes(device: Any) -> int | None:
    """Free bytes of a JAX device or sharding on accelerators; None for CPU devices."""
    devices = getattr(device, "device_set", None)
    devices = list(devices) if devices is not None else [device]
    if not devices or any(getattr(d, "platform", "cpu") == "cpu" for d in devices):
        return None
    free = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception as exc:  # a backend without the statistics
            return _host_instead(str(d), f"{type(exc).__name__}: {exc}")
        if not stats or "bytes_limit" not in stats:
            return _host_instead(str(d), "memory_stats() has no bytes_limit")
        free.append(max(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), 0))
    # a sharded array spreads over its devices; a replicated one needs room on each
    replicated = bool(getattr(device, "is_fully_replicated", len(free) == 1))
    return min(free) if replicated else min(free) * len(free)


def _tf_gpu(device: str) -> str | None:
    """``"GPU:i"`` of a TensorFlow device string naming a GPU, else None."""
    m = re.search(r"(?:^|[/:])(?:device:)?GPU:(\d+)\s*$", device, flags=re.IGNORECASE)
    return f"GPU:{m.group(1)}" if m else None


def _tf_free_bytes(device: str) -> int | None:
    """Free bytes of TensorFlow's allocator on a GPU device; None for other devices."""
    gpu = _tf_gpu(device)
    if gpu is None:
        return None
    import tensorflow as tf

    try:
        current = int(tf.config.experimental.get_memory_info(gpu)["current"])
    except Exception as exc:  # no such device, or no statistics
        return _host_instead(device, f"{type(exc).__name__}: {exc}")
    if gpu not in _TF_LIMITS:
        try:
            from tensorflow.python.client import device_lib

            for d in device_lib.list_local_devices():
                if d.device_type.upper() == "GPU":
                    _TF_LIMITS[_tf_gpu(d.name) or d.name] = int(d.memory_limit)
        except Exception as exc:
            return _host_instead(device, f"{type(exc).__name__}: {exc}")
    if gpu not in _TF_LIMITS:
        return _host_instead(device, "TensorFlow lists no memory limit for it")
    return max(_TF_LIMITS[gpu] - current, 0)


def available_bytes(xp: Any, device: Any) -> int:
    """Free memory where arrays of ``xp`` on ``device`` live (host memory for CPUs)."""
    dev = str(device)
    lib = _array.library_name(xp)
    if lib == "torch" and dev.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(dev))
        return int(free)
    if lib == "cupy":
        import cupy

        free, _ = cupy.cuda.runtime.memGetInfo()
        return int(free)
    if lib == "jax":
        free = _jax_free_bytes(device)
        if free is not None:
            return free
    if lib == "tensorflow":
        free = _tf_free_bytes(dev)
        if free is not None:
            return free
    return host_available_bytes()
