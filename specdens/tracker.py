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
during a write can leave a torn line (no final newline). The next writer, a restarted
run or another run sharing the file, ends it with a newline before it appends (it never
cuts it off: the line could be that of a writer still writing), so the torn fragment
stays a damaged line of its own and never swallows the next record; :func:`read_records`
skips such lines with a :class:`TrackerFileWarning` naming them. Steps already recorded
for the run are not recorded again (:meth:`SpectrumTracker.due`).

Several processes may share a file: every append, and the header's write, holds an
advisory lock on it (``fcntl.flock``; readers take a shared one), and the file is
created with ``O_EXCL``, so that it gets exactly one header. Where there is no
``fcntl`` (Windows), or the file system refuses ``flock``, the tracker goes on without
locks: appends stay whole (one ``write`` with ``O_APPEND``), but a tracker opening a
file that another has just created waits up to 2 s for its header, and a header without
records is not replaced (see :class:`SpectrumTracker`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import inspect
import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _checks
from ._progress import make_progress
from .algorithms.eigsh import _resolve_ncv, _resolve_tol
from .algorithms.lanczos import REORTH_MODES
from .algorithms.probes import check_seed
from .analysis import (
    CONCENTRATION_WHICH,
    GradientConcentration,
    SpectrumStats,
    _check_vector,
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
    line that is valid JSON but not a valid record."""


class TrackerFileWarning(UserWarning):
    """Lines torn by a crash (writes interrupted before their end) were skipped or ended
    with a newline, or a header without records was replaced."""


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
    else is a foreign file, which must be left alone."""
    return raw.startswith(_HEADER_START) or _HEADER_START.startswith(raw)


@dataclass
class _Parsed:
    """A tracker file read line by line (see :func:`_parse`)."""

    header: dict | None
    header_line: bytes | None  # the header's line, without its newline
    records: list[tuple[int, dict]]  # (line number, JSON object) after the header
    damaged: list[str]  # "line N (why)" of each skipped damaged line
    torn: str | None  # the last line when it has no final newline (None if intact)


def _parse(data: bytes, path: Path) -> _Parsed:
    """Parse the bytes of a tracker file.

    Damaged lines (not valid JSON) are skipped and described in ``damaged``: each is a
    record or header torn by a crash, which a later writer terminated with a newline
    before appending (so a torn line is never glued to the next record); empty lines
    (two writers terminating the same torn line) are skipped silently. A last line without
    a final newline is left out and described in ``torn``. Raises
    :class:`TrackerFileError` for a foreign file (also one whose only line is not a tracker
    header, with or without a final newline: it is not taken for a torn header) or another
    version.
    """
    pieces = data.split(b"\n")
    # ``data`` ends with "\n" when intact: the last piece is then empty.
    header = header_line = torn = None
    records: list[tuple[int, dict]] = []
    damaged: list[str] = []
    for idx, raw in enumerate(pieces):
        lineno = idx + 1
        if idx == len(pieces) - 1:
            if raw:
                if header is None and not _may_be_torn_header(raw):
                    raise TrackerFileError(
                        f"{path} is not a specdens tracker file (its first line has no "
                        f"final newline and does not begin like a tracker header, "
                        f"{_HEADER_START.decode()}...); it is left unchanged: give the tracker "
                        "another path")
                torn = f"line {lineno} has no final newline ({len(raw)} bytes)"
            break
        if not raw:
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            if header is None and not _may_be_torn_header(raw):
                raise TrackerFileError(
                    f"{path} is not a specdens tracker file (its line {lineno} is not a "
                    f"tracker header: {exc}); it is left unchanged: give the tracker another "
                    "path") from None
            damaged.append(f"line {lineno} (not valid JSON: {exc})")
            continue
        if header is None:
            if obj.get("format") != FORMAT_NAME:
                raise TrackerFileError(f"{path} is not a specdens tracker file (its line "
                                       f"{lineno} has no format {FORMAT_NAME!r})")
            if obj.get("version") != FORMAT_VERSION:
                raise TrackerFileError(f"{path} has tracker format version "
                                       f"{obj.get('version')}; this specdens reads version "
                                       f"{FORMAT_VERSION}")
            header, header_line = obj, raw
        else:
            records.append((lineno, obj))
    return _Parsed(header, header_line, records, damaged, torn)


def _warn_damage(path: Path, parsed: _Parsed, stacklevel: int) -> None:
    parts = parsed.damaged + ([parsed.torn] if parsed.torn is not None else [])
    if parts:
        warnings.warn(f"{path}: ignoring lines torn by a crash (writes interrupted before "
                      f"their end): {'; '.join(parts)}", TrackerFileWarning,
                      stacklevel=stacklevel + 1)


# Advisory locks: every append (and the header's write) holds an exclusive flock on the
# file, readers a shared one. Without fcntl (Windows), or on a file system that refuses
# flock, the tracker goes on without locks (see SpectrumTracker's documentation).
try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def _locked(fd: int, *, exclusive: bool = True) -> Iterator[bool]:
    """Hold an advisory lock on the open file ``fd``; yields whether it is held."""
    if _fcntl is None:
        yield False
        return
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX if exclusive else _fcntl.LOCK_SH)
    except OSError:  # e.g. a network file system without flock
        yield False
        return
    try:
        yield True
    finally:
        _fcntl.flock(fd, _fcntl.LOCK_UN)


def _read_fd(fd: int) -> bytes:
    """The whole file behind ``fd``."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _header_line_of(fd: int) -> bytes | None:
    """The first line of the file behind ``fd`` that is valid JSON (the header's, after
    any torn fragments; without its newline), or None when there is none."""
    os.lseek(fd, 0, os.SEEK_SET)
    buf = b""
    while True:
        chunk = os.read(fd, 1 << 16)
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            try:
                if isinstance(json.loads(raw.decode("utf-8")), dict):
                    return raw
            except (UnicodeDecodeError, ValueError):
                continue  # an empty line or a torn fragment
        if not chunk:
            return None


def _write_fd(fd: int, data: bytes) -> None:
    """Write ``data`` to ``fd`` (opened with ``O_APPEND``) with one ``write`` (retried
    for the remainder) and ``fsync`` it."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def _ends_torn(fd: int) -> bool:
    """Whether the file behind ``fd`` is non-empty and does not end with a newline."""
    size = os.fstat(fd).st_size
    if not size:
        return False
    os.lseek(fd, size - 1, os.SEEK_SET)
    return os.read(fd, 1) != b"\n"


def _read(path: Path) -> _Parsed:
    fd = os.open(path, os.O_RDONLY)
    try:
        with _locked(fd, exclusive=False):  # no half-written line of a live writer
            data = _read_fd(fd)
    finally:
        os.close(fd)
    return _parse(data, path)


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

    Warns
    -----
    TrackerFileWarning
        For lines torn by a crash, which are skipped and named: a last line without a
        final newline, and lines that are not valid JSON. Only torn writes leave the
        latter: the tracker writes every line with one ``write`` and terminates a torn
        line with a newline before it appends (so another run sharing the file, or the
        restarted run, never glues its record onto the fragment).

    Raises
    ------
    FileNotFoundError
        When there is no such file.
    TrackerFileError
        For a foreign file, another format version, or a line that is valid JSON but not
        a valid record.
    """
    p = Path(path)
    parsed = _read(p)
    _warn_damage(p, parsed, stacklevel=2)
    out = []
    for lineno, obj in parsed.records:
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
    return _read(Path(path)).header


def _append(path: Path, line: str, *,
            check: Callable[[int, bool], None] | None = None) -> None:
    """Append one line with one ``write`` (retried for the remainder) and ``fsync``,
    holding the file's lock. A torn last line (left by a writer that crashed) is first
    terminated with a newline, so that it stays a damaged line of its own and the new
    line is intact. ``check(fd, locked)`` runs first, under the lock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} was removed after the tracker opened it; make a new "
                                "SpectrumTracker to start a new file") from None
    try:
        with _locked(fd) as locked:
            if check is not None:
                check(fd, locked)
            prefix = b""
            if _ends_torn(fd):
                warnings.warn(f"{path}: terminating a torn last line (a write interrupted by "
                              "a crash) with a newline before appending; readers skip it",
                              TrackerFileWarning, stacklevel=3)
                prefix = b"\n"
            _write_fd(fd, prefix + line.encode("utf-8"))
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


