"""The gradient of a model's mean training loss over the whole data set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from specdens import _checks

from ._data import Batches
from ._loss import BatchLoss, autograd, gradients
from .distributed import (
    agree_and_count,
    all_reduce_sum,
    join_failed,
    no_data_error,
    resolve_group,
)


def gradient(
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
    process_group: Any = None,
) -> torch.Tensor:
    """The full-data gradient ``g = sum_b (n_b / N) grad L_b + weight_decay * theta +
    grad R`` as a flat vector in the space of :func:`hessian` called with the same options.

    Parameters
    ----------
    model, criterion, data, loss_fn, params, batch_size_fn, batchnorm, weight_decay,
    regularizer, process_group
        As in :func:`specdens.backends.torch.hessian` (same weighting of uneven batches,
        same parameter order, same reduction over ``torch.distributed`` ranks). The model
        is not modified (``.grad`` included).

    Returns
    -------
    torch.Tensor
        Shape ``(n,)``, the model's dtype, on its device.

    Raises
    ------
    FloatingPointError
        When the gradient has a NaN or Inf entry (checked once, on the final vector).

    References
    ----------
    B. Ghorbani, S. Krishnan, Y. Xiao (2019), An Investigation into Neural Net Optimization
    via Hessian Eigenvalue Density, ICML (section 4: the gradient and the outlier
    eigenspace).
    """
    group = resolve_group(process_group)
    with autograd():
        try:
            if data is None:
                raise TypeError("gradient needs data: one (inputs, targets) batch or an "
                                "iterable of batches")
            weight_decay = _checks.finite_number(weight_decay, "weight_decay")
            loss = BatchLoss(model, criterion, loss_fn, batch_size_fn=batch_size_fn,
                             params=params, batchnorm=batchnorm)
            space = loss.space
            leaves = loss.leaves()
            leaf_list = [leaves[n] for n in space.names]
            acc = torch.zeros(space.n, dtype=space.dtype, device=space.device)
            total = 0.0
            # with a process group, this rank's shard may be empty (it adds nothing)
            batches = Batches(data, space.device, allow_empty=group is not None)
            for i, batch in enumerate(batches):
                with batches.at(i):
                    value, count = loss(batch, leaves)
                acc.add_(space.flatten(gradients(value, leaf_list)), alpha=count)
                total += count
            reg = None
            if regularizer is not None:
                if not callable(regularizer):
                    raise TypeError("regularizer must be a callable(params: dict[str, "
                                    "Tensor]) -> scalar tensor")
                r = regularizer(dict(leaves))
                if not isinstance(r, torch.Tensor) or r.numel() != 1:
                    raise ValueError("regularizer must return a scalar tensor")
                reg = space.flatten(gradients(r.reshape(()), leaf_list))
        except Exception:
            join_failed(group)  # the other ranks learn of it, then this one raises
            raise
        # one small collective before the vector-sized one: the ranks must agree
        total = agree_and_count(group, loss, kind="gradient", count=total,
                                weight_decay=weight_decay, regularizer=regularizer)
        if total == 0:      # the same on every rank: all raise
            raise no_data_error(group)
        all_reduce_sum(acc, group)
        g = acc / total
        if weight_decay:
            g = g + float(weight_decay) * space.flatten([loss.primal[n] for n in space.names])
        if reg is not None:
            g = g + reg
        # one read of the final vector (not one per batch, which would synchronise with
        # the device at every batch); the same on every rank, so all raise
        bad = int((~torch.isfinite(g)).sum())
        if bad:
            raise FloatingPointError(
                f"the gradient has NaN or Inf in {bad} of its {g.numel()} entries: the loss "
                "of some batch is not finite (a NaN or Inf in the data, an overflowing loss, "
                "a float16 model); specdens never returns such values. Check the data and "
                "the model")
    return g.detach()
