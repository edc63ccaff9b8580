"""specdens.matrix_io.load_matrix on files that were read wrong, crashed the reader or were
refused for the wrong reason."""

from __future__ import annotations

import gzip
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import scipy.sparse

from specdens.matrix_io import MatrixFileError, load_matrix

MM = "%%MatrixMarket matrix "


def test_small_dtype_sparse_duplicates_are_summed_in_float64(tmp_path):
    """An int8 (or uint16) scipy sparse .npz whose (0, 0) entry is stored as two
    duplicates: they were summed in the file's dtype (int8 100 + 100 = -56, uint16
    60000 + 60000 = 54464), before the conversion to float64."""
    for dtype, value in ((np.int8, 100), (np.uint16, 60000)):
        data = np.array([value, value, 1], dtype=dtype)
        C = scipy.sparse.coo_matrix((data, ([0, 0, 1], [0, 0, 1])), shape=(2, 2))
        scipy.sparse.save_npz(tmp_path / "dups.npz", C)
        A = load_matrix(tmp_path / "dups.npz")
        assert A.dtype == np.float64
        np.testing.assert_array_equal(A.toarray(), [[2.0 * value, 0.0], [0.0, 1.0]])


def test_symmetric_mtx_pairs_stored_on_both_sides_are_refused(tmp_path):
    """Symmetric storage holds one triangle; the reader mirrors every off-diagonal entry,
    so a file that stored both (2, 1) and (1, 2) read as [[1, 2], [2, 0]], with no error.
    An entry stored above the diagonal alone is unambiguous and read as scipy reads it."""
    path = tmp_path / "both.mtx"
    path.write_text(MM + "coordinate real symmetric\n3 3 4\n1 1 1\n2 1 1\n1 2 1\n3 1 5\n")
    with pytest.raises(MatrixFileError, match=r"both\.mtx is a symmetric Matrix Market file "
                       r"that stores 1 off-diagonal pair on both sides of the diagonal "
                       r"\(the first: row 2, column 1 and row 1, column 2\).*'general'"):
        load_matrix(path)
    expected = [[1.0, 1.0, 5.0], [1.0, 0.0, 0.0], [5.0, 0.0, 0.0]]
    for body in ("1 1 1\n2 1 1\n3 1 5\n", "1 1 1\n1 2 1\n1 3 5\n", "1 1 1\n1 2 1\n3 1 5\n"):
        path.write_text(MM + "coordinate real symmetric\n3 3 3\n" + body)
        np.testing.assert_array_equal(load_matrix(path).toarray(), expected)


def test_empty_or_rectangular_array_mtx_is_refused_from_the_header(tmp_path):
    """An array-format .mtx (or .mtx.gz) of 0 rows or columns killed the process with
    SIGFPE inside scipy's reader; it is refused from its header (in a subprocess, which
    such a crash cannot take the test run down with)."""
    texts = {"e00.mtx": "0 0", "e05.mtx": "0 5", "e50.mtx": "5 0"}
    for name, dims in texts.items():
        (tmp_path / name).write_text(MM + f"array real general\n{dims}\n")
    (tmp_path / "e00.mtx.gz").write_bytes(gzip.compress((tmp_path / "e00.mtx").read_bytes()))
    code = ("import sys\nfrom specdens.matrix_io import MatrixFileError, load_matrix\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n        load_matrix(name)\n"
            "    except MatrixFileError as exc:\n        print(exc)\n")
    names = ["e00.mtx", "e00.mtx.gz", "e05.mtx", "e50.mtx"]
    run = subprocess.run([sys.executable, "-c", code, *names], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.returncode, run.stderr)
    lines = run.stdout.splitlines()
    assert lines[0].startswith("e00.mtx holds an empty 0 x 0 matrix")
    assert lines[1].startswith("e00.mtx.gz holds an empty 0 x 0 matrix")
    assert lines[2].startswith("e05.mtx holds a non-square 0 x 5 matrix")
    assert lines[3].startswith("e50.mtx holds a non-square 5 x 0 matrix")


@pytest.mark.skipif(np.finfo(np.longdouble).max <= np.finfo(np.float64).max,
                    reason="longdouble is float64 here")
