"""JAX backend (``specdens.backends.jax``): the Hessian, the generalised Gauss-Newton
matrix and the gradient of a mean training loss over a data set, as specdens operators on
flat jax arrays; a Lanczos loop compiled whole with :func:`jax.jit`; data sharded over
devices.

Importing this module imports jax; ``import specdens`` does not.

>>> import specdens
>>> from specdens.backends.jax import hessian, slq               # doctest: +SKIP
>>> H = hessian(loss_fn, params, batches)                        # doctest: +SKIP
>>> specdens.slq(H, num_steps=90, num_probes=10)   # the core's engine, eager  # doctest: +SKIP
>>> slq(H, num_steps=90, num_probes=10)            # one compiled loop         # doctest: +SKIP

float64 needs ``jax_enable_x64`` (``jax.config.update("jax_enable_x64", True)`` at
start-up, or ``with jax.enable_x64(True):`` around building and using the operator).
"""

from .compiled import lanczos, slq
from .distributed import resolve_mesh
from .ggn import GGNOperator, ggn
from .gradient import gradient
from .hessian import HessianOperator, hessian
from .tracking import track

__all__ = [
    "GGNOperator",
    "HessianOperator",
    "ggn",
    "gradient",
    "hessian",
    "lanczos",
    "resolve_mesh",
    "slq",
    "track",
]
