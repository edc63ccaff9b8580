"""Checkpoint files for resumable runs: atomic, pickle-free ``.npz`` with a JSON header.

A checkpoint is one ``.npz`` file (``numpy.savez``, read back with
``allow_pickle=False``) holding plain numeric arrays and one string entry, ``header``:
a JSON object with the file's ``format`` and ``version``, the ``settings`` of the run
(everything that changes its numbers), the ``fingerprint`` of the operator, and the
run's progress. It is written to a temporary file in the same folder, flushed to disk
(``fsync``) and renamed over the old one with :func:`os.replace`, which is atomic on POSIX
and Windows: a process killed at any moment leaves either the previous checkpoint or the
new one, never a torn file (at worst a stray ``.NAME.*.tmp`` file, which is never read).

The ``settings`` are stored as they ran, defaults resolved (the Lanczos basis dtype and
breakdown tolerance, except that ``reorth="auto"`` without a ``basis_dtype`` stores None:
it was free to choose), so that passing a default explicitly on resume is the same run.
Files written before (``null`` for a default) are read with ``null`` standing for the
default and resume. A file is read with ``allow_pickle=False`` and then checked before
use: the header's sections (:func:`check_header`), and, by the reader, every field and
array against the run that resumes it; anything that does not fit raises
:class:`CheckpointError` naming the file and the field.

Operator fingerprint
--------------------
Unless the caller gives a ``key`` (any string naming the operator, e.g. a model
checkpoint's hash and data set version: then no product is spent), the operator is
identified by its shape, dtype, array library, and two sketches of one product
``y = A x`` with a fixed pseudo-random unit vector ``x`` (one extra matvec per call):

* ``sketch``: ``||y||``, ``z^T y`` for a second fixed vector ``z``, and three entries of
  ``y``;
* ``count_sketch``: ``S y`` for a fixed count sketch ``S`` (each entry of ``y``, with a
  fixed random sign, added to one of 256 fixed random buckets; Charikar, Chen &
  Farach-Colton 2002), which keeps the norm of any fixed vector to about 10 %: ``||S (y' -
  y)||`` measures the whole difference of two products, where the five numbers above see
  only its few components along them (a random perturbation of 1e-2 ``||A||`` moved them
  by ~1e-2 / sqrt(n) and passed).

A resumed run recomputes both and refuses the checkpoint unless every number of
``sketch`` agrees to within ``tol`` and ``||S y' - S y|| <= tol`` (files written before
the count sketch: the first test alone), with ``tol = min(1e-2, 1e3 eps) ||y||`` (``eps``
of the dtype whose rounding the products carry: the operator's, or its least precise
part's): it accepts the run-to-run rounding differences of non-deterministic reductions on
GPUs (~sqrt(terms) eps per entry) but rejects any operator whose product differs by more,
such as the same network at other weights. An operator whose products differ more from run
to run can be named with a ``checkpoint_key`` instead.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .. import _array, _checks
from .probes import draw_probe, probe_rng

FINGERPRINT_SEED = 0x5EED_F1A9
FINGERPRINT_BUCKETS = 256
"""Rows of the fingerprint's count sketch."""
"""Seed of the fixed vectors of the operator fingerprint."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupt, foreign, from another operator or
    from other settings."""


