"""Example operators with known spectra, for tests, demos and the command line.

Each factory ``name(n=..., *, seed=0)`` returns a :class:`SpectrumOperator`: a
symmetric ``n x n`` operator ``A = Q diag(lam) Q^T`` whose eigenvalues ``lam`` are
known exactly (``op.eigenvalues``) and whose products cost ``O(n log n)``, so the
examples scale to millions of rows. ``Q`` is a random orthogonal transform built from
two rounds of random sign flips and the orthonormal DCT-II (a structured random
rotation, as in fast Johnson-Lindenstrauss transforms: Ailon & Chazelle, 2009), so its
eigenvectors are spread out like those of a generic matrix. The spectra are
deterministic: quantiles ``F^{-1}((i + 1/2) / m)`` of a target distribution rather than
random draws; only the eigenvectors depend on ``seed``.

========================  ===========================================================
``hessian_like``          a neural-network Hessian: a bulk peaked at zero with about
                          40% small negative eigenvalues, plus ten large outliers
                          (Ghorbani, Krishnan & Xiao, 2019; Sagun et al., 2017)
``marchenko_pastur``      a sample covariance: Marchenko-Pastur bulk plus three spikes
                          above its edge (Marchenko & Pastur, 1967; Baik, Ben Arous &
                          Peche, 2005)
``semicircle``            a Wigner matrix: Wigner's semicircle on ``[-2, 2]``
``uniform``               eigenvalues evenly spread over ``[-1, 1]``
``laplacian_1d``          the Dirichlet Laplacian of a path, ``tridiag(-1, 2, -1)``,
                          eigenvalues ``2 - 2 cos(pi k / (n + 1))``
========================  ===========================================================

References
----------
N. Ailon, B. Chazelle (2009), The fast Johnson-Lindenstrauss transform and approximate
nearest neighbors. SIAM J. Comput. 39(1).
B. Ghorbani, S. Krishnan, Y. Xiao (2019), An investigation into neural net optimization
via Hessian eigenvalue density. ICML, PMLR 97:2232-2241.
L. Sagun, U. Evci, V. U. Guney, Y. Dauphin, L. Bottou (2017), Empirical analysis of the
Hessian of over-parametrized neural networks. arXiv:1706.04454.
V. A. Marchenko, L. A. Pastur (1967), Distribution of eigenvalues for some sets of random
matrices. Mat. Sb. 72(114).
J. Baik, G. Ben Arous, S. Peche (2005), Phase transition of the largest eigenvalue for
nonnull complex sample covariance matrices. Ann. Probab. 33(5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .operators import LinearOperatorBase

__all__ = [
    "EXAMPLES",
    "SpectrumOperator",
    "get_example",
    "hessian_like",
    "laplacian_1d",
    "marchenko_pastur",
    "semicircle",
    "uniform",
]

DEFAULT_N = 3000


def _numpy_namespace() -> Any:
    import array_api_compat.numpy as npx

    return npx


class SpectrumOperator(LinearOperatorBase):
    """The symmetric operator ``A = Q diag(eigenvalues) Q^T`` with a fast random ``Q``.

    ``Q^T x = C (s2 * C (s1 * x))`` with ``C`` the orthonormal DCT-II and ``s1``, ``s2``
    random sign vectors drawn from ``seed``; ``Q`` is exactly orthogonal, so the
    eigenvalues of ``A`` are ``eigenvalues`` up to rounding. Vectors are float64 numpy
    arrays; a product costs ``O(n log n)``.

    Parameters
    ----------
    eigenvalues
        The spectrum, any order (stored sorted ascending).
    seed
        Seed of the random signs (the eigenvectors).
    name, description
        Shown by the command line and in summaries.

    Attributes
    ----------
    eigenvalues : numpy.ndarray
        The exact spectrum, float64, ascending.
    params : dict
        The factory's arguments, for summaries.
    """

    def __init__(self, eigenvalues: Any, *, seed: int = 0, name: str = "spectrum",
                 description: str = "", params: dict | None = None):
        lam = np.asarray(eigenvalues, dtype=np.float64)
        if lam.ndim != 1:
            raise ValueError(f"eigenvalues must be 1-D (the spectrum; e.g. "
                             f"numpy.linalg.eigvalsh(A), not the matrix); got shape "
                             f"{lam.shape}")
        lam = np.sort(lam)
        if lam.size == 0:
            raise ValueError("an example operator needs at least one eigenvalue")
        if not np.all(np.isfinite(lam)):
            raise ValueError("eigenvalues must be finite")
        n = lam.size
        super().__init__((n, n), np.dtype(np.float64), _numpy_namespace(), "cpu")
        self.symmetric = True
        self.eigenvalues = lam
        self.seed = seed
        self.name = name
        self.description = description
        self.params = dict(params or {})
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0x5eed,)))
        self._s1 = rng.choice(np.array([-1.0, 1.0]), size=n)
        self._s2 = rng.choice(np.array([-1.0, 1.0]), size=n)
        # The eigenvalue of each coordinate of the rotated space: a fixed random
        # permutation, so that the DCT's frequency ordering carries no structure.
        self._lam = lam[rng.permutation(n)]

    def _rotate_t(self, X: np.ndarray) -> np.ndarray:
        """``Q^T X``."""
        from scipy.fft import dct

        Y = dct(self._s1[:, None] * X, type=2, norm="ortho", axis=0)
        return dct(self._s2[:, None] * Y, type=2, norm="ortho", axis=0)

    def _rotate(self, X: np.ndarray) -> np.ndarray:
        """``Q X``."""
        from scipy.fft import idct

        Y = self._s2[:, None] * idct(X, type=2, norm="ortho", axis=0)
        return self._s1[:, None] * idct(Y, type=2, norm="ortho", axis=0)

    def _matmat(self, V: Any) -> Any:
        X = np.asarray(V, dtype=np.float64)
        return self._rotate(self._lam[:, None] * self._rotate_t(X))

    def _matvec(self, v: Any) -> Any:
        return self._matmat(np.asarray(v).reshape(-1, 1))[:, 0]

    def __repr__(self) -> str:
        lam = self.eigenvalues
        return (f"<SpectrumOperator {self.name} n={self.shape[0]} "
                f"eigenvalues in [{lam[0]:.6g}, {lam[-1]:.6g}] seed={self.seed}>")


class TridiagonalToeplitzOperator(LinearOperatorBase):
    """The symmetric tridiagonal Toeplitz matrix ``tridiag(off, diag, off)``.

    Its eigenvalues are ``diag + 2 off cos(pi k / (n + 1))``, ``k = 1..n`` (e.g.
    G. Strang, Computational Science and Engineering, 2007, section 1.5).
    """

    def __init__(self, n: int, *, diag: float = 2.0, off: float = -1.0, name: str = "",
                 description: str = "", params: dict | None = None):
        super().__init__((n, n), np.dtype(np.float64), _numpy_namespace(), "cpu")
        self.symmetric = True
        self.diag, self.off = float(diag), float(off)
        k = np.arange(1, n + 1)
        self.eigenvalues = np.sort(self.diag + 2 * self.off * np.cos(np.pi * k / (n + 1)))
        self.seed = None
        self.name = name
        self.description = description
        self.params = dict(params or {})

    def _matmat(self, V: Any) -> Any:
        X = np.asarray(V, dtype=np.float64)
        out = self.diag * X
        out[1:] += self.off * X[:-1]
        out[:-1] += self.off * X[1:]
        return out

    def _matvec(self, v: Any) -> Any:
        return self._matmat(np.asarray(v).reshape(-1, 1))[:, 0]

    def __repr__(self) -> str:
        return f"<TridiagonalToeplitzOperator {self.name} n={self.shape[0]}>"


# -- helpers --------------------------------------------------------------------------
def _check_n(n: Any, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an integer; got {n!r}")
    if n < minimum:
        raise ValueError(f"n must be at least {minimum}; got {n}")
    return int(n)


def _midpoints(m: int) -> np.ndarray:
    """The probabilities ``(i + 1/2) / m``, ``i = 0..m-1``."""
    return (np.arange(m) + 0.5) / m


def _quantiles_from_density(density: Callable[[np.ndarray], np.ndarray], a: float, b: float,
                            p: np.ndarray, *, num: int = 200_001) -> np.ndarray:
    """Quantiles of a density on ``[a, b]`` that vanishes like a square root at both ends.

    Integrates in the variable ``x = a + (b - a)(1 - cos phi) / 2``, where the integrand
    ``rho(x) dx/dphi`` is smooth, then inverts the CDF by interpolation in ``phi``.
    """
    phi = np.linspace(0.0, np.pi, num)
    x = a + (b - a) * (1 - np.cos(phi)) / 2
    integrand = density(x) * (b - a) / 2 * np.sin(phi)
    cdf = np.concatenate([[0.0], np.cumsum((integrand[1:] + integrand[:-1]) / 2 * np.diff(phi))])
    cdf /= cdf[-1]
    phi_p = np.interp(p, cdf, phi)
    return a + (b - a) * (1 - np.cos(phi_p)) / 2


def _one_minus_sqrt(ratio: float) -> float:
    """``|1 - sqrt(ratio)|`` as ``|1 - ratio| / (1 + sqrt(ratio))``: to rounding also for
    a ratio near 1, where ``1 - sqrt(ratio)`` would lose most of its digits."""
    return abs(1.0 - ratio) / (1.0 + np.sqrt(ratio))


def _mp_angle_cdf(theta: np.ndarray, ratio: float) -> np.ndarray:
    """The CDF of the Marchenko-Pastur bulk (its continuous part, normalised to mass 1) at
    ``x = a + 4 sqrt(ratio) sin^2(theta / 2)``, ``theta`` in ``[0, pi]``, in closed form.

    With ``x = c - d cos(theta)`` (``c = 1 + ratio``, ``d = 2 sqrt(ratio)``) the density
    ``sqrt((b - x)(x - a)) / (2 pi ratio x) dx`` is ``d^2 sin^2(theta) / (2 pi ratio (c -
    d cos(theta))) d theta``, whose integral from 0 is ``d sin(theta) + c theta - 2 |1 -
    ratio| arctan(sqrt(b / a) tan(theta / 2))``. Written with ``arctan(k t) = theta / 2 +
    arctan((k - 1) t / (1 + k t^2))`` (``t = tan(theta / 2)``, ``k = sqrt(b / a)``) it is

        d sin(theta) + 2 min(1, ratio) theta
            - 2 |1 - ratio| arctan(2 min(s, 1) t / (|1 - s| + (1 + s) t^2)),  s = sqrt(ratio),

    finite at ``a = 0`` (``ratio = 1``: the arctan term drops) and without the
    cancellation of the first form for a small or a large ratio; its value at ``pi`` is
    ``2 pi min(1, ratio)``, the normaliser.
    """
    s = np.sqrt(ratio)
    d = 2 * s
    m1 = min(1.0, ratio)
    t = np.tan(theta / 2)
    integral = d * np.sin(theta) + 2 * m1 * theta
    e = _one_minus_sqrt(ratio)
    if ratio != 1.0:
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = np.arctan(2 * min(s, 1.0) * t / (e + (1 + s) * t * t))
        corr = np.where(theta > 0, corr, 0.0)  # (0 / 0 where e = 0 to rounding)
        integral = integral - 2 * abs(1 - ratio) * corr
    return integral / (2 * np.pi * m1)


def _mp_quantiles(ratio: float, p: np.ndarray) -> np.ndarray:
    """Quantiles ``F^{-1}(p)`` of the Marchenko-Pastur bulk (:func:`_mp_angle_cdf`): the
    closed-form CDF inverted by bisection in ``theta``, bracketed on a grid first, to
    the rounding of ``theta`` (relative, also for the smallest quantiles when the lower
    edge ``a`` is 0 or nearly so); ``x = a + 4 sqrt(ratio) sin^2(theta / 2)`` keeps that
    relative accuracy near ``a = 0`` (``c - d cos(theta)`` would cancel)."""
    p = np.asarray(p, dtype=np.float64)
    a = _one_minus_sqrt(ratio) ** 2
    if p.size == 0:
        return np.zeros(0)
    grid = np.linspace(0.0, np.pi, 4097)
    cdf = np.maximum.accumulate(_mp_angle_cdf(grid, ratio))
    j = np.clip(np.searchsorted(cdf, p, side="right") - 1, 0, grid.size - 2)
    lo, hi = grid[j], grid[j + 1]
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.all((mid == lo) | (mid == hi)):  # adjacent floats: as fine as theta gets
            break
        below = _mp_angle_cdf(mid, ratio) < p
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    theta = (lo + hi) / 2
    return a + 4 * np.sqrt(ratio) * np.sin(theta / 2) ** 2


# -- the examples -----------------------------------------------------------------------
def hessian_like(n: int = DEFAULT_N, *, seed: int = 0, num_outliers: int = 10,
                 negative_fraction: float = 0.4) -> SpectrumOperator:
    """A spectrum shaped like a trained neural network's Hessian.

    A bulk of ``n - num_outliers`` eigenvalues peaked at zero: a fraction
    ``negative_fraction`` of it negative, ``-0.15 * B`` with ``B ~ Beta(1, 4)``, the rest
    positive, ``B' ~ Beta(1, 3)`` (so the bulk is ``[-0.15, 1]``, its density largest at
    zero and vanishing at both edges); plus ``num_outliers`` outliers geometrically spaced
    over ``[4, 40]``, far above the bulk, as in the Hessians of networks trained without
    BatchNorm (Ghorbani, Krishnan & Xiao, 2019; Sagun et al., 2017).

    Parameters
    ----------
    n
        Size; at least ``num_outliers + 2``.
    seed
        Seed of the eigenvectors (the spectrum does not depend on it).
    num_outliers
        Number of large isolated eigenvalues.
    negative_fraction
        Fraction of the bulk below zero.

    Returns
    -------
    SpectrumOperator
        With ``.eigenvalues`` the exact spectrum and ``.outliers`` the outliers.
    """
    if isinstance(num_outliers, bool) or not isinstance(num_outliers, (int, np.integer)):
        raise TypeError(f"num_outliers must be an integer; got {num_outliers!r}")
    num_outliers = int(num_outliers)
    if num_outliers < 0:
        raise ValueError(f"num_outliers must be >= 0; got {num_outliers}")
    n = _check_n(n, num_outliers + 2)
    if not 0.0 <= negative_fraction <= 1.0:
        raise ValueError(f"negative_fraction must be in [0, 1]; got {negative_fraction}")
    m = n - num_outliers
    n_neg = int(round(negative_fraction * m))
    n_pos = m - n_neg
    # Beta(1, b) has CDF 1 - (1 - x)^b, so its quantile is 1 - (1 - p)^(1 / b).
    neg = -0.15 * (1 - (1 - _midpoints(n_neg)) ** (1 / 4))
    pos = 1.0 * (1 - (1 - _midpoints(n_pos)) ** (1 / 3))
    out = np.geomspace(4.0, 40.0, num_outliers) if num_outliers else np.zeros(0)
    op = SpectrumOperator(
        np.concatenate([neg, pos, out]), seed=seed, name="hessian_like",
        description=(f"Hessian-like: bulk on [-0.15, 1] peaked at 0 with {negative_fraction:.0%} "
                     f"negative, plus {num_outliers} outliers in [4, 40]"),
        params={"n": n, "seed": seed, "num_outliers": num_outliers,
                "negative_fraction": negative_fraction},
    )
    op.outliers = out.copy()
    return op


def marchenko_pastur(n: int = DEFAULT_N, *, seed: int = 0, ratio: float = 0.5,
                     spikes: Any = None) -> SpectrumOperator:
    """A sample covariance matrix: the Marchenko-Pastur law plus spikes.

    The bulk of ``n - len(spikes)`` eigenvalues is the Marchenko-Pastur law of ratio
    ``ratio = n / samples`` and unit variance, with density
    ``sqrt((b - x)(x - a)) / (2 pi ratio x)`` on ``[a, b] = [(1 - sqrt(ratio))^2,
    (1 + sqrt(ratio))^2]``, and for ``ratio > 1`` an atom of mass ``1 - 1 / ratio`` at
    zero. The spikes are extra eigenvalues above the edge ``b`` (a spiked covariance
    model, Baik, Ben Arous & Peche, 2005); the default ``(5, 8, 12)`` lies well above
    ``b = 2.91`` of the default ratio 0.5 (and of every ratio up to 0.5).

    Parameters
    ----------
    n
        Size; at least ``len(spikes) + 2``.
    seed
        Seed of the eigenvectors (the spectrum does not depend on it).
    ratio
        ``n / samples``, positive.
    spikes
        Isolated eigenvalues added to the bulk (may be empty); each above ``b`` (a
        ValueError otherwise). Default: ``(5, 8, 12)`` times ``max(1, b / b0)``, ``b0 =
        (1 + sqrt(0.5))^2`` the edge of ratio 0.5, so that they stand as far above the
        bulk, relative to its edge, for every ratio.

    Returns
    -------
    SpectrumOperator
        With ``.eigenvalues`` the exact spectrum, ``.edges`` the bulk's support ``(a, b)``
        and ``.outliers`` the spikes.
    """
    ratio = float(ratio)
    if not (ratio > 0 and np.isfinite(ratio)):
        raise ValueError(f"ratio must be positive and finite; got {ratio}")
    a, b = _one_minus_sqrt(ratio) ** 2, (1 + np.sqrt(ratio)) ** 2
    if spikes is None:
        spikes = np.array([5.0, 8.0, 12.0]) * max(1.0, b / (1 + np.sqrt(0.5)) ** 2)
    spikes = np.sort(np.asarray(spikes, dtype=np.float64).reshape(-1))
    n = _check_n(n, spikes.size + 2)
    if not np.all(np.isfinite(spikes)):
        raise ValueError(f"spikes must be finite; got {spikes.tolist()}")
    if spikes.size and not spikes[0] > b:
        raise ValueError(
            f"spikes must lie above the bulk's edge b = (1 + sqrt(ratio))^2 = {b:.6g} of "
            f"ratio {ratio:g}; got {spikes.tolist()} (pass larger spikes, or spikes=())")
    m = n - spikes.size
    n_zero = int(round((1 - 1 / ratio) * m)) if ratio > 1 else 0
    m_bulk = m - n_zero

    bulk = _mp_quantiles(ratio, _midpoints(m_bulk))
    op = SpectrumOperator(
        np.concatenate([np.zeros(n_zero), bulk, spikes]), seed=seed, name="marchenko_pastur",
        description=(f"Marchenko-Pastur, ratio {ratio:g}, bulk [{a:.4g}, {b:.4g}], plus "
                     f"{spikes.size} spikes {np.array2string(spikes, precision=4)}"),
        params={"n": n, "seed": seed, "ratio": ratio, "spikes": spikes.tolist()},
    )
    op.edges = (float(a), float(b))
    op.outliers = spikes.copy()
    return op


def semicircle(n: int = DEFAULT_N, *, seed: int = 0, radius: float = 2.0) -> SpectrumOperator:
    """A Wigner matrix: Wigner's semicircle law on ``[-radius, radius]``.

    Density ``2 sqrt(radius^2 - x^2) / (pi radius^2)`` (E. Wigner, 1958, On the
    distribution of the roots of certain symmetric matrices, Ann. Math. 67(2)).

    Returns
    -------
    SpectrumOperator
    """
    n = _check_n(n)
    r = float(radius)
    if not r > 0:
        raise ValueError(f"radius must be positive; got {radius}")
    lam = _quantiles_from_density(lambda x: np.sqrt(np.maximum(r * r - x * x, 0.0)), -r, r,
                                  _midpoints(n))
    return SpectrumOperator(lam, seed=seed, name="semicircle",
                            description=f"Wigner semicircle on [{-r:g}, {r:g}]",
                            params={"n": n, "seed": seed, "radius": r})


def uniform(n: int = DEFAULT_N, *, seed: int = 0, low: float = -1.0,
            high: float = 1.0) -> SpectrumOperator:
    """Eigenvalues evenly spread over ``[low, high]`` (the uniform law's quantiles).

    Returns
    -------
    SpectrumOperator
    """
    n = _check_n(n)
    low, high = float(low), float(high)
    if not high > low:
        raise ValueError(f"need low < high; got low={low}, high={high}")
    return SpectrumOperator(low + (high - low) * _midpoints(n), seed=seed, name="uniform",
                            description=f"uniform on [{low:g}, {high:g}]",
                            params={"n": n, "seed": seed, "low": low, "high": high})


def laplacian_1d(n: int = DEFAULT_N, *, seed: int = 0) -> TridiagonalToeplitzOperator:
    """The Dirichlet Laplacian of a path graph, ``tridiag(-1, 2, -1)``.

    Eigenvalues ``2 - 2 cos(pi k / (n + 1))``, ``k = 1..n``: the arcsine law on
    ``[0, 4]``, which piles up at both edges. A sparse operator with no random
    rotation; ``seed`` is accepted for a uniform signature and ignored.

    Returns
    -------
    TridiagonalToeplitzOperator
        With ``.eigenvalues`` the exact spectrum.
    """
    n = _check_n(n)
    return TridiagonalToeplitzOperator(
        n, diag=2.0, off=-1.0, name="laplacian_1d",
        description="1-D Dirichlet Laplacian tridiag(-1, 2, -1), arcsine law on [0, 4]",
        params={"n": n},
    )


EXAMPLES: dict[str, Callable[..., LinearOperatorBase]] = {
    "hessian_like": hessian_like,
    "marchenko_pastur": marchenko_pastur,
    "semicircle": semicircle,
    "uniform": uniform,
    "laplacian_1d": laplacian_1d,
}
"""Name -> factory of every built-in example."""


def get_example(name: str, n: int | None = None, seed: int = 0) -> LinearOperatorBase:
    """The example operator called ``name``.

    Parameters
    ----------
    name
        One of :data:`EXAMPLES`.
    n
        Size (default: the factory's default, 3000).
    seed
        Seed of the eigenvectors.

    Returns
    -------
    LinearOperatorBase
        With ``.eigenvalues``, the exact spectrum.

    Raises
    ------
    ValueError
        For an unknown name; the message lists the known ones.
    """
    try:
        factory = EXAMPLES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown example {name!r}; choose one of {', '.join(sorted(EXAMPLES))}"
        ) from None
    return factory(seed=seed) if n is None else factory(n, seed=seed)
