"""The loss of one batch as a function of the selected parameters.

The model is called through :func:`torch.func.functional_call` on clones of its
parameters and buffers taken when the operator is built, with every module in the
train/eval mode it had then, so the operator is the Hessian at that point and nothing
the computation does reaches the user's tensors.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.func import functional_call
from torch.nn.modules.dropout import _DropoutNd

from ._data import CountError, as_count, batch_count
from ._params import ParamSpace, select_parameters
from ._state import check_batchnorm, normalisation_modes, training_modes
from .distributed import describe

# How many rounding errors (eps relative) two evaluations of the loss of one batch may
# differ by and still pass for deterministic. On the CPU a repeated evaluation is bit for
# bit the same. On a GPU, kernels that accumulate with atomics (scatter_add/index_add, as
# in graph networks; some cuDNN algorithms) sum in an order that varies between calls;
# the rounding errors that reordering leaves in a loss (a mean of like-signed terms) are
# random, partly cancel, and come to a few eps: 64 leaves room for them. Dropout moves a
# loss by far more: p = 0.01 on 256 units x 2000 samples by 5e-4 relative, 4400 float32
# eps. A model whose loss varies more on its device passes check_determinism=False.
DETERMINISM_EPS = 64

# Criterion reductions whose value is a mean over the batch (``"batchmean"``:
# ``KLDivLoss``'s sum over a sample's entries, averaged over the samples) or a sum
# (divided by the count here).
REDUCTIONS = ("mean", "batchmean", "sum")


class _Call(torch.nn.Module):
    """A module whose forward is ``fn(model, batch)``: ``functional_call`` on it swaps the
    parameters of ``model`` for every method ``fn`` calls, not only ``forward``."""

    def __init__(self, model: torch.nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.__dict__["_fn"] = fn  # a criterion module must not become a submodule

    def forward(self, batch: Any) -> Any:
        return self._fn(self.model, batch)


class BatchLoss:
    """Mean loss of one batch, and its sample count, at given values of the selected
    parameters.

    Parameters
    ----------
    model, criterion, loss_fn, batch_size_fn, params, batchnorm
        As in :func:`specdens.backends.torch.hessian`.
    """

    def __init__(self, model: torch.nn.Module, criterion: Any, loss_fn: Any, *,
                 batch_size_fn: Any, params: Any, batchnorm: str):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if (criterion is None) == (loss_fn is None):
            raise TypeError("pass exactly one of criterion (called as criterion(model(inputs), "
                            "targets)) and loss_fn=lambda model, batch: ...")
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError("batch_size_fn must be a callable(batch) -> number of samples")
        check_batchnorm(model, batchnorm)
        self.reduction = "mean"
        if criterion is not None:
            if not callable(criterion):
                raise TypeError(f"criterion must be callable; got {type(criterion).__name__}")
            self.reduction = _reduction_of(criterion)
            if self.reduction not in REDUCTIONS:
                raise ValueError(
                    f"criterion has reduction={self.reduction!r}; specdens needs a scalar "
                    "loss: use reduction='mean' (or 'batchmean' for KLDivLoss, or 'sum', "
                    "divided by the batch size here)"
                )
        self.model = model
        self.criterion = criterion
        self.loss_fn = loss_fn
        # the count of the batch about to be evaluated, when known from an earlier pass
        # over the same data (see :meth:`known_count`): counting it again would read a
        # value back from the device (a synchronisation) for every batch of every product
        self._known: float | None = None
        self.batch_size_fn = batch_size_fn
        # whether loss_fn returns (mean_loss, count): learnt at its first call (None
        # before); while it is not known, a count needs a forward pass (count_of)
        self._pair: bool | None = None
        self.batchnorm = batchnorm
        # every module's mode now, set again for every evaluation: the operator stays the
        # loss of this point even if the model is switched to train() or eval() later
        self.modes = training_modes(model)
        selected = select_parameters(model, params)
        self.space = ParamSpace(selected)
        chosen = {n for n, _ in selected}
        with torch.no_grad():
            self.primal = {n: p.detach().clone() for n, p in selected}
            self.frozen = {"model." + n: p.detach().clone()
                           for n, p in model.named_parameters() if n not in chosen}
            self.frozen.update({"model." + n: b.detach().clone()
                                for n, b in model.named_buffers()})
        fn = self._criterion_loss if criterion is not None else self._custom_loss
        self._call = _Call(model, fn)
        self._forward = _Call(model, call_model)

    # -- the loss -------------------------------------------------------------------
    @contextlib.contextmanager
    def known_count(self, count: float | None) -> Iterator[None]:
        """Evaluate a batch whose count an earlier pass over the same data found (the
        operators check that the data did not change) without counting it again; None:
        count it."""
        self._known = count
        try:
            yield
        finally:
            self._known = None

    def _criterion_count(self, batch: Any) -> float:
        """The weight of a criterion batch: ``batch_size_fn`` when given, else the
        denominator of the criterion's own mean where it is not the number of samples
        (:func:`class_index_count`), else the number of samples."""
        if self._known is not None:
            return self._known
        if self.batch_size_fn is None:
            count = class_index_count(self.criterion, split_batch(batch)[1])
            if count is not None:
                return count
        return batch_count(batch, self.batch_size_fn)

    def _criterion_loss(self, model: torch.nn.Module, batch: Any) -> tuple[Any, float]:
        inputs, targets = split_batch(batch)
        count = self._criterion_count(batch)
        loss = self.criterion(call_model(model, inputs), targets)
        return self.scale(loss, count), count

    def _custom_loss(self, model: torch.nn.Module, batch: Any) -> tuple[Any, float]:
        out = self.loss_fn(model, batch)
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise ValueError(f"loss_fn returned a {type(out).__name__} of length {len(out)}; "
                                 "return the batch's mean loss, or (mean_loss, count)")
            self._pair = True
            loss = out[0]
            count = self._known if self._known is not None else as_count(out[1], "loss_fn")
        else:
            self._pair = False
            loss, count = out, batch_count(batch, self.batch_size_fn)
        return loss, count

    def scale(self, loss: Any, count: float) -> Any:
        """The criterion's value as a mean over the batch's samples (``'mean'`` and
        ``'batchmean'`` are one already)."""
        return loss / count if self.reduction == "sum" else loss

    def __call__(self, batch: Any, params: dict[str, torch.Tensor]) -> tuple[Any, float]:
        """``(mean loss, count)`` of ``batch`` with the selected parameters set to
        ``params`` (a dict by parameter name)."""
        mapping = dict(self.frozen)
        mapping.update({"model." + n: t for n, t in params.items()})
        with normalisation_modes(self.model, self.batchnorm, self.modes):
            loss, count = functional_call(self._call, mapping, (batch,))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                f"the loss must be a scalar tensor; got "
                f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}"
                ". Use reduction='mean' or return loss.mean() from loss_fn"
            )
        return loss.reshape(()), count

    def outputs(self, inputs: Any, params: dict[str, torch.Tensor]) -> Any:
        """``model(inputs)`` with the selected parameters set to ``params``."""
        mapping = dict(self.frozen)
        mapping.update({"model." + n: t for n, t in params.items()})
        with normalisation_modes(self.model, self.batchnorm, self.modes):
            return functional_call(self._forward, mapping, (inputs,))

    def count_of(self, batch: Any) -> float:
        """Samples in ``batch``: the count every evaluation of the loss gives (a pair's
        count wins over ``batch_size_fn``), without a forward pass when it does not come
        from ``loss_fn``."""
        if self.criterion is not None:
            return self._criterion_count(batch)
        if self.batch_size_fn is not None and self._pair is False:
            return batch_count(batch, self.batch_size_fn)
        # grad enabled: loss_fn may differentiate with respect to its inputs (a PINN);
        # the parameters are detached, so no graph of them is built
        with autograd():
            return self(batch, self.primal)[1]

    def description(self) -> str:
        """What this loss is, the same in every process for the same loss (see
        :func:`~specdens.backends.torch.distributed.describe`): the criterion with its
        settings, or ``loss_fn``; ``batch_size_fn``."""
        what = (describe(self.criterion) if self.criterion is not None
                else f"loss_fn={describe(self.loss_fn)}")
        return f"{what}, batch_size_fn={describe(self.batch_size_fn)}"

    def leaves(self) -> dict[str, torch.Tensor]:
        """Fresh leaf copies of the selected parameters that require grad."""
        return {n: t.detach().requires_grad_(True) for n, t in self.primal.items()}

    def check_deterministic(self, batch: Any) -> None:
        """Raise when the loss is random: a dropout module with ``p > 0`` that the loss
        of ``batch`` calls in training mode, or two evaluations of it that differ by more
        than ``DETERMINISM_EPS`` rounding errors (another random operation)."""
        names = {id(m): f"{n or 'model'} ({type(m).__name__})"
                 for n, m in self.model.named_modules()}
        dropping: dict[int, str] = {}

        def note(module: torch.nn.Module, args: Any) -> None:
            if module.training and module.p > 0:
                dropping[id(module)] = names[id(module)]

        hooks = [m.register_forward_pre_hook(note) for m in self.model.modules()
                 if isinstance(m, _DropoutNd)]
        # grad enabled: loss_fn may differentiate with respect to its inputs (a PINN);
        # the parameters are detached, so no graph of them is built
        try:
            with autograd():
                a, _ = self(batch, self.primal)
        finally:
            for h in hooks:
                h.remove()
        if dropping:
            raise RuntimeError(
                "the model is not deterministic: the loss calls "
                f"{', '.join(dropping.values())} in training mode, which drops random units "
                "at every evaluation. A Hessian needs a fixed function: call .eval() on the "
                "dropout modules (or the model) before building the operator, or pass "
                "check_determinism=False if the randomness is intended"
            )
        with autograd():
            b, _ = self(batch, self.primal)
        a, b = float(a.detach()), float(b.detach())
        if not (math.isfinite(a) and math.isfinite(b)):
            raise FloatingPointError(f"the loss of the first batch is not finite ({a})")
        tol = DETERMINISM_EPS * torch.finfo(self.space.dtype).eps * max(abs(a), abs(b), 1e-30)
        if abs(a - b) > tol:
            raise RuntimeError(
                f"the model is not deterministic: two evaluations of the loss on the first "
                f"batch gave {a!r} and {b!r}. A Hessian needs a fixed function: make the "
                "random operations of the model or the loss deterministic (noise, "
                "torch.nn.functional.dropout(training=True)), or pass check_determinism=False "
                "if the randomness is intended"
            )


_CALL_NOTE = (
    "with a criterion, specdens calls model(inputs) with ONE argument, inputs being the "
    "first item of the batch (here a {kind}), as it is: never model(*inputs) nor "
    "model(**inputs). For a model whose forward takes several arguments, "
    "forward(self, x1, x2) or forward(self, **batch), pass loss_fn=lambda model, batch: "
    "criterion(model(*batch[0]), batch[1]) (or model(**batch[0])) instead of the criterion")


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(inputs)``: one argument, whatever ``inputs`` is. A TypeError on inputs that
    are a tuple, list or mapping (a ``forward(self, x1, x2)`` model) gets a note on how
    the model is called and what to pass instead."""
    try:
        return model(inputs)
    except TypeError as exc:
        if isinstance(inputs, (tuple, list, Mapping)):
            exc.add_note(_CALL_NOTE.format(kind=type(inputs).__name__))
        raise


