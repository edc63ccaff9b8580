"""How much memory a device has free, for ``reorth="auto"``."""

from __future__ import annotations

import os
from typing import Any

from . import _array


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


def available_bytes(xp: Any, device: Any) -> int:
    """Free memory where arrays of ``xp`` on ``device`` live (host memory for CPUs)."""
    dev = str(device)
    if _array.library_name(xp) == "torch" and dev.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(dev))
        return int(free)
    if _array.library_name(xp) == "cupy":
        import cupy

        free, _ = cupy.cuda.runtime.memGetInfo()
        return int(free)
    return host_available_bytes()