def test_longdouble_beyond_float64_is_named_so(tmp_path):
    """A longdouble .npy holding 1e400: a RuntimeWarning from the cast, then 'NaN or
    infinite entries'. The entries are finite; they exceed float64's range."""
    np.save(tmp_path / "ld.npy", np.eye(3, dtype=np.longdouble) * np.longdouble("1e400"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(MatrixFileError, match=r"ld\.npy holds float\d+ entries beyond the "
                           r"float64 range \(max \|a\| = 1\.0e\+400"):
            load_matrix(tmp_path / "ld.npy")
    inf = np.eye(3, dtype=np.longdouble)
    inf[0, 0] = np.inf
    np.save(tmp_path / "inf.npy", inf)
    with pytest.raises(MatrixFileError, match="NaN or infinite"):
        load_matrix(tmp_path / "inf.npy")


def test_skew_symmetric_matrices_are_named_so(tmp_path):
    """A skew-symmetric matrix was refused as 'not symmetric ... symmetrise it, e.g.
    (A + A.T) / 2', which is 0 for it."""
    (tmp_path / "skew.mtx").write_text(MM + "coordinate real skew-symmetric\n3 3 2\n"
                                       "2 1 1.0\n3 2 2.0\n")
    np.save(tmp_path / "skew.npy", np.array([[0.0, 1.0], [-1.0, 0.0]]))
    for name in ("skew.mtx", "skew.npy"):
        with pytest.raises(MatrixFileError, match="skew-symmetric.*imaginary") as info:
            load_matrix(tmp_path / name)
        assert "symmetrise" not in str(info.value)


def test_npz_members_that_are_not_arrays_are_ignored(tmp_path):
    """Only .npy members of an .npz are arrays: one holding only readme.txt was 'an array
    of shape ()', and one holding an array and a readme.txt held '2 arrays'."""
    with zipfile.ZipFile(tmp_path / "text.npz", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(MatrixFileError, match=r"text\.npz holds no arrays \(no \.npy members; "
                       r"it holds readme\.txt\)"):
        load_matrix(tmp_path / "text.npz")
    np.savez(tmp_path / "both.npz", H=np.eye(2))
    with zipfile.ZipFile(tmp_path / "both.npz", "a") as z:
        z.writestr("readme.txt", "hi")
    np.testing.assert_array_equal(load_matrix(tmp_path / "both.npz"), np.eye(2))


@pytest.mark.parametrize("body, match", [
    # scipy's reader took each value up to its first non-number character: the matrix
    # read was symmetric and wrong (2.5D+01 -> 2.5, 1,5 -> 1, 0x10 -> 0), with no error
    ("1 1 2.5D+01\n2 2 3.0D+01\n", r"line 3 \('1 1 2.5D\+01'\): a Fortran exponent"),
    ("1 1 1,5\n2 2 2\n", r"line 3 \('1 1 1,5'\): a decimal comma"),
    ("1 1 0x10\n2 2 2\n", r"line 3 .*the character 'x'"),
    ("1 1 2.0 # note\n2 2 2\n", r"line 3 .*the character '#'"),
    ("1 1 1.0.5\n2 2 2\n", r"line 3 .*a malformed number"),
    ("1 1 1e5e3\n2 2 2\n", r"line 3 .*a malformed number"),
    ("1 1 1-2\n2 2 2\n", r"line 3 .*a malformed number"),
    # a value too many per entry (a complex file declared real): the second was dropped
    ("1 1 1.0 4.0\n2 2 2.0 0.0\n", r"holds 8 numbers after its size line where its header "
                                   r"declares 2 entries of 3 numbers \(6 numbers\)"),
    # NUL bytes (scipy.io.mmwrite writes them with precision > 17) crashed the process
    ("1 1 2.0\x00\n2 2 2\n", r"line 3 .*a NUL byte"),
])
def test_mtx_values_scipy_would_misread_are_refused(tmp_path, body, match):
    path = tmp_path / "m.mtx"
    path.write_bytes((MM + "coordinate real general\n2 2 2\n" + body).encode("latin-1"))
    with pytest.raises(MatrixFileError, match=match):
        load_matrix(path)
    with gzip.open(tmp_path / "m.mtx.gz", "wb") as fh:
        fh.write(path.read_bytes())
    with pytest.raises(MatrixFileError, match=match.replace("m.mtx", "m.mtx.gz")):
        load_matrix(tmp_path / "m.mtx.gz")


def test_mtx_numbers_that_read_right_still_load(tmp_path):
    """What the body check lets through reads exactly: signs, exponents of both cases,
    leading points, tabs, CRLF and comments after the banner; nan is refused later as a
    NaN, and an integer field refuses a fraction (it was cut to 7)."""
    path = tmp_path / "ok.mtx"
    path.write_bytes((MM + "coordinate real general\r\n% a comment\r\n2 2 3\r\n"
                      "1 1 -1.5E+01\r\n2 2\t.5e-1\r\n1 2 -0.0\r\n").encode())
    np.testing.assert_array_equal(load_matrix(path).toarray(), [[-15.0, 0.0], [0.0, 0.05]])
    path.write_text(MM + "coordinate real general\n1 1 1\n1 1 nan\n")
    with pytest.raises(MatrixFileError, match="NaN or infinite"):
        load_matrix(path)
    path.write_text(MM + "coordinate integer general\n1 1 1\n1 1 7.9\n")
    with pytest.raises(MatrixFileError, match="not an integer in a file whose field is "
                                              "'integer'"):
        load_matrix(path)
    path.write_text(MM + "coordinate integer general\n1 1 1\n1 1 7E1\n")
    with pytest.raises(MatrixFileError, match="not an integer"):
        load_matrix(path)
    path.write_text(MM + "coordinate integer symmetric\n2 2 2\n1 1 7\n2 1 -3\n")
    np.testing.assert_array_equal(load_matrix(path).toarray(), [[7.0, -3.0], [-3.0, 0.0]])
    path.write_text(MM + "array real symmetric\n2 2\n1.0\n2.0\n3.0\n")
    np.testing.assert_array_equal(load_matrix(path), [[1.0, 2.0], [2.0, 3.0]])


def test_a_bsr_matrix_of_a_shape_off_its_blocks_is_refused(tmp_path):
    """scipy's full format check passed a (5, 5) BSR matrix of (2, 2) blocks; converting
    it to CSR left an index pointer uninitialised: heap corruption, segfaults."""
    data = np.array([[[2.0, 1.0], [1.0, 2.0]], [[3.0, 0.0], [0.0, 3.0]]])
    np.savez(tmp_path / "bsr.npz", format=np.array("bsr"), shape=np.array([5, 5]),
             data=data, indices=np.array([0, 1]), indptr=np.array([0, 1, 2]))
    with pytest.raises(MatrixFileError, match=r"BSR shape \(5, 5\) is not a multiple of its "
                                              r"block size \(2, 2\)"):
        load_matrix(tmp_path / "bsr.npz")


def test_one_triangle_of_a_general_file_is_told_to_declare_symmetric(tmp_path):
    """A 'general' file holding one triangle of a symmetric matrix was told to take
    (A + A.T) / 2, which halves the off-diagonal entries."""
    path = tmp_path / "lower.mtx"
    path.write_text(MM + "coordinate real general\n3 3 4\n1 1 2\n2 1 1\n3 1 5\n3 3 1\n")
    with pytest.raises(MatrixFileError, match="declare the file 'symmetric'.*would halve"):
        load_matrix(path)
    path.write_text(MM + "coordinate real general\n2 2 2\n2 1 1\n1 2 3\n")
    with pytest.raises(MatrixFileError, match=r"not symmetric: .*\(A \+ A.T\) / 2"):
        load_matrix(path)


def test_nnz_counts_nonzeros_for_sparse_and_dense_alike(tmp_path):
    from specdens.matrix_io import describe_matrix

    path = tmp_path / "zeros.mtx"
    path.write_text(MM + "coordinate real symmetric\n2 2 3\n1 1 0\n2 1 0\n2 2 4\n")
    A = load_matrix(path)
    assert describe_matrix(A)["nnz"] == 1 == describe_matrix(A.toarray())["nnz"]
