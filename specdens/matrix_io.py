"""Reading symmetric matrices from files: ``.npy``, ``.npz`` and Matrix Market ``.mtx``.

=====================  ================================================================
``.npy``               a dense 2-D array (``numpy.save``)
``.npz``               a dense 2-D array (``numpy.savez``; one array, or ``key=``), or a
                       scipy sparse matrix (``scipy.sparse.save_npz``)
``.mtx``, ``.mtx.gz``  Matrix Market, coordinate (sparse) or array (dense), general or
                       symmetric storage (``scipy.io.mmwrite``)
=====================  ================================================================

Pickled data is never loaded; only the ``.npy`` members of an ``.npz`` are arrays. The
matrix must be real, square, finite and symmetric (a skew-symmetric one, with imaginary
eigenvalues, is refused as such): anything else raises :class:`MatrixFileError` with the
reason, and so does every file that cannot be read: a corrupt or truncated one (a header
declaring more data than the file holds is refused before anything is allocated; a scipy
sparse matrix's index arrays are checked in full, out-of-range indices included), one whose
values overflow their type or, for longdouble, float64's range, and one whose matrix does
not fit in memory. A Matrix Market coordinate file with ``symmetric`` storage holds one
triangle (the lower, as the format says): the reader mirrors every off-diagonal entry, so
a pair stored on both sides of the diagonal, which would be added, is refused. Its body
is checked before scipy's reader, which reads a value up to its first character that is
not part of a number and drops the rest (a Fortran ``D`` exponent, a decimal comma, an
extra value per entry, a fraction in an ``integer`` file were read as wrong numbers, and
a NUL byte crashed the process): anything but numbers is refused, naming the line. Integer,
bool, float16 and longdouble values become float64 before duplicate sparse entries are
summed.

References
----------
R. F. Boisvert, R. Pozo, K. A. Remington (1996), The Matrix Market exchange formats:
initial design. NIST IR 5935.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SUFFIXES", "MatrixFileError", "describe_matrix", "load_matrix"]

SUFFIXES = (".npy", ".npz", ".mtx", ".mtx.gz")
"""File types :func:`load_matrix` reads."""

_SPARSE_NPZ_KEYS = {"format", "shape", "data"}
_SPARSE_FORMATS = {"csr", "csc", "coo", "bsr", "dia", "dok", "lil"}


class MatrixFileError(ValueError):
    """A matrix file that cannot be used: unknown type, corrupt, or not a real square
    symmetric finite matrix."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def load_matrix(path: str | os.PathLike, *, key: str | None = None,
                check_symmetric: bool = True) -> Any:
    """Read a symmetric matrix from a file.

    Parameters
    ----------
    path
        A ``.npy``, ``.npz`` or ``.mtx`` (``.mtx.gz``) file; see the module docs.
    key
        For a ``.npz`` of several dense arrays, the one to read.
    check_symmetric
        Refuse a matrix with ``max |A - A^T| > sqrt(eps) * max |A|`` (``eps`` of its
        dtype), the tolerance at which :func:`specdens.lanczos` warns.

    Returns
    -------
    numpy.ndarray or scipy.sparse.csr_matrix or scipy.sparse.csr_array
        float32 or float64 (other real dtypes become float64); anything
        :func:`specdens.aslinearoperator` accepts.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    MatrixFileError
        For an unknown file type, a corrupt or truncated file, values out of their type's
        range, a matrix too large for the memory, or a matrix that is not 2-D, square,
        real, finite or symmetric.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise MatrixFileError(f"{path} is a directory, not a matrix file")
    suffix = _suffix(path)
    if key is not None and suffix != ".npz":
        raise MatrixFileError(f"key={key!r} applies to .npz files only, not to {path}")
    readers = {".npy": lambda: _load_npy(path), ".npz": lambda: _load_npz(path, key),
               ".mtx": lambda: _load_mtx(path), ".mtx.gz": lambda: _load_mtx(path)}
    if suffix not in readers:
        raise MatrixFileError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; specdens reads "
            ".npy, .npz (numpy.savez or scipy.sparse.save_npz) and Matrix Market .mtx/.mtx.gz"
        )
    try:
        try:
            A = readers[suffix]()
        except (MatrixFileError, MemoryError):
            raise
        except Exception as exc:
            # whatever else numpy's, scipy's or zlib's readers raise on a malformed file
            # (each reader names the usual ones): the file is unreadable, not the program
            raise MatrixFileError(f"{path} is not a readable {suffix} file "
                                  f"({type(exc).__name__}: {exc})") from None
        return _check(A, path, check_symmetric)
    except MemoryError as exc:
        raise MatrixFileError(f"{path} holds a matrix too large for the memory available "
                              f"({exc})") from None


def _npy_header_check(fh: Any, available: int, path: Path, kind: str, header: str) -> None:
    """Refuse a ``.npy`` stream (positioned at its start) whose header is malformed or
    declares more data than the ``available`` bytes of the stream: the reader would
    allocate the declared size first (a 200000 x 200000 header over 64 bytes asked for
    298 GiB). Streams of other format versions are left to numpy."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            return
    except (ValueError, TypeError, SyntaxError, OverflowError, EOFError) as exc:
        raise MatrixFileError(f"{path} is not a readable {kind} (bad header: {exc})") from None
    if dtype.hasobject:
        return  # refused as pickled data by numpy, with its own message
    declared = math.prod(int(d) for d in shape) * dtype.itemsize
    left = available - fh.tell()
    if declared > left:
        raise MatrixFileError(
            f"{path} is truncated or corrupt: {header} declares a {dtype} array of shape "
            f"{tuple(shape)} ({declared} bytes) but only {max(left, 0)} bytes follow")


