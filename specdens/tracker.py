"""``SpectrumTracker``: the Hessian spectrum through training, in one crash-safe file.

At chosen training steps the tracker computes the SLQ density (:func:`specdens.slq`),
the top-``k`` eigenvalues and the gradient concentration in their eigenspace
(:func:`specdens.analysis.gradient_concentration`), the outliers, the bulk edge and the
negative mass (:func:`specdens.analysis.spectrum_stats`), and appends them with the loss
and the accuracy to a file. It needs no framework: give it an operator and a gradient
vector (or a factory that builds them only when the step is due); the hooks
:func:`specdens.backends.torch.tracking.track` build them for a PyTorch model.

The file
--------
JSON Lines (UTF-8), no pickle: the first line is a header
``{"format": "specdens.SpectrumTracker", "version": 1, "created": ..., "specdens_version":
..., "meta": {...}, "settings": {...}}`` (a tracker continuing the file must have the same
``meta`` and ``settings``),
every further line one self-contained record ``{"type": "record", "run": ..., "step":
..., ...}`` (see :meth:`SpectrumRecord.to_json`). Floats are written with Python's
shortest round-trip representation, so float64 values read back bit for bit; NaN and
infinities are written as ``null`` and read back as NaN.

Crash safety: each record is written with one ``write`` on a descriptor opened with
``O_APPEND``, then ``fsync``-ed before :meth:`SpectrumTracker.record` returns, so a
record that was returned survives a crash of the process (and of the machine). A crash
during a write can leave at most one torn last line (no final newline, or not valid
JSON): :func:`read_records` ignores it, and a tracker opened on the file cuts it off
before appending, so a restarted run continues the file. Steps already recorded for the
run are not recorded again (:meth:`SpectrumTracker.due`).
"""

from __future__ import annotations

import datetime as _dt
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _checks
from ._progress import make_progress
from .analysis import (
    CONCENTRATION_WHICH,
    GradientConcentration,
    SpectrumStats,
    gradient_concentration,
    spectrum_stats,
)
from .density import SpectralDensity
from .summary import Bulk, Outlier

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SERIES",
    "SpectrumRecord",
    "SpectrumTracker",
    "TrackerFileError",
    "TrackerFileWarning",
    "log_spaced_steps",
    "read_records",
    "series",
]

FORMAT_NAME = "specdens.SpectrumTracker"
FORMAT_VERSION = 1


class TrackerFileError(ValueError):
    """A tracker file that cannot be read: not a tracker file, another version, or a
    damaged line before the last one."""


class TrackerFileWarning(UserWarning):
    """A torn last line (a write interrupted by a crash) was ignored or cut off."""


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
    """Plain JSON types: numpy scalars and arrays to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return _f(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store a {type(obj).__name__} in a tracker record; use numbers, "
                    "strings, lists and dicts")


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
        """The largest recorded eigenvalue (``stats.largest`` when there are stats)."""
        if self.stats is not None:
            return self.stats.largest
        return float(np.max(self.eigenvalues)) if self.eigenvalues.size else float("nan")

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


def series(records: Iterable[SpectrumRecord], name: str, *,
           run: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One scalar over time: ``(steps, values)`` of the records (of ``run``, if given),
    sorted by step; values NaN where a record lacks them.

    ``name`` is one of :data:`SERIES`: ``loss``, ``accuracy``, ``top_eigenvalue``,
    ``concentration``, ``num_outliers``, ``num_lower_outliers``, ``num_top_above``,
    ``edge_ratio``, ``bulk_edge``, ``negative_mass``, ``wall_time``.
    """
    if name not in SERIES:
        raise ValueError(f"unknown series {name!r}; choose one of {', '.join(SERIES)}")
    rs = sorted((r for r in records if run is None or r.run == run), key=lambda r: r.step)
    steps = np.array([r.step for r in rs], dtype=np.int64)
    return steps, np.array([SERIES[name](r) for r in rs], dtype=np.float64)


