"""specdens: eigenvalue densities and extreme eigenpairs of huge symmetric operators.

Stochastic Lanczos quadrature over matrix-vector products, as in Ghorbani, Krishnan &
Xiao, "An Investigation into Neural Net Optimization via Hessian Eigenvalue Density"
(ICML 2019). The core is backend-neutral (array API); it never imports an ML framework.
"""

from . import analysis, testing, tracker
from .algorithms.adaptive import ProbeCountWarning
from .algorithms.checkpoint import CheckpointError
from .algorithms.eigsh import EigshResult, EigshWarning, eigsh
from .algorithms.kpm import KPMDensity, kpm
from .algorithms.lanczos import LanczosResult, LanczosWarning, lanczos
from .algorithms.slq import slq
from .algorithms.trace import (
    DiagonalEstimate,
    TraceEstimate,
    diagonal,
    trace,
    trace_functions,
)
from .analysis import (
    GradientConcentration,
    SpectrumStats,
    gradient_concentration,
    negative_mass,
    spectrum_stats,
)
from .density import (
    DensityEstimate,
    Estimate,
    ProbeConvergence,
    SpectralBounds,
    SpectralDensity,
)
from .operators import LinearOperator, LinearOperatorBase, aslinearoperator
from .tracker import SpectrumRecord, SpectrumTracker, read_records

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DensityEstimate",
    "DiagonalEstimate",
    "EigshResult",
    "EigshWarning",
    "Estimate",
    "GradientConcentration",
    "KPMDensity",
    "LanczosResult",
    "LanczosWarning",
    "LinearOperator",
    "LinearOperatorBase",
    "ProbeConvergence",
    "ProbeCountWarning",
    "SpectralBounds",
    "SpectralDensity",
    "SpectrumRecord",
    "SpectrumStats",
    "SpectrumTracker",
    "TraceEstimate",
    "analysis",
    "aslinearoperator",
    "diagonal",
    "eigsh",
    "gradient_concentration",
    "kpm",
    "lanczos",
    "negative_mass",
    "read_records",
    "slq",
    "spectrum_stats",
    "trace",
    "trace_functions",
    "testing",
    "tracker",
    "__version__",
]
