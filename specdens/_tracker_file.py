"""The tracker file of :class:`~specdens.tracker.SpectrumTracker`, low level.

Its format (:data:`FORMAT_NAME`, :data:`FORMAT_VERSION`) and errors; parsing a file line by
line, with lines torn by a crash skipped and named; the advisory locks; reading a file
(:func:`read_records`, :func:`read_header`) and appending one line to it, each with one
``write`` and ``fsync``. What the file holds, and how writers share it, is described in
:mod:`specdens.tracker`, which re-exports the public names.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ._records import SpectrumRecord

FORMAT_NAME = "specdens.SpectrumTracker"
FORMAT_VERSION = 1


class TrackerFileError(ValueError):
    """A tracker file that cannot be read: not a tracker file, another version, or a
    line that is valid JSON but not a valid record."""


class TrackerFileWarning(UserWarning):
    """Lines torn by a crash (writes interrupted before their end) were skipped or ended
    with a newline."""


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
        if header is not None and _HEADER_START in raw:
            # a torn line glued to the header of another file (two files concatenated, the
            # first one cut off mid-line) was skipped as torn, and the second file's
            # records were read under the first one's header
            raise TrackerFileError(
                f"{path} holds a second tracker header at line {lineno} (two record files "
                "concatenated?); it is left unchanged: split it at that line, or give the "
                "tracker another path")
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