def atomic_write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` with :func:`numpy.savez` to exactly ``path``, atomically.

    The file is written to a temporary file in the same folder (``.NAME.*.tmp``),
    flushed to disk (``fsync``) and renamed over ``path`` with :func:`os.replace`: an
    error or a crash at any moment leaves either the old file or the new one, never a
    truncated one. The new file has the permissions of the file it replaces, or those
    a plain ``open(path, "wb")`` would give. A symbolic link at ``path`` stays a link: the
    file it points to is replaced (the temporary file is made in that file's folder), as
    ``open(path, "wb")`` would write through it. Serialise everything that can fail (JSON
    entries) before calling this.
    """
    path = Path(path)
    if path.is_symlink():
        # (os.replace on the link itself would turn it into a regular file)
        path = Path(os.path.realpath(path))
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = _create_temp(folder, path.name)
    try:
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except OSError:  # no old file (or no permission to read it): keep the umask's
            pass
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); not available everywhere
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new, empty ``folder/.NAME.RANDOM.tmp`` opened for writing, created with mode
    0o666 less the umask (as ``open`` does; :func:`tempfile.mkstemp` gives 0o600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {folder / name}")


def atomic_savez(path: str | os.PathLike, header: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` and the JSON ``header`` to ``path`` atomically (temp file + fsync +
    :func:`os.replace`; see :func:`atomic_write_npz`)."""
    header_json = json.dumps(header, allow_nan=True)
    atomic_write_npz(path, {"header": np.array(header_json), **arrays})


def read_npz(path: str | os.PathLike, fmt: str, version: int, *,
             header_only: bool = False) -> tuple[dict, dict]:
    """Header and arrays of a checkpoint written by :func:`atomic_savez` (with
    ``header_only``, no arrays: an npz file reads its entries one by one, so the basis is
    left on disk).

    Raises
    ------
    CheckpointError
        When the file is unreadable, not of format ``fmt`` or of another version.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            names = ["header"] if header_only and "header" in z.files else z.files
            arrays = {k: np.array(z[k]) for k in names}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{path} is not a readable specdens checkpoint ({exc}); delete "
                              "it to start afresh") from None
    try:
        header = json.loads(str(arrays.pop("header")))
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a specdens checkpoint (no JSON header); delete it "
                              "or choose another path") from None
    if not isinstance(header, dict) or header.get("format") != fmt:
        found = header.get("format") if isinstance(header, dict) else None
        raise CheckpointError(f"{path} is not a {fmt} file (format {found!r}); delete it or "
                              "choose another path")
    if header.get("version") != version:
        raise CheckpointError(f"{path} has checkpoint version {header.get('version')}; this "
                              f"specdens reads version {version}")
    return header, arrays


def check_folder(path: str | os.PathLike) -> None:
    """Refuse a checkpoint path that is a folder, or whose folder does not exist or cannot
    be written to, before any work (the first save would fail only after a round of
    products, naming its temporary file)."""
    if Path(path).is_dir():
        raise IsADirectoryError(f"checkpoint={str(path)!r} is a folder: checkpoint= names the "
                                f"file to write, e.g. {str(Path(path) / 'run.npz')!r}")
    folder = Path(path).parent
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint={str(path)!r}: the folder {str(folder)!r} does not "
                                "exist; create it first, or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"checkpoint={str(path)!r}: the folder {str(folder)!r} is not "
                              "writable; choose another path")


def check_header(header: dict, path: Any) -> None:
    """Refuse a header whose sections are missing or malformed (a hand-edited or foreign
    but well-formed file), naming the field: ``settings``, ``resolved`` and ``progress``
    objects, and a ``fingerprint`` with the operator's shape, dtype, library and a
    ``key`` or a ``sketch`` of finite numbers."""
    def bad(field: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path} is corrupt or not written by this specdens: {field} "
                               f"{what}; delete it to start afresh")

    for section in ("settings", "fingerprint", "resolved", "progress"):
        if not isinstance(header.get(section), dict):
            raise bad(section, "is missing" if section not in header else "is not an object")
    fp = header["fingerprint"]
    shape = fp.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in shape)):
        raise bad("fingerprint.shape", f"is {shape!r}")
    for field in ("dtype", "library"):
        if not isinstance(fp.get(field), str):
            raise bad(f"fingerprint.{field}", f"is {fp.get(field)!r}")
    if "key" in fp:
        if not isinstance(fp["key"], str):
            raise bad("fingerprint.key", f"is {fp['key']!r}")
    else:
        for field, size in (("sketch", None), ("count_sketch", FINGERPRINT_BUCKETS)):
            values = fp.get(field)
            if field == "count_sketch" and values is None:
                continue  # (files written before the count sketch)
            if not (isinstance(values, list) and values and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                    for v in values) and (size is None or len(values) == size)):
                raise bad(f"fingerprint.{field}", f"is {values!r}")


