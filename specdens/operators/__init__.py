"""Operators: the protocol, the base class, wrappers and compositions."""

from .base import LinearOperatorBase
from .compose import (
    CastOperator,
    ProductOperator,
    ScaledOperator,
    ShiftedOperator,
    SumOperator,
    TransposedOperator,
)
from .protocol import LinearOperator
from .wrappers import (
    CallableOperator,
    DenseOperator,
    ScipyOperator,
    SparseOperator,
    aslinearoperator,
)

__all__ = [
    "CallableOperator",
    "CastOperator",
    "DenseOperator",
    "LinearOperator",
    "LinearOperatorBase",
    "ProductOperator",
    "ScaledOperator",
    "ScipyOperator",
    "ShiftedOperator",
    "SparseOperator",
    "SumOperator",
    "TransposedOperator",
    "aslinearoperator",
]
