"""The generalised Gauss-Newton matrix ``G = sum_b (n_b / N) J_b^T H_b J_b``.

``J_b`` is the Jacobian of the model's outputs on batch ``b`` with respect to the selected
variables and ``H_b`` the Hessian of the loss with respect to those outputs. ``G`` is the
Hessian with the second-derivative terms of the network dropped: positive semi-definite
whenever the loss is convex in the outputs (cross-entropy, squared error).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._loss import BatchLoss, _ggn_added_losses, activity_regularized
from ._operator import DataOperator


class GGNOperator(DataOperator):
    """``G v`` by ``J v`` (a forward accumulator over the forward pass), then ``H_out``
    (forward-over-back in the outputs), then ``J^T`` (the tape of the forward pass)."""

    _product_name = "ggn"


def ggn(
    model: Any,
    loss: Callable[[Any, Any], Any],
    data: Any,
    *,
    params: Any = None,
    batch_size_fn: Callable[[Any], Any] | None = None,
    batchnorm: str = "batch",
    weight_decay: float = 0.0,
    block: str = "loop",
    check_determinism: bool = True,
    strategy: Any = None,
) -> GGNOperator:
    """The generalised Gauss-Newton matrix of the mean loss as a specdens operator.

    ``G = sum_b (n_b / N) J_b^T H_b J_b + Hess(P) + weight_decay * I`` with ``J_b`` the
    Jacobian of ``model(inputs_b)`` (all outputs of the batch, so BatchNorm on batch
    statistics is included), ``H_b`` the Hessian of ``loss(targets_b, outputs)`` in the
    outputs and ``P`` the sum of the Keras model's weight regularisers
    (``kernel_regularizer=``..., in ``model.losses``), whose exact Hessian is added once,
    as ``weight_decay * I`` is. Losses the model adds while it is called (an
    ``activity_regularizer``, ``add_loss``) are functions of inner activations, which the
    GGN has no place for: they raise a ValueError (use :func:`hessian`, which includes
    them). When the outputs carry a Keras mask, ``H_b`` is that of the loss of the masked
    outputs (the mean over the unmasked entries, as in the Hessian) and ``n_b`` the
    mask's sum.

    Parameters
    ----------
    model, loss, data, params, batch_size_fn, batchnorm, weight_decay, check_determinism,
    strategy
        As in :func:`specdens.backends.tf.hessian`; batches are ``(inputs, targets)`` and
        the model returns one tensor. A custom ``loss_fn`` has no output/loss split, so it
        is not accepted here.
    block
        ``"loop"`` (default: one forward pass with a tangent per vector) or ``"batched"``
        (vectorised with ``tf.vectorized_map``).

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
    if loss is None:
        raise TypeError("ggn needs a loss(targets, outputs): the GGN splits the loss into the "
                        "model's outputs and a loss of those outputs")
    batch_loss = BatchLoss(model, loss, None, batch_size_fn=batch_size_fn, params=params,
                           batchnorm=batchnorm)
    activity = activity_regularized(batch_loss.adapter)
    if activity:
        raise ValueError(_ggn_added_losses(
            f"activity_regularizer on {', '.join(activity[:6])}"
            f"{', ...' if len(activity) > 6 else ''}"))
    return GGNOperator(batch_loss, data, method="reverse", block=block,
                       weight_decay=weight_decay, regularizer=None,
                       check_determinism=check_determinism, strategy=strategy)


__all__ = ["GGNOperator", "ggn"]
