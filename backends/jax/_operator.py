"""A specdens operator whose product is a sample-weighted pass over the data, compiled
with JAX.

Subclasses give the per-batch kernel (``_kernel``: the block of products of one batch's
mean loss, and its sample count). This class places the parameters, runs the pass on one
device or a mesh, divides by the number of samples of the same pass, and adds the
regularisation -- all on the device, with nothing read back.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from specdens import LinearOperatorBase, _checks

from . import distributed
from ._data import Batches, check_counts
from ._params import ParamSpace, check_x64
from ._pass import WeightedPass, acc_dtype, total

# operators built from the same functions, parameter structure and settings share their
# compiled products (a tracker builds one operator per record): the most recent ones
_SHARED: OrderedDict[tuple, _Traces] = OrderedDict()
SHARED_SIZE = 8


class _Traces:
    """The compiled products of a :class:`DataOperator` (owned by a skeleton of the first
    operator with its trace key), shared by later operators with the same key, which then
    trace nothing again. ``num_traces`` is counted on the operator in use."""

    def __init__(self) -> None:
        self.skeleton: Any = None
        self._user: Callable[[], Any] = lambda: None

    def use(self, op: DataOperator) -> None:
        self._user = weakref.ref(op)

    def traced(self) -> None:
        op = self._user()
        if op is not None:
            op.num_traces += 1


def _shared_traces(op: DataOperator) -> _Traces:
    key = op._trace_key()
    traces = _SHARED.get(key) if key is not None else None
    if traces is None:
        traces = _Traces()
        traces.skeleton = op._skeleton(traces)
        if key is not None:
            _SHARED[key] = traces
            while len(_SHARED) > SHARED_SIZE:
                _SHARED.popitem(last=False)
    else:
        _SHARED.move_to_end(key)
    traces.use(op)
    return traces


@dataclass(frozen=True)
class _Apply:
    """A traceable product of the compiled loop: equal for equal skeletons and batch
    groupings, so :func:`jax.jit` (which keys its static arguments by equality) traces the
    loop once for all operators that share their compiled products."""

    skeleton: Any
    kinds: tuple[str, ...]

    def __call__(self, operand: Any, V: Any) -> Any:
        return self.skeleton._apply(self.kinds, operand, V)


def check_weight_decay(weight_decay: Any) -> float:
    return _checks.finite_number(weight_decay, "weight_decay")


def placement(space: ParamSpace, mesh: Any, data_axis: Any) -> tuple[Any, tuple, Any, Any]:
    """``(mesh, axes, sharding, device)``: where vectors live. Without a mesh: the params'
    device (jax's default device for numpy params); with one: replicated on the mesh."""
    mesh, axes = distributed.resolve_mesh(mesh, data_axis)
    if mesh is not None:
        rep = distributed.replicated(mesh)
        return mesh, axes, rep, rep
    devs = space.leaf_devices
    if devs is not None and len(devs) > 1:
        raise ValueError(
            f"params are spread over {len(devs)} devices; pass mesh=... (a jax.sharding.Mesh "
            "or a list of devices) to use several devices")
    device = next(iter(devs)) if devs else jax.devices()[0]
    return None, (), jax.sharding.SingleDeviceSharding(device), device


def batch_counts(batches: Any, host_count: Callable[[Any], float | None],
                 counter: WeightedPass, consts: Any, dtype: Any, sharding: Any,
                 how: str) -> float:
    """The total of the sample counts of the batches, each read on the host and checked (see
    :func:`._data.check_counts`: a batch with no samples is refused, named). A count that
    ``host_count`` cannot give (it needs the traced loss) comes from ``counter``'s
    compiled pass over that batch alone (its shards with a mesh: an empty *shard* is
    allowed), all read back together at the end. ``dtype``: the counts' (see
    :func:`._pass.acc_dtype`)."""
    counts: list[Any] = []
    pending: list[tuple[int, Any]] = []
    for i, batch in enumerate(batches):
        c = host_count(batch)
        if c is None:
            # the weighted sum of ones is the sum of the positive counts of the shards
            pending.append((i, counter.settle(total(counter.run(consts, [batch], None, (),
                                                                dtype, sharding)))))
        counts.append(c)
    for (i, _), (positive, tot) in zip(pending, jax.device_get([p for _, p in pending]),
                                       strict=True):
        counts[i] = _shard_total(i, float(positive), float(tot))
    return check_counts(counts, how)


def _shard_total(i: int, positive: float, tot: float) -> float:
    """The count ``tot`` of batch ``i`` whose shards' positive counts sum to ``positive``;
    a ValueError when a shard's count is negative."""
    if positive != tot and tot >= 0:    # (a NaN is not >= 0: refused by check_counts)
        raise ValueError(f"batch {i} of the data: a shard has a negative sample count "
                         f"(total {tot}): counts must be finite and non-negative (check "
                         "loss_fn's count or batch_size_fn)")
    return tot


def pass_counts(per_batch: list[list[Any]], how: str) -> float:
    """The total of the per-batch counts collected by :meth:`WeightedPass.run` (``counts=``),
    read back in one transfer and checked as :func:`batch_counts` checks them (a batch
    with no samples is refused, named; an empty *shard* is allowed)."""
    counts = []
    for i, pieces in enumerate(jax.device_get(per_batch)):
        shards = [float(c) for piece in pieces for c in np.ravel(piece)]
        positive = sum(c for c in shards if c > 0)
        counts.append(_shard_total(i, positive, sum(shards)))
    return check_counts(counts, how)


class DataOperator(LinearOperatorBase):
    """Base class of :class:`HessianOperator` and :class:`GGNOperator`.

    Attributes
    ----------
    param_names, param_shapes : list
        The selected leaves, in the order of the flat vectors.
    num_samples : float
        Samples over all batches (all shards).
    num_batches : int
        Batches per pass.
    num_traces : int
        How many times a per-batch product has been traced, i.e. compiled, while this
        operator was in use: once per distinct batch signature (tree structure, shapes,
        dtypes) and block size ``k`` (plus once per distinct part with a mesh: the
        sharded part and the rest). Operators built from the same functions (the same
        objects), parameter structure and static leaves, selection, regularisation and
        mesh share their compiled products (the 8 most recent such groups): a later one
        traces nothing, as for a tracker's records (on the digits MLP, 30 steps x 2
        probes per record: 0.76 -> 0.11 s per record, 0.95 -> 0.04 s with the compiled
        loop). As with :func:`jax.jit`, a function is keyed by identity, not by what
        its closure holds.
    mesh : jax.sharding.Mesh or None
        The mesh the data is sharded over.
    """

    symmetric = True

    def __init__(self, space: ParamSpace, data: Any, *, weight_decay: float,
                 regularizer: Callable[[Any], Any] | None, mesh: Any, data_axis: Any,
                 check_data: bool):
        self.space = space
        self.mesh, self.axes, self.sharding, device = placement(space, mesh, data_axis)
        super().__init__((space.n, space.n), space.dtype, jnp, device)
        self.param_names = list(space.names)
        self.param_shapes = list(space.shapes)
        self.weight_decay = check_weight_decay(weight_decay)
        if regularizer is not None and not callable(regularizer):
            raise TypeError("regularizer must be a callable(params) -> scalar")
        self.regularizer = regularizer
        self.consts = space.place(self.sharding)
        self.acc_dtype = acc_dtype(space.dtype)
        self.batches = Batches(data, check=check_data,
                               device=device if self.mesh is None else None)
        self.num_batches = self.batches.num_batches
        self.num_traces = 0
        self._stacked: list | None = None
        self._check_loss()
        self._traces = _shared_traces(self)
        self._pass = self._traces.skeleton._pass
        self._finish = self._traces.skeleton._finish
        self._counter = self._traces.skeleton._counter
        self.num_samples = self._count_samples()

    # -- subclass hooks ------------------------------------------------------------------
    # attributes the kernels read besides the space, dtype, regularisation and mesh
    _TRACE_ATTRS: tuple[str, ...] = ()

    def _kernel_key(self) -> tuple:
        """What the kernels depend on besides the parameter space's structure: the
        functions they call (by identity, as :func:`jax.jit` keys a function)."""
        raise NotImplementedError

    def _kernel(self, consts: Any, batch: Any, V: Any) -> tuple[Any, Any]:
        """``(products (k, n) of the batch's mean loss with the rows of V^T, count)``."""
        raise NotImplementedError

    def _count_kernel(self, consts: Any, batch: Any, _: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def _check_loss(self) -> None:
        """Trace the loss on the first batch (shape and dtype checks, no compilation)."""

    def _host_count(self, batch: Any) -> float | None:
        """The sample count of ``batch`` without compiling anything, or None when it needs
        the traced loss."""
        return None

    # -- construction ---------------------------------------------------------------------
    def _count_samples(self) -> float:
        return batch_counts(self.batches, self._host_count, self._counter, self.consts,
                            self.acc_dtype, self.sharding, self._count_source())

    def _count_source(self) -> str:
        """Where the counts come from, for the error on a batch with no samples."""
        return "its sample count is 0"

    # -- products ----------------------------------------------------------------------------
    def _matvec(self, v: Any) -> Any:
        return self._matmat(jnp.reshape(v, (-1, 1)))[:, 0]

    def _check_x64(self) -> None:
        check_x64(self.dtype, "this operator is float64 (built with jax_enable_x64 on) and is "
                  "used here")

    def _matmat(self, V: Any) -> Any:
        self._check_x64()
        self._check_block(V)
        self._traces.use(self)
        k = int(V.shape[1])
        parts = self._pass.run(self.consts, self.batches, V, (k, self.space.n),
                               self.acc_dtype, self.sharding)
        return self._pass.settle(self._finish(self.consts, parts, V))

    def _finish_products(self, consts: Any, parts: Any, V: Any) -> Any:
        acc, tot = total(parts)
        out = acc / tot + self._extra_terms(consts, V.T)
        return out.T.astype(self.dtype)

    def _extra_terms(self, consts: Any, Vt: Any) -> Any:
        """``weight_decay * V`` plus the regulariser's products, rows of ``Vt``."""
        out = self.weight_decay * Vt if self.weight_decay else jnp.zeros_like(Vt)
        if self.regularizer is not None:
            x0, frozen = consts
            reg = self.regularizer

            def r(x: Any) -> Any:
                value = reg(self.space.combine(x, frozen))
                if jnp.shape(value) not in ((), (1,)):
                    raise ValueError(f"regularizer must return a scalar; got shape "
                                     f"{jnp.shape(value)}")
                return jnp.reshape(value, ())

            g = jax.grad(r)
            out = out + jax.vmap(lambda v: jax.jvp(g, (x0,), (v,))[1])(Vt)
        return out

    def _check_block(self, V: Any) -> None:
        if V.dtype != self.dtype:
            raise TypeError(f"the operator has dtype {self.dtype} (the params'); got a vector of "
                            f"dtype {V.dtype}. Cast it: v.astype(jnp.{self.dtype})")

    # -- the product as a pure function (for the compiled Lanczos loop) -------------------------
    def jax_operand(self) -> Any:
        """The arrays the product depends on: the parameters and every batch, stacked by
        signature and placed on the device(s) (the whole data set in device memory).

        The stacked batches are a copy of the data made at the first call (the first
        compiled run): a numpy array of a list of batches changed in place afterwards is
        not seen by the compiled loop (nor by the data check, see ``check_data``)."""
        self._check_x64()
        if self._stacked is None:
            self._kinds, self._stacked = self._pass.stack(self.batches)
        self._traces.use(self)
        return (self.consts, self._stacked)

    @property
    def jax_apply(self) -> Callable[[Any, Any], Any]:
        """``jax_apply(operand, V)``: ``A @ V`` for a block ``V`` of shape ``(n, k)``,
        traceable, given :meth:`jax_operand`. Equal (and so one trace inside
        :func:`jax.jit`) for operators that share their compiled products."""
        if self._stacked is None:
            self.jax_operand()
        return _Apply(self._traces.skeleton, self._kinds)

    def _apply(self, kinds: tuple[str, ...], operand: Any, V: Any) -> Any:
        consts, groups = operand
        acc, tot = self._pass.pure(consts, kinds, groups, V,
                                   (int(V.shape[1]), self.space.n), self.acc_dtype)
        return (acc / tot + self._extra_terms(consts, V.T)).T.astype(self.dtype)

    # -- sharing compiled products between operators ----------------------------------------
    def _trace_key(self) -> tuple | None:
        """What a trace of the products depends on besides array shapes and values; None
        when some part of it is not hashable (a static leaf, say: products are then
        traced per operator)."""
        key = (type(self), self.space.trace_key(), self.weight_decay, self.regularizer,
               self.mesh, self.axes, self._kernel_key())
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def _skeleton(self, traces: _Traces) -> DataOperator:
        """An instance of this class that holds what the kernels read and no arrays (the
        space's structure, not the parameters; no data), with the compiled steps."""
        skel = object.__new__(type(self))
        for name in ("shape", "dtype", "acc_dtype", "xp", "device", "mesh", "axes", "sharding",
                     "weight_decay", "regularizer", *self._TRACE_ATTRS):
            setattr(skel, name, getattr(self, name))
        skel.space = self.space.structure()
        skel._pass = WeightedPass(skel._kernel, self.mesh, self.axes, traces.traced)
        rep = self.sharding if self.mesh is not None else None
        skel._finish = jax.jit(skel._finish_products, out_shardings=rep)
        # the counts that need the traced loss: the weighted sum of ones is the sum of the
        # positive counts of the shards
        skel._counter = WeightedPass(
            lambda c, b, e: (jnp.ones((), skel.acc_dtype), skel._count_kernel(c, b, e)[1]),
            self.mesh, self.axes, lambda: None)
        return skel

    # -- vectors <-> parameters ---------------------------------------------------------------
    def unflatten(self, v: Any) -> dict[str, Any]:
        """A flat vector as a dict of parameter-shaped arrays, by leaf name."""
        return self.space.unflatten(v)

    def as_params(self, v: Any) -> Any:
        """A flat vector as a pytree with ``params``' structure (unselected array leaves are
        the parameter values)."""
        return self.space.combine(v, self.consts[1])

    def flatten(self, tree: Any) -> Any:
        """A pytree with ``params``' structure as a flat vector of its selected leaves."""
        return self.space.flatten(tree)
