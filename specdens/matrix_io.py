"""Reading symmetric matrices from files: ``.npy``, ``.npz`` and Matrix Market ``.mtx``.

=====================  ================================================================
``.npy``               a dense 2-D array (``numpy.save``)
``.npz``               a dense 2-D array (``numpy.savez``; one array, or ``key=``), or a
                       scipy sparse matrix (``scipy.sparse.save_npz``)
``.mtx``, ``.mtx.gz``  Matrix Market, coordinate (sparse) or array (dense), general or
                       symmetric storage (``scipy.io.mmwrite``)
=====================  ================================================================

Pickled data is never loaded. The matrix must be real, square, finite and symmetric:
anything else raises :class:`MatrixFileError` with the reason.

References
----------
R. F. Boisvert, R. Pozo, K. A. Remington (1996), The Matrix Market exchange formats:
initial design. NIST IR 5935.
"""

from __future__ import annotations

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
        For an unknown file type, a corrupt file, or a matrix that is not 2-D, square,
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
    if suffix == ".npy":
        A = _load_npy(path)
    elif suffix == ".npz":
        A = _load_npz(path, key)
    elif suffix in (".mtx", ".mtx.gz"):
        A = _load_mtx(path)
    else:
        raise MatrixFileError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; specdens reads "
            ".npy, .npz (numpy.savez or scipy.sparse.save_npz) and Matrix Market .mtx/.mtx.gz"
        )
    return _check(A, path, check_symmetric)


def _load_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY":
        raise MatrixFileError(f"{path} is not a readable .npy file (no NumPy header)")
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
        with np.load(path, allow_pickle=False) as z:
            files = list(z.files)
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
                                          f"{', '.join(files) or 'nothing'}")
                return z[key]
            if len(files) == 1:
                return z[files[0]]
            if not files:
                raise MatrixFileError(f"{path} holds no arrays")
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
        return scipy.sparse.load_npz(path)
    except (ValueError, OSError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise MatrixFileError(f"{path} is not a readable scipy sparse .npz file ({exc})") from None


def _load_mtx(path: Path) -> Any:
    import scipy.io

    try:
        return scipy.io.mmread(str(path))
    except (ValueError, OSError, EOFError, IndexError, TypeError) as exc:
        raise MatrixFileError(f"{path} is not a readable Matrix Market file ({exc})") from None


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
    if A.dtype not in (np.float32, np.float64):
        A = A.astype(np.float64)
    if sparse:
        A = A.tocsr()
        A.sum_duplicates()
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
        if gap > tol:
            raise MatrixFileError(
                f"{path} holds a matrix that is not symmetric: max |A - A^T| = {gap:.3g} "
                f"(relative {gap / scale:.2g}); specdens needs a symmetric matrix; "
                "symmetrise it, e.g. (A + A.T) / 2")
    return A


def describe_matrix(A: Any) -> dict:
    """Shape, dtype, storage and number of stored entries of a loaded matrix (for
    summaries)."""
    import scipy.sparse

    if scipy.sparse.issparse(A):
        return {"shape": list(A.shape), "dtype": str(A.dtype), "storage": f"sparse {A.format}",
                "nnz": int(A.nnz)}
    return {"shape": list(A.shape), "dtype": str(A.dtype), "storage": "dense",
            "nnz": int(np.count_nonzero(A))}
