"""The Hessian of a mean training loss over a data set, as a specdens operator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from ._data import LOSS_ADVICE, count_source, explain_one_batch
from ._loss import BatchLoss, host_count
from ._operator import DataOperator
from ._params import ParamSpace


class HessianOperator(DataOperator):
    """``H v`` for the Hessian of the mean loss over all samples of the data.

    Build it with :func:`hessian`. Vectors are flat jax arrays of the selected leaves
    (``param_names`` order) in the params' dtype, on the params' device (replicated over
    the mesh with ``mesh=``).
    """

    _TRACE_ATTRS = ("loss", "_pair")

    def __init__(self, loss: BatchLoss, space: ParamSpace, data: Any, **kw: Any):
        self.loss = loss
        super().__init__(space, data, **kw)

    def _kernel_key(self) -> tuple:
        return (self.loss.loss_fn, self.loss.batch_size_fn, self.loss.what, self._pair)

    def _loss_and_count(self, x: Any, frozen: Any, batch: Any) -> tuple[Any, Any]:
        return self.loss(self.space.combine(x, frozen), batch, self.acc_dtype)

    def _kernel(self, consts: Any, batch: Any, V: Any) -> tuple[Any, Any]:
        x0, frozen = consts
        grad = jax.grad(lambda x: self._loss_and_count(x, frozen, batch), has_aux=True)

        def one(v: Any) -> tuple[Any, Any]:
            _, hv, count = jax.jvp(grad, (x0,), (v,), has_aux=True)
            return hv, count

        hv, count = jax.vmap(one, out_axes=(0, None))(V.T)
        return hv, count

    def _count_kernel(self, consts: Any, batch: Any, _: Any) -> tuple[Any, Any]:
        x0, frozen = consts
        return self._loss_and_count(x0, frozen, batch)

    def _check_loss(self) -> None:
        batch = self.batches.first()
        with explain_one_batch(self.batches.one_batch_hint(LOSS_ADVICE), self.loss.what):
            out = jax.eval_shape(
                lambda c, b: self.loss.loss_fn(self.space.combine(c[0], c[1]), b),
                self.consts, batch)
            self._pair = isinstance(out, (tuple, list))
            jax.eval_shape(lambda c, b: self._loss_and_count(c[0], c[1], b), self.consts, batch)

    def _count_source(self) -> str:
        return count_source(self._pair, self.loss.batch_size_fn)

    def _host_count(self, batch: Any) -> float | None:
        if self._pair:
            return None
        return host_count(self.loss.batch_size_fn, batch)


def hessian(
    loss_fn: Callable[[Any, Any], Any],
    params: Any,
    data: Any,
    *,
    mask: Any = None,
    batch_size_fn: Callable[[Any], Any] | None = None,
    weight_decay: float = 0.0,
    regularizer: Callable[[Any], Any] | None = None,
    mesh: Any = None,
    data_axis: str | tuple[str, ...] | None = None,
    check_data: bool = True,
) -> HessianOperator:
    """The Hessian of the mean training loss as a specdens operator on flat jax arrays.

    The operator is ``H = sum_b (n_b / N) Hess(L_b) + weight_decay * I + Hess(R)`` at
    ``params``: ``L_b`` is the mean loss of batch ``b`` over its ``n_b`` samples and
    ``N = sum_b n_b``, so uneven batches are weighted exactly; ``R`` is the
    ``regularizer``. A product is forward-over-reverse (:func:`jax.jvp` of
    :func:`jax.grad`), vectorised over a block of vectors with :func:`jax.vmap` (one pass
    over the data per block), compiled once per batch signature and block size (and
    shared with later operators of the same ``loss_fn``, parameter structure and
    settings: see ``num_traces``), with the running sums kept on the device.

    Parameters
    ----------
    loss_fn
        ``loss_fn(params, batch)`` returning the batch's *mean* loss (a scalar), or a pair
        ``(mean_loss, count)`` when the mean is over something other than the batch's
        leading dimension (e.g. non-padding tokens). Pure and traceable: randomness
        (dropout) needs a fixed key, and normalisation layers do what ``loss_fn`` asks:
        with flax, ``BatchNorm`` on batch statistics (as in Ghorbani et al. 2019) is
        ``model.apply(variables, x, train=True, mutable=["batch_stats"])[0]`` (the
        updated statistics dropped: nothing is written back), on population statistics
        ``use_running_average=True``. Batch statistics are those of each batch, or of
        each shard with a mesh.
    params
        Any pytree: a dict, a flax ``params`` collection, an equinox module, haiku params.
        Numpy or jax arrays; float32, or float64 with ``jax_enable_x64`` on
        (``jax.config.update("jax_enable_x64", True)`` at start-up, or build and use the
        operator inside ``with jax.enable_x64(True):``); float64 params without it raise a
        TypeError rather than silently computing in float32.
    data
        One batch (an array, a dict, a tuple/list whose first item is an array, a tuple
        ``(inputs, targets)`` whose inputs are a dict and whose targets are not, or a pair
        ``([x1, x2], y)`` whose inputs are a tuple or list of arrays and whose targets an
        array) or
        a re-iterable of batches (a list, a loader that can be iterated again; a one-shot
        generator raises a TypeError; a list of dicts, or a tuple of dicts only, is
        several batches). A batch is any pytree of arrays; numpy batches move
        to the device on every pass, jax arrays stay where they are (pass device arrays
        to keep the data on the device).
    mask
        The leaves spanning the operator (default: every floating-point array leaf): a
        pytree of booleans with ``params``' structure or a prefix of it, a callable
        ``mask(name, leaf) -> bool``, or leaf names / ``fnmatch`` glob patterns on the
        dotted key paths (``"params.Dense_1.*"``). Other leaves are held fixed.
    batch_size_fn
        ``batch_size_fn(batch) -> count`` of samples in a batch (default: the leading
        dimension of the batch's first array leaf, in ``jax.tree_util.tree_leaves`` order).
        Traced: use shapes or ``jnp``, not numpy.
    weight_decay
        Adds ``weight_decay * I``, the Hessian of ``weight_decay / 2 * ||theta||^2``.
    regularizer
        ``regularizer(params) -> scalar``; its Hessian (in the selected leaves) is added
        once, not per batch.
    mesh
        A :class:`jax.sharding.Mesh` or a list of devices: every batch is sharded along
        its leading axis over ``data_axis`` and the per-device sums are reduced once per
        product; vectors are replicated on every device. See
        :mod:`specdens.backends.jax.distributed` (multi-host with ``jax.distributed``).
    data_axis
        Mesh axis name(s) to shard the samples over (default: all of them).
    check_data
        Check that every pass yields the batches of the first one and raise a
        RuntimeError otherwise: free for a list or tuple of batches, whose array objects
        are compared; otherwise a checksum of every leaf that also sees the order of the
        entries (so a random flip, a shuffle or one changed entry is caught). The identity
        check does not look at values: a numpy array of a list of batches changed
        in place between products (``X[:] *= 3``, a reused buffer, in-place augmentation)
        is not detected, and the next eager product silently uses the new values, while
        :meth:`~HessianOperator.jax_operand` (and so
        :func:`specdens.backends.jax.lanczos` / ``slq``) keeps a copy of the data made at
        its first compiled run and goes on using the old values. Keep the arrays of a
        list of batches unchanged while an operator uses them (jax arrays cannot change
        so). Every batch must hold samples: a batch whose count is 0 raises a ValueError
        naming it. Jax arrays committed to another device than the params raise a
        ValueError (without a mesh).

    Returns
    -------
    HessianOperator
        ``shape == (n, n)``, ``dtype`` the params', ``device`` theirs (a replicated
        ``NamedSharding`` with a mesh); ``matvec``, ``matmat``, ``to_dense()``;
        ``param_names``, ``unflatten(v)``, ``as_params(v)``, ``flatten(tree)``,
        ``num_samples``, ``num_traces``, and ``jax_operand()`` / ``jax_apply(operand, V)``
        for :func:`specdens.backends.jax.lanczos`.

    Notes
    -----
    Functions are keyed by identity, as :func:`jax.jit` keys them. The compiled products
    are shared by later operators (and :func:`specdens.backends.jax.gradient` shares its
    compiled steps likewise) built from the same ``loss_fn``, ``batch_size_fn`` and
    ``regularizer`` *objects* with the same parameter structure and settings; whatever a
    function reads from outside its arguments -- a closure's captured values, a global, a
    bound method's ``self``, a dict or list changed in place -- is a constant fixed when it
    was first traced, and a later change to it is *not* seen: the same function object
    gives the results of its first trace. Values that change (a loss scale, flax
    ``batch_stats`` updated by training, a step-dependent coefficient) must come in
    through ``params`` (a leaf left out by ``mask``) or through the batch; a new function
    object (a fresh closure per value) also works but compiles again::

        def loss_fn(params, batch):       # NOT: scale read from a global or closure
            x, y = batch
            return params["scale"] * jnp.mean((x @ params["w"] - y) ** 2)

        p = {"w": w, "scale": jnp.float32(scale)}
        H = hessian(loss_fn, p, batches, mask=["w"])     # scale: held fixed, not stale

    References
    ----------
    B. A. Pearlmutter (1994), Fast exact multiplication by the Hessian, Neural Computation
    6(1). B. Ghorbani, S. Krishnan, Y. Xiao (2019), An Investigation into Neural Net
    Optimization via Hessian Eigenvalue Density, ICML.

    Examples
    --------
    >>> def loss_fn(params, batch):                                   # doctest: +SKIP
    ...     x, y = batch
    ...     return optax.softmax_cross_entropy_with_integer_labels(
    ...         model.apply(params, x), y).mean()
    >>> H = hessian(loss_fn, params, batches)                         # doctest: +SKIP
    >>> density = specdens.slq(H, num_steps=90, num_probes=10)        # doctest: +SKIP
    """
    space = ParamSpace(params, mask)
    loss = BatchLoss(loss_fn, batch_size_fn)
    return HessianOperator(loss, space, data, weight_decay=weight_decay,
                           regularizer=regularizer, mesh=mesh, data_axis=data_axis,
                           check_data=check_data)


__all__ = ["HessianOperator", "hessian"]