def log_spaced_steps(last: int, num: int, *, first: int = 1,
                     include_zero: bool = True) -> list[int]:
    """About ``num`` distinct integer steps from 0 to ``last``, log-spaced.

    Step 0 (with ``include_zero``), then ``num - 1`` points ``round(geomspace(first,
    last))`` with duplicates removed (so fewer when ``last`` is small).

    >>> log_spaced_steps(1024, 12)
    [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    """
    last = _checks.nonnegative_int(last, "last")
    num = _checks.positive_int(num, "num")
    first = _checks.positive_int(first, "first")
    out = {0} if include_zero else set()
    count = num - 1 if include_zero else num
    if last >= first and count > 0:
        pts = np.geomspace(first, last, count) if count > 1 else np.array([last])
        out.update(int(round(float(p))) for p in pts)
    elif last >= 1 and count > 0:
        out.add(last)
    return sorted(out)


# -- the file ---------------------------------------------------------------------------
# How every header line begins (``json.dumps`` of the header dict, "format" first).
_HEADER_START = b'{"format": ' + json.dumps(FORMAT_NAME).encode("ascii")


def _may_be_torn_header(raw: bytes) -> bool:
    """Whether ``raw``, a first line cut short or not valid JSON, can be a header line
    torn by a crash: only a prefix of one (or a line beginning like one) can; anything
    else is a foreign file, which must not be cut off."""
    return raw.startswith(_HEADER_START) or _HEADER_START.startswith(raw)


