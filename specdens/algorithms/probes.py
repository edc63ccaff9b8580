"""Random probe vectors with counter-based seeding.

Probe ``i`` of seed ``s`` is drawn from its own stream,
``numpy.random.SeedSequence(s, spawn_key=(i,))``, so it is the same vector whatever the
number of probes, the block size or the number of devices.

A seed is a non-negative integer. ``seed=None`` draws fresh entropy from the operating
system for every probe, as numpy does: the run cannot be reproduced, so it is refused where
reproducibility is needed (a checkpoint, a deflating eigensolver run).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _array

PROBE_KINDS = ("rademacher", "gaussian", "sphere")


def check_seed(seed: Any, *, reproducible_for: str | None = None) -> int | None:
    """``seed`` as an int (or None), with errors that name it.

    Raises ``TypeError`` unless it is an integer (not a bool) or None, ``ValueError`` when
    it is negative, and ``ValueError`` for None when ``reproducible_for`` names a feature
    that needs a reproducible run.
    """
    if seed is None:
        if reproducible_for is not None:
            raise ValueError(
                f"{reproducible_for} needs a reproducible run, but seed=None draws fresh "
                "random probes on every call; pass an integer seed (e.g. seed=0)"
            )
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be a non-negative integer (or None); got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed}")
    return int(seed)


def probe_rng(seed: int | None, index: int) -> np.random.Generator:
    """The generator of probe ``index`` for ``seed`` (independent of all other probes)."""
    seed = check_seed(seed)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(index,))))


def draw_probe(kind: str, n: int, seed: int, index: int) -> tuple[np.ndarray, float]:
    """Probe ``index`` as a unit float64 host vector, and its Hutchinson scale.

    The scale is ``||v||^2 / n`` of the raw vector: 1 for Rademacher and sphere probes,
    a chi-square draw for Gaussian probes. Estimators weight probe ``i`` by it, so that
    ``E[scale * u^T f(A) u] = tr f(A) / n`` holds for every kind.
    """
    rng = probe_rng(seed, index)
    if kind == "rademacher":
        v = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        return v / np.sqrt(n), 1.0
    if kind in ("gaussian", "sphere"):
        v = rng.standard_normal(n)
        nrm2 = float(v @ v)
        if nrm2 == 0.0:  # probability zero; only for n tiny and a degenerate draw
            v[0], nrm2 = 1.0, 1.0
        scale = nrm2 / n if kind == "gaussian" else 1.0
        return v / np.sqrt(nrm2), scale
    raise ValueError(f"unknown probe kind {kind!r}; choose one of {', '.join(PROBE_KINDS)}")


def probe_block(
    kind: str, n: int, seed: int, indices: range | list[int], xp: Any, device: Any, dtype: Any
) -> tuple[Any, np.ndarray]:
    """Probes ``indices`` as rows of a ``(k, n)`` array in ``xp`` on ``device``."""
    rows, scales = [], []
    for i in indices:
        v, s = draw_probe(kind, n, seed, i)
        rows.append(v)
        scales.append(s)
    host = np.stack(rows) if rows else np.zeros((0, n))
    return _array.from_numpy(host, xp, device, dtype), np.asarray(scales)
