"""The generalised Gauss-Newton matrix ``G = sum_b (n_b / N) J_b^T H_b J_b``.

``J_b`` is the Jacobian of the model's outputs on batch ``b`` with respect to the selected
parameters and ``H_b`` the Hessian of the criterion with respect to those outputs. ``G`` is
the Hessian with the second-derivative terms of the network dropped: positive
semi-definite whenever the criterion is convex in the outputs (cross-entropy, squared
error).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._loss import BatchLoss, gradients, split_batch
from ._operator import DataOperator
from ._params import stack_columns
from .distributed import join_failed, resolve_group


class GGNOperator(DataOperator):
    """``G v`` by ``J v`` (the double-vjp trick on the kept output graph), then ``H_out``,
    then ``J^T``: three backwards per vector, no forward pass while graphs are kept."""

    kind = "ggn"

    def _build(self, batch: Any) -> tuple[Any, float]:
        inputs, targets = split_batch(batch)
        count = self.loss.count_of(batch)
        out = self.loss.outputs(inputs, self._leaves)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"ggn needs a model whose output is one tensor; got "
                            f"{type(out).__name__}")
        out_leaf = out.detach().requires_grad_(True)
        value = self.loss.scale(self.loss.criterion(out_leaf, targets), count)
        (dl,) = torch.autograd.grad(value.reshape(()), out_leaf, create_graph=True)
        u = torch.zeros_like(out, requires_grad=True)
        # (outputs that depend on none of the selected parameters: all None, G = 0)
        gu = gradients(out, self._leaf_list, grad_outputs=u, create_graph=True)
        return (out, out_leaf, dl, u, gu), count

    def _apply(self, state: Any, V: torch.Tensor, retain: bool) -> torch.Tensor:
        out, out_leaf, dl, u, gu = state
        idx = [i for i, g in enumerate(gu) if g is not None and g.requires_grad]
        k = V.shape[1]
        cols = []
        for j in range(k):
            keep = retain or j < k - 1
            if not idx or not dl.requires_grad:
                cols.append(torch.zeros(V.shape[0], dtype=V.dtype, device=V.device))
                continue
            parts = self.space.split(V[:, j])
            (jv,) = torch.autograd.grad([gu[i] for i in idx], u,
                                        grad_outputs=[parts[i] for i in idx], retain_graph=True)
            (hjv,) = torch.autograd.grad(dl, out_leaf, grad_outputs=jv, retain_graph=True)
            res = torch.autograd.grad(out, self._leaf_list, grad_outputs=hjv,
                                      retain_graph=keep, allow_unused=True)
            cols.append(self.space.flatten(res))
        return stack_columns(cols)


def ggn(
    model: torch.nn.Module,
    criterion: Callable[[Any, Any], torch.Tensor],
    data: Any,
    *,
    params: Any = None,
    batch_size_fn: Callable[[Any], Any] | None = None,
    batchnorm: str = "batch",
    weight_decay: float = 0.0,
    graph_memory: int | None = None,
    check_determinism: bool = True,
    process_group: Any = None,
) -> GGNOperator:
    """The generalised Gauss-Newton matrix of the mean loss as a specdens operator.

    ``G = sum_b (n_b / N) J_b^T H_b J_b + weight_decay * I`` with ``J_b`` the Jacobian of
    ``model(inputs_b)`` (all outputs of the batch, so BatchNorm on batch statistics is
    included) and ``H_b`` the Hessian of ``criterion(outputs, targets_b)`` in the outputs.

    Parameters
    ----------
    model, criterion, data, params, batch_size_fn, batchnorm, weight_decay, graph_memory,
    check_determinism, process_group
        As in :func:`specdens.backends.torch.hessian`; batches are ``(inputs, targets)``
        and the model returns one tensor. A custom ``loss_fn`` has no output/loss split,
        so it is not accepted here.

    Returns
    -------
    GGNOperator
        Same vector space as ``hessian(...)`` with the same options.

    References
    ----------
    N. N. Schraudolph (2002), Fast curvature matrix-vector products for second-order
    gradient descent, Neural Computation 14(7). J. Martens (2020), New insights and
    perspectives on the natural gradient method, JMLR 21.
    """
    group = resolve_group(process_group)
    try:
        if criterion is None:
            raise TypeError("ggn needs a criterion(outputs, targets): the GGN splits the loss "
                            "into the model's outputs and a loss of those outputs")
        loss = BatchLoss(model, criterion, None, batch_size_fn=batch_size_fn, params=params,
                         batchnorm=batchnorm)
    except Exception:
        join_failed(group)  # the other ranks learn of it, then this one raises
        raise
    return GGNOperator(loss, data, weight_decay=weight_decay, regularizer=None,
                       graph_memory=graph_memory, check_determinism=check_determinism,
                       process_group=process_group, store=True)


__all__ = ["GGNOperator", "ggn"]
