"""Data parallelism over several devices, and over several hosts through ``jax.distributed``.

With ``mesh=`` the operators shard every batch along its leading (sample) axis over the
mesh's data axes (:func:`jax.shard_map`): each device computes the sample-weighted product
of its part, ``n_d * (H_d v)``, and keeps a running sum; the sums and counts are reduced
across devices once per product, so the result -- and every Lanczos vector after it -- is
replicated: every device holds the same vectors and runs the same recurrence. A batch
whose size is not a multiple of the number of shards is split: the largest multiple is
sharded and the remaining samples are processed whole on every device, weighted by their
count. Splitting a batch changes nothing for a loss that is a mean of per-sample terms;
a loss that couples the samples of a batch (batch statistics, contrastive losses) is
computed per shard instead, which is a different function.

Multi-host
----------
Call :func:`jax.distributed.initialize` in every process first, then build a mesh over
the global devices, ``jax.make_mesh((jax.device_count(),), ("data",))``, and pass it as
``mesh=``. Every process must pass the same batches in the same order: as numpy arrays
(each process transfers only the shards its own devices hold, as :func:`jax.device_put`
does for a global sharding), or as global ``jax.Array`` s already sharded along their
leading axis (e.g. built with :func:`jax.make_array_from_process_local_data` from each
process's local samples). Products, alpha and beta are then replicated on every device of
every process, so ``specdens.lanczos`` / :func:`specdens.backends.jax.lanczos` return the
same result everywhere. The multi-device path is tested with several CPU devices in one
process (``XLA_FLAGS=--xla_force_host_platform_device_count=4``); multiple processes use
the same code (one SPMD program), but are not exercised by the test suite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def resolve_mesh(mesh: Any, data_axis: str | Sequence[str] | None
                 ) -> tuple[Mesh | None, tuple[str, ...]]:
    """The mesh and the axes the data is sharded over.

    Parameters
    ----------
    mesh
        ``None`` (one device), a :class:`jax.sharding.Mesh`, or a sequence of devices
        (a one-axis mesh named ``"data"`` is built over them).
    data_axis
        Mesh axis name(s) to shard the samples over (default: every axis of the mesh).
    """
    if mesh is None:
        if data_axis is not None:
            raise ValueError("data_axis was given without a mesh")
        return None, ()
    if not isinstance(mesh, Mesh):
        try:
            devices = list(mesh)
        except TypeError:
            raise TypeError(f"mesh must be a jax.sharding.Mesh or a sequence of devices; got "
                            f"{type(mesh).__name__}") from None
        if not devices or not all(isinstance(d, jax.Device) for d in devices):
            raise TypeError("mesh must be a jax.sharding.Mesh or a non-empty sequence of "
                            "jax devices (jax.devices())")
        if len(set(devices)) != len(devices):
            raise ValueError("mesh: the same device is listed twice")
        mesh = Mesh(np.array(devices), ("data",))
    # Vectors are replicated arrays of every rank; with explicit axis types a replicated
    # (n, k) block reports the sharding P(None, None) and a vector P(), which compare as
    # different devices. Auto axes make every replicated array report P().
    mesh = Mesh(mesh.devices, mesh.axis_names,
                axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    axes = tuple(mesh.axis_names) if data_axis is None else (
        (data_axis,) if isinstance(data_axis, str) else tuple(data_axis))
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"data_axis {missing} not in the mesh's axes {list(mesh.axis_names)}")
    return mesh, axes


def num_shards(mesh: Mesh | None, axes: tuple[str, ...]) -> int:
    """How many parts each batch is split into."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in axes]))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of vectors: a full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def sharded(mesh: Mesh, axes: tuple[str, ...]) -> NamedSharding:
    """Leading axis split over the data axes."""
    return NamedSharding(mesh, P(axes))


def waits_for_reductions(devices: Any) -> bool:
    """Whether programs across ``devices`` (a mesh, a sharding or a device) must be waited
    for one by one: on several CPU devices.

    XLA's CPU client runs a multi-device program on one thread per device, from a pool of
    max(cores, devices) threads, and a dispatch blocks a pool thread while its device has
    32 programs in flight. A backlog of 32 behind a reduction across the devices therefore
    deadlocks a pool with fewer than twice as many threads as devices (4 forced host
    devices on a 2-core machine): the rendezvous waits 40 s for a device that never gets a
    thread, then aborts the process. Accelerators do not share such a pool.
    """
    if isinstance(devices, Mesh):
        found = list(np.ravel(devices.devices))
    elif hasattr(devices, "device_set"):
        found = list(devices.device_set)
    else:
        found = []
    return len(found) > 1 and all(d.platform == "cpu" for d in found)
