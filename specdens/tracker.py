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
file that another has just created waits up to 2 s for its header. A header is never
replaced (see :class:`SpectrumTracker`).
"""

from __future__ import annotations

import datetime as _dt
import functools
import inspect
import json
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from . import _checks
from ._progress import make_progress
from ._records import SERIES, SpectrumRecord, _plain
from ._records import _density_from_json as _density_from_json  # importable here, as before
from ._records import _density_to_json as _density_to_json  # importable here, as before
from ._tracker_file import (
    FORMAT_NAME,
    FORMAT_VERSION,
    TrackerFileError,
    TrackerFileWarning,
    _append,
    _fsync_dir,
    _header_line_of,
    _locked,
    _parse,
    _read_fd,
    _write_fd,
    read_records,
)
from ._tracker_file import read_header as read_header  # public, not in __all__
from .algorithms.eigsh import _resolve_ncv, _resolve_tol
from .algorithms.lanczos import REORTH_MODES
from .algorithms.probes import check_seed
from .analysis import (
    CONCENTRATION_WHICH,
    _check_vector,
    gradient_concentration,
    spectrum_stats,
)
from .density import SpectralDensity

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
        not checked). A header is never replaced, also one without records yet (its
        tracker may still be computing its first record): delete the file, or pass another
        path, to start over with other settings.
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
        terminate a torn last line, check the header's meta and settings (a header is
        never replaced), read the steps this run already recorded."""
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
                if parsed.header is not None:
                    self._check_meta(parsed.header)
                    # A header is never replaced, also one without records yet: its
                    # tracker may be computing its first record (hours for a Hessian).
                    self._check_settings(parsed.header, empty=not parsed.records)
                if parsed.header is None:
                    self._header_line = self._write_header(fd, self.meta)
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
        """Before an append (under the lock): the file still begins with the header this
        tracker opened or wrote. Headers are never replaced, but the file may have been
        removed and created again (by another tracker, with other settings) since."""
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
            raise ValueError(f"{self.path} was replaced by another tracker's file since this "
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

    def _check_settings(self, header: dict, *, empty: bool = False) -> None:
        """Refuse to continue a file recorded with other settings (k, which, SLQ and
        eigsh settings, outlier rule): its records would be of another kind. A file from
        before the header held them is not checked. ``empty``: the file holds no records
        yet (its tracker may still be computing its first one; the header is not
        replaced either way)."""
        old = header.get("settings")
        if not isinstance(old, dict) or old == self.settings:
            return
        new = self.settings
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        diffs = ", ".join(f"{k}: {old.get(k)!r} in the file, {new.get(k)!r} now"
                          for k in keys[:6])
        if empty:
            raise ValueError(f"{self.path} was created with other tracker settings ({diffs}) "
                             "and holds no records yet (its tracker may still be computing "
                             "its first one); pass the same settings, or delete the file (or "
                             "pass another path) to start over with other settings")
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
            When the file was removed and created again by a tracker with other settings
            or meta since this one opened it; nothing is written.
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