def operator_fingerprint(op: Any, key: str | None = None) -> dict:
    """Shape, dtype, library and either ``key`` or a one-product sketch of the operator."""
    n = int(op.shape[0])
    fp: dict[str, Any] = {
        "shape": [n, n],
        "dtype": _array.dtype_name(op.dtype),
        "library": op.array_library,
        # (not compared: what the sketch's tolerance follows)
        "product_dtype": _array.dtype_name(_checks.product_dtype(op)),
    }
    if key is not None:
        if not isinstance(key, str) or not key:
            raise TypeError(f"checkpoint_key must be a non-empty string; got {key!r}")
        fp["key"] = key
        return fp
    x, _ = draw_probe("gaussian", n, FINGERPRINT_SEED, 0)
    z, _ = draw_probe("gaussian", n, FINGERPRINT_SEED, 1)
    X = _array.from_numpy(x[:, None], op.xp, op.device, op.dtype)
    y = _array.to_numpy(op.matmat(X))[:, 0]
    if not np.all(np.isfinite(y)):
        raise FloatingPointError("the operator returned NaN or Inf for the checkpoint "
                                 "fingerprint's product; check the operator")
    fp["sketch"] = [float(np.linalg.norm(y)), float(z @ y), float(y[0]), float(y[n // 2]),
                    float(y[-1])]
    fp["count_sketch"] = count_sketch(y).tolist()
    return fp


def count_sketch(y: np.ndarray, *, chunk: int = 1 << 20) -> np.ndarray:
    """The fingerprint's count sketch of a host vector: ``FINGERPRINT_BUCKETS`` sums of
    its entries, each with a fixed random sign in a fixed random bucket (drawn from the
    fingerprint's seed in chunks of ``chunk`` entries, so that memory stays O(chunk)).

    ``E ||S d||^2 = ||d||^2`` for any vector ``d``, with a relative spread of about
    ``sqrt(2 / FINGERPRINT_BUCKETS)`` (9 %) for a ``d`` spread over many entries."""
    rng = probe_rng(FINGERPRINT_SEED, 2)
    out = np.zeros(FINGERPRINT_BUCKETS)
    for start in range(0, y.shape[0], chunk):
        part = np.asarray(y[start:start + chunk], dtype=np.float64)
        code = rng.integers(0, 2 * FINGERPRINT_BUCKETS, size=part.shape[0], dtype=np.uint16)
        signed = np.where(code & 1, -part, part)
        out += np.bincount(code >> 1, weights=signed, minlength=FINGERPRINT_BUCKETS)
    return out


def check_fingerprint(saved: dict, current: dict, path: Any) -> None:
    """Refuse a checkpoint of another operator (see the module notes for the rule)."""
    for what in ("shape", "dtype", "library"):
        if saved.get(what) != current.get(what):
            raise CheckpointError(
                f"{path} was written for another operator: {what} {saved.get(what)} there, "
                f"{current.get(what)} now. Delete it or choose another checkpoint path."
            )
    if "key" in saved or "key" in current:
        if saved.get("key") != current.get("key"):
            raise CheckpointError(
                f"{path} was written for another operator: checkpoint_key {saved.get('key')!r} "
                f"there, {current.get('key')!r} now (pass the same key, or delete the file)."
            )
        return
    a = np.asarray(saved.get("sketch", []), dtype=np.float64)
    b = np.asarray(current["sketch"], dtype=np.float64)
    eps = _array.finfo_eps(current.get("product_dtype", current["dtype"]))
    tol = min(1e-2, 1e3 * eps) * max(abs(float(a[0])) if a.size else 0.0, np.finfo(float).tiny)
    advice = ("Delete the file or choose another checkpoint path; if the operator is the "
              "same but not reproducible, name it with checkpoint_key=...")
    if a.shape != b.shape or not np.all(np.abs(a - b) <= tol):
        raise CheckpointError(
            f"{path} was written for another operator: the fingerprint product A x differs "
            f"(saved sketch {a.tolist()}, now {b.tolist()}, tolerance {tol:.2e}). {advice}"
        )
    if saved.get("count_sketch") is not None and current.get("count_sketch") is not None:
        diff = float(np.linalg.norm(np.asarray(saved["count_sketch"], dtype=np.float64)
                                    - np.asarray(current["count_sketch"], dtype=np.float64)))
        if not diff <= tol:
            raise CheckpointError(
                f"{path} was written for another operator: the fingerprint product A x differs "
                f"by {diff:.3e} in the norm of its count sketch (||A x|| = {a[0]:.6e}; "
                f"tolerance {tol:.2e}). {advice}"
            )


def check_settings(saved: dict, current: dict, path: Any) -> None:
    """Refuse a checkpoint written with other settings, naming every difference."""
    keys = sorted(set(saved) | set(current))
    diff = [f"{k}={saved.get(k)!r} there, {current.get(k)!r} now" for k in keys
            if saved.get(k) != current.get(k)]
    if diff:
        raise CheckpointError(
            f"{path} was written with other settings ({'; '.join(diff)}); resume with the "
            "same settings, or delete the file to start afresh."
        )
