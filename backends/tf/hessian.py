"""The Hessian of a model's mean training loss as a specdens operator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._loss import BatchLoss
from ._operator import DataOperator

DEFAULT_METHOD = "reverse"
DEFAULT_BLOCK = "loop"


class HessianOperator(DataOperator):
    """``H v`` for the Hessian of the mean loss over all samples of the data.

    Build it with :func:`hessian`. Vectors are flat ``tf.Tensor`` s of the selected
    variables (``param_names`` order) in the model's dtype and on its device.
    """

    _product_name = "hvp"


def hessian(
    model: Any,
    loss: Callable[[Any, Any], Any] | None = None,
    data: Any = None,
    *,
    loss_fn: Callable[..., Any] | None = None,
    params: Any = None,
    batch_size_fn: Callable[[Any], Any] | None = None,
    batchnorm: str = "batch",
    weight_decay: float = 0.0,
    regularizer: Callable[[dict], Any] | None = None,
    method: str = DEFAULT_METHOD,
    block: str = DEFAULT_BLOCK,
    check_determinism: bool = True,
    strategy: Any = None,
) -> HessianOperator:
    """The Hessian of the mean training loss of a Keras model or ``tf.Module``.

    The operator is ``H = sum_b (n_b / N) Hess(L_b) + Hess(P) + weight_decay * I +
    Hess(R)`` at the variable values of the call: ``L_b`` is the mean loss of batch ``b``
    over its ``n_b`` samples and ``N = sum_b n_b``, so uneven batches are weighted exactly
    (each product accumulates ``n_b * Hess(L_b) v`` and divides by ``N``); with a
    ``loss``, ``L_b`` includes the losses a Keras model adds while it is called (activity
    regularisers, ``add_loss``) and ``P`` is the sum of its weight regularisers
    (``kernel_regularizer=``...), added once: the objective of ``model.fit``, ``loss +
    sum(model.losses)``; ``R`` is the ``regularizer``. Products are exact (no sampling),
    in the model's dtype, on its device.

    Parameters
    ----------
    model
        A Keras 3 model or layer (TensorFlow backend), built; or any ``tf.Module`` with
        variables. It is never modified: the operator takes a snapshot of every variable
        here and evaluates the model at it (a Keras model inside a ``keras.StatelessScope``,
        so BatchNorm moving statistics and random-seed states are never written; a
        ``tf.Module`` by writing the snapshot into its variables for the duration of each
        product and the values it found back afterwards, bit for bit). The operator stays
        the Hessian at that point if the model trains on. Products are exact in the
        variables' dtype, so a Keras model with layers under a mixed-precision dtype
        policy (``"mixed_float16"``, ``"mixed_bfloat16"``: float32 variables, 16-bit
        computations) raises a TypeError rather than return a Hessian with 16-bit
        rounding (~1e-3 relative, not symmetric): pass a copy of the model with the
        layers under the variables' dtype (the message shows how). So does a float64
        model with layers left at Keras's default float32 policy (``Activation``,
        ``Flatten``... built without ``dtype="float64"``, and nested blocks that subclass
        ``keras.Layer`` or ``keras.Model`` built without it, or nested functional models
        whose ``Input`` is float32) at or after its first selected variable, whose inputs
        Keras casts to float32; float32 preprocessing in front of it (``Rescaling``,
        ``Normalization``, or the model's own cast of its inputs) only rounds the data
        and is accepted.
    loss
        ``loss(targets, model(inputs))`` (the Keras order): a Keras loss object with
        reduction ``"sum_over_batch_size"`` (the default, the batch mean) or ``"sum"``
        (divided by ``n_b`` here), or a callable returning the batch mean; ``"none"``
        raises a ValueError. A Keras loss computes in its own dtype (float32 unless created
        with ``dtype=`` or after ``keras.config.set_floatx``); one less precise than the
        variables raises a TypeError. A Keras loss with ``ignore_class``
        (``SparseCategoricalCrossentropy(ignore_class=-1)``) is a mean over the targets
        that are not ignored, and each batch counts as many of them (Keras's own
        denominator), so the operator is that of ``loss(y_all, model(X_all))`` however
        the ignored targets fall into batches. Likewise for outputs that carry a Keras
        mask (``Embedding(mask_zero=True)`` or ``Masking`` passed on to them, as by
        ``GRU(return_sequences=True)`` or ``Dense`` on a sequence): a Keras loss object
        divides by the mask's sum (with ``ignore_class``, its entries whose target is not
        ignored), and each batch counts that sum (a fully masked batch counts 0 and adds
        nothing); a plain callable ``loss`` of masked outputs raises a ValueError unless
        ``batch_size_fn`` gives its denominator. The Keras model's own losses
        (``model.losses``) are added, as ``model.fit`` adds them: its weight regularisers
        once; the losses its call adds (an ``activity_regularizer``, which Keras averages
        over the batch's samples, or ``add_loss``) with their batch's weight, so that with
        the default count they make the penalty of all the data at once (with a count of
        unmasked entries or of targets that are not ignored, such added losses raise a
        ValueError: pass ``batch_size_fn``, or write the objective in ``loss_fn``).
        Exclusive with ``loss_fn``.
    data
        One batch, a ``tf.data.Dataset`` of batches, or a re-iterable of batches (a list,
        a ``keras.utils.PyDataset``): batches must be the same on every pass (no
        ``shuffle``, no random augmentation); a difference raises a RuntimeError. An
        infinite dataset (``.repeat()`` without a count) or a ``PyDataset`` without an end
        raises a ValueError (use ``.take(n)``). One batch is a tensor or numpy array (or a
        ``tf.RaggedTensor`` or ``tf.SparseTensor``), a dict, a tuple/list whose first item
        is one, or a multi-input batch ``([x1, x2], y)`` (Keras's convention for a model
        of several inputs; its arrays must share their sample dimension); with a
        ``loss``, batches are ``(inputs, targets)``. So ``[X[:20], X[20:]]`` is
        one batch of two tensors: pass bare-tensor batches as ``[(X[:20],), (X[20:],)]``
        (a ``loss_fn`` that fails on such a list gets this hint in its error).
    loss_fn
        ``loss_fn(model, batch)`` for losses that are not ``loss(y, model(x))`` (masked
        tokens, PINN residuals, sample weights). It returns either the batch's *mean* loss
        (its count is then ``batch_size_fn(batch)`` or the leading dimension of the first
        tensor of the batch) or a pair ``(mean_loss, count)``. If it takes a ``training``
        keyword, it receives the flag of ``batchnorm`` (needed for a model with
        BatchNormalization layers under ``batchnorm="batch"``, else ValueError: without
        it the model's calls would run on the moving statistics). Its calls of the model
        read the snapshot. ``loss_fn`` writes the whole objective: ``model.losses`` are not added
        (add ``tf.add_n(model.losses)`` to its value after calling the model, which then
        holds that call's losses and the weight penalties at the snapshot). A
        ``loss_fn`` that returns the mean only, without ``batch_size_fn``, of a model
        whose outputs carry (or, for a subclassed model with
        ``Embedding(mask_zero=True)`` or ``Masking`` layers, may carry) a Keras mask
        raises a ValueError: a Keras loss of them divides by the mask's sum, which
        specdens cannot see; return ``(mean_loss, count)``.
    params
        The variables spanning the operator (default: ``model.trainable_variables`` of a
        floating dtype, so a ``tf.Module``'s integer counter is left out): names (Keras
        ``variable.path``, ``"dense/kernel"``), ``fnmatch`` glob patterns (``"dense_1/*"``)
        or variable objects; selecting a variable that is not floating-point raises a
        TypeError. Vectors follow ``model.trainable_variables`` order; see
        ``op.param_names``.
    batch_size_fn
        ``batch_size_fn(batch) -> count`` of samples in a batch (default: the leading
        dimension of the inputs; for a Keras ``loss``, the sum of the outputs' Keras mask
        when they carry one, else the targets that are not ``ignore_class`` when it has
        one), called inside the traced function.
    batchnorm
        ``"batch"`` (default, as in Ghorbani et al. 2019): Keras ``BatchNormalization``
        layers normalise by the statistics of each batch, so the Hessian depends on the
        batching; ``"population"``: by their moving statistics. Keras has one ``training``
        flag for every layer: the model is called with ``training=True`` when it has
        BatchNormalization layers and ``batchnorm="batch"`` (a model that also has random
        layers, such as Dropout, is then refused), else ``training=False``. Moving
        statistics are never updated. A plain ``tf.Module`` is called as ``model(inputs)``.
    weight_decay
        Adds ``weight_decay * I``, the Hessian of ``weight_decay / 2 * ||theta||^2``, on
        top of the model's own weight regularisers (a penalty already in ``model.losses``
        must not be passed again here).
    regularizer
        ``regularizer(params) -> scalar`` of the dict of selected variables (by name, as
        tensors); its Hessian is added (once, not per batch), on top of the model's own
        losses.
    method
        ``"reverse"`` (default; back-over-back: one forward and one first-order backward
        pass per batch, then one second backward per vector) or ``"forward"``
        (forward-over-back with ``tf.autodiff.ForwardAccumulator``: a forward-and-backward
        pass with tangents per vector). See Notes for the measurements behind the default.
    block
        How ``matmat`` treats the ``k`` vectors of a block within its single pass over the
        data: ``"loop"`` (default; a graph loop, ``tf.map_fn``, over the vectors inside the
        traced function) or ``"batched"`` (vectorised with ``pfor``:
        ``GradientTape.jacobian`` or ``tf.vectorized_map``), which needs ``k`` times the
        memory of one product.
    check_determinism
        Evaluate the loss of the first batch twice and raise a RuntimeError if the values
        differ.
    strategy
        A ``tf.distribute`` strategy to reduce over (default: the one of the enclosing
        ``strategy.scope()``, else the one that created the model's variables, else none).
        The data is distributed with ``strategy.experimental_distribute_dataset``; each
        replica's products and sample counts are summed over replicas (see
        :mod:`specdens.backends.tf.distributed`). Under a strategy Keras divides the mean
        of a loss object by the number of replicas; specdens traces its functions where
        Keras does not, so a Keras loss gives the plain mean over the replica's share
        whether it is the ``loss``, inside a callable ``loss`` or inside a ``loss_fn``
        (which must return that plain mean: do not divide by the replicas yourself).

    Returns
    -------
    HessianOperator
        ``shape == (n, n)``, ``dtype`` the variables', ``device`` theirs; ``matvec``,
        ``matmat``, ``to_dense()``; ``param_names``, ``unflatten(v)``, ``flatten(d)``,
        ``num_samples``, ``num_batches``, ``traces``.

    Notes
    -----
    ``tf.nn.moments``, which Keras ``BatchNormalization`` (with ``training=True``),
    ``LayerNormalization`` and ``GroupNormalization`` call, computes the variance against
    ``tf.stop_gradient(mean)``: exact values and first derivatives, but second derivatives
    that miss the coupling of the samples through the mean (2 % of the Hessian on a small
    normalisation). specdens traces its functions with an exact ``tf.nn.moments`` (see
    ``specdens.backends.tf._moments``), so its Hessians through these layers are exact
    where nested ``tf.GradientTape``s are not.

    Product methods, measured with the workloads of ``benchmarks/bench_tf.py`` (one CPU
    thread, float32, median of 3 alternating runs of one block product on a shared
    2-core machine, so +-30 % between runs): on the MLP 64-32-10 over 1797 digits with 10
    vectors, reverse/batched 9.1 ms, forward/batched 11.6, reverse/loop 12.4,
    forward/loop 18.1 (torch backend 15.0); on the CNN over 8 batches of 64 CIFAR-shaped
    images, with 10 vectors reverse/loop 1.49 s, forward/loop 1.57, reverse/batched
    1.74, forward/batched 1.76 (torch 2.20), with 2 vectors forward/loop 0.31 s,
    reverse/loop 0.33, reverse/batched 0.37, forward/batched 0.40 (torch 0.37).
    Back-over-back in a loop is the default: the fastest or within 8 % of it where the
    products dominate (the CNN); the vectorised block wins on small dense models.

    Every product runs one traced per-batch function (a ``tf.function``, traced once per
    batch signature with the sample dimension relaxed, so uneven batches share a trace);
    its tensor arguments are the variable values, the batch and the block, so an operator
    rebuilt at new weights (each epoch, say) reuses the traces of the previous one when
    the model, the loss (a Keras loss of the same configuration, or the same callable),
    the options and the strategy are the same.

    References
    ----------
    B. Ghorbani, S. Krishnan, Y. Xiao (2019), An Investigation into Neural Net Optimization
    via Hessian Eigenvalue Density, ICML. B. A. Pearlmutter (1994), Fast exact
    multiplication by the Hessian, Neural Computation 6(1).

    Examples
    --------
    >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # doctest: +SKIP
    >>> op = hessian(model, loss, dataset)                                   # doctest: +SKIP
    >>> density = specdens.slq(op, num_steps=90, num_probes=10)              # doctest: +SKIP
    """
    if data is None:
        raise TypeError("hessian needs data: one (inputs, targets) batch, a tf.data.Dataset or "
                        "an iterable of batches")
    batch_loss = BatchLoss(model, loss, loss_fn, batch_size_fn=batch_size_fn, params=params,
                           batchnorm=batchnorm)
    return HessianOperator(batch_loss, data, method=method, block=block,
                           weight_decay=weight_decay, regularizer=regularizer,
                           check_determinism=check_determinism, strategy=strategy)
