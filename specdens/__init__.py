"""specdens: eigenvalue densities and extreme eigenpairs of huge symmetric operators.

Stochastic Lanczos quadrature over matrix-vector products, as in Ghorbani, Krishnan &
Xiao, "An Investigation into Neural Net Optimization via Hessian Eigenvalue Density"
(ICML 2019). The core is backend-neutral (array API); it never imports an ML framework.
"""

from . import testing
from .algorithms.eigsh import EigshResult, EigshWarning, eigsh
from .algorithms.lanczos import LanczosResult, LanczosWarning, lanczos
from .algorithms.slq import slq
from .density import Estimate, SpectralBounds, SpectralDensity
from .operators import LinearOperator, LinearOperatorBase, aslinearoperator

__version__ = "0.1.0"

__all__ = [
    "EigshResult",
    "EigshWarning",
    "Estimate",
    "LanczosResult",
    "LanczosWarning",
    "LinearOperator",
    "LinearOperatorBase",
    "SpectralBounds",
    "SpectralDensity",
    "aslinearoperator",
    "eigsh",
    "lanczos",
    "slq",
    "testing",
    "__version__",
]
