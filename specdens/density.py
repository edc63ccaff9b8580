"""``SpectralDensity``: the SLQ estimate of an operator's eigenvalue distribution.

The estimate is a mixture of Gauss quadrature rules, one per probe: probe ``i`` puts
weight ``w_ij`` at Ritz value ``theta_ij``. For any ``f``,
``tr f(A) / n ~ (1/k) sum_i s_i sum_j w_ij f(theta_ij)`` with ``s_i`` the probe's
Hutchinson scale (1 for Rademacher and sphere probes). See Ubaru, Chen & Saad (2017),
Fast estimation of tr(f(A)) via stochastic Lanczos quadrature, and Chen, Trogdon &
Ubaru (2021), Analysis of stochastic Lanczos quadrature for spectrum approximation.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import ndtr

from .algorithms.lanczos import LanczosResult
from .algorithms.quadrature import quadrature_rules

FORMAT_NAME = "specdens.SpectralDensity"
FORMAT_VERSION = 1
KERNELS = ("gaussian", "lorentzian")


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate: mean over probes and its standard error.

    ``stderr`` is the sample standard deviation over probes divided by
    ``sqrt(num_probes)`` (NaN for a single probe).
    """

    value: Any
    stderr: Any
    num_probes: int

    def __float__(self) -> float:
        return float(self.value)

    def __repr__(self) -> str:
        return (f"Estimate(value={_fmt(self.value)}, stderr={_fmt(self.stderr)}, "
                f"num_probes={self.num_probes})")


@dataclass(frozen=True)
class SpectralBounds:
    """Extreme Ritz values and their residual norms.

    Each Ritz value lies within its residual of an eigenvalue, and the Ritz values lie
    inside ``[lambda_min, lambda_max]``; ``interval`` widens them by the residuals.
    """

    lower: float
    upper: float
    lower_residual: float
    upper_residual: float

    @property
    def interval(self) -> tuple[float, float]:
        return (self.lower - self.lower_residual, self.upper + self.upper_residual)


def _fmt(x: Any) -> str:
    a = np.asarray(x)
    return f"{float(a):.6g}" if a.ndim == 0 else np.array2string(a, precision=6)


