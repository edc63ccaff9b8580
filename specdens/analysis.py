"""Backend-neutral analyses of a Hessian spectrum: gradient concentration, outliers, the
bulk edge and the negative mass.

These are the quantities Ghorbani, Krishnan & Xiao (2019) follow through training:

- the **gradient concentration** ``||P_k g||^2 / ||g||^2``, the share of the gradient's
  squared norm in the span of ``k`` extreme eigenvectors (:func:`gradient_concentration`);
- the **outliers**, eigenvalues isolated from the bulk, by the rule of
  :mod:`specdens.summary` (:func:`specdens.summary.outliers`);
- the **ratio of the largest eigenvalue to the bulk edge** and the **negative mass**
  (:func:`spectrum_stats`, :func:`negative_mass`).

Each works on one snapshot (an operator and a gradient, or an SLQ estimate), so applying
it at every recorded step of a training run gives its evolution;
:class:`specdens.tracker.SpectrumTracker` does that and stores the results.

References
----------
B. Ghorbani, S. Krishnan, Y. Xiao (2019), An investigation into neural net optimization
via Hessian eigenvalue density, ICML (sections 4 and 5).
C. Davis, W. M. Kahan (1970), The rotation of eigenvectors by a perturbation. III, SIAM
J. Numer. Anal. 7(1), 1-46 (the sin-theta theorem behind ``error_estimate``).
G. Gur-Ari, D. A. Roberts, E. Dyer (2018), Gradient descent happens in a tiny subspace,
arXiv:1812.04754 (the gradient in the top-k eigenspace, k the number of classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _array, _checks
from .algorithms.eigsh import eigsh
from .density import Estimate, SpectralDensity
from .summary import Bulk, Outlier, bulk, outliers

__all__ = [
    "CONCENTRATION_WHICH",
    "GradientConcentration",
    "SpectrumStats",
    "gradient_concentration",
    "negative_mass",
    "negative_mass_bounds",
    "spectrum_stats",
]

CONCENTRATION_WHICH = ("LA", "SA", "LM")
"""Eigenspaces :func:`gradient_concentration` projects on (scipy ``eigsh`` names)."""

GAP_ROUNDING = 8
"""The rounding allowance of :func:`gradient_concentration`'s separation test, in units
of ``eps * max|lambda|`` (``eps`` that of the dtype eigsh worked in or of the operator's
products, whichever is larger, as for the ``tol`` of :func:`specdens.eigsh`). Beyond its
residual a computed eigenvalue is exact to a few rounding units only: the Rayleigh quotient
``x^T A x`` of a converged unit ``x`` rounds by up to about ``2 eps |lambda|`` (observed:
a Ritz value of the identity two units of ``eps / 2`` below 1), and a residual norm
formed in floating point cannot resolve below about ``eps |lambda|``, so each of the two
values the gap compares is uncertain by about ``3 eps |lambda|``; the gap, their
difference, by ``6 eps |lambda|``, plus at most ``eps |lambda|`` for the two roundings in
forming it: 7, rounded up to 8."""


def _arr(a: np.ndarray) -> str:
    return np.array2string(np.asarray(a), precision=6, threshold=8, edgeitems=3)


@dataclass(frozen=True, repr=False)
class GradientConcentration:
    """Share of a gradient in the span of ``k`` extreme eigenvectors.

    Attributes
    ----------
    fraction : float
        ``||P_k g||^2 / ||g||^2`` with ``P_k = X X^T`` the orthogonal projector on the
        ``k`` computed (unit, orthogonal) eigenvectors ``X``; ``sum(overlaps)``.
    overlaps : numpy.ndarray, shape (k,)
        ``(x_i^T g)^2 / ||g||^2`` for each eigenvector, in the order of ``eigenvalues``.
    eigenvalues : numpy.ndarray, shape (k,)
        The eigenvalues of the eigenvectors used, ascending (as :func:`specdens.eigsh`).
    residuals : numpy.ndarray, shape (k,)
        Their residual norms ``||A x_i - lambda_i x_i||`` (from :func:`specdens.eigsh`).
    gradient_norm : float
        ``||g||``, computed as ``max|g| * ||g / max|g|||`` (``inf`` only when ``||g||``
        exceeds the largest float64).
    which : str
        ``"LA"`` (the ``k`` largest eigenvalues), ``"SA"`` (the ``k`` smallest) or
        ``"LM"`` (the ``k`` largest in magnitude).
    gap : float
        Estimated distance between the ``k`` eigenvalues and the rest of the spectrum,
        from the next Ritz value (the ``k+1``-th of the same kind) widened by its
        residual; NaN when ``k + 1 = n`` (no next value was computed).
    error_estimate : float
        ``||R||_F / gap`` with ``R = A X - X diag(eigenvalues)``: the Davis-Kahan bound
        on ``||P_k - P||_2``, ``P`` the exact spectral projector, and so on
        ``|fraction - exact fraction|``. It is a bound when no eigenvalue of the rest of
        the spectrum lies closer than ``gap`` (the next Ritz value converged to the next
        eigenvalue, as it does at the ends of the spectrum); ``inf`` when the ``k``-th
        and next eigenvalues are not separated (the ``k``-dimensional eigenspace is then
        not well defined, and ``fraction`` depends on the computed basis): when ``gap``
        is not larger than the residual of the wanted eigenvalue next to the rest plus
        the rounding allowance ``8 * eps * max|lambda|`` (``GAP_ROUNDING``; e.g. a
        degenerate eigenvalue split by rounding).
    converged : bool
        Whether :func:`specdens.eigsh` met its tolerance.
    """

    fraction: float
    overlaps: np.ndarray
    eigenvalues: np.ndarray
    residuals: np.ndarray
    gradient_norm: float
    which: str
    gap: float
    error_estimate: float
    converged: bool

    @property
    def k(self) -> int:
        """Number of eigenvectors."""
        return int(self.eigenvalues.shape[0])

    def __repr__(self) -> str:
        return (
            f"GradientConcentration(which={self.which!r}, k={self.k}, "
            f"fraction={self.fraction:.6g}, eigenvalues={_arr(self.eigenvalues)}, "
            f"max_residual={float(np.max(self.residuals, initial=0.0)):.2e}, "
            f"gap={self.gap:.3g}, error_estimate={self.error_estimate:.2e}, "
            f"gradient_norm={self.gradient_norm:.6g}, converged={self.converged})"
        )


def gradient_concentration(
    op: Any,
    g: Any,
    k: int = 10,
    *,
    which: str = "LA",
    tol: float | None = None,
    ncv: int | None = None,
    maxiter: int | None = None,
    seed: int = 0,
    dtype: Any = None,
) -> GradientConcentration:
    """``||P_k g||^2 / ||g||^2``: how much of ``g`` lies in ``k`` extreme eigenvectors.

    Computes ``k + 1`` eigenpairs with :func:`specdens.eigsh` (the extra one estimates the
    gap to the rest of the spectrum), projects ``g`` on the ``k`` wanted eigenvectors and
    returns the share of its squared norm there, per eigenvector and in total.
    Ghorbani et al. (2019) report it with ``k`` the number of classes for the top
    eigenvalues (``which="LA"``).

    Parameters
    ----------
    op
        A symmetric operator (anything :func:`specdens.aslinearoperator` accepts), e.g.
        :func:`specdens.backends.torch.hessian`.
    g
        The vector, shape ``(n,)``, in the operator's array library and on its device,
        e.g. :func:`specdens.backends.torch.gradient` with the same options. Must be
        finite and non-zero; any scale works (``g`` is divided by its largest absolute
        entry before it is projected and squared, so that no square overflows or
        underflows).
    k
        Number of eigenvectors, ``1 <= k < n``.
    which
        ``"LA"``: the ``k`` largest (algebraic) eigenvalues; ``"SA"``: the ``k`` smallest
        (most negative); ``"LM"``: the ``k`` largest in magnitude.
    tol, ncv, maxiter, seed, dtype
        Passed to :func:`specdens.eigsh` (``ncv`` for ``k + 1`` pairs). ``dtype`` defaults
        to float64, or float32 where the array library has none (JAX without
        ``jax_enable_x64``).

    Returns
    -------
    GradientConcentration
        The fraction, the per-eigenvector overlaps, the eigenvalues and residual norms
        used, the estimated gap and the resulting error estimate.

    Raises
    ------
    ValueError
        For ``k`` out of range, an unknown ``which``, or a ``g`` of the wrong shape, on
        another device, with NaN or Inf, or zero.
    TypeError
        When ``g`` is not an array of the operator's library.

    Warns
    -----
    specdens.EigshWarning
        When :func:`specdens.eigsh` did not converge (``converged`` is then False).

    Notes
    -----
    With ``X`` the computed unit eigenvectors and ``U`` the exact ones of the same
    eigenvalues, ``|g^T (X X^T - U U^T) g| / ||g||^2 <= ||X X^T - U U^T||_2 =
    ||sin Theta(X, U)||_2 <= ||R||_F / delta`` (Davis & Kahan, 1970), ``delta`` the
    distance from the computed eigenvalues to the rest of the spectrum: that is
    ``error_estimate`` with ``delta`` estimated by ``gap``.

    Examples
    --------
    >>> import numpy as np, specdens
    >>> from specdens.analysis import gradient_concentration
    >>> A = np.diag(np.arange(1.0, 101.0))
    >>> g = np.zeros(100); g[-1], g[0] = 3.0, 4.0        # 9 of 25 in the top eigenvector
    >>> round(gradient_concentration(A, g, k=1).fraction, 6)  # to ~ residual / gap
    0.36
    """
    op, n = _checks.operator_of(op)
    k = _checks.positive_int(k, "k")
    if not isinstance(which, str) or which not in CONCENTRATION_WHICH:
        raise ValueError(f"which={which!r}; choose 'LA' (largest eigenvalues), 'SA' (smallest) "
                         "or 'LM' (largest magnitude)")
    if k >= n:
        raise ValueError(f"k={k} must be smaller than the operator size n={n}")
    gvec, gmax = _check_vector(op, g, n)
    if dtype is None and not _array.supports_float64(op.xp, op.device):
        dtype = "float32"  # e.g. JAX without jax_enable_x64
    kk = k + 1 if k + 1 < n else k
    res = eigsh(op, kk, which=which, tol=tol, ncv=ncv, maxiter=maxiter, seed=seed,
                dtype=dtype)
    xp = op.xp
    X = res.eigenvectors
    # Scaled by max|g| (in g's dtype, before the cast) so that no square overflows or
    # underflows: the fraction is scale-free, and ||g|| = max|g| * ||g / max|g|||.
    gw = xp.astype(gvec / gmax, X.dtype)
    coef = _array.to_numpy(xp.matmul(xp.matrix_transpose(X), gw))
    gnorm2 = float(_array.to_numpy(xp.sum(gw * gw)))
    vals, resid = res.eigenvalues, res.residuals
    wanted, extra = _split(vals, k, which)
    overlaps = coef[wanted] ** 2 / gnorm2
    gap = float("nan")
    separation = float("nan")  # the gap that separation needs
    if extra is not None:
        wv, wr = vals[wanted], resid[wanted]
        xv, xr = float(vals[extra]), float(resid[extra])
        if which == "LA":
            edge = int(np.argmin(wv))
            gap = float(wv[edge]) - (xv + xr)
        elif which == "SA":
            edge = int(np.argmax(wv))
            gap = (xv - xr) - float(wv[edge])
        else:
            edge = int(np.argmin(np.abs(wv)))
            gap = float(abs(wv[edge])) - (abs(xv) + xr)
        # The wanted eigenvalue next to the rest is itself only known to its residual,
        # and both to rounding (see GAP_ROUNDING): a gap within that is no separation
        # (e.g. a degenerate eigenvalue split by rounding).
        eps = max(_array.finfo_eps(X.dtype), _array.finfo_eps(_checks.product_dtype(op)))
        scale = float(np.max(np.abs(vals)))
        separation = float(wr[edge]) + GAP_ROUNDING * eps * scale
    rnorm = float(np.sqrt(np.sum(resid[wanted] ** 2)))
    if math.isnan(gap):
        err = float("nan")
    elif gap > separation:
        err = rnorm / gap
    else:
        err = float("inf")
    return GradientConcentration(
        fraction=float(np.sum(overlaps)),
        overlaps=np.asarray(overlaps, dtype=np.float64),
        eigenvalues=np.asarray(vals[wanted], dtype=np.float64),
        residuals=np.asarray(resid[wanted], dtype=np.float64),
        gradient_norm=gmax * math.sqrt(gnorm2),
        which=which,
        gap=gap,
        error_estimate=err,
        converged=bool(res.converged),
    )


def _split(vals: np.ndarray, k: int, which: str) -> tuple[np.ndarray, int | None]:
    """Indices of the ``k`` wanted values among ``vals`` (ascending) and of the extra one."""
    m = vals.shape[0]
    if m == k:
        return np.arange(k), None
    if which == "LA":
        return np.arange(1, m), 0
    if which == "SA":
        return np.arange(k), k
    extra = int(np.argmin(np.abs(vals)))
    return np.array([i for i in range(m) if i != extra]), extra


def _check_vector(op: Any, g: Any, n: int) -> tuple[Any, float]:
    """``g`` checked against the operator (library, shape, device, dtype; finite and
    non-zero), and its largest absolute entry."""
    lib = _array.library_name(g)
    if lib != op.array_library:
        raise TypeError(f"g is a {lib} array but the operator works on {op.array_library} "
                        "arrays; pass the gradient in the operator's array library")
    if tuple(g.shape) != (n,):
        raise ValueError(f"g must have shape ({n},) like the operator's vectors; got "
                         f"{tuple(g.shape)}")
    if not _array.same_device(_array.device_of(g), op.device):
        raise ValueError(f"g is on device {_array.device_of(g)}; the operator's vectors live "
                         f"on {op.device}")
    _array.check_supported_dtype(g.dtype, "g")
    g64 = _array.to_numpy(g)
    if not np.all(np.isfinite(g64)):
        bad = int(np.sum(~np.isfinite(g64)))
        raise ValueError(f"g has {bad} NaN or Inf entries; the gradient of a diverged model "
                         "has no meaningful concentration")
    if not np.any(g64 != 0):
        raise ValueError("g is zero; the concentration ||P g||^2 / ||g||^2 is undefined")
    return g, float(np.max(np.abs(g64)))


def negative_mass(density: SpectralDensity, *, tol: float | None = None) -> Estimate:
    """Estimated fraction of eigenvalues below ``-tol``, with its standard error.

    The quadrature mass of each probe's Ritz values below ``-tol`` (the step CDF of the
    Gauss rule, no smoothing), averaged over probes; ``stderr`` is the standard error
    over the same per-probe masses (NaN for one probe). Near a large cluster of
    eigenvalues at zero the estimate resolves about one quadrature weight.

    Parameters
    ----------
    density
        An SLQ estimate.
    tol
        Threshold, ``>= 0``; ``0`` counts every Ritz value below zero. The default, None,
        is twice the run's rounding floor (:meth:`SpectralDensity.negative_tolerance`):
        the Ritz values of an exactly zero eigenvalue (the null space of a Hessian or a
        GGN, most of its spectrum) are rounding of either sign, ~1e-13 of the largest
        eigenvalue in float64 and ~1e-7 with float32 products, and with ``tol=0`` about
        half of that null space counted as negative (0.50 +/- 0.16 for an exact 0.005).

    Returns
    -------
    specdens.Estimate

    Raises
    ------
    TypeError
        When ``density`` is not a :class:`~specdens.SpectralDensity`.
    ValueError
        When ``tol`` is negative, NaN or infinite.
    """
    if not isinstance(density, SpectralDensity):
        raise TypeError(f"density must be a SpectralDensity; got {type(density).__name__}")
    tol = density.negative_tolerance(tol)
    valid = np.arange(density.nodes.shape[1])[None, :] < density.lengths[:, None]
    per = density.probe_scales * np.sum(
        np.where(valid & (density.nodes < -tol), density.weights, 0.0), axis=1)
    # Eigenvalues a deflated estimate holds apart count exactly, 1/n each.
    defl = np.asarray(getattr(density, "deflated_eigenvalues", np.zeros(0)), dtype=np.float64)
    if defl.size:
        per = per + float(np.sum(defl < -tol)) / density.n
    k = per.shape[0]
    se = float(per.std(ddof=1) / math.sqrt(k)) if k > 1 else float("nan")
    return Estimate(float(per.mean()), se, k)


def negative_mass_bounds(density: SpectralDensity, *,
                         tol: float | None = None) -> tuple[float, float]:
    """Bounds on the negative mass that the quadrature alone guarantees.

    For a Gauss rule with nodes ``theta_1 < ... < theta_m`` and weights ``w_j`` of a
    measure ``mu``, the Chebyshev-Markov-Stieltjes inequalities give
    ``sum_{j<k} w_j <= mu((-inf, theta_k)) <= mu((-inf, theta_k]) <= sum_{j<=k} w_j``.
    So, with ``S`` the weight of the nodes below ``x = -tol``, ``theta_k`` the largest
    node below ``x`` and ``theta_{k+1}`` the smallest at or above it, each probe's mass
    below ``x`` lies in ``[S - w_k, S + w_{k+1}]``. The bounds are the means of these over
    probes (times the probe scales; deflated eigenvalues count exactly). They hold in exact
    arithmetic for the probes' own spectral measures: the Hutchinson sampling error (the
    standard error of :func:`negative_mass`) comes on top. Wide bounds mean that the
    Lanczos steps do not resolve the spectrum around zero; more steps narrow them.

    A probe whose rule is exact, because its Krylov space became invariant (a breakdown)
    or reached dimension ``n``, has the rule as its spectral measure: its mass below ``x``
    is ``S`` itself, both bounds (before: ``[0, 1]`` for ``-2 I``, whose negative mass is
    exactly 1).

    Parameters
    ----------
    density
        An SLQ estimate.
    tol
        As for :func:`negative_mass` (default: twice the run's rounding floor).

    Returns
    -------
    (lower, upper) : tuple of float
    """
    if not isinstance(density, SpectralDensity):
        raise TypeError(f"density must be a SpectralDensity; got {type(density).__name__}")
    x = -density.negative_tolerance(tol)
    exact = density._breakdown_flags() | (np.asarray(density.lengths) == density.n)
    lows, highs = [], []
    for i in range(density.num_probes):
        m = int(density.lengths[i])
        order = np.argsort(density.nodes[i, :m], kind="stable")
        th, w = density.nodes[i, :m][order], density.weights[i, :m][order]
        below = th < x
        total = float(np.sum(w[below]))
        if exact[i]:  # the rule is the probe's measure
            lows.append(density.probe_scales[i] * total)
            highs.append(density.probe_scales[i] * total)
            continue
        k = int(np.sum(below))  # nodes below x: indices 0 .. k-1
        low = total - (float(w[k - 1]) if k > 0 else 0.0)
        high = total + (float(w[k]) if k < m else 0.0)
        lows.append(density.probe_scales[i] * low)
        highs.append(density.probe_scales[i] * min(high, float(np.sum(w))))
    lo, hi = float(np.mean(lows)), float(np.mean(highs))
    defl = np.asarray(getattr(density, "deflated_eigenvalues", np.zeros(0)), dtype=np.float64)
    if defl.size:
        atoms = float(np.sum(defl < x)) / density.n
        lo, hi = lo + atoms, hi + atoms
    return lo, hi


@dataclass(frozen=True, repr=False)
class SpectrumStats:
    """Outliers, bulk edge, largest eigenvalue and negative mass of one spectrum.

    Attributes
    ----------
    outliers : tuple of specdens.summary.Outlier
        The outliers of :func:`specdens.summary.outliers` (both sides), ascending.
    bulk : specdens.summary.Bulk
        The bulk's edges and the outlier thresholds of the same rule.
    largest : float
        The largest eigenvalue estimate: the largest Ritz value of the SLQ estimate, or
        the largest of ``eigenvalues`` (e.g. from :func:`specdens.eigsh`) when that is
        larger (both are Rayleigh quotients, never above the true largest eigenvalue).
    edge_ratio : float
        ``largest / bulk.upper``: how far the top eigenvalue stands above the bulk's upper
        edge (the ``1 - tail`` quantile of the spectrum without its outliers). A bulk edge
        within the estimate's rounding floor of 0, ``|bulk.upper| <= floor``, counts as 0
        and gives ``inf`` (e.g. a low-rank positive semi-definite matrix: its bulk is
        exactly 0, and the Ritz values there are rounding residues of either sign, which
        gave ratios of 1e15 to 1e18 or NaN); NaN when ``largest`` is within the floor of 0
        too, or when the edge is below ``-floor`` (a negative bulk edge), where the ratio
        has no meaning. ``floor`` is the smallest residual bound of the Ritz values, capped
        at ``rtol * bulk.scale``: residual bounds are floored at the run's rounding,
        ``4 eps max|theta|`` with ``eps`` of the arithmetic or of the products, whichever is
        coarser (:func:`specdens.algorithms.quadrature.quadrature_rules`), and a Ritz value
        that has converged (an outlier; every one after a breakdown) sits at that floor;
        until one has, no value is resolved finer than ``rtol * bulk.scale``, the outlier
        rule's convergence tolerance.
    num_top_above : int or None
        How many of ``eigenvalues`` lie above ``bulk.upper_threshold`` (outliers by the
        same rule, but counted on accurately computed eigenvalues, so a tight cluster of
        outliers that SLQ resolved as one Ritz value is counted fully); None without
        ``eigenvalues``. At most ``len(eigenvalues)``.
    negative_mass, negative_mass_stderr : float
        :func:`negative_mass` with ``tol=negative_tol``.
    negative_mass_bounds : tuple of float
        :func:`negative_mass_bounds`: what the quadrature guarantees about it.
    rule : dict
        The outlier rule's parameters (``tail``, ``gap``, ``rtol``) and ``negative_tol``,
        the tolerance used (the default resolved to its value).
    """

    outliers: tuple[Outlier, ...]
    bulk: Bulk
    largest: float
    edge_ratio: float
    num_top_above: int | None
    negative_mass: float
    negative_mass_stderr: float
    negative_mass_bounds: tuple = (float("nan"), float("nan"))
    rule: dict = field(default_factory=dict)

    @property
    def num_outliers(self) -> int:
        """Outliers above the bulk (the isolated large eigenvalues of the paper)."""
        return sum(1 for o in self.outliers if o.side == "upper")

    @property
    def num_lower_outliers(self) -> int:
        """Outliers below the bulk."""
        return sum(1 for o in self.outliers if o.side == "lower")

    def __repr__(self) -> str:
        return (
            f"SpectrumStats(num_outliers={self.num_outliers}, "
            f"num_lower_outliers={self.num_lower_outliers}, largest={self.largest:.6g}, "
            f"bulk=[{self.bulk.lower:.4g}, {self.bulk.upper:.4g}], "
            f"edge_ratio={self.edge_ratio:.4g}, num_top_above={self.num_top_above}, "
            f"negative_mass={self.negative_mass:.4g} +/- {self.negative_mass_stderr:.2g} "
            f"in [{self.negative_mass_bounds[0]:.3g}, {self.negative_mass_bounds[1]:.3g}])"
        )


def spectrum_stats(
    density: SpectralDensity,
    eigenvalues: Any = None,
    *,
    tail: float = 0.01,
    gap: float = 0.5,
    rtol: float = 1e-6,
    negative_tol: float | None = None,
) -> SpectrumStats:
    """Outliers, bulk edge, ratio of the largest eigenvalue to it, and negative mass.

    Parameters
    ----------
    density
        An SLQ estimate.
    eigenvalues
        Optional accurately computed top eigenvalues (e.g. ``specdens.eigsh(op, k,
        which="LA").eigenvalues``): their maximum is the largest eigenvalue, and they are
        counted against the outlier threshold (``num_top_above``). Must be finite.
    tail, gap, rtol
        The outlier rule of :func:`specdens.summary.outliers` (module
        :mod:`specdens.summary` documents it).
    negative_tol
        Passed to :func:`negative_mass` and :func:`negative_mass_bounds` as ``tol``
        (default None: twice the run's rounding floor, so that the Ritz values of a zero
        eigenvalue, rounding of either sign, are not counted as negative; ``0`` for the
        strict sign).

    Returns
    -------
    SpectrumStats
    """
    if not isinstance(density, SpectralDensity):
        raise TypeError(f"density must be a SpectralDensity; got {type(density).__name__}")
    found = outliers(density, tail=tail, gap=gap, rtol=rtol)
    edges = bulk(density, tail=tail, gap=gap, rtol=rtol)
    largest = float(density.bounds().upper)
    above = None
    if eigenvalues is not None:
        ev = _checks.vector_1d(eigenvalues, "eigenvalues",
                               "the computed top eigenvalues (e.g. eigsh(...).eigenvalues)")
        if ev.size == 0 or not np.all(np.isfinite(ev)):
            raise ValueError("eigenvalues must be a non-empty finite array")
        # Ritz values and computed eigenvalues are both Rayleigh quotients, so neither
        # exceeds the largest eigenvalue (to rounding): the larger is the better estimate.
        largest = max(largest, float(np.max(ev)))
        above = int(np.sum(ev > edges.upper_threshold))
    floor = _edge_floor(density, edges.scale, rtol)
    if edges.upper > floor:
        ratio = largest / edges.upper
    elif edges.upper >= -floor and largest > floor:
        ratio = math.inf  # the bulk edge is 0 to rounding: the top stands infinitely above
    else:
        ratio = float("nan")
    negative_tol = density.negative_tolerance(negative_tol)
    neg = negative_mass(density, tol=negative_tol)
    return SpectrumStats(
        outliers=found,
        bulk=edges,
        largest=largest,
        edge_ratio=float(ratio),
        num_top_above=above,
        negative_mass=float(neg.value),
        negative_mass_stderr=float(neg.stderr),
        negative_mass_bounds=negative_mass_bounds(density, tol=negative_tol),
        rule={"tail": tail, "gap": gap, "rtol": rtol, "negative_tol": negative_tol},
    )


def _edge_floor(density: SpectralDensity, scale: float, rtol: float) -> float:
    """The rounding floor of ``SpectrumStats.edge_ratio``: the smallest residual bound of
    the Ritz values (the run's rounding floor once one has converged), capped at
    ``rtol * scale``."""
    valid = np.arange(density.nodes.shape[1])[None, :] < density.lengths[:, None]
    res = np.asarray(density.residuals, dtype=np.float64)[valid]
    smallest = float(np.min(res)) if res.size else math.inf
    return min(smallest, rtol * scale)
