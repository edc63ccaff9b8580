"""Stochastic Lanczos quadrature.

Ghorbani, Krishnan & Xiao (ICML 2019); Ubaru, Chen & Saad (2017).
"""

from __future__ import annotations

from typing import Any

from ..density import SpectralDensity
from .lanczos import lanczos


def slq(
    op: Any,
    *,
    num_steps: int = 90,
    num_probes: int = 1,
    seed: int = 0,
    probes: Any = None,
    reorth: str = "full",
    **kwargs: Any,
) -> SpectralDensity:
    """Estimate the eigenvalue density of a symmetric operator.

    Runs :func:`specdens.lanczos` from ``num_probes`` random probes and turns each
    tridiagonal into a Gauss quadrature rule (solved in float64 on the host).

    Parameters
    ----------
    op
        A symmetric operator (anything :func:`specdens.aslinearoperator` accepts).
    num_steps
        Lanczos steps per probe. The paper uses 80 to 90; the Wasserstein-1 error
        decreases like ``1 / num_steps`` (Chen, Trogdon & Ubaru, 2021).
    num_probes
        Random probes; the estimate's variance decreases like ``1 / (n num_probes)``.
    seed, probes, reorth, **kwargs
        Passed to :func:`specdens.lanczos`.

    Returns
    -------
    SpectralDensity
    """
    result = lanczos(op, num_steps, num_probes=num_probes, probes=probes, seed=seed,
                     reorth=reorth, **kwargs)
    return SpectralDensity.from_lanczos(result)
