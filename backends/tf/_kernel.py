"""Traced per-batch functions: gradients, Hessian-vector and GGN-vector products.

A :class:`Kernel` owns the ``tf.function`` objects of one configuration (model, loss,
selected variables, options, strategy); they are traced with exact second derivatives
through ``tf.nn.moments`` (see ``_moments``). Their tensor arguments are the values of the
model's variables, the batch and the block of vectors, so new weights never retrace: a
kernel is cached per model (weakly) and shared by every operator built with the same
configuration, which makes rebuilding an operator each epoch cheap. Each function is
traced once per *relaxed* batch signature (the leading, sample dimension left unknown), so
uneven batches share one trace.

Hessian-vector products (Pearlmutter 1994), for a block ``V`` of ``k`` vectors:

* ``method="reverse"`` (back-over-back): one forward pass and one first-order backward pass
  recorded by an outer ``tf.GradientTape``, then the gradient of ``<grad L, v>`` for each
  column (``block="loop"``, a persistent outer tape) or for all columns at once
  (``block="batched"``, ``GradientTape.jacobian`` vectorised with ``pfor``);
* ``method="forward"`` (forward-over-back): ``tf.autodiff.ForwardAccumulator`` over a
  ``tf.GradientTape``, one forward-and-backward pass per column (``"loop"``) or all
  columns vectorised by ``tf.vectorized_map`` (``"batched"``; the tangent-free forward
  pass is loop-invariant and computed once).

References
----------
B. A. Pearlmutter (1994), Fast exact multiplication by the Hessian, Neural Computation
6(1). N. N. Schraudolph (2002), Fast curvature matrix-vector products for second-order
gradient descent, Neural Computation 14(7). A. Agrawal et al. (2019), TensorFlow Eager: a
multi-stage, Python-embedded DSL for machine learning (``pfor`` vectorisation).
"""

from __future__ import annotations

import collections
import functools
import weakref
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from ._data import fingerprint, relaxed_spec, spec_key
from ._loss import BatchLoss, output_mask, split_batch, unscaled_keras_losses, with_mask
from ._moments import exact_moments
from .distributed import run_and_sum

METHODS = ("reverse", "forward")
BLOCKS = ("loop", "batched")
ZERO = tf.UnconnectedGradients.ZERO
_MAX_KERNELS_PER_MODEL = 16
_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kernel_for(loss: BatchLoss, *, method: str, block: str, strategy: Any,
               regularizer: Any) -> Kernel:
    """The cached kernel of this configuration (a new one the first time)."""
    key = (loss.key(), method, block, id(strategy) if strategy is not None else None,
           regularizer)
    per_model = _KERNELS.get(loss.model)
    if per_model is None:
        per_model = collections.OrderedDict()
        _KERNELS[loss.model] = per_model
    kernel = per_model.get(key)
    if kernel is None or kernel.strategy is not strategy \
            or not kernel.same_variables(loss.adapter.variables):
        kernel = Kernel(method=method, block=block, strategy=strategy, regularizer=regularizer,
                        variables=loss.adapter.variables)
        per_model[key] = kernel
        while len(per_model) > _MAX_KERNELS_PER_MODEL:
            per_model.popitem(last=False)
    per_model.move_to_end(key)
    kernel.bind(loss)
    return kernel


