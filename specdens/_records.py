"""The records of :class:`~specdens.tracker.SpectrumTracker` and their JSON form.

:class:`SpectrumRecord` (what the tracker recorded at one step), :data:`SERIES` (its
scalars by name), and the conversion of a record and of its parts (the density, the
gradient concentration, the spectrum statistics) to and from the plain JSON values of a
line of the tracker file. The public names are re-exported by :mod:`specdens.tracker`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._json import plain
from .analysis import GradientConcentration, SpectrumStats
from .density import SpectralDensity
from .summary import Bulk, Outlier


# -- JSON helpers ---------------------------------------------------------------------
def _f(x: Any) -> float | None:
    """A JSON number: ``None`` for NaN and infinities."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _fl(a: Any) -> list:
    """An array as nested lists of JSON numbers (NaN and infinities as ``None``)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        return _f(a)  # type: ignore[return-value]
    return [_fl(x) if a.ndim > 1 else _f(x) for x in a]


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _arr(x: Any, ndim: int = 1) -> np.ndarray:
    """JSON lists back to a float64 array (``None`` as NaN)."""
    if x is None:
        return np.zeros((0,) * ndim)
    if ndim == 1:
        return np.array([_nan(v) for v in x], dtype=np.float64)
    return np.array([[_nan(v) for v in row] for row in x], dtype=np.float64).reshape(
        (len(x), -1) if x else (0, 0))


def _plain(obj: Any) -> Any:
    """Plain JSON types for a tracker record (see :func:`specdens._json.plain`)."""
    return plain(obj, where="a tracker record")


def _density_to_json(d: SpectralDensity) -> dict:
    return {
        "nodes": _fl(d.nodes), "weights": _fl(d.weights), "residuals": _fl(d.residuals),
        "lengths": [int(v) for v in d.lengths], "probe_scales": _fl(d.probe_scales),
        "n": int(d.n), "num_steps": int(d.num_steps), "seed": d.seed, "reorth": d.reorth,
        "probe_kind": d.probe_kind, "wall_time": _f(d.wall_time), "matvecs": int(d.matvecs),
        "extra": _plain(d.extra),
        **({"probe_indices": [int(v) for v in d.probe_indices]}
           if d.probe_indices is not None else {}),
        **({"breakdown": [bool(v) for v in d.breakdown]} if d.breakdown is not None else {}),
        **({"probe_seeds": [int(v) for v in d.probe_seeds]}
           if d.probe_seeds is not None else {}),
        **_deflation_to_json(d),
    }


def _deflation_to_json(d: SpectralDensity) -> dict:
    """The fields of a deflated or adaptive estimate, when it has them."""
    out: dict = {}
    defl = getattr(d, "deflated_eigenvalues", None)
    if defl is not None and np.size(defl):
        out["deflated_eigenvalues"] = _fl(defl)
        out["deflated_residuals"] = _fl(d.deflated_residuals)
    conv = getattr(d, "convergence", None)
    if conv is not None:
        out["convergence"] = _plain(conv.to_dict())
    return out


def _deflation_from_json(x: dict) -> dict:
    out: dict = {}
    if x.get("deflated_eigenvalues"):
        out["deflated_eigenvalues"] = _arr(x["deflated_eigenvalues"])
        out["deflated_residuals"] = _arr(x["deflated_residuals"])
    if x.get("convergence") is not None:
        from .density import ProbeConvergence  # type: ignore[attr-defined]

        out["convergence"] = ProbeConvergence.from_dict(x["convergence"])
    return out


def _density_from_json(x: dict) -> SpectralDensity:
    d = SpectralDensity(
        nodes=_arr(x["nodes"], 2), weights=_arr(x["weights"], 2),
        residuals=_arr(x["residuals"], 2),
        lengths=np.asarray(x["lengths"], dtype=np.int64),
        probe_scales=_arr(x["probe_scales"]), n=int(x["n"]), num_steps=int(x["num_steps"]),
        seed=x.get("seed"), reorth=x.get("reorth", "full"),
        probe_kind=x.get("probe_kind", "rademacher"), wall_time=_nan(x.get("wall_time")),
        matvecs=int(x.get("matvecs", 0)), extra=dict(x.get("extra") or {}),
        probe_indices=(np.asarray(x["probe_indices"], dtype=np.int64)
                       if x.get("probe_indices") is not None else None),
        breakdown=(np.asarray(x["breakdown"], dtype=bool)
                   if x.get("breakdown") is not None else None),
        probe_seeds=(tuple(int(v) for v in x["probe_seeds"])
                     if x.get("probe_seeds") is not None else None),
        **_deflation_from_json(x),
    )
    d._validate("tracker record")
    return d


def _concentration_to_json(c: GradientConcentration) -> dict:
    return {
        "fraction": _f(c.fraction), "overlaps": _fl(c.overlaps),
        "eigenvalues": _fl(c.eigenvalues), "residuals": _fl(c.residuals),
        "gradient_norm": _f(c.gradient_norm), "which": c.which, "gap": _f(c.gap),
        # inf (eigenvalues not separated) differs from NaN (no gap computed): kept apart
        "error_estimate": "inf" if c.error_estimate == math.inf else _f(c.error_estimate),
        "converged": bool(c.converged),
    }


def _concentration_from_json(x: dict) -> GradientConcentration:
    err = x.get("error_estimate")
    return GradientConcentration(
        fraction=_nan(x["fraction"]), overlaps=_arr(x["overlaps"]),
        eigenvalues=_arr(x["eigenvalues"]), residuals=_arr(x["residuals"]),
        gradient_norm=_nan(x["gradient_norm"]), which=str(x["which"]), gap=_nan(x["gap"]),
        error_estimate=float("inf") if err == "inf" else _nan(err),
        converged=bool(x["converged"]),
    )


def _stats_to_json(s: SpectrumStats) -> dict:
    return {
        "outliers": [{"value": _f(o.value), "residual": _f(o.residual),
                      "num_probes": int(o.num_probes), "mass": _f(o.mass), "side": o.side}
                     for o in s.outliers],
        "bulk": {k: _f(getattr(s.bulk, k)) for k in
                 ("lower", "upper", "width", "lower_threshold", "upper_threshold", "scale")},
        "largest": _f(s.largest),
        # inf (a bulk edge at 0 to rounding) differs from NaN (no edge ratio): kept apart
        "edge_ratio": "inf" if s.edge_ratio == math.inf else _f(s.edge_ratio),
        "num_top_above": s.num_top_above, "negative_mass": _f(s.negative_mass),
        "negative_mass_stderr": _f(s.negative_mass_stderr),
        "negative_mass_bounds": [_f(v) for v in s.negative_mass_bounds],
        "rule": _plain(s.rule),
    }


def _stats_from_json(x: dict) -> SpectrumStats:
    b = x["bulk"]
    return SpectrumStats(
        outliers=tuple(Outlier(value=_nan(o["value"]), residual=_nan(o["residual"]),
                               num_probes=int(o["num_probes"]), mass=_nan(o["mass"]),
                               side=str(o["side"])) for o in x["outliers"]),
        bulk=Bulk(**{k: _nan(b[k]) for k in ("lower", "upper", "width", "lower_threshold",
                                              "upper_threshold", "scale")}),
        largest=_nan(x["largest"]),
        edge_ratio=float("inf") if x["edge_ratio"] == "inf" else _nan(x["edge_ratio"]),
        num_top_above=x.get("num_top_above"), negative_mass=_nan(x["negative_mass"]),
        negative_mass_stderr=_nan(x["negative_mass_stderr"]),
        negative_mass_bounds=tuple(_nan(v) for v in x.get("negative_mass_bounds",
                                                           [None, None])),
        rule=dict(x.get("rule") or {}),
    )


# -- records ----------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class SpectrumRecord:
    """What :class:`SpectrumTracker` recorded at one training step.

    Attributes
    ----------
    run : str
        The run's name (several runs may share a file).
    step : int
        The training step.
    time : float
        When the record was written (seconds since the epoch, UTC).
    loss, accuracy : float
        As given to :meth:`SpectrumTracker.record` (NaN when not given).
    density : SpectralDensity or None
        The SLQ estimate (None when the tracker was built with ``num_probes=0``).
    eigenvalues, eigenvalue_residuals : numpy.ndarray, shape (k,)
        The ``k`` extreme eigenvalues of kind ``which`` (ascending) and their residual
        norms; empty with ``k=0``.
    which : str
        Their kind (``"LA"``, ``"SA"`` or ``"LM"``).
    concentration : GradientConcentration or None
        The gradient's concentration in their eigenspace (None without a gradient).
    stats : SpectrumStats or None
        Outliers, bulk edge, edge ratio and negative mass (None without a density).
    wall_time : float
        Seconds spent computing the record.
    extra : dict
        The caller's additional JSON values (test accuracy, learning rate, ...).
    """

    run: str
    step: int
    time: float
    loss: float
    accuracy: float
    density: SpectralDensity | None
    eigenvalues: np.ndarray
    eigenvalue_residuals: np.ndarray
    which: str
    concentration: GradientConcentration | None
    stats: SpectrumStats | None
    wall_time: float
    extra: dict = field(default_factory=dict)

    # -- derived values ------------------------------------------------------------------
    @property
    def top_eigenvalue(self) -> float:
        """The estimate of the largest eigenvalue; NaN when the record has none.

        The larger of ``stats.largest`` (the density's largest Ritz value) and the largest
        recorded eigenvalue when it is the largest eigenvalue: always for ``which="LA"``;
        for ``"LM"`` when it is >= 0 (then no eigenvalue outside the ``k`` of largest
        magnitude is larger; when all ``k`` are negative the largest is not among them).
        Eigenvalues of kind ``"SA"`` say nothing about it: an ``"SA"`` record without a
        density (``num_probes=0``) gives NaN. Both kinds of values are Rayleigh quotients,
        never above the true largest eigenvalue, so the larger is the better estimate.
        """
        found = []
        if self.stats is not None and not math.isnan(self.stats.largest):
            found.append(float(self.stats.largest))
        ev = self.eigenvalues[np.isfinite(self.eigenvalues)]
        if ev.size and self.which in ("LA", "LM"):
            top = float(np.max(ev))
            if self.which == "LA" or top >= 0:
                found.append(top)
        return max(found) if found else float("nan")

    def value(self, name: str) -> float:
        """One scalar of the record by name (see :data:`SERIES`); NaN when absent."""
        if name not in SERIES:
            raise ValueError(f"unknown series {name!r}; choose one of {', '.join(SERIES)}")
        return SERIES[name](self)

    # -- JSON ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The record as a JSON object (the line format of the tracker file)."""
        return {
            "type": "record", "run": self.run, "step": int(self.step), "time": _f(self.time),
            "loss": _f(self.loss), "accuracy": _f(self.accuracy),
            "density": None if self.density is None else _density_to_json(self.density),
            "top": {"which": self.which, "eigenvalues": _fl(self.eigenvalues),
                    "residuals": _fl(self.eigenvalue_residuals)},
            "concentration": None if self.concentration is None
            else _concentration_to_json(self.concentration),
            "stats": None if self.stats is None else _stats_to_json(self.stats),
            "wall_time": _f(self.wall_time), "extra": _plain(self.extra),
        }

    @classmethod
    def from_json(cls, x: dict) -> SpectrumRecord:
        """A record from its JSON object; raises KeyError/ValueError/TypeError when
        malformed."""
        if x.get("type") != "record":
            raise ValueError("not a record line")
        top = x["top"]
        return cls(
            run=str(x["run"]), step=int(x["step"]), time=_nan(x.get("time")),
            loss=_nan(x.get("loss")), accuracy=_nan(x.get("accuracy")),
            density=None if x.get("density") is None else _density_from_json(x["density"]),
            eigenvalues=_arr(top["eigenvalues"]), eigenvalue_residuals=_arr(top["residuals"]),
            which=str(top["which"]),
            concentration=None if x.get("concentration") is None
            else _concentration_from_json(x["concentration"]),
            stats=None if x.get("stats") is None else _stats_from_json(x["stats"]),
            wall_time=_nan(x.get("wall_time")), extra=dict(x.get("extra") or {}),
        )

    def __repr__(self) -> str:
        conc = "None" if self.concentration is None else f"{self.concentration.fraction:.4g}"
        nout = "None" if self.stats is None else str(self.stats.num_outliers)
        return (
            f"SpectrumRecord(run={self.run!r}, step={self.step}, loss={self.loss:.6g}, "
            f"accuracy={self.accuracy:.4g}, top_eigenvalue={self.top_eigenvalue:.6g}, "
            f"num_outliers={nout}, concentration={conc}, wall_time={self.wall_time:.3g}s)"
        )


def _conc(r: SpectrumRecord) -> float:
    return float("nan") if r.concentration is None else r.concentration.fraction


def _stat(name: str) -> Callable[[SpectrumRecord], float]:
    def get(r: SpectrumRecord) -> float:
        return float("nan") if r.stats is None else float(getattr(r.stats, name))

    return get


def _top_above(r: SpectrumRecord) -> float:
    if r.stats is None or r.stats.num_top_above is None:
        return float("nan")
    return float(r.stats.num_top_above)


SERIES: dict[str, Callable[[SpectrumRecord], float]] = {
    "loss": lambda r: r.loss,
    "accuracy": lambda r: r.accuracy,
    "top_eigenvalue": lambda r: r.top_eigenvalue,
    "concentration": _conc,
    "num_outliers": _stat("num_outliers"),
    "num_lower_outliers": _stat("num_lower_outliers"),
    "num_top_above": _top_above,
    "edge_ratio": _stat("edge_ratio"),
    "bulk_edge": lambda r: float("nan") if r.stats is None else r.stats.bulk.upper,
    "negative_mass": _stat("negative_mass"),
    "wall_time": lambda r: r.wall_time,
}
"""Scalar series of a record, by name: ``series(records, name)`` reads them over time."""
