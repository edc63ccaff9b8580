"""Sample-weighted passes over the data: ``sum_b n_b * kernel(batch_b)`` and ``sum_b n_b``,
on one device or sharded over a mesh, compiled once per batch signature.

A *kernel* is a traceable ``kernel(consts, batch, extra) -> (value, count)``: for the
Hessian, ``value`` is the block of products of the batch's mean loss, ``extra`` the block
of vectors. The eager pass (:meth:`WeightedPass.run`) dispatches one compiled step per
batch and keeps the running sums on the device (nothing is read back); the pure pass
(:meth:`WeightedPass.pure`) runs inside another compiled function, with the batches
stacked by signature and scanned (``lax.scan``), for the compiled Lanczos loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from . import distributed
from ._data import Batches, signature

Kernel = Callable[[Any, Any, Any], tuple[Any, Any]]


class WeightedPass:
    """Compiled per-batch steps of a sample-weighted sum.

    Parameters
    ----------
    kernel
        ``kernel(consts, batch, extra) -> (value, count)``, traceable.
    mesh, axes
        From :func:`specdens.backends.jax.distributed.resolve_mesh`.
    on_trace
        Called (in Python) each time a step is traced, i.e. compiled.
    """

    def __init__(self, kernel: Kernel, mesh: Any, axes: tuple[str, ...],
                 on_trace: Callable[[], None]):
        self.kernel = kernel
        self.mesh = mesh
        self.axes = axes
        self.shards = distributed.num_shards(mesh, axes)
        self.on_trace = on_trace
        # on several CPU devices, a reduction's results are waited for (see settle)
        self.settles = mesh is not None and distributed.waits_for_reductions(mesh)
        donate = (3, 4) if jax.default_backend() != "cpu" else ()
        self._plain = jax.jit(self._plain_step, donate_argnums=donate)
        self._sharded = jax.jit(self._sharded_step, donate_argnums=donate)

    def settle(self, x: Any) -> Any:
        """``x``, waited for on a mesh of several CPU devices, so that no backlog of
        programs builds up behind its reduction (see
        :func:`.distributed.waits_for_reductions`); as is elsewhere."""
        return jax.block_until_ready(x) if self.settles else x

    # -- placement ---------------------------------------------------------------------
    def pieces(self, batch: Any) -> list[tuple[str, Any]]:
        """``batch`` as ``("plain", whole)`` without a mesh; with one, as a sharded part
        (``"sharded"``: the largest multiple of the shard count) and a replicated rest."""
        if self.mesh is None:
            return [("plain", batch)]
        leaves, treedef = jax.tree_util.tree_flatten(batch)
        lead = {int(x.shape[0]) for x in leaves if len(x.shape) > 0}
        if len(lead) != 1:
            shapes = [tuple(x.shape) for x in leaves]
            raise ValueError(
                "with a mesh, batches are split along their leading (sample) axis, so every "
                f"array leaf needs the same leading dimension; got shapes {shapes}")
        size = lead.pop()
        main = size - size % self.shards
        out = []
        for lo, hi, kind in ((0, main, "sharded"), (main, size, "replicated")):
            if hi > lo:
                part = [x[lo:hi] if len(x.shape) > 0 else x for x in leaves]
                out.append((kind, jax.tree_util.tree_unflatten(treedef, part)))
        return out

    def _put(self, kind: str, batch: Any) -> Any:
        if kind == "plain":
            return batch
        if kind == "replicated":
            return jax.device_put(batch, distributed.replicated(self.mesh))
        data = distributed.sharded(self.mesh, self.axes)
        rep = distributed.replicated(self.mesh)
        return jax.tree_util.tree_map(
            lambda x: jax.device_put(x, data if len(x.shape) > 0 else rep), batch)

    # -- compiled steps ----------------------------------------------------------------------
    def _plain_step(self, consts: Any, batch: Any, extra: Any, acc: Any, tot: Any) -> Any:
        self.on_trace()
        value, count = self.kernel(consts, batch, extra)
        return acc + weighted(value, count), tot + count, count

    def _sharded_step(self, consts: Any, batch: Any, extra: Any, acc: Any, tot: Any) -> Any:
        self.on_trace()
        ax = self.axes

        def local(consts: Any, b: Any, extra: Any, acc: Any, tot: Any) -> Any:
            value, count = self.kernel(_varying(consts, ax), b, _varying(extra, ax))
            return acc + weighted(value, count)[None], tot + count[None], count[None]

        bspec = jax.tree_util.tree_map(lambda x: P(ax) if x.ndim > 0 else P(), batch)
        return jax.shard_map(local, mesh=self.mesh,
                             in_specs=(P(), bspec, P(), P(ax), P(ax)),
                             out_specs=(P(ax), P(ax), P(ax)))(consts, batch, extra, acc, tot)

    # -- eager pass ------------------------------------------------------------------------
    def run(self, consts: Any, batches: Batches, extra: Any, shape: tuple[int, ...],
            dtype: Any, sharding: Any, counts: list[list[Any]] | None = None
            ) -> list[tuple[Any, Any]]:
        """One pass; the running sums ``[(sum n_b value_b, sum n_b), ...]`` (per-device sums
        with a leading shard axis, and a replicated one, with a mesh). Nothing is read
        back. With a list ``counts``, each batch's counts are appended to it as they come
        out of the steps (a list per batch of device arrays: the count, or with a mesh the
        per-device counts of its sharded part and the count of its replicated rest), for
        the caller to read back and check after the pass."""
        sums: dict[str, list[Any]] = {}
        for batch in batches:
            mine: list[Any] = []
            for kind, part in self.pieces(batch):
                if kind not in sums:
                    sums[kind] = self._zeros(kind, shape, dtype, sharding)
                step = self._sharded if kind == "sharded" else self._plain
                acc, tot = sums[kind]
                acc, tot, count = step(consts, self._put(kind, part), extra, acc, tot)
                sums[kind] = [acc, tot]
                mine.append(count)
            if counts is not None:
                counts.append(mine)
        return [tuple(s) for s in sums.values()]

    def _zeros(self, kind: str, shape: tuple[int, ...], dtype: Any, sharding: Any) -> list[Any]:
        if kind == "sharded":
            d = distributed.sharded(self.mesh, self.axes)
            return [jnp.zeros((self.shards, *shape), dtype, device=d),
                    jnp.zeros((self.shards,), dtype, device=d)]
        return [jnp.zeros(shape, dtype, device=sharding), jnp.zeros((), dtype, device=sharding)]

    # -- pure pass (inside a compiled function) --------------------------------------------------
    def stack(self, batches: Batches) -> tuple[tuple[str, ...], list[Any]]:
        """Every batch on the device(s), stacked by (kind, signature) for :meth:`pure`:
        the kinds of the groups (static) and the stacked groups (arrays)."""
        groups: dict[Any, list[Any]] = {}
        for batch in batches:
            for kind, part in self.pieces(batch):
                groups.setdefault((kind, signature(part)), []).append(part)
        out = []
        for (kind, _), parts in groups.items():
            stacked = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs])
                                             if not any(isinstance(x, jax.Array) for x in xs)
                                             else jnp.stack(xs), *parts)
            out.append((kind, self._put_stacked(kind, stacked)))
        return tuple(k for k, _ in out), [g for _, g in out]

    def _put_stacked(self, kind: str, stacked: Any) -> Any:
        if self.mesh is None:
            return jax.device_put(stacked)
        if kind == "replicated":
            return jax.device_put(stacked, distributed.replicated(self.mesh))
        data = jax.sharding.NamedSharding(self.mesh, P(None, self.axes))
        rep = distributed.replicated(self.mesh)
        return jax.tree_util.tree_map(
            lambda x: jax.device_put(x, data if x.ndim > 1 else rep), stacked)

    def pure(self, consts: Any, kinds: tuple[str, ...], groups: list[Any], extra: Any,
             shape: tuple[int, ...], dtype: Any) -> tuple[Any, Any]:
        """``(sum n_b value_b, sum n_b)`` over stacked batches, traceable."""
        self.on_trace()

        def scan_sum(consts: Any, stacked: Any, extra: Any, axes: tuple[str, ...] = ()
                     ) -> tuple[Any, Any]:
            def body(carry: Any, b: Any) -> Any:
                acc, tot = carry
                value, count = self.kernel(consts, b, extra)
                return (acc + weighted(value, count), tot + count), None
            init = (jnp.zeros(shape, dtype), jnp.zeros((), dtype))
            if axes:  # the running sums differ between devices
                init = _varying(init, axes)
            return jax.lax.scan(body, init, stacked)[0]

        ax = self.axes

        def local(consts: Any, stacked: Any, extra: Any) -> Any:
            a, t = scan_sum(_varying(consts, ax), stacked, _varying(extra, ax), ax)
            return jax.lax.psum(a, ax), jax.lax.psum(t, ax)

        acc, tot = jnp.zeros(shape, dtype), jnp.zeros((), dtype)
        for kind, stacked in zip(kinds, groups, strict=True):
            if kind == "sharded":
                spec = jax.tree_util.tree_map(lambda x: P(None, ax) if x.ndim > 1 else P(),
                                              stacked)
                a, t = jax.shard_map(local, mesh=self.mesh, in_specs=(P(), spec, P()),
                                     out_specs=(P(), P()))(consts, stacked, extra)
            else:
                a, t = scan_sum(consts, stacked, extra)
            acc, tot = acc + a, tot + t
        return acc, tot


def acc_dtype(dtype: Any) -> Any:
    """The dtype of sample counts and running sums for params of ``dtype``: at least
    float32 (``jnp.promote_types(dtype, float32)``), so that float16 counts do not
    overflow past 65504 samples nor bfloat16 ones round totals above 256; products are
    cast back to ``dtype`` after the division by the total."""
    return jnp.promote_types(dtype, jnp.float32)


def weighted(value: Any, count: Any) -> Any:
    """``count * value``, and exactly 0 for an empty shard of a batch under a mesh (count
    0), whose mean loss (a sum over no samples divided by 0) and so whose products are
    NaN. (A whole batch with no samples is refused when the operator is built.) Only a
    count of 0 (or less) masks: a NaN product of a batch with samples comes through, and
    a NaN count makes the total NaN (refused by the callers)."""
    return jnp.where(count > 0, count * value, jnp.zeros_like(value))


def _varying(tree: Any, axes: tuple[str, ...]) -> Any:
    """Mark replicated inputs as varying across the data axes inside ``shard_map``.

    Differentiating a per-device loss with respect to an input that ``shard_map`` knows
    to be the same on every device makes JAX sum the derivative over the devices (the
    transpose of broadcasting an invariant value is ``psum``). The products must stay
    per device, weighted by each device's own sample count, before one reduction."""
    return jax.tree_util.tree_map(lambda x: jax.lax.pcast(x, axes, to="varying"), tree)


def total(parts: list[tuple[Any, Any]]) -> tuple[Any, Any]:
    """Add up the running sums of :meth:`WeightedPass.run` (traceable): the per-device
    sums of a mesh are reduced over their shard axis here."""
    acc, tot = None, None
    for a, t in parts:
        if t.ndim == 1:  # per-device sums: reduce across the shard axis
            a, t = jnp.sum(a, axis=0), jnp.sum(t)
        acc = a if acc is None else acc + a
        tot = t if tot is None else tot + t
    return acc, tot
