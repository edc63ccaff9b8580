"""Framework backends, installed as ``specdens.backends``.

Each subpackage (``specdens.backends.torch``, ``.jax``, ``.tf``) imports its framework
only when it is itself imported; ``import specdens`` imports none of them.
"""
