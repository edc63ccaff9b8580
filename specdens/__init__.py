"""specdens: eigenvalue densities and extreme eigenpairs of huge symmetric operators.

Stochastic Lanczos quadrature over matrix-vector products, as in Ghorbani, Krishnan &
Xiao, "An Investigation into Neural Net Optimization via Hessian Eigenvalue Density"
(ICML 2019). The core is backend-neutral (array API); it never imports an ML framework.
"""

from .density import Estimate, SpectralBounds, SpectralDensity
from .lanczos import LanczosResult, LanczosWarning, lanczos
from .operators import LinearOperator, LinearOperatorBase, aslinearoperator
from .slq import slq

__version__ = "0.1.0"

__all__ = [
    "Estimate",
    "LanczosResult",
    "LanczosWarning",
    "LinearOperator",
    "LinearOperatorBase",
    "SpectralBounds",
    "SpectralDensity",
    "aslinearoperator",
    "lanczos",
    "slq",
    "__version__",
]