class Kernel:
    """The traced functions of one configuration.

    Attributes
    ----------
    traces : collections.Counter
        How many times each function was traced (``"hvp"``, ``"ggn"``, ``"grad"``,
        ``"info"``, ``"value"``, ``"reg_hvp"``, ``"reg_grad"``).
    """

    def __init__(self, *, method: str, block: str, strategy: Any, regularizer: Any,
                 variables: list[Any] | None = None):
        if method not in METHODS:
            raise ValueError(f"method={method!r}; choose 'reverse' (back-over-back) or "
                             "'forward' (forward-over-back, tf.autodiff.ForwardAccumulator)")
        if block not in BLOCKS:
            raise ValueError(f"block={block!r}; choose 'loop' or 'batched'")
        self.method = method
        self.block = block
        self.strategy = strategy
        self.regularizer = regularizer
        self.traces: collections.Counter = collections.Counter()
        self._loss_ref: Any = None
        # the model's variables of the traces (weakly: their ids are in the cache key,
        # and an id may be reused by a new variable once the old one is gone)
        self._variable_refs = [_weak(v) for v in (variables or [])]
        self._seen: dict[str, set] = collections.defaultdict(set)
        self._functions = {
            name: tf.function(_exact(getattr(self, "_" + name)), autograph=False)
            for name in ("info", "value", "hvp", "ggn", "grad", "reg_hvp", "reg_grad")
        }

    def same_variables(self, variables: list[Any]) -> bool:
        """Whether ``variables`` are the very objects this kernel was traced with."""
        return len(variables) == len(self._variable_refs) and all(
            ref() is v for ref, v in zip(self._variable_refs, variables, strict=True))

    def bind(self, loss: BatchLoss) -> None:
        """Use ``loss`` (equal in configuration to the one of any earlier trace) for new
        traces. Held weakly: the kernel never keeps a model alive."""
        self._loss_ref = weakref.ref(loss)

    @property
    def loss(self) -> BatchLoss:
        loss = self._loss_ref() if self._loss_ref is not None else None
        if loss is None:
            raise RuntimeError("the operator of this kernel no longer exists")
        return loss

    # -- calling with one trace per relaxed signature ----------------------------------
    def __call__(self, name: str, values: list[Any], batch: Any, *rest: Any,
                 batch_spec: Any = None) -> Any:
        """Run function ``name``; trace it first for the relaxed signature of ``batch``
        (or ``batch_spec``, for distributed batches) when that is new."""
        fn = self._functions[name]
        if batch is None:
            spec = None
        else:
            spec = relaxed_spec(batch) if batch_spec is None else batch_spec
        key = (spec_key(spec) if batch is not None else None,
               tuple((_block_spec(r).shape, r.dtype) for r in rest),
               tuple((tuple(v.shape), v.dtype) for v in values))
        if batch is None:
            if key not in self._seen[name]:
                fn.get_concrete_function([tf.TensorSpec(v.shape, v.dtype) for v in values],
                                         *[_block_spec(r) for r in rest])
                self._seen[name].add(key)
            return fn(values, *rest)
        try:
            if key not in self._seen[name]:
                fn.get_concrete_function([tf.TensorSpec(v.shape, v.dtype) for v in values],
                                         spec, *[_block_spec(r) for r in rest])
                self._seen[name].add(key)
            return fn(values, batch, *rest)
        except Exception as err:  # a loss_fn failing on a list of tensors: say why
            explained = self.loss.explain(err, batch)
            if explained is err:
                raise
            raise explained from err

    # -- per-batch functions (traced) ----------------------------------------------
    def _info(self, values: list[Any], batch: Any) -> tuple[Any, Any]:
        """``(count, fingerprint)`` of a batch (summed over replicas)."""
        self.traces["info"] += 1
        loss = self.loss

        def local(values: list[Any], batch: Any) -> tuple[Any, Any]:
            return loss.count(values, batch), fingerprint(batch)

        return run_and_sum(self.strategy, local, (values, batch))

    def _value(self, values: list[Any], batch: Any) -> tuple[Any, Any]:
        """``(count * mean loss, count)`` of a batch (summed over replicas)."""
        self.traces["value"] += 1
        loss = self.loss

        def local(values: list[Any], batch: Any) -> tuple[Any, Any]:
            value, count = loss(values, loss.handles(values), batch)
            return _weighted(tf.cast(value, tf.float64), count), count

        return run_and_sum(self.strategy, local, (values, batch))

    def _grad(self, values: list[Any], batch: Any) -> tuple[Any, Any, Any]:
        """``(count * grad L_b, count, fingerprint)``."""
        self.traces["grad"] += 1
        loss = self.loss

        def local(values: list[Any], batch: Any) -> tuple[Any, Any, Any]:
            handles = loss.handles(values)
            with tf.GradientTape() as tape:
                tape.watch(handles)
                value, count = loss(values, handles, batch)
            g = loss.space.flatten(tape.gradient(value, handles, unconnected_gradients=ZERO))
            return _weighted(g, count), count, fingerprint(batch)

        return run_and_sum(self.strategy, local, (values, batch))

    def _hvp(self, values: list[Any], batch: Any, V: Any) -> tuple[Any, Any, Any]:
        """``(count * H_b V, count, fingerprint)`` for a ``(n, k)`` block ``V``."""
        self.traces["hvp"] += 1
        loss = self.loss

        def local(values: list[Any], batch: Any, V: Any) -> tuple[Any, Any, Any]:
            if self.method == "reverse":
                HV, count = _hvp_reverse(loss, values, batch, V, self.block)
            else:
                HV, count = _hvp_forward(loss, values, batch, V, self.block)
            return _weighted(HV, count), count, fingerprint(batch)

        return run_and_sum(self.strategy, local, (values, batch, V))

    def _ggn(self, values: list[Any], batch: Any, V: Any) -> tuple[Any, Any, Any]:
        """``(count * J_b^T H_b J_b V, count, fingerprint)``."""
        self.traces["ggn"] += 1
        loss = self.loss

        def local(values: list[Any], batch: Any, V: Any) -> tuple[Any, Any, Any]:
            GV, count = _ggn_product(loss, values, batch, V, self.block)
            return _weighted(GV, count), count, fingerprint(batch)

        return run_and_sum(self.strategy, local, (values, batch, V))

    # -- the regularisers (once per product, not per batch) -----------------------------
    def _reg_grad(self, values: list[Any]) -> Any:
        self.traces["reg_grad"] += 1
        loss = self.loss
        handles = loss.handles(values)
        with tf.GradientTape() as tape:
            tape.watch(handles)
            r = self._reg_value(values, handles)
        return loss.space.flatten(tape.gradient(r, handles, unconnected_gradients=ZERO))

    def _reg_hvp(self, values: list[Any], V: Any) -> Any:
        self.traces["reg_hvp"] += 1
        loss = self.loss
        space = loss.space
        handles = loss.handles(values)
        with tf.GradientTape() as outer:
            outer.watch(handles)
            with tf.GradientTape() as inner:
                inner.watch(handles)
                r = self._reg_value(values, handles)
            g = _dense(inner.gradient(r, handles, unconnected_gradients=ZERO), handles)

        def one(v: Any) -> Any:
            return space.flatten(outer.gradient(g, handles, output_gradients=space.split(v),
                                                unconnected_gradients=ZERO))

        return _columns(one, V, space)

    def _reg_value(self, values: list[Any], handles: list[Any]) -> Any:
        """The ``regularizer`` of the selected variables plus the model's own weight
        penalties (``model.losses`` of a Keras model with ``kernel_regularizer=``...,
        with a ``loss``: :meth:`BatchLoss.weight_penalty`)."""
        loss = self.loss
        total = loss.weight_penalty(values, handles)
        if self.regularizer is not None:
            r = self.regularizer(dict(zip(loss.space.names, handles, strict=True)))
            r = tf.convert_to_tensor(r)
            if r.shape.num_elements() != 1 or not r.dtype.is_floating:
                raise ValueError(f"regularizer must return a floating scalar; got shape "
                                 f"{tuple(r.shape)} and dtype {r.dtype.name}")
            r = tf.reshape(r, [])
            total = r if total is None else total + tf.cast(r, total.dtype)
        if total is None:  # pragma: no cover - called only when there is a penalty
            total = tf.zeros((), loss.space.dtype)
        return total


