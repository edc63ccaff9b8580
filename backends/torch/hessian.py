"""The Hessian of a model's mean training loss as a specdens operator."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch

from ._loss import BatchLoss, autograd, gradients, split_batch
from ._operator import DataOperator, graph_products
from ._params import stack_columns
from .distributed import join_failed, resolve_group

METHODS = ("graph", "forward")
BLOCKS = ("loop", "batched")


# torch.func's forward-over-reverse fails inside torch for some losses: backward formulas
# without a forward-mode derivative (NotImplementedError "Trying to use forward AD with
# huber_loss_backward ..."), or whose forward-mode derivative writes into the zero tangent
# of a tensor the function closes over (RuntimeError "ZeroTensors are immutable": mse_loss
# with reduction='mean' and its targets, torch 2.13)
_FORWARD_AD_FAILURES = ("forward AD", "ZeroTensors are immutable")
_FORWARD_AD_FAILED = (
    "method='forward' cannot differentiate this loss: torch.func's forward-over-reverse "
    "(torch.func.jvp of torch.func.grad) failed inside torch ({cause}): some of torch's "
    "backward formulas have no forward-mode derivative (huber_loss, soft_margin_loss...) or "
    "break under it (mse_loss with reduction='mean' called in a loss_fn). Use "
    "method='graph' (the default), which needs no forward-mode derivative")


_WEIGHT_NORM = (
    "hessian cannot differentiate this model: the selected parameters {names} feed torch's "
    "weight norm ({where}), whose second derivative in torch {version} is wrong (the "
    "double backward of torch._weight_norm; its first derivative is right), so the "
    "Hessian would be wrong and not even symmetric. Write the reparametrisation by hand "
    "in the forward, w = g * v / v.norm(dim=..., keepdim=True) (the norm over every "
    "dimension but weight norm's dim), which autograd differentiates correctly; or "
    "leave those parameters out with params=. ggn() and gradient() use first "
    "derivatives only and are not affected")


@functools.lru_cache(maxsize=1)
def weight_norm_hessian_is_wrong() -> bool:
    """Whether torch's second derivative of ``torch._weight_norm`` is wrong in this
    torch: a Hessian-vector product through its double backward (what
    ``method="graph"`` takes) against that of the same function written with
    ``Tensor.norm``, on a small float64 example on the CPU (wrong by ~1 relative in
    torch 2.13; a correct one agrees to ~1e-15)."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    g = torch.rand(4, 1, dtype=torch.float64, generator=gen) + 0.5
    u = torch.randn(4, 3, dtype=torch.float64, generator=gen)

    def hvp(w_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        x = v.clone().requires_grad_(True)
        with autograd():
            (gx,) = torch.autograd.grad((w_of(x) ** 3).sum(), x, create_graph=True)
            return torch.autograd.grad(gx, x, grad_outputs=u)[0]

    fused = hvp(lambda x: torch._weight_norm(x, g, 0))
    plain = hvp(lambda x: g * x / x.norm(dim=1, keepdim=True))
    return not bool(torch.allclose(fused, plain, rtol=1e-10, atol=1e-12))


def weight_norm_inputs(model: torch.nn.Module) -> dict[int, str]:
    """The parameters that torch's weight norm takes (by ``id``): those of a
    parametrization chain holding ``torch.nn.utils.parametrizations.weight_norm``'s
    ``_WeightNorm``, and the ``name_g``/``name_v`` of the legacy
    ``torch.nn.utils.weight_norm`` forward-pre-hook; each with where it is used."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import _WeightNorm

    legacy = getattr(importlib.import_module("torch.nn.utils.weight_norm"), "WeightNorm",
                     None)
    found: dict[int, str] = {}
    for mod_name, module in model.named_modules():
        where = mod_name or "the model"
        if parametrize.is_parametrized(module):
            for tensor, chain in module.parametrizations.items():
                if any(isinstance(p, _WeightNorm) for p in chain):
                    for p in chain.parameters():
                        found[id(p)] = (f"{where}.{tensor} through "
                                        "torch.nn.utils.parametrizations.weight_norm")
        for hook in module._forward_pre_hooks.values():
            if legacy is not None and isinstance(hook, legacy):
                for suffix in ("_g", "_v"):
                    p = getattr(module, hook.name + suffix, None)
                    if isinstance(p, torch.Tensor):
                        found[id(p)] = f"{where}.{hook.name} through torch.nn.utils.weight_norm"
    return found


def check_weight_norm(loss: BatchLoss) -> None:
    """Refuse a Hessian with respect to parameters that feed torch's weight norm, whose
    second derivative is wrong (see :func:`weight_norm_hessian_is_wrong`)."""
    inputs = weight_norm_inputs(loss.model)
    if not inputs:
        return
    params = dict(loss.model.named_parameters())
    hit = [n for n in loss.space.names if id(params[n]) in inputs]
    if hit and weight_norm_hessian_is_wrong():
        where = sorted({inputs[id(params[n])] for n in hit})
        raise ValueError(_WEIGHT_NORM.format(names=hit, where="; ".join(where),
                                             version=torch.__version__))


class HessianOperator(DataOperator):
    """``H v`` for the Hessian of the mean loss over all samples of the data.

    Build it with :func:`hessian`. Vectors are flat tensors of the selected parameters
    (``param_names`` order) in the model's dtype and on its device.
    """

    kind = "hessian"

    def __init__(self, loss: BatchLoss, data: Any, *, method: str, block: str, **kw: Any):
        self.method = method
        self.block = block
        super().__init__(loss, data, store=method == "graph", **kw)

    def _check_options(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; choose 'graph' (reverse-over-reverse on "
                             "kept first-order graphs) or 'forward' (torch.func "
                             "forward-over-reverse)")
        if self.block not in BLOCKS:
            raise ValueError(f"block={self.block!r}; choose 'loop' or 'batched'")
        check_weight_norm(self.loss)

    def _check_first_batch(self, batch: Any) -> None:
        if self.method == "forward":
            # one product on the first batch, so that a loss torch.func cannot
            # differentiate raises here, at construction (on every rank), not in a product
            zero = torch.zeros((self.space.n, 1), dtype=self.dtype, device=self.device)
            with autograd():   # (as in a product)
                self._apply((batch, self.loss.count_of(batch)), zero, False)

    def _build(self, batch: Any) -> tuple[Any, float]:
        if self.method == "forward":
            # the state is the batch and its count: the products evaluate the loss again,
            # and must not count the batch again (a device read for some criteria)
            count = self.loss.count_of(batch)
            return (batch, count), count
        value, count = self.loss(batch, self._leaves)
        return gradients(value, self._leaf_list, create_graph=True), count

    def _apply(self, state: Any, V: torch.Tensor, retain: bool) -> torch.Tensor:
        if self.method == "forward":
            batch, count = state
            with self.loss.known_count(count):
                return self._forward_over_reverse(batch, V)
        return graph_products(state, self._leaf_list, V, self.space, retain=retain,
                              batched=self.block == "batched")

    def _apply_stored(self, V: torch.Tensor, acc: torch.Tensor) -> None:
        if self.method != "graph":
            return super()._apply_stored(V, acc)
        # One backward through the kept graphs of all batches of the same size: the
        # autograd engine sums their contributions per parameter, which saves a pass of
        # Python, a flatten and an accumulation per batch.
        groups: dict[float, list[Any]] = {}
        for grads, count in self._stored:
            groups.setdefault(count, []).extend(grads)
        for count, grads in groups.items():
            acc.add_(graph_products(grads, self._leaf_list, V, self.space, retain=True,
                                    batched=self.block == "batched"), alpha=count)

    def _forward_over_reverse(self, batch: Any, V: torch.Tensor) -> torch.Tensor:
        try:
            return self._jvp_of_grad(batch, V)
        except (RuntimeError, NotImplementedError) as exc:
            if not any(s in str(exc) for s in _FORWARD_AD_FAILURES):
                raise
            cause = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            raise RuntimeError(_FORWARD_AD_FAILED.format(cause=cause)) from exc

    def _jvp_of_grad(self, batch: Any, V: torch.Tensor) -> torch.Tensor:
        names = self.space.names
        # floating-point targets of a criterion enter the jvp as primals with a zero
        # tangent (which changes nothing) rather than as constants of the function: the
        # forward-mode derivative of mse_loss's backward writes into a constant's implicit
        # zero tangent, which raises ("ZeroTensors are immutable", torch 2.13)
        inputs, targets = (split_batch(batch) if self.loss.criterion is not None
                           else (None, None))
        dual = isinstance(targets, torch.Tensor) and targets.is_floating_point()
        zero = (torch.zeros_like(targets),) if dual else ()

        def grad_fn(p: dict, *t: torch.Tensor) -> dict:
            b = (inputs, t[0]) if dual else batch
            return torch.func.grad(lambda q: self.loss(b, q)[0])(p)

        primals = (self.loss.primal, targets) if dual else (self.loss.primal,)
        if self.block == "batched":
            tangents = dict(zip(names, self.space.split_block(V), strict=True))

            def one(t: dict) -> dict:
                return torch.func.jvp(grad_fn, primals, (t, *zero))[1]

            out = torch.func.vmap(one)(tangents)
            return self.space.flatten_block([out[n] for n in names], V.shape[1])
        cols = []
        for j in range(V.shape[1]):
            tangent = dict(zip(names, self.space.split(V[:, j]), strict=True))
            _, hv = torch.func.jvp(grad_fn, primals, (tangent, *zero))
            cols.append(self.space.flatten([hv[n] for n in names]))
        return stack_columns(cols)


def hessian(
    model: torch.nn.Module,
    criterion: Callable[[Any, Any], torch.Tensor] | None = None,
    data: Any = None,
    *,
    loss_fn: Callable[[torch.nn.Module, Any], Any] | None = None,
    params: Any = None,
    batch_size_fn: Callable[[Any], Any] | None = None,
    batchnorm: str = "batch",
    weight_decay: float = 0.0,
    regularizer: Callable[[dict], torch.Tensor] | None = None,
    method: str = "graph",
    block: str = "loop",
    graph_memory: int | None = None,
    check_determinism: bool = True,
    process_group: Any = None,
) -> HessianOperator:
    """The Hessian of the mean training loss of ``model`` as a specdens operator.

    The operator is ``H = sum_b (n_b / N) Hess(L_b) + weight_decay * I + Hess(R)`` at the
    parameter values of the call: ``L_b`` is the mean loss of batch ``b`` over its ``n_b``
    samples and ``N = sum_b n_b``, so uneven batches are weighted exactly; ``R`` is the
    ``regularizer``. Products are exact (no sampling), in the model's dtype, on its device.

    Parameters
    ----------
    model
        A ``torch.nn.Module``. It is never modified: the operator works on clones of its
        parameters and buffers taken here, with every module in the train/eval mode it
        has here (so it stays the Hessian at this point even if the model trains on, or
        is switched to ``train()`` or ``eval()``), never writes ``.grad`` or
        ``requires_grad``, and restores any mode it sets.
    criterion
        ``criterion(model(inputs), targets)``, with ``reduction='mean'`` (the batch mean,
        weighted by ``n_b``), ``reduction='batchmean'`` (``KLDivLoss``: the sum over a
        sample's entries averaged over the samples, a per-sample mean too) or
        ``reduction='sum'`` (divided by ``n_b`` here); ``reduction='none'`` raises a
        ValueError. Exclusive with ``loss_fn``.
    data
        One batch, or a re-iterable of batches (a list, a ``DataLoader`` without shuffling
        or random augmentation: batches must be the same on every pass; a difference,
        also one that only moves entries, as a flip or a permutation within the batch
        does, raises a RuntimeError). One batch is a tensor, a mapping (a dict, a
        tokenizer's ``BatchEncoding``), a tuple/list whose first item is a tensor, or
        ``((x1, x2), y)`` / ``({...}, y)`` for a model with several inputs; with a
        criterion, batches are ``(inputs, targets)`` and the model is called with one
        argument, ``model(inputs)``: ``model((x1, x2))`` or ``model({...})``, never
        ``model(x1, x2)`` nor ``model(**inputs)`` (for a ``forward(self, x1, x2)`` or
        ``forward(self, **batch)``, pass ``loss_fn=lambda model, batch:
        criterion(model(*batch[0]), batch[1])``). A tuple/list of tensors is always one
        batch (``[x, y]``, as a ``DataLoader`` over a ``TensorDataset`` yields it), so
        ``[x1, x2]`` is one batch, not two: write batches that are a single tensor each as
        ``[(x1,), (x2,)]``. Every batch must hold samples: a batch whose count is not
        positive (no samples, a count of 0 from ``batch_size_fn`` or ``loss_fn``, no target
        that ``CrossEntropyLoss``/``NLLLoss`` counts) raises a ValueError naming the
        batch, here and in :func:`~specdens.backends.torch.gradient`,
        :func:`~specdens.backends.torch.ggn` and
        :func:`~specdens.backends.torch.tracking.evaluate`; leave it out. Tensors move to
        the model's device.
    loss_fn
        ``loss_fn(model, batch)`` for losses that are not ``criterion(model(x), y)``
        (language models, PINNs). It returns either the batch's *mean* loss (its sample
        count is then ``batch_size_fn(batch)`` or the leading dimension of the batch's
        first tensor), or a pair ``(mean_loss, count)`` (e.g. the number of non-padding
        tokens), whose count is the batch's weight even when ``batch_size_fn`` is given.
        It may call any method of ``model``; their parameters are the operator's. It is
        always evaluated with grad enabled, so it may differentiate with respect to its
        inputs (``torch.autograd.grad``, for a PINN's residual) with ``method="graph"``
        (``torch.func`` transforms, which ``"forward"`` uses, refuse it).
    params
        The parameters spanning the operator (default: those with ``requires_grad``):
        names, ``fnmatch`` glob patterns (``"layer1.*"``) or parameter tensors. A string
        that is a parameter's exact name selects it and is not read as a pattern
        (``ModuleDict`` keys may hold ``[``). A tied (shared) parameter is listed once,
        under its first name, and selected by any of its names. Vectors follow
        ``model.named_parameters()`` order; see ``op.param_names``. Parameters the loss
        does not depend on give zero rows and columns. Parameters that feed torch's weight
        norm (``torch.nn.utils.parametrizations.weight_norm`` or the older
        ``torch.nn.utils.weight_norm``) are refused with a ValueError, for both methods:
        torch's second derivative of ``torch._weight_norm`` is wrong, so the Hessian
        would be wrong and not symmetric; write ``w = g * v / v.norm(...)`` in the
        forward instead (:func:`~specdens.backends.torch.ggn` and
        :func:`~specdens.backends.torch.gradient` are not affected).
    batch_size_fn
        ``batch_size_fn(batch) -> count`` of samples in a batch (default: the leading
        dimension of the batch's first tensor, that of ``inputs`` or of its first tensor;
        for ``CrossEntropyLoss``/``NLLLoss`` with class-index targets, the criterion's own
        denominator, the class weights of the targets that are not ``ignore_index``, so
        that the operator is the Hessian of the criterion on all the data at once). Not
        used for a ``loss_fn`` that returns ``(mean_loss, count)``: the pair's count wins.
    batchnorm
        ``"batch"`` (default, as in Ghorbani et al. 2019): BatchNorm layers normalise by
        the statistics of each batch, so the Hessian depends on the batching;
        ``"population"``: by their running statistics (eval-mode BatchNorm). Running
        statistics are never updated. Other layers keep the mode they have at this call.
    weight_decay
        Adds ``weight_decay * I``, the Hessian of ``weight_decay / 2 * ||theta||^2``.
    regularizer
        ``regularizer(params) -> scalar`` of the dict of selected parameters (by name);
        its Hessian is added (once, not per batch).
    method
        ``"graph"`` (default): the first-order graph of each batch is built once and kept
        while ``graph_memory`` allows; a product is then one extra backward per vector
        (``torch.autograd.grad`` with ``retain_graph``). Batches past the budget rebuild
        their graph in every product (double backward). ``"forward"``: forward-over-
        reverse with ``torch.func.jvp`` of ``torch.func.grad``, no kept graphs; one
        product on the first batch at construction checks that ``torch.func`` can
        differentiate the loss, and raises a RuntimeError naming the cause where it
        cannot (torch has no forward-mode derivative of some backward formulas:
        ``huber_loss``, ``soft_margin_loss``; ``mse_loss`` called in a ``loss_fn`` breaks
        under it, while a criterion's floating-point targets enter the jvp with a zero
        tangent, which avoids that).
    block
        How ``matmat`` treats k vectors within its single pass over the data: ``"loop"``
        (default, k backwards) or ``"batched"`` (one vectorised backward,
        ``is_grads_batched=True``; ``torch.func.vmap`` for ``method="forward"``), which
        needs k times the memory of one product.
    graph_memory
        Bytes the kept graphs may use (measured as the storages autograd saves); default
        half of the device's free memory. ``0`` keeps none.
    check_determinism
        Raise a RuntimeError if the loss is random: when the loss of the first batch calls
        a dropout module (``torch.nn.Dropout`` and the other ``_DropoutNd``) with
        ``p > 0`` in training mode, or when two evaluations of it differ by more than 64
        rounding errors (``64 * eps`` relative; repeated evaluation on the CPU is bit for
        bit the same, on a GPU atomics may reorder sums).
    process_group
        ``torch.distributed`` group to reduce over (default: the default group when
        ``torch.distributed`` is initialised). Each rank passes over its own shard; the
        products and counts are all-reduced, so every rank holds the Hessian of all data.
        A rank's shard may be empty (more ranks than samples); data that is empty on every
        rank raises a ValueError on every rank. Every rank must build the same operator
        (the same function, model dtype, criterion and its settings or ``loss_fn``,
        ``batch_size_fn``, ``params``, ``batchnorm``, ``weight_decay``, ``regularizer``):
        the construction checks it in one small collective and raises a RuntimeError on
        every rank, naming the difference; a rank that raises before or during its pass
        over its shard makes the others raise at once. Each product checks that every
        rank multiplies the same vectors (an estimator called with another ``seed`` on
        some rank): a RuntimeError on every rank on the CPU; elsewhere the product is made
        NaN on every rank and the estimator raises.
        A ``DataLoader`` that repeats or leaves out samples gets a warning: a
        ``DistributedSampler`` that pads or drops to even the shards, or ``drop_last=True``
        with an incomplete last batch.

    Returns
    -------
    HessianOperator
        ``shape == (n, n)``, ``dtype`` the model's, ``device`` the model's; ``matvec``,
        ``matmat``, ``to_dense()``; ``param_names``, ``unflatten(v)``, ``flatten(d)``,
        ``num_samples``, ``num_stored`` (batches with kept graphs), ``graph_bytes``.

    References
    ----------
    B. Ghorbani, S. Krishnan, Y. Xiao (2019), An Investigation into Neural Net Optimization
    via Hessian Eigenvalue Density, ICML. B. A. Pearlmutter (1994), Fast exact
    multiplication by the Hessian, Neural Computation 6(1).

    Examples
    --------
    >>> op = hessian(model, torch.nn.CrossEntropyLoss(), loader)      # doctest: +SKIP
    >>> density = specdens.slq(op, num_steps=90, num_probes=10)      # doctest: +SKIP
    """
    group = resolve_group(process_group)
    try:
        if data is None:
            raise TypeError("hessian needs data: one (inputs, targets) batch or an iterable "
                            "of batches")
        loss = BatchLoss(model, criterion, loss_fn, batch_size_fn=batch_size_fn,
                         params=params, batchnorm=batchnorm)
    except Exception:
        join_failed(group)  # the other ranks learn of it, then this one raises
        raise
    return HessianOperator(loss, data, method=method, block=block, weight_decay=weight_decay,
                           regularizer=regularizer, graph_memory=graph_memory,
                           check_determinism=check_determinism, process_group=process_group)
