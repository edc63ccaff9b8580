"""JAX backend (``specdens.backends.jax``): jitted Hessian-vector-product operators over
pytrees and multi-device reduction.

The core engine already runs on jax arrays through array-api-compat: wrap an array with
``specdens.aslinearoperator``. The Hessian operators arrive with the JAX backend issue.
"""