@dataclass(frozen=True, repr=False)
class SpectralDensity:
    """Stochastic Lanczos quadrature estimate of an eigenvalue density.

    Attributes
    ----------
    nodes, weights : numpy.ndarray, shape (num_probes, num_steps), float64
        Gauss quadrature rule of each probe; each row of ``weights`` sums to 1 and is 0
        past the step where the probe broke down.
    residuals : numpy.ndarray, shape (num_probes, num_steps)
        Residual norm of each Ritz pair (distance bound to the spectrum).
    lengths : numpy.ndarray
        Lanczos steps each probe reached.
    probe_scales : numpy.ndarray
        Hutchinson scales of the probes (1 except for Gaussian probes).
    n, num_steps, num_probes, seed, reorth, probe_kind, wall_time, matvecs
        Run metadata.
    """

    nodes: np.ndarray
    weights: np.ndarray
    residuals: np.ndarray
    lengths: np.ndarray
    probe_scales: np.ndarray
    n: int
    num_steps: int
    seed: int | None = None
    reorth: str = "full"
    probe_kind: str = "rademacher"
    wall_time: float = float("nan")
    matvecs: int = 0
    extra: dict = field(default_factory=dict)

    # -- construction -----------------------------------------------------------
    @classmethod
    def from_lanczos(cls, result: LanczosResult, **extra: Any) -> SpectralDensity:
        """Gauss quadrature rules of a :class:`~specdens.LanczosResult`."""
        nodes, weights, residuals = quadrature_rules(result)
        return cls(
            nodes=nodes,
            weights=weights,
            residuals=residuals,
            lengths=result.lengths.copy(),
            probe_scales=result.probe_scales.copy(),
            n=result.n,
            num_steps=result.num_steps,
            seed=result.seed,
            reorth=result.reorth,
            probe_kind=result.probe_kind,
            wall_time=result.wall_time,
            matvecs=result.matvecs,
            extra=dict(extra),
        )

    @property
    def num_probes(self) -> int:
        return int(self.nodes.shape[0])

    def _valid(self) -> np.ndarray:
        return np.arange(self.nodes.shape[1])[None, :] < self.lengths[:, None]

    def atoms(self) -> tuple[np.ndarray, np.ndarray]:
        """The estimate as one discrete measure: locations and masses (summing to the
        mean probe scale, 1 for Rademacher and sphere probes)."""
        mass = self.weights * self.probe_scales[:, None] / self.num_probes
        keep = self._valid() & (mass > 0)
        return self.nodes[keep], mass[keep]

    @property
    def spectral_range(self) -> float:
        """Largest minus smallest Ritz value."""
        b = self.bounds()
        return b.upper - b.lower

    # -- density ----------------------------------------------------------------
    def default_sigma(self) -> float:
        """The default kernel width: the median gap between consecutive Ritz values of
        one probe. Scale-free and shift-invariant, it resolves what the quadrature
        resolves (Gauss nodes are about one kernel width apart where the mass is)."""
        gaps = []
        for i in range(self.num_probes):
            th = np.sort(self.nodes[i, : self.lengths[i]])
            g = np.diff(th)
            gaps.append(g[g > 0])
        gaps = np.concatenate(gaps) if gaps else np.zeros(0)
        if gaps.size:
            return float(np.median(gaps))
        scale = float(np.max(np.abs(self.nodes[self._valid()]))) if self.nodes.size else 0.0
        return 1e-3 * scale if scale > 0 else 1e-3

    def default_grid(self, sigma: float | None = None, *, num: int | None = None) -> np.ndarray:
        """Grid over the Ritz values, padded by 5 kernel widths, spacing about sigma/3
        (at most 20001 uniform points, plus 17 points within 4 sigma of every Ritz value
        when that is coarser than sigma/3)."""
        sigma = self.default_sigma() if sigma is None else float(sigma)
        b = self.bounds()
        lo, hi = b.lower - 5 * sigma, b.upper + 5 * sigma
        refine = num is None and 3 * (hi - lo) / sigma > 20001
        if num is None:
            num = int(np.clip(np.ceil(3 * (hi - lo) / sigma), 1001, 20001))
        grid = np.linspace(lo, hi, num)
        if refine:
            # A wide range with a narrow kernel: add points around every Ritz value so
            # that no peak falls between grid points.
            loc, _ = self.atoms()
            local = np.unique(loc)[:, None] + sigma * np.linspace(-4, 4, 17)[None, :]
            grid = np.unique(np.concatenate([grid, local.reshape(-1)]))
        return grid

    def density(self, grid: Any = None, *, sigma: float | None = None,
                kernel: str = "gaussian") -> tuple[np.ndarray, np.ndarray]:
        """The smoothed density on a grid.

        Parameters
        ----------
        grid
            Points to evaluate at (default: :meth:`default_grid`).
        sigma
            Kernel width: the Gaussian's standard deviation or the Lorentzian's half
            width (default: :meth:`default_sigma`).
        kernel
            ``"gaussian"`` or ``"lorentzian"``; both are normalised exactly on the real
            line, so the density integrates to the total mass (1 for Rademacher and
            sphere probes) with no renormalisation on the grid.

        Returns
        -------
        grid, values : numpy.ndarray
        """
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}; choose one of {', '.join(KERNELS)}")
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if not (sigma > 0 and np.isfinite(sigma)):
            raise ValueError(f"sigma must be positive and finite; got {sigma}")
        grid = self.default_grid(sigma) if grid is None else np.asarray(grid, dtype=np.float64)
        loc, mass = self.atoms()
        values = np.empty(grid.shape)
        flat_grid, flat_vals = grid.reshape(-1), values.reshape(-1)
        chunk = max(1, 2**22 // max(loc.size, 1))
        for s in range(0, flat_grid.size, chunk):
            diff = (flat_grid[s:s + chunk, None] - loc[None, :]) / sigma
            if kernel == "gaussian":
                k = np.exp(-0.5 * diff * diff) / (sigma * np.sqrt(2 * np.pi))
            else:
                k = 1.0 / (np.pi * sigma * (1.0 + diff * diff))
            flat_vals[s:s + chunk] = k @ mass
        return grid, values

    def cdf(self, x: Any, *, sigma: float | None = None) -> np.ndarray:
        """Estimated fraction of eigenvalues ``<= x``: the quadrature's step function, or
        its Gaussian smoothing of width ``sigma``."""
        x = np.asarray(x, dtype=np.float64)
        loc, mass = self.atoms()
        order = np.argsort(loc)
        loc, mass = loc[order], mass[order]
        if sigma is None:
            cum = np.cumsum(mass)
            idx = np.searchsorted(loc, x, side="right")
            return np.where(idx > 0, cum[np.maximum(idx - 1, 0)], 0.0)
        flat = x.reshape(-1)
        vals = ndtr((flat[:, None] - loc[None, :]) / float(sigma)) @ mass
        return vals.reshape(x.shape)

    # -- functionals ------------------------------------------------------------
    def _per_probe(self, f: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        fx = np.where(self._valid(), f(self.nodes), 0.0)
        return self.probe_scales * np.sum(self.weights * fx, axis=1)

    def _estimate(self, per_probe: np.ndarray) -> Estimate:
        k = per_probe.shape[0]
        mean = per_probe.mean(axis=0)
        stderr = per_probe.std(axis=0, ddof=1) / np.sqrt(k) if k > 1 else np.full_like(mean, np.nan)
        return Estimate(mean if mean.ndim else float(mean),
                        stderr if np.ndim(stderr) else float(stderr), k)

    def moments(self, p: int | Any) -> Estimate:
        """Estimate of ``tr(A^p) / n`` for an integer ``p`` or an array of them (exact per
        probe for ``p <= 2 * num_steps - 1``)."""
        ps = np.asarray(p)
        if ps.dtype.kind not in "iu" or np.any(ps < 0):
            raise ValueError(f"moments need non-negative integer powers; got {p!r}")
        per = np.stack([self._per_probe(lambda t, q=int(q): t**q) for q in ps.reshape(-1)], axis=1)
        est = self._estimate(per.reshape((-1,) + ps.shape) if ps.ndim else per[:, 0])
        return est

    def trace(self, f: Callable[[np.ndarray], np.ndarray]) -> Estimate:
        """Estimate of ``tr f(A)`` for a vectorised function ``f`` (e.g. ``numpy.exp``)."""
        per = self._per_probe(lambda t: np.asarray(f(t), dtype=np.float64)) * self.n
        return self._estimate(per)

    def fraction_negative(self, tol: float = 0.0) -> float:
        """Estimated fraction of eigenvalues below ``-tol``."""
        return float(self._estimate(self._per_probe(lambda t: (t < -tol).astype(float))).value)

    def bounds(self) -> SpectralBounds:
        """Smallest and largest Ritz values over all probes, with their residual norms."""
        valid = self._valid()
        nodes = np.where(valid, self.nodes, np.nan)
        i_lo = np.unravel_index(np.nanargmin(nodes), nodes.shape)
        i_hi = np.unravel_index(np.nanargmax(nodes), nodes.shape)
        return SpectralBounds(float(self.nodes[i_lo]), float(self.nodes[i_hi]),
                              float(self.residuals[i_lo]), float(self.residuals[i_hi]))

    # -- files ------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write to an ``.npz`` file: the arrays plus a JSON ``meta`` entry, no pickle.

        Format: ``format`` = ``"specdens.SpectralDensity"``, ``version`` = 1; float64
        arrays ``nodes``, ``weights``, ``residuals`` (num_probes x num_steps),
        ``probe_scales`` (num_probes); int64 ``lengths``; ``meta`` a JSON object with
        n, num_steps, seed, reorth, probe_kind, wall_time, matvecs and ``extra``.
        """
        meta = {
            "n": self.n, "num_steps": self.num_steps, "seed": self.seed, "reorth": self.reorth,
            "probe_kind": self.probe_kind, "wall_time": self.wall_time, "matvecs": self.matvecs,
            "extra": self.extra,
        }
        with open(path, "wb") as fh:
            np.savez(
                fh,
                format=np.array(FORMAT_NAME), version=np.array(FORMAT_VERSION),
                nodes=self.nodes, weights=self.weights, residuals=self.residuals,
                lengths=self.lengths.astype(np.int64), probe_scales=self.probe_scales,
                meta=np.array(json.dumps(meta, default=_json_default)),
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpectralDensity:
        """Read a file written by :meth:`save`; refuses corrupt or foreign files."""
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise ValueError(f"{path} is not a readable specdens result file ({exc})") from None
        if "format" not in data or str(data["format"]) != FORMAT_NAME:
            raise ValueError(
                f"{path} is not a specdens SpectralDensity file (no '{FORMAT_NAME}' tag)"
            )
        version = int(data.get("version", -1))
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {version}; this specdens reads version "
                             f"{FORMAT_VERSION}")
        missing = {"nodes", "weights", "residuals", "lengths", "probe_scales", "meta"} - set(data)
        if missing:
            raise ValueError(f"{path} is a corrupt specdens file: missing {sorted(missing)}")
        try:
            meta = json.loads(str(data["meta"]))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is a corrupt specdens file: bad meta ({exc})") from None
        out = cls(
            nodes=np.asarray(data["nodes"], dtype=np.float64),
            weights=np.asarray(data["weights"], dtype=np.float64),
            residuals=np.asarray(data["residuals"], dtype=np.float64),
            lengths=np.asarray(data["lengths"], dtype=np.int64),
            probe_scales=np.asarray(data["probe_scales"], dtype=np.float64),
            n=int(meta["n"]), num_steps=int(meta["num_steps"]), seed=meta.get("seed"),
            reorth=meta.get("reorth", "full"), probe_kind=meta.get("probe_kind", "rademacher"),
            wall_time=float(meta.get("wall_time", float("nan"))),
            matvecs=int(meta.get("matvecs", 0)), extra=meta.get("extra", {}),
        )
        out._validate(str(path))
        return out

    def _validate(self, where: str) -> None:
        k, m = self.nodes.shape if self.nodes.ndim == 2 else (-1, -1)
        shapes_ok = (
            self.nodes.ndim == 2 and self.weights.shape == (k, m) and self.residuals.shape == (k, m)
            and self.lengths.shape == (k,) and self.probe_scales.shape == (k,)
        )
        if not shapes_ok:
            raise ValueError(f"{where} is a corrupt specdens file: inconsistent array shapes")
        if not (np.all(np.isfinite(self.nodes)) and np.all(np.isfinite(self.weights))):
            raise ValueError(f"{where} is a corrupt specdens file: non-finite nodes or weights")
        if np.any(self.lengths < 1) or np.any(self.lengths > m) or np.any(self.weights < 0):
            raise ValueError(f"{where} is a corrupt specdens file: invalid lengths or weights")
        if not np.allclose(self.weights.sum(axis=1), 1.0, atol=1e-8):
            raise ValueError(f"{where} is a corrupt specdens file: weights do not sum to 1")

    # -- plotting and display ---------------------------------------------------
    def plot(self, ax: Any = None, *, log_density: bool = True, sigma: float | None = None,
             kernel: str = "gaussian", **kwargs: Any) -> Any:
        """Plot the density with matplotlib (the paper's view: a log density axis)."""
        from .plotting import plot_density

        return plot_density(self, ax=ax, log_density=log_density, sigma=sigma, kernel=kernel,
                            **kwargs)

    def __repr__(self) -> str:
        b = self.bounds()
        return (
            f"SpectralDensity(n={self.n}, num_probes={self.num_probes}, "
            f"num_steps={self.num_steps}, "
            f"reorth={self.reorth!r}, range=[{b.lower:.6g}, {b.upper:.6g}], "
            f"matvecs={self.matvecs}, wall_time={self.wall_time:.3g}s)"
        )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in a specdens result file's metadata")
