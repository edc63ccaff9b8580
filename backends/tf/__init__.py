"""TensorFlow backend (``specdens.backends.tf``): the Hessian, the generalised Gauss-Newton
matrix and the gradient of the mean training loss of a Keras 3 model (TensorFlow backend)
or a ``tf.Module``, as specdens operators on flat ``tf.Tensor`` vectors, with
``tf.distribute`` reduction; and the TensorFlow array namespace that lets the engine run
on TensorFlow tensors.

Importing this module imports TensorFlow (not Keras); ``import specdens`` imports neither.

>>> import specdens
>>> from specdens.backends.tf import hessian                                # doctest: +SKIP
>>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)     # doctest: +SKIP
>>> op = hessian(model, loss, dataset)                                      # doctest: +SKIP
>>> specdens.slq(op, num_steps=90, num_probes=10)                           # doctest: +SKIP
"""

from ._state import ModelState
from .ggn import GGNOperator, ggn
from .gradient import gradient
from .hessian import HessianOperator, hessian

__all__ = [
    "GGNOperator",
    "HessianOperator",
    "ModelState",
    "ggn",
    "gradient",
    "hessian",
]