# Without locks: how long a tracker opening a file that another one has just created waits
# for its header (seconds).
_HEADER_WAIT = 2.0


@functools.lru_cache(maxsize=1)
def _small_density() -> SpectralDensity:
    """A tiny SLQ estimate on which :func:`spectrum_stats` checks outlier options."""
    from .algorithms.slq import slq

    return slq(np.diag([-1.0, 0.0, 1.0, 2.0]), num_steps=4, num_probes=2, seed=0)


class SpectrumTracker:
    """Record the Hessian spectrum at chosen training steps into one append-only file.

    Parameters
    ----------
    path
        The JSON Lines file (created with its header if missing or empty; continued if it
        exists, after ending a torn last line with a newline). Any other file, also a
        one-line file without a final newline that does not begin like a tracker header,
        is refused with a :class:`TrackerFileError` and left unchanged. Several trackers,
        in several processes, may use one file at once (see the module documentation on
        locks).
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
        SLQ settings (:func:`specdens.slq`); the same probes (``seed``, an integer >= 0;
        None, fresh probes at every step, only with ``k=0``) at every step, so that
        changes over time are not probe noise. ``num_probes=0`` skips the density.
    eigsh_options
        Passed to :func:`specdens.eigsh` (``tol``, ``ncv``, ``maxiter``, ``dtype``;
        ``dtype`` stored by its name, so ``"float64"``, ``numpy.float64`` and
        ``torch.float64`` are the same setting).
    outlier_options
        Passed to :func:`specdens.analysis.spectrum_stats` (``tail``, ``gap``, ``rtol``,
        ``negative_tol``).

        Every setting is checked here, by the checks of the function it is passed to
        (``ncv <= n`` by :meth:`record`, before any product), so that a typo raises
        before the header is written, not at the first record.
    meta
        JSON values describing the experiment, stored in the header of a new file. When
        the file exists and its header holds other ``meta``, a ValueError names the
        differences: records of different experiments are not mixed. The same holds for
        the tracker's own settings (``k``, ``which``, ``num_steps``, ``num_probes``,
        ``seed``, ``reorth``, ``eigsh_options``, ``outlier_options``; stored as
        ``settings`` in the header): every tracker continuing a file, for any ``run``,
        must use those it was created with (files written before the header held them are
        not checked). Only a header without records yet is replaced by one with other
        settings (with a :class:`TrackerFileWarning`, keeping its ``meta``; not without
        locks); a tracker that opened the file with the old settings then refuses to
        append.
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
        # Every setting is checked here, by the checks of the functions it goes to, before
        # it is written to the header: a typo fails now, not after a record's computation.
        self.seed = check_seed(seed, reproducible_for=(
            "k > 0 (specdens.eigsh's start vector)" if self.k else None))
        if not isinstance(reorth, str) or reorth not in REORTH_MODES:
            raise ValueError(f"reorth={reorth!r}; choose one of {', '.join(REORTH_MODES)}")
        self.reorth = reorth
        self.eigsh_options = self._eigsh_options(eigsh_options)
        self.outlier_options = self._outlier_options(outlier_options)
        self.meta = None if meta is None else _plain(meta)
        self.settings = self._settings()
        self.progress = progress
        self._recorded: set[int] = set()
        self._header_line: bytes | None = None
        self._open()

    def _eigsh_options(self, options: dict | None) -> dict:
        """``eigsh_options`` checked as :func:`specdens.eigsh` checks them (``ncv <= n``
        when the operator is known), with ``dtype`` by its canonical name."""
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"eigsh_options must be a dict; got {type(options).__name__}")
        opts = {k: v for k, v in (options or {}).items() if v is not None}
        bad = set(opts) - {"tol", "ncv", "maxiter", "dtype"}
        if bad:
            raise ValueError(f"eigsh_options: unknown {sorted(bad)}; allowed: tol, ncv, "
                             "maxiter, dtype")
        try:
            if "tol" in opts:
                _resolve_tol(opts["tol"], 2.0**-52)
                opts["tol"] = float(opts["tol"])
            if "ncv" in opts:
                opts["ncv"] = _checks.positive_int(opts["ncv"], "ncv")
                if self.k and not self.k < opts["ncv"]:
                    raise ValueError(f"ncv={opts['ncv']} must be larger than k={self.k}")
            if "maxiter" in opts:
                opts["maxiter"] = _checks.nonnegative_int(opts["maxiter"], "maxiter")
            if "dtype" in opts:
                # "float64", numpy.float64 and torch.float64 are one setting
                opts["dtype"] = _checks.float_dtype_name(opts["dtype"], "dtype", "float64")
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"eigsh_options: {exc}") from None
        return opts

    @staticmethod
    def _outlier_options(options: dict | None) -> dict:
        """``outlier_options`` checked by :func:`specdens.analysis.spectrum_stats` itself
        (on a tiny estimate), one option at a time so that the error names it."""
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"outlier_options must be a dict; got {type(options).__name__}")
        opts = {k: v for k, v in (options or {}).items() if v is not None}
        bad = set(opts) - {"tail", "gap", "rtol", "negative_tol"}
        if bad:
            raise ValueError(f"outlier_options: unknown {sorted(bad)}; allowed: tail, gap, "
                             "rtol, negative_tol")
        for key, value in opts.items():
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise TypeError(f"outlier_options[{key!r}] must be a real number; got "
                                f"{value!r}")
            try:
                spectrum_stats(_small_density(), **{key: value})
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"outlier_options[{key!r}]={value!r}: {exc}") from None
        return {k: float(v) for k, v in opts.items()}

    @staticmethod
    def _steps(steps: Iterable[int]) -> list[int]:
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise TypeError(f"steps must be an iterable of integers or None; got {steps!r}")
        return [_checks.nonnegative_int(s, "each step") for s in steps]

    def _settings(self) -> dict:
        """What a record is a record of: the tracker's eigsh, SLQ and outlier settings, as
        JSON values (checked and canonical: ``dtype`` by its name)."""
        # the same settings spelled differently must compare equal: options left at None
        # are the defaults, and the outlier rule's defaults are written out
        defaults = {name: p.default for name, p in
                    inspect.signature(spectrum_stats).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}
        outlier = {k: defaults[k] for k in ("tail", "gap", "rtol", "negative_tol")
                   if k in defaults}
        outlier.update(self.outlier_options)
        return {"k": self.k, "which": self.which, "num_steps": self.num_steps,
                "num_probes": self.num_probes, "seed": self.seed, "reorth": self.reorth,
                "eigsh_options": _plain(self.eigsh_options),
                "outlier_options": _plain(outlier)}

    def _open(self) -> None:
        """Create the file with its header, or continue it, under the file's lock:
        terminate a torn last line, check the header's meta and settings (or replace a
        header that has no records yet), read the steps this run already recorded."""
        p = self.path
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            # exactly one tracker creates the file (and writes its header, below)
            fd = os.open(p, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            fd = os.open(p, os.O_RDWR | os.O_APPEND)
            created = False
        try:
            with _locked(fd) as locked:
                if created:
                    _fsync_dir(p)
                data = _read_fd(fd)
                # Without the lock, the tracker that created the file may not have written
                # its header yet: wait for it a little (with the lock there is nothing to
                # wait for: whoever holds it first writes the header).
                deadline = time.monotonic() + _HEADER_WAIT
                while (not locked and not created and b"\n" not in data
                       and time.monotonic() < deadline):
                    time.sleep(0.01)
                    data = _read_fd(fd)
                parsed = _parse(data, p)  # raises for a foreign file, before any write
                if parsed.torn is not None:
                    # Terminated, never cut off: it may be the line of a writer that has
                    # not got the lock (no locks on this platform or file system).
                    torn = parsed.torn
                    parsed = _parse(data + b"\n", p)  # (raises before the file changes)
                    warnings.warn(f"{p}: terminating a torn last line ({torn}) left by a "
                                  "crash with a newline; readers skip it", TrackerFileWarning,
                                  stacklevel=3)
                    _write_fd(fd, b"\n")
                meta = self.meta
                if parsed.header is not None:
                    self._check_meta(parsed.header)
                    try:
                        self._check_settings(parsed.header)
                    except ValueError as exc:
                        if parsed.records or not locked:
                            raise
                        # Settings without records (e.g. a typo an older specdens wrote
                        # before checking it) hold nothing to protect: the header is
                        # replaced, under the lock, keeping its meta.
                        warnings.warn(f"{p}: replacing its header, which has no records yet: "
                                      f"{exc}", TrackerFileWarning, stacklevel=3)
                        if meta is None:
                            meta = parsed.header.get("meta")
                        os.ftruncate(fd, 0)
                        parsed.header = None
                if parsed.header is None:
                    self._header_line = self._write_header(fd, meta)
                else:
                    self._header_line = parsed.header_line
                    for _, obj in parsed.records:
                        if obj.get("type") == "record" and obj.get("run") == self.run \
                                and isinstance(obj.get("step"), int):
                            self._recorded.add(obj["step"])
        finally:
            os.close(fd)

    def _write_header(self, fd: int, meta: dict | None) -> bytes:
        from . import __version__

        header = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                  "specdens_version": __version__, "meta": meta,
                  "settings": self.settings}
        line = json.dumps(header, allow_nan=False).encode("utf-8")
        _write_fd(fd, line + b"\n")
        return line

    def _check_header(self, fd: int, locked: bool) -> None:
        """Before an append (under the lock): the file's header is still one this tracker
        may continue (another tracker may have replaced a header without records)."""
        if not locked:
            return  # headers are only replaced under the lock
        line = _header_line_of(fd)
        if line == self._header_line:
            return
        try:
            if line is None:
                raise ValueError("no header")
            header = json.loads(line.decode("utf-8"))
            if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
                raise ValueError("not a tracker header")
        except (UnicodeDecodeError, ValueError):
            raise TrackerFileError(f"{self.path} no longer begins with a tracker header; "
                                   "it was replaced after this tracker opened it: make a new "
                                   "SpectrumTracker") from None
        try:
            self._check_meta(header)
            self._check_settings(header)
        except ValueError as exc:
            raise ValueError(f"another tracker replaced the header of {self.path} since this "
                             f"one opened it: {exc}") from None
        self._header_line = line

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
        TypeError, ValueError
            For a bad ``loss`` or ``accuracy`` (a number, or an array or tensor with one
            element; strings are refused), ``gradient`` (shape, library, device, finite
            and non-zero) or ``eigsh_options`` for this operator, naming the argument:
            all checked before any product.
        ValueError
            When another tracker replaced the file's header (it had no records) with other
            settings since this one opened it; nothing is written.
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
        # Everything is checked before the SLQ pass, whose products would be spent for
        # nothing when a later check failed.
        loss = _num_or_nan(loss, "loss")
        accuracy = _num_or_nan(accuracy, "accuracy")
        lin, n = _checks.operator_of(op)
        if self.k and self.k >= n:
            raise ValueError(f"k={self.k} eigenvalues were asked of an operator of size "
                             f"n={n}; k must be smaller than n (make the tracker with a "
                             "smaller k)")
        if self.k:
            try:
                if "ncv" in self.eigsh_options:
                    _resolve_ncv(self.eigsh_options["ncv"], self.k, n)
                _checks.work_dtype(self.eigsh_options.get("dtype"), lin)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"eigsh_options: {exc}") from None
            if gradient is not None:
                try:
                    _check_vector(lin, gradient, n)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"gradient: {exc}") from None
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
            # the largest eigenvalue is among those of kind LA, and among those of kind LM
            # when it is not below 0 (spectrum_stats takes the larger of these and of the
            # density's largest Ritz value, both Rayleigh quotients)
            top = vals if (self.k and self.which in ("LA", "LM")) else None
            stats = spectrum_stats(density, top, **self.outlier_options)
        rec = SpectrumRecord(
            run=self.run, step=step, time=time.time(), loss=loss, accuracy=accuracy,
            density=density,
            eigenvalues=np.asarray(vals, dtype=np.float64),
            eigenvalue_residuals=np.asarray(res, dtype=np.float64), which=self.which,
            concentration=conc, stats=stats, wall_time=time.perf_counter() - t0,
            extra=extra_json,
        )
        _append(self.path, json.dumps(rec.to_json(), allow_nan=False) + "\n",
                check=self._check_header)
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
    """``x`` as a float (NaN for None): a number, or an array or tensor with one element;
    strings are refused (``"0.5"`` is a typo, not a loss)."""
    if x is None:
        return float("nan")
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{what} must be a number; got the string {x!r} (pass float(...) if "
                        "it holds a number)")
    if hasattr(x, "item") and callable(x.item):
        try:
            x = x.item()
        except (TypeError, ValueError, RuntimeError):
            shape = tuple(getattr(x, "shape", ()))
            raise TypeError(f"{what} must be a number or an array with one element; got "
                            f"a {type(x).__name__} of shape {shape}") from None
        if isinstance(x, (str, bytes)):
            raise TypeError(f"{what} must be a number; got the string {x!r}")
    if isinstance(x, complex):
        raise TypeError(f"{what} must be a real number; got {x!r}")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number; got {type(x).__name__}") from None