def _reduction_of(criterion: Any) -> Any:
    """The reduction of a loss module (its ``reduction``), of a ``functools.partial`` of a
    loss function (its ``reduction`` keyword: ``partial(F.mse_loss, reduction="sum")`` was
    read as a mean), or ``"mean"`` (a function of the caller's, which must return one)."""
    if isinstance(criterion, functools.partial):
        if "reduction" in criterion.keywords:
            return criterion.keywords["reduction"]
        return _reduction_of(criterion.func)
    reduction = getattr(criterion, "reduction", None)
    if reduction is not None:
        return reduction
    try:  # a loss function's own default (torch.nn.functional's are "mean")
        default = inspect.signature(criterion).parameters.get("reduction")
    except (TypeError, ValueError):
        default = None
    if default is not None and isinstance(default.default, str):
        return default.default
    return "mean"


@contextlib.contextmanager
def autograd(*, records: bool = True) -> Iterator[None]:
    """``torch.enable_grad()``, refusing ``torch.inference_mode()``, which it cannot
    switch off: there the loss records no graph, and its derivatives came back as zeros
    (read as "depends on no parameter") without an error. ``records=False``: the block
    only differentiates graphs recorded before (an operator's stored graphs), which works
    in inference mode too."""
    if records and torch.is_inference_mode_enabled():
        raise RuntimeError(
            "specdens differentiates the loss, but torch.inference_mode() is on, and "
            "torch.enable_grad() cannot switch it off: call it outside the inference_mode "
            "block (PyTorch Lightning runs validation and test under inference_mode; record "
            "in a training hook, or set Trainer(inference_mode=False)), or inside "
            "torch.inference_mode(False) with data made outside inference mode")
    with torch.enable_grad():
        yield