def _scan(path: Path) -> tuple[dict | None, list[tuple[int, dict]], int, str | None]:
    """Parse a tracker file: header, ``(line number, record JSON)`` pairs, the byte length
    of the intact part, and a description of a torn last line (None if there is none).

    Raises :class:`TrackerFileError` for a damaged line before the last one, a foreign
    file (also one whose only line is not a tracker header, with or without a final
    newline: it is not taken for a torn header) or another version.
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    # ``data`` ends with "\n" when intact: the last piece is then empty.
    pieces = [(i + 1, ln) for i, ln in enumerate(lines)]
    good_len = 0
    header = None
    recs: list[tuple[int, dict]] = []
    torn = None
    for idx, (lineno, raw) in enumerate(pieces):
        last_piece = idx == len(pieces) - 1
        if last_piece:
            if raw:
                if header is None and not _may_be_torn_header(raw):
                    raise TrackerFileError(
                        f"{path} is not a specdens tracker file (its first line has no "
                        f"final newline and does not begin like a tracker header, "
                        f"{_HEADER_START.decode()}...); it is left unchanged: give the tracker "
                        "another path")
                torn = f"line {lineno} has no final newline ({len(raw)} bytes)"
            break
        try:
            obj = json.loads(raw.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            if header is None and not _may_be_torn_header(raw):
                raise TrackerFileError(
                    f"{path} is not a specdens tracker file (its first line is not a tracker "
                    f"header: {exc}); it is left unchanged: give the tracker another path"
                ) from None
            if idx == len(pieces) - 2 and not pieces[-1][1]:
                torn = f"line {lineno} is not valid JSON ({exc})"
                break
            raise TrackerFileError(
                f"{path}: line {lineno} is damaged ({exc}); only the last line of a tracker "
                "file can be torn by a crash, so this file was changed by something else"
            ) from None
        if header is None:
            if obj.get("format") != FORMAT_NAME:
                raise TrackerFileError(f"{path} is not a specdens tracker file (its first line "
                                       f"has no format {FORMAT_NAME!r})")
            if obj.get("version") != FORMAT_VERSION:
                raise TrackerFileError(f"{path} has tracker format version "
                                       f"{obj.get('version')}; this specdens reads version "
                                       f"{FORMAT_VERSION}")
            header = obj
        else:
            recs.append((lineno, obj))
        good_len += len(raw) + 1
    return header, recs, good_len, torn


def read_records(path: str | os.PathLike, *, run: str | None = None,
                 latest: bool = True) -> list[SpectrumRecord]:
    """The records of a tracker file, in file order.

    Parameters
    ----------
    path
        The file written by :class:`SpectrumTracker`.
    run
        Only this run's records (default: all runs).
    latest
        When a (run, step) pair was recorded twice (by two trackers, or ``record(...,
        replace=True)``), keep only the later record, at the position of the later.

    Returns
    -------
    list of SpectrumRecord
        Empty for an empty file or a file holding only a (possibly torn) header.

    Raises
    ------
    FileNotFoundError
        When there is no such file.
    TrackerFileError
        For a foreign file, another format version, or a damaged line that is not the
        last (a torn last line is ignored with a :class:`TrackerFileWarning`).
    """
    p = Path(path)
    header, recs, _, torn = _scan(p)
    if torn is not None:
        warnings.warn(f"{p}: ignoring a torn last line ({torn}): a write interrupted by a "
                      "crash", TrackerFileWarning, stacklevel=2)
    if header is None and recs:
        raise TrackerFileError(f"{p} has records but no header line")
    out = []
    for lineno, obj in recs:
        try:
            rec = SpectrumRecord.from_json(obj)
        except (KeyError, TypeError, ValueError) as exc:
            raise TrackerFileError(f"{p}: line {lineno} is not a valid record ({exc!r})") from None
        if run is None or rec.run == run:
            out.append(rec)
    if latest:
        last_index = {(r.run, r.step): i for i, r in enumerate(out)}
        out = [r for i, r in enumerate(out) if last_index[(r.run, r.step)] == i]
    return out


def read_header(path: str | os.PathLike) -> dict | None:
    """The header of a tracker file (format, version, created, meta and, since specdens
    stores them, the tracker's settings), or None when the file is empty or holds only a
    torn header."""
    header, _, _, _ = _scan(Path(path))
    return header


def _append(path: Path, line: str) -> None:
    """Append one line with one ``write`` (retried for the remainder) and ``fsync``."""
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SpectrumTracker:
    """Record the Hessian spectrum at chosen training steps into one append-only file.

    Parameters
    ----------
    path
        The JSON Lines file (created with its header if missing or empty; continued if it
        exists, after cutting off a torn last line). Any other file, also a one-line file
        without a final newline that does not begin like a tracker header, is refused
        with a :class:`TrackerFileError` and left unchanged.
    run
        Name of this run's records (several runs may share a file).
    steps
        The steps to record: an iterable of integers >= 0 (e.g.
        :func:`log_spaced_steps`), or None to record at every call of :meth:`record` /
        :meth:`maybe_record`.
    k
        Number of extreme eigenvalues, and the dimension of the eigenspace of the gradient
        concentration (Ghorbani et al. use the number of classes). ``0`` skips both.
    which
        Their kind: ``"LA"`` (largest, the default), ``"SA"`` or ``"LM"``.
    num_steps, num_probes, seed, reorth
        SLQ settings (:func:`specdens.slq`); the same probes (``seed``) at every step, so
        that changes over time are not probe noise. ``num_probes=0`` skips the density.
    eigsh_options
        Passed to :func:`specdens.eigsh` (``tol``, ``ncv``, ``maxiter``, ``dtype``).
    outlier_options
        Passed to :func:`specdens.analysis.spectrum_stats` (``tail``, ``gap``, ``rtol``,
        ``negative_tol``).
    meta
        JSON values describing the experiment, stored in the header of a new file. When
        the file exists and its header holds other ``meta``, a ValueError names the
        differences: records of different experiments are not mixed. The same holds for
        the tracker's own settings (``k``, ``which``, ``num_steps``, ``num_probes``,
        ``seed``, ``reorth``, ``eigsh_options``, ``outlier_options``; stored as
        ``settings`` in the header): every tracker continuing a file, for any ``run``,
        must use those it was created with (files written before the header held them are
        not checked).
    progress
        ``True`` for progress bars on long computations (stderr), or a callable
        ``(done, total)`` for the SLQ part.

    Examples
    --------
    A plain training loop (``make`` builds the operator and the gradient only at the
    recorded steps; :func:`specdens.backends.torch.tracking.track` does it for PyTorch):

    >>> tracker = SpectrumTracker("spectra.jsonl", steps=log_spaced_steps(1000, 10),
    ...                           k=10)                                  # doctest: +SKIP
    >>> for step in range(1001):                                        # doctest: +SKIP
    ...     tracker.maybe_record(step, lambda: (make_hessian(), make_gradient()),
    ...                          loss=lambda: current_loss())
    ...     train_one_step()
    >>> records = SpectrumTracker.load("spectra.jsonl")                 # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        run: str = "run",
        steps: Iterable[int] | None = None,
        k: int = 10,
        which: str = "LA",
        num_steps: int = 90,
        num_probes: int = 10,
        seed: int = 0,
        reorth: str = "full",
        eigsh_options: dict | None = None,
        outlier_options: dict | None = None,
        meta: dict | None = None,
        progress: Any = False,
    ):
        if not isinstance(run, str) or not run:
            raise ValueError(f"run must be a non-empty string; got {run!r}")
        self.path = Path(path)
        self.run = run
        self.schedule = None if steps is None else frozenset(self._steps(steps))
        self.k = _checks.nonnegative_int(k, "k")
        if which not in CONCENTRATION_WHICH:
            raise ValueError(f"which={which!r}; choose one of {', '.join(CONCENTRATION_WHICH)}")
        self.which = which
        self.num_steps = _checks.positive_int(num_steps, "num_steps")
        self.num_probes = _checks.nonnegative_int(num_probes, "num_probes")
        if self.k == 0 and self.num_probes == 0:
            raise ValueError("k=0 and num_probes=0 leave nothing to record")
        self.seed = seed
        self.reorth = reorth
        self.eigsh_options = dict(eigsh_options or {})
        bad = set(self.eigsh_options) - {"tol", "ncv", "maxiter", "dtype"}
        if bad:
            raise ValueError(f"eigsh_options: unknown {sorted(bad)}; allowed: tol, ncv, "
                             "maxiter, dtype")
        self.outlier_options = dict(outlier_options or {})
        bad = set(self.outlier_options) - {"tail", "gap", "rtol", "negative_tol"}
        if bad:
            raise ValueError(f"outlier_options: unknown {sorted(bad)}; allowed: tail, gap, "
                             "rtol, negative_tol")
        self.meta = None if meta is None else _plain(meta)
        self.settings = self._settings()
        self.progress = progress
        self._recorded: set[int] = set()
        self._open()

    @staticmethod
    def _steps(steps: Iterable[int]) -> list[int]:
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise TypeError(f"steps must be an iterable of integers or None; got {steps!r}")
        return [_checks.nonnegative_int(s, "each step") for s in steps]

    def _settings(self) -> dict:
        """What a record is a record of: the tracker's eigsh, SLQ and outlier settings, as
        JSON values (a value JSON cannot hold, e.g. a dtype object, as its ``str``)."""

        def plain(v: Any) -> Any:
            if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic)):
                return np.dtype(v).name  # np.float64, np.dtype("float64") -> "float64"
            try:
                return _plain(v)
            except TypeError:
                return str(v)

        # the same settings spelled differently must compare equal: options left at None
        # are the defaults, and the outlier rule's defaults are written out
        defaults = {name: p.default for name, p in
                    inspect.signature(spectrum_stats).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}
        outlier = {k: defaults[k] for k in ("tail", "gap", "rtol", "negative_tol")
                   if k in defaults}
        outlier.update({k: v for k, v in self.outlier_options.items() if v is not None})
        return {"k": self.k, "which": self.which, "num_steps": self.num_steps,
                "num_probes": self.num_probes, "seed": plain(self.seed),
                "reorth": plain(self.reorth),
                "eigsh_options": {str(k): plain(v) for k, v in self.eigsh_options.items()
                                  if v is not None},
                "outlier_options": {str(k): plain(v) for k, v in outlier.items()}}

    def _open(self) -> None:
        """Create the file with its header, or continue it: cut off a torn last line,
        check the header's meta and settings, read the steps this run already recorded."""
        p = self.path
        if p.exists() and p.stat().st_size > 0:
            header, recs, good_len, torn = _scan(p)
            if torn is not None:
                warnings.warn(f"{p}: cutting off a torn last line ({torn}) left by a crash; "
                              "continuing the file", TrackerFileWarning, stacklevel=3)
                with open(p, "r+b") as fh:
                    fh.truncate(good_len)
                    fh.flush()
                    os.fsync(fh.fileno())
            if header is None:
                if recs:
                    raise TrackerFileError(f"{p} has records but no header line")
            else:
                self._check_meta(header)
                self._check_settings(header)
                for _, obj in recs:
                    if obj.get("type") == "record" and obj.get("run") == self.run \
                            and isinstance(obj.get("step"), int):
                        self._recorded.add(obj["step"])
                return
        p.parent.mkdir(parents=True, exist_ok=True)
        from . import __version__

        header = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                  "specdens_version": __version__, "meta": self.meta,
                  "settings": self.settings}
        _append(p, json.dumps(header, allow_nan=False) + "\n")
        _fsync_dir(p)

    def _check_meta(self, header: dict) -> None:
        old = header.get("meta")
        if self.meta is None or old is None or old == self.meta:
            return
        keys = sorted(k for k in set(old) | set(self.meta) if old.get(k) != self.meta.get(k))
        diffs = ", ".join(f"{k}: {old.get(k)!r} in the file, {self.meta.get(k)!r} now"
                          for k in keys[:6])
        raise ValueError(f"{self.path} records another experiment ({diffs}); write to "
                         "another file or pass the same meta")

    def _check_settings(self, header: dict) -> None:
        """Refuse to continue a file recorded with other settings (k, which, SLQ and
        eigsh settings, outlier rule): its records would be of another kind. A file from
        before the header held them is not checked."""
        old = header.get("settings")
        if not isinstance(old, dict) or old == self.settings:
            return
        new = self.settings
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        diffs = ", ".join(f"{k}: {old.get(k)!r} in the file, {new.get(k)!r} now"
                          for k in keys[:6])
        raise ValueError(f"{self.path} was recorded with other tracker settings ({diffs}); "
                         "write to another file or pass the same settings")

    # -- schedule -----------------------------------------------------------------------
    @property
    def recorded_steps(self) -> frozenset[int]:
        """The steps of this run already in the file (also from before a restart)."""
        return frozenset(self._recorded)

    def due(self, step: int) -> bool:
        """Whether ``step`` is scheduled and not yet recorded for this run."""
        step = _checks.nonnegative_int(step, "step")
        if step in self._recorded:
            return False
        return self.schedule is None or step in self.schedule

    # -- recording ------------------------------------------------------------------------
    def maybe_record(self, step: int, factory: Callable[[], Any], *, loss: Any = None,
                     accuracy: Any = None, extra: Any = None) -> SpectrumRecord | None:
        """Record at ``step`` if it is due; build what is needed only then.

        Parameters
        ----------
        step
            The training step.
        factory
            ``factory() -> op`` or ``(op, gradient)``, called only when the step is due.
        loss, accuracy, extra
            Values, or callables with no arguments evaluated only when the step is due.

        Returns
        -------
        SpectrumRecord or None
            The record, or None when the step was not due.
        """
        if not self.due(step):
            return None
        if not callable(factory):
            raise TypeError("factory must be a callable returning op or (op, gradient)")
        made = factory()
        if isinstance(made, tuple) and len(made) != 2:
            raise ValueError(f"factory returned a tuple of length {len(made)}; return op or "
                             "(op, gradient)")
        op, grad = made if isinstance(made, tuple) else (made, None)
        return self.record(step, op, grad, loss=_call(loss), accuracy=_call(accuracy),
                           extra=_call(extra))

    def record(self, step: int, op: Any, gradient: Any = None, *, loss: float | None = None,
               accuracy: float | None = None, extra: dict | None = None,
               replace: bool = False) -> SpectrumRecord:
        """Compute the spectrum of ``op`` at ``step`` and append it to the file.

        Parameters
        ----------
        step
            The training step (an integer >= 0). Recording a step twice for the same run
            raises a ValueError unless ``replace=True`` (the reader then keeps the later
            record).
        op
            The symmetric operator, e.g. the Hessian at the current parameters.
        gradient
            The gradient at the same point, in the operator's array library (optional:
            without it no concentration is recorded).
        loss, accuracy
            Numbers stored with the record (NaN or None: stored as missing).
        extra
            A dict of further JSON values.

        Returns
        -------
        SpectrumRecord
            The record, already durable in the file.

        Raises
        ------
        FloatingPointError
            When the operator returns NaN or Inf (from :func:`specdens.slq` or
            :func:`specdens.eigsh`); nothing is written.
        """
        from .algorithms.eigsh import eigsh
        from .algorithms.slq import slq

        step = _checks.nonnegative_int(step, "step")
        if step in self._recorded and not replace:
            raise ValueError(f"step {step} of run {self.run!r} is already in {self.path}; a "
                             "restarted run continues the file (check tracker.due(step)), or "
                             "pass replace=True")
        if extra is not None and not isinstance(extra, dict):
            raise TypeError(f"extra must be a dict of JSON values; got {type(extra).__name__}")
        extra_json = _plain(extra or {})
        n = int(_checks.operator_of(op)[1])
        if self.k and self.k >= n:
            # (before the SLQ pass, whose products would be spent for nothing)
            raise ValueError(f"k={self.k} eigenvalues were asked of an operator of size "
                             f"n={n}; k must be smaller than n (make the tracker with a "
                             "smaller k)")
        t0 = time.perf_counter()
        density = None
        if self.num_probes:
            prog = self.progress
            if prog is True:
                prog = make_progress(True, f"{self.run} step {step}: lanczos")
            density = slq(op, num_steps=self.num_steps, num_probes=self.num_probes,
                          seed=self.seed, reorth=self.reorth, progress=prog or False)
        conc = None
        vals = np.zeros(0)
        res = np.zeros(0)
        if self.k:
            opts = {"seed": self.seed, **self.eigsh_options}
            if gradient is not None:
                conc = gradient_concentration(op, gradient, self.k, which=self.which, **opts)
                vals, res = conc.eigenvalues, conc.residuals
            else:
                e = eigsh(op, self.k, which=self.which, return_eigenvectors=False, **opts)
                vals, res = e.eigenvalues, e.residuals
        stats = None
        if density is not None:
            top = vals if (self.k and self.which == "LA") else None
            stats = spectrum_stats(density, top, **self.outlier_options)
        rec = SpectrumRecord(
            run=self.run, step=step, time=time.time(), loss=_num_or_nan(loss, "loss"),
            accuracy=_num_or_nan(accuracy, "accuracy"), density=density,
            eigenvalues=np.asarray(vals, dtype=np.float64),
            eigenvalue_residuals=np.asarray(res, dtype=np.float64), which=self.which,
            concentration=conc, stats=stats, wall_time=time.perf_counter() - t0,
            extra=extra_json,
        )
        _append(self.path, json.dumps(rec.to_json(), allow_nan=False) + "\n")
        self._recorded.add(step)
        return rec

    # -- reading --------------------------------------------------------------------------
    def records(self) -> list[SpectrumRecord]:
        """This run's records in the file (sorted by step)."""
        return sorted(read_records(self.path, run=self.run), key=lambda r: r.step)

    @classmethod
    def load(cls, path: str | os.PathLike, *, run: str | None = None) -> list[SpectrumRecord]:
        """The records of a tracker file (all runs, or ``run``'s); see :func:`read_records`."""
        return read_records(path, run=run)

    def __repr__(self) -> str:
        sched = "every call" if self.schedule is None else f"{len(self.schedule)} steps"
        return (f"SpectrumTracker(path={str(self.path)!r}, run={self.run!r}, schedule={sched}, "
                f"recorded={len(self._recorded)}, k={self.k}, which={self.which!r}, "
                f"num_steps={self.num_steps}, num_probes={self.num_probes})")


def _call(x: Any) -> Any:
    return x() if callable(x) else x


def _num_or_nan(x: Any, what: str) -> float:
    if x is None:
        return float("nan")
    if hasattr(x, "item") and callable(x.item):
        x = x.item()
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number; got {type(x).__name__}") from None