def _weak(obj: Any) -> Callable[[], Any]:
    """A weak reference to ``obj`` (a strong one where it takes none)."""
    try:
        return weakref.ref(obj)
    except TypeError:  # pragma: no cover - variables take weak references
        return lambda: obj


def _exact(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` traced with exact second derivatives through ``tf.nn.moments``, and with
    Keras's mean losses not divided by the number of replicas (the body of a
    ``tf.function`` runs only while it is traced)."""

    @functools.wraps(fn)
    def traced(*args: Any) -> Any:
        with exact_moments(), unscaled_keras_losses():
            return fn(*args)

    return traced


def _block_spec(V: Any) -> tf.TensorSpec:
    """A ``(n, k)`` block's spec with ``k`` unknown: one trace serves every block width."""
    return tf.TensorSpec([V.shape[0], None], V.dtype)


def _weighted(x: Any, count: Any) -> Any:
    """``count * x``, and exactly 0 for an empty share (count 0), whose loss may be NaN."""
    scaled = x * tf.cast(count, x.dtype)
    return tf.where(count > 0, scaled, tf.zeros_like(scaled))


def _gradient(loss: BatchLoss, values: list[Any], handles: list[Any], batch: Any
              ) -> tuple[list[Any], Any]:
    """``grad L_b`` at ``handles`` (inside the caller's tapes) and the count."""
    with tf.GradientTape() as tape:
        tape.watch(handles)
        value, count = loss(values, handles, batch)
    return _dense(tape.gradient(value, handles, unconnected_gradients=ZERO), handles), count


def _dense(grads: list[Any], handles: list[Any]) -> list[Any]:
    """Gradients as dense tensors of their variables' shapes: an ``Embedding``'s (a
    gather's) gradient is an ``IndexedSlices``, which a second ``GradientTape.gradient``
    cannot take as a target (``AttributeError: 'IndexedSlices' object has no attribute
    '_id'``). The scatter-add is differentiable."""
    out = []
    for g, h in zip(grads, handles, strict=True):
        if isinstance(g, tf.IndexedSlices):
            rows = tf.shape(h, out_type=g.indices.dtype)[0]
            g = tf.math.unsorted_segment_sum(g.values, g.indices, rows)
        out.append(g)
    return out


def _hvp_reverse(loss: BatchLoss, values: list[Any], batch: Any, V: Any, block: str
                 ) -> tuple[Any, Any]:
    space = loss.space
    handles = loss.handles(values)
    with tf.GradientTape() as outer:
        outer.watch(handles)
        g, count = _gradient(loss, values, handles, batch)
        if block == "batched":
            s = tf.linalg.matvec(V, space.flatten(g), transpose_a=True)  # (k,): <g, v_j>
    if block == "batched":
        jac = outer.jacobian(s, handles, unconnected_gradients=ZERO,
                             experimental_use_pfor=True)
        return space.flatten_block(jac), count

    def one(v: Any) -> Any:
        return space.flatten(outer.gradient(g, handles, output_gradients=space.split(v),
                                            unconnected_gradients=ZERO))

    return _columns(one, V, space), count


def _hvp_forward(loss: BatchLoss, values: list[Any], batch: Any, V: Any, block: str
                 ) -> tuple[Any, Any]:
    space = loss.space
    handles = loss.handles(values)

    def one(tangents: list[Any]) -> Any:
        with tf.autodiff.ForwardAccumulator(handles, tangents) as acc:
            g, _ = _gradient(loss, values, handles, batch)
        return space.flatten(acc.jvp(g, unconnected_gradients=ZERO))

    count = loss.count(values, batch)
    if block == "batched":
        return tf.transpose(tf.vectorized_map(one, space.split_block(V))), count
    return _columns(lambda v: one(space.split(v)), V, space), count


def _columns(fn: Any, V: Any, space: Any) -> Any:
    """``[fn(V[:, j]) for j]`` as a ``(n, k)`` block, by a graph loop (``tf.map_fn``): the
    traced graph holds one product whatever ``k`` is."""
    out = tf.map_fn(fn, tf.transpose(V), fn_output_signature=tf.TensorSpec([space.n],
                                                                           V.dtype))
    return tf.transpose(out)


def _ggn_product(loss: BatchLoss, values: list[Any], batch: Any, V: Any, block: str
                 ) -> tuple[Any, Any]:
    """``J^T H_out J V`` column by column: ``J v`` by a forward accumulator, ``H_out``
    by forward-over-back in the outputs (with their Keras mask, if any: the loss of the
    outputs is the one the Hessian differentiates), ``J^T`` by the tape of the forward
    pass."""
    space = loss.space
    handles = loss.handles(values)
    inputs, targets = split_batch(batch)
    count = loss.count(values, batch)

    def one(tangents: list[Any]) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(handles)
            with tf.autodiff.ForwardAccumulator(handles, tangents) as acc:
                out = loss.outputs(values, handles, inputs, refuse_added_losses=True)
            if not isinstance(out, tf.Tensor):
                raise TypeError(f"ggn needs a model whose output is one tensor; got "
                                f"{type(out).__name__}")
            jv = acc.jvp(out, unconnected_gradients=ZERO)
        # the loss of the outputs as they are, Keras mask included (a stop_gradient drops
        # it, and a Keras loss would then average over the masked entries too)
        fixed = with_mask(tf.stop_gradient(out), output_mask(out))
        with tf.autodiff.ForwardAccumulator(fixed, jv) as acc_out:
            with tf.GradientTape() as t_out:
                t_out.watch(fixed)
                value = loss.output_loss(targets, fixed, count)
            dl = t_out.gradient(value, fixed, unconnected_gradients=ZERO)
        hjv = acc_out.jvp(dl, unconnected_gradients=ZERO)
        return space.flatten(tape.gradient(out, handles, output_gradients=hjv,
                                           unconnected_gradients=ZERO))

    if block == "batched":
        return tf.transpose(tf.vectorized_map(one, space.split_block(V))), count
    return _columns(lambda v: one(space.split(v)), V, space), count
