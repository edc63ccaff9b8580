"""Plain JSON values of the Python, numpy and path objects that results, summaries and
tracker records hold."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def plain(obj: Any, *, where: str) -> Any:
    """``obj`` as plain JSON types: dicts (string keys), lists, numbers, strings, bools and
    None. numpy scalars and arrays become Python ones, tuples lists, paths strings, and
    NaN and infinities None (strict JSON has neither). Anything else raises a TypeError
    naming ``where`` it was to be stored."""
    if isinstance(obj, dict):
        return {str(k): plain(v, where=where) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, where=where) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist(), where=where)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store a {type(obj).__name__} in {where}; use numbers, strings, "
                    "lists and dicts")