def gradients(value: torch.Tensor, leaves: list[torch.Tensor], *,
              grad_outputs: torch.Tensor | None = None,
              create_graph: bool = False) -> list[torch.Tensor | None]:
    """``torch.autograd.grad(value, leaves, grad_outputs)`` with ``None`` for a leaf that
    ``value`` does not depend on (zero), and all ``None`` when it depends on none of them
    (only parameters the loss does not use, a regularizer that ignores its arguments),
    where autograd would raise."""
    if not value.requires_grad:
        return [None] * len(leaves)
    return list(torch.autograd.grad(value, leaves, grad_outputs=grad_outputs,
                                    create_graph=create_graph, allow_unused=True))


def class_index_count(criterion: Any, targets: Any) -> float | None:
    """The denominator of ``criterion``'s mean when it is not the number of samples, else
    None.

    ``torch.nn.CrossEntropyLoss`` and ``torch.nn.NLLLoss`` with class-index targets average
    over the targets that are not ``ignore_index``, weighted by the class weights:
    ``sum_i weight[y_i] [y_i != ignore_index]`` (over every target element, so a sequence
    loss with targets ``(N, T)`` counts tokens). Weighting batches by that denominator makes
    the data set's loss the one the criterion gives on all the data at once, whatever the
    batching. (With class-probability targets the mean is over samples: None.)
    """
    if not isinstance(criterion, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)):
        return None
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point \
            or targets.dtype.is_complex or targets.dtype == torch.bool:
        return None
    keep = targets != criterion.ignore_index
    weight = criterion.weight
    if weight is None:
        count = float(keep.sum())
    else:
        w = weight.detach().to(torch.float64)[torch.where(keep, targets, 0)]
        count = float((w * keep).sum())
    if not count > 0:
        raise CountError(
            f"a batch of {tuple(targets.shape)} targets has none that counts for "
            f"{type(criterion).__name__} (every target is ignore_index="
            f"{criterion.ignore_index}, or their class weights sum to 0): its mean loss is "
            "undefined; leave such batches out of the data"
        )
    return count


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a criterion batch."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        f"with a criterion every batch must be (inputs, targets); got a "
        f"{type(batch).__name__}{_length(batch)}"
        ". For other batches use loss_fn=lambda model, batch: ..."
    )


def _length(batch: Any) -> str:
    return f" of length {len(batch)}" if hasattr(batch, "__len__") else ""
