"""PyTorch backend (``specdens.backends.torch``): the Hessian, the generalised Gauss-Newton
matrix and the gradient of a ``torch.nn.Module``'s mean training loss, as specdens
operators on flat parameter vectors, with ``torch.distributed`` reduction.

Importing this module imports torch; ``import specdens`` does not.

>>> import specdens
>>> from specdens.backends.torch import hessian                # doctest: +SKIP
>>> op = hessian(model, torch.nn.CrossEntropyLoss(), loader)   # doctest: +SKIP
>>> specdens.slq(op, num_steps=90, num_probes=10)              # doctest: +SKIP
"""

from ._state import ModelState
from .distributed import check_consistent
from .ggn import GGNOperator, ggn
from .gradient import gradient
from .hessian import HessianOperator, hessian
from .tracking import track

__all__ = [
    "GGNOperator",
    "HessianOperator",
    "ModelState",
    "check_consistent",
    "ggn",
    "gradient",
    "hessian",
    "track",
]