def _load_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY":
        raise MatrixFileError(f"{path} is not a readable .npy file (no NumPy header)")
    with open(path, "rb") as fh:
        _npy_header_check(fh, os.fstat(fh.fileno()).st_size, path, ".npy file",
                          "its .npy header")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise MatrixFileError(f"{path} holds pickled objects, which specdens does not load; "
                                  "save a numeric array with numpy.save") from None
        raise MatrixFileError(f"{path} is not a readable .npy file ({exc})") from None
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise MatrixFileError(f"{path} is not a readable .npy file ({exc})") from None


def _load_npz(path: Path, key: str | None) -> Any:
    if not zipfile.is_zipfile(path):
        raise MatrixFileError(f"{path} is not a readable .npz file (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.endswith(".npy"):
                    with archive.open(info) as fh:
                        _npy_header_check(fh, info.file_size, path, ".npz file",
                                          f"the .npy header of its member {info.filename}")
        with np.load(path, allow_pickle=False) as z:
            # (only .npy members are arrays: numpy.load hands any other member back as its
            # raw bytes, which read as a 0-d array)
            members = [info.filename for info in z.zip.infolist()]
            files = [name[:-4] for name in members if name.endswith(".npy")]
            if _SPARSE_NPZ_KEYS <= set(files) and key is None:
                fmt = z["format"]
                fmt = fmt.item() if fmt.ndim == 0 else fmt
                fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
                if fmt in _SPARSE_FORMATS:
                    return _load_sparse_npz(path)
            if "format" in files and "meta" in files:
                raise MatrixFileError(
                    f"{path} is a specdens result file (SpectralDensity.save), not a matrix; "
                    "read it with specdens.SpectralDensity.load")
            if key is not None:
                if key not in files:
                    raise MatrixFileError(f"{path} has no array {key!r}; it holds "
                                          f"{', '.join(files) or 'no arrays'}")
                return z[key]
            if len(files) == 1:
                return z[files[0]]
            if not files:
                raise MatrixFileError(
                    f"{path} holds no arrays (no .npy members; it holds "
                    f"{', '.join(members) or 'nothing'}); save the matrix with numpy.savez or "
                    "scipy.sparse.save_npz")
            raise MatrixFileError(
                f"{path} holds {len(files)} arrays ({', '.join(files)}); say which one is the "
                "matrix (load_matrix(path, key=...) or --key on the command line)")
    except MatrixFileError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise MatrixFileError(f"{path} holds pickled objects, which specdens does not "
                                  "load") from None
        raise MatrixFileError(f"{path} is not a readable .npz file ({exc})") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise MatrixFileError(f"{path} is not a readable .npz file ({exc})") from None


def _load_sparse_npz(path: Path) -> Any:
    import scipy.sparse

    try:
        A = scipy.sparse.load_npz(path)
    except (ValueError, OSError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise MatrixFileError(f"{path} is not a readable scipy sparse .npz file ({exc})") from None
    return _checked_sparse(A, path)


def _bsr_check(A: Any, path: Path) -> None:
    """Refuse a BSR matrix whose shape is not a multiple of its block size, or whose
    blocks and block indices differ in number: scipy's full format check passes the
    first, and converting it to CSR left an index pointer uninitialised and corrupted
    the heap (a crash, or an error from a later step)."""
    rows, cols = A.shape
    r, c = A.blocksize
    data = np.asarray(A.data)
    if r < 1 or c < 1 or rows % r or cols % c:
        raise MatrixFileError(f"{path} holds a corrupt sparse matrix (BSR shape {A.shape} is "
                              f"not a multiple of its block size {(r, c)})")
    if data.ndim != 3 or data.shape[0] != np.asarray(A.indices).size:
        raise MatrixFileError(f"{path} holds a corrupt sparse matrix (BSR with "
                              f"{data.shape[0] if data.ndim else 0} blocks of data but "
                              f"{np.asarray(A.indices).size} block indices)")


def _working_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a real matrix of ``dtype`` is read as: float32 or float64 (native byte
    order) stay, every other real dtype (bool, integers, float16, longdouble) becomes
    float64."""
    if dtype.kind == "f" and dtype.itemsize in (4, 8):
        return np.dtype(np.float32 if dtype.itemsize == 4 else np.float64)
    return np.dtype(np.float64)


def _checked_sparse(A: Any, path: Path) -> Any:
    """``A`` as CSR in its working dtype (:func:`_working_dtype`) with its index arrays
    checked in full (scipy's own construction checks only their lengths and dtypes: an
    index out of range or an index pointer that decreases then fails later, with a
    misleading message or a crash), its duplicate entries summed.

    The values are converted before anything sums them: duplicates summed in the file's
    dtype wrap around (int8 100 + 100 = -56) or overflow (float16)."""
    try:
        if getattr(A, "format", None) == "bsr":
            _bsr_check(A, path)
        if hasattr(A, "check_format"):
            A.check_format(full_check=True)
        if A.dtype.kind in "biuf" and A.dtype != _working_dtype(A.dtype):
            A = A.astype(_working_dtype(A.dtype))
        A = A.tocsr()
        A.check_format(full_check=True)
        A.sum_duplicates()
    except MatrixFileError:
        raise
    except (ValueError, IndexError, TypeError, OverflowError) as exc:
        raise MatrixFileError(f"{path} holds a corrupt sparse matrix ({exc})") from None
    return A


def _load_mtx(path: Path) -> Any:
    import scipy.io

    try:
        rows, cols, entries, fmt, field, symmetry = scipy.io.mminfo(str(path))
        rows, cols, entries = int(rows), int(cols), int(entries)
        # (scipy's reader divides by the number of columns of an array-format file: one
        # with 0 rows or columns killed the process with SIGFPE)
        _mtx_shape_check(path, rows, cols, fmt)
        if _suffix(path) == ".mtx":  # (compressed, the size of the data is not known)
            _mtx_size_check(path, rows, cols, entries, fmt, field, symmetry)
        # (the bytes the check read, decompressed: the reader does not read them again)
        data = _mtx_body_check(path, rows, cols, entries, fmt, field, symmetry)
        A = scipy.io.mmread(io.BytesIO(data))
        if fmt == "coordinate" and symmetry != "general":
            _mtx_lower_triangle_check(A, path, entries, symmetry)
        return A
    except MatrixFileError:
        raise
    except (ValueError, OSError, EOFError, IndexError, TypeError, OverflowError,
            RuntimeError) as exc:
        # (OverflowError: an integer entry or a dimension beyond 64 bits)
        raise MatrixFileError(f"{path} is not a readable Matrix Market file ({exc})") from None


# what may stand in the body of a Matrix Market file (numbers and whitespace), once the
# words nan and inf(inity) are taken out
_MTX_NUMBER_BYTES = b"0123456789+-.eE \t\r\n"
_MTX_HINTS = {b"d": "a Fortran exponent ('D'): write it with 'E' (1.5E+02)",
              b",": "a decimal comma: write the decimal point as '.'",
              b"\x00": "a NUL byte (scipy.io.mmwrite with precision above 17 writes them)"}


def _mtx_body_check(path: Path, rows: int, cols: int, entries: int, fmt: str, field: str,
                    symmetry: str) -> bytes:
    """Refuse a Matrix Market body that scipy's reader would read wrongly without an
    error: it reads each value up to its first character that is not part of a number
    and drops the rest (``2.5D+01`` became 2.5, ``1,5`` became 1, ``7.9`` in an
    ``integer`` file 7, an extra value per entry was dropped), and a NUL byte made it
    crash the process. Checks, in C-speed passes over the bytes: only digits, signs,
    ``.``, exponents, whitespace and ``nan``/``inf`` occur; no number has two points or
    exponents or a sign inside it; the body holds exactly the number of tokens that the
    header's size line declares; an ``integer`` field has no ``.`` or exponent. Returns
    the file's bytes (decompressed)."""
    import gzip

    opener = gzip.open if _suffix(path) == ".mtx.gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    # the body: after the banner, the comments and the size line
    start = 0
    while True:
        end = data.find(b"\n", start)
        line = data[start:] if end < 0 else data[start:end]
        start = len(data) if end < 0 else end + 1
        stripped = line.strip()
        if stripped and not stripped.startswith(b"%"):
            break  # (the size line)
        if end < 0:
            return data  # (no size line: scipy's reader reports it)
    body = data[start:]
    if b"%" in body:  # comment lines among the entries (rare): left out
        body = b"\n".join(ln for ln in body.split(b"\n") if not ln.lstrip().startswith(b"%"))

    def refuse(pos: int, why: str) -> MatrixFileError:
        line_no = data.count(b"\n", 0, start) + body.count(b"\n", 0, pos) + 1
        lo = body.rfind(b"\n", 0, pos) + 1
        hi = body.find(b"\n", pos)
        text = body[lo:hi if hi >= 0 else len(body)].decode("latin-1").strip()
        return MatrixFileError(f"{path} line {line_no} ({text[:60]!r}): {why}; scipy's "
                               "reader would read a wrong number there without an error")

    words = body
    bad = words.translate(None, _MTX_NUMBER_BYTES)
    if bad:
        # (each of nan and inf(inity) as a number of its length: the token count and
        # positions stay)
        words = (body.lower().replace(b"infinity", b"00000000").replace(b"inf", b"000")
                 .replace(b"nan", b"000"))
        bad = words.translate(None, _MTX_NUMBER_BYTES)
    if bad:
        char = bad[:1]
        pos = words.find(char)
        hint = _MTX_HINTS.get(char.lower(), f"the character {char.decode('latin-1')!r}, "
                                             "which is not part of a number")
        raise refuse(pos, hint)
    # (vectorised: a regular expression took 20 times as long as scipy's reader)
    raw = np.frombuffer(words, dtype=np.uint8)
    space = raw <= 32  # (space, tab, CR, LF: other control bytes were refused above)
    starts = np.flatnonzero(~space & np.concatenate(([True], space[:-1])))
    malformed = _mtx_malformed_at(raw, starts)
    if malformed is not None:
        raise refuse(malformed, "a malformed number (two points or exponents, or a sign "
                                "inside it)")
    if field == "integer":
        for char in (b".", b"e", b"E"):
            pos = words.find(char)
            if pos >= 0:
                raise refuse(pos, "a value that is not an integer in a file whose field is "
                                  "'integer' (the reader would cut it to its integer part); "
                                  "declare the field 'real'")
    per_value = {"pattern": 0, "complex": 2}.get(field, 1)
    if fmt == "coordinate":
        expected = entries * (2 + per_value)
    else:
        expected = _mtx_array_values(rows, cols, symmetry) * per_value
    tokens = int(starts.size)
    if tokens != expected:
        what = (f"{entries} entries of {2 + per_value} numbers" if fmt == "coordinate"
                else f"{expected} values")
        raise MatrixFileError(
            f"{path} holds {tokens} numbers after its size line where its header declares "
            f"{what} ({expected} numbers): an entry with a value too many or too few (a "
            f"complex file declared '{field}'?), or a truncated file")
    return data


def _mtx_malformed_at(raw: np.ndarray, starts: np.ndarray) -> int | None:
    """The position of the first malformed number in ``raw`` (bytes of numbers and
    whitespace; ``starts``: where each token begins), or None: a token with two points or
    two exponents, or a sign that follows a digit or a point (``1.0.5``, ``1e5e3``,
    ``1-2``, each of which scipy's reader cuts short)."""
    signs = np.flatnonzero((raw == 43) | (raw == 45))
    signs = signs[signs > 0]
    before = raw[signs - 1]
    found = signs[((before >= 48) & (before <= 57)) | (before == 46)]
    first = [int(found[0])] if found.size else []
    for mask in (raw == 46, (raw == 101) | (raw == 69)):
        at = np.flatnonzero(mask)
        token = np.searchsorted(starts, at, side="right")
        again = np.flatnonzero(token[1:] == token[:-1])
        if again.size:
            first.append(int(at[again[0] + 1]))
    return min(first) if first else None


def _mtx_array_values(rows: int, cols: int, symmetry: str) -> int:
    """Values an array-format Matrix Market file stores: one triangle (with the
    diagonal, or without it for skew-symmetric storage) of a square symmetric matrix."""
    if rows != cols or symmetry == "general":
        return rows * cols
    if symmetry == "skew-symmetric":
        return rows * (rows - 1) // 2
    return rows * (rows + 1) // 2


def _mtx_shape_check(path: Path, rows: int, cols: int, fmt: str) -> None:
    """Refuse, from the header, a Matrix Market matrix that is empty or not square."""
    if rows != cols:
        raise MatrixFileError(f"{path} holds a non-square {rows} x {cols} matrix (its Matrix "
                              "Market header says so); specdens needs a square symmetric "
                              "matrix (for a rectangular J, use J^T J or J J^T)")
    if rows == 0:
        raise MatrixFileError(f"{path} holds an empty 0 x 0 matrix (its Matrix Market header "
                              "says so)")


def _mtx_lower_triangle_check(A: Any, path: Path, entries: int, symmetry: str) -> None:
    """Refuse a ``symmetric`` (or ``skew-symmetric``, ``hermitian``) coordinate file that
    stores an off-diagonal pair on both sides of the diagonal: the format stores one
    triangle (the lower, row >= column), and the reader mirrors every off-diagonal entry,
    so ``(1, 2)`` next to ``(2, 1)`` would be added to it and the matrix read would be
    wrong, with no error. An entry stored above the diagonal alone is unambiguous (its
    mirror is the matrix's) and read as scipy reads it.

    The reader returns the file's entries first, in file order, and then their mirror
    images; that layout is checked before it is relied on."""
    row, col = np.asarray(A.row, dtype=np.int64), np.asarray(A.col, dtype=np.int64)
    stored_row, stored_col = row[:entries], col[:entries]
    off = stored_row != stored_col
    if row.size != entries + int(np.count_nonzero(off)):
        return  # (another layout: not the file's entries first)
    n = int(A.shape[0])
    lo = np.minimum(stored_row, stored_col)[off]
    hi = np.maximum(stored_row, stored_col)[off]
    upper = (stored_row < stored_col)[off]
    key = lo * n + hi
    both = np.intersect1d(key[upper], key[~upper])
    if both.size:
        i, j = divmod(int(both[0]), n)
        raise MatrixFileError(
            f"{path} is a {symmetry} Matrix Market file that stores {both.size} "
            f"off-diagonal pair{'' if both.size == 1 else 's'} on both sides of the diagonal "
            f"(the first: row {j + 1}, column {i + 1} and row {i + 1}, column {j + 1}); "
            f"{symmetry} storage holds one triangle (the lower, row >= column), which the "
            "reader mirrors, so both would be added: store each off-diagonal entry once, or "
            "declare the file 'general' and store both triangles")


def _mtx_size_check(path: Path, rows: int, cols: int, entries: int, fmt: str, field: str,
                    symmetry: str) -> None:
    """Refuse a Matrix Market header that declares more entries than the file can hold:
    the reader allocates the declared size first (a 100000 x 100000 array header over one
    value asked for 74.5 GiB). Each stored entry takes at least 2 bytes (a digit and a
    separator) in array format and 4 in coordinate format (``i j`` and, unless the field
    is pattern, a value)."""
    if fmt == "array":
        least = 2 * _mtx_array_values(rows, cols, symmetry) - 1
    else:
        least = (4 if field == "pattern" else 6) * entries - 1
    size = path.stat().st_size
    if least > size:
        raise MatrixFileError(
            f"{path} is truncated or corrupt: its header declares a {rows} x {cols} {fmt} "
            f"matrix with {entries} entries, which take at least {least} bytes, but the file "
            f"has {size}")


def _check(A: Any, path: Path, check_symmetric: bool) -> Any:
    import scipy.sparse

    sparse = scipy.sparse.issparse(A)
    if not sparse:
        A = np.asarray(A)
    shape = tuple(A.shape)
    if len(shape) != 2:
        raise MatrixFileError(f"{path} holds an array of shape {shape}; a matrix needs 2 "
                              "dimensions")
    if shape[0] != shape[1]:
        raise MatrixFileError(f"{path} holds a non-square {shape[0]} x {shape[1]} matrix; "
                              "specdens needs a square symmetric matrix (for a rectangular J, "
                              "use J^T J or J J^T)")
    if shape[0] == 0:
        raise MatrixFileError(f"{path} holds an empty 0 x 0 matrix")
    kind = A.dtype.kind
    if kind == "c":
        raise MatrixFileError(f"{path} holds a complex matrix ({A.dtype}); specdens handles "
                              "real symmetric matrices only")
    if kind not in "biuf":
        raise MatrixFileError(f"{path} holds {A.dtype} data, not numbers")
    if kind == "f" and A.dtype.itemsize > 8:
        _check_wide_floats(A.data if sparse else A, path)
    target = _working_dtype(A.dtype)
    if A.dtype != target:  # (also big-endian '>f4': the same precision, native order)
        A = A.astype(target)
    if sparse:
        A = _checked_sparse(A, path)
        values = A.data
    else:
        values = A
    if values.size and not np.all(np.isfinite(values)):
        raise MatrixFileError(f"{path} holds NaN or infinite entries")
    if check_symmetric and values.size:
        scale = float(np.max(np.abs(values)))
        if sparse:
            diff = abs(A - A.T)
            gap = float(diff.max()) if diff.nnz else 0.0
        else:
            gap = float(np.max(np.abs(A - A.T)))
        tol = float(np.sqrt(np.finfo(A.dtype).eps)) * scale
        if gap > tol and _is_skew(A, sparse, tol):
            raise MatrixFileError(
                f"{path} holds a skew-symmetric matrix (A^T = -A), whose eigenvalues are "
                "imaginary; specdens handles real symmetric matrices only")
        if gap > tol and _one_triangle(A, sparse):
            raise MatrixFileError(
                f"{path} holds a matrix that is not symmetric but stores only one triangle "
                f"off the diagonal (max |A - A^T| = {gap:.3g}): if it is that triangle of a "
                "symmetric matrix, declare the file 'symmetric' (Matrix Market: "
                "%%MatrixMarket matrix coordinate real symmetric), or add the mirrored "
                "entries A + A.T - diag(A); (A + A.T) / 2 would halve them")
        if gap > tol:
            raise MatrixFileError(
                f"{path} holds a matrix that is not symmetric: max |A - A^T| = {gap:.3g} "
                f"(relative {gap / scale:.2g}); specdens needs a symmetric matrix; "
                "symmetrise it, e.g. (A + A.T) / 2")
    return A


def _one_triangle(A: Any, sparse: bool) -> bool:
    """Whether every nonzero entry off the diagonal lies on one side of it (and some do)."""
    import scipy.sparse

    if sparse:
        upper = scipy.sparse.triu(A, k=1).count_nonzero()
        lower = scipy.sparse.tril(A, k=-1).count_nonzero()
    else:
        upper = int(np.count_nonzero(np.triu(A, 1)))
        lower = int(np.count_nonzero(np.tril(A, -1)))
    return (upper == 0) != (lower == 0)


def _is_skew(A: Any, sparse: bool, tol: float) -> bool:
    """Whether ``max |A + A^T| <= tol``."""
    if sparse:
        total = abs(A + A.T)
        return (float(total.max()) if total.nnz else 0.0) <= tol
    return float(np.max(np.abs(A + A.T))) <= tol


def _check_wide_floats(values: np.ndarray, path: Path) -> None:
    """Refuse a longdouble (float96/float128) matrix that float64 cannot hold, before the
    cast: NaN or infinite entries, or finite ones beyond float64's range (which the cast
    would turn into infinities, reported as such). Tiny entries become subnormal or 0, as
    the rounding of any float64 matrix would."""
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise MatrixFileError(f"{path} holds NaN or infinite entries")
    big = np.max(np.abs(values))
    limit = np.finfo(np.float64).max
    if big > limit:
        power = np.format_float_scientific(big, precision=1, unique=False)
        raise MatrixFileError(
            f"{path} holds {values.dtype} entries beyond the float64 range (max |a| = "
            f"{power} > {limit:.3g}); specdens computes in float64: divide the matrix by a "
            "power of ten and multiply the spectrum back")


def describe_matrix(A: Any) -> dict:
    """Shape, dtype, storage and number of stored entries of a loaded matrix (for
    summaries)."""
    import scipy.sparse

    if scipy.sparse.issparse(A):
        # (nonzeros, as for a dense matrix: explicitly stored zeros are not counted)
        return {"shape": list(A.shape), "dtype": str(A.dtype), "storage": f"sparse {A.format}",
                "nnz": int(A.count_nonzero())}
    return {"shape": list(A.shape), "dtype": str(A.dtype), "storage": "dense",
            "nnz": int(np.count_nonzero(A))}
