"""The ``specdens`` command line, run in-process through ``main`` (and once as
``python -m specdens``), and the matrix file reader behind it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.io
import scipy.sparse

import specdens
from specdens.cli import main
from specdens.matrix_io import MatrixFileError, load_matrix

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = {"n", "steps", "probes", "range", "negative_fraction", "moments", "outliers",
                "timings", "matvecs", "input", "settings", "files", "specdens_version"}
FAST = ["--steps", "30", "--probes", "3", "-q"]


def laplacian(n):
    return scipy.sparse.diags([-np.ones(n - 1), 2 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1],
                              format="csr")


def symmetric_dense(n, seed=0):
    B = np.random.default_rng(seed).standard_normal((n, n))
    return (B + B.T) / 2


def check_outputs(out_dir, stem, n, fmt="png"):
    plot = out_dir / f"{stem}-density.{fmt}"
    result = out_dir / f"{stem}-slq.npz"
    summary_path = out_dir / f"{stem}-summary.json"
    for p in (plot, result, summary_path):
        assert p.is_file() and p.stat().st_size > 0, p
    if fmt == "png":
        assert plot.read_bytes()[:8] == PNG_MAGIC
    summary = json.loads(summary_path.read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["n"] == n
    assert {"min", "max", "min_residual", "max_residual"} <= set(summary["range"])
    assert {"value", "stderr"} <= set(summary["moments"]["1"])
    assert {"load_s", "slq_s", "plot_s", "total_s", "wall_time"} <= set(summary["timings"])
    density = specdens.SpectralDensity.load(result)
    assert density.n == n
    assert density.extra["input"] == summary["input"]
    return summary


def test_example(tmp_path, capsys):
    rc = main(["spectrum", "--example", "hessian_like", "--n", "1000", "--out", str(tmp_path),
               "--steps", "60", "--probes", "4", "--seed", "1"])
    assert rc == 0
    summary = check_outputs(tmp_path, "hessian_like-n1000", 1000)
    assert summary["input"]["kind"] == "example"
    assert summary["settings"]["seed"] == 1 and summary["seed"] == 1
    assert summary["reorth"] == "full" and summary["settings"]["reorth_requested"] == "auto"
    assert len(summary["outliers"]) == 10
    assert summary["exact"]["wasserstein1_over_range"] < 5e-3
    out = capsys.readouterr().out
    assert "outliers          10" in out and "hessian_like-n1000-density.png" in out


@pytest.mark.parametrize("kind", ["npy", "npz", "npz-key", "sparse-npz", "mtx", "mtx-dense"])
def test_matrix_files(tmp_path, kind):
    n = 120
    if kind == "npy":
        path = tmp_path / "mat.npy"
        np.save(path, symmetric_dense(n))
        extra = []
    elif kind == "npz":
        path = tmp_path / "mat.npz"
        np.savez(path, symmetric_dense(n))
        extra = []
    elif kind == "npz-key":
        path = tmp_path / "mat.npz"
        np.savez(path, other=np.zeros(3), H=symmetric_dense(n))
        extra = ["--key", "H"]
    elif kind == "sparse-npz":
        path = tmp_path / "mat.npz"
        scipy.sparse.save_npz(path, laplacian(n))
        extra = []
    elif kind == "mtx":
        path = tmp_path / "mat.mtx"
        scipy.io.mmwrite(path, scipy.sparse.coo_matrix(laplacian(n)), symmetry="symmetric")
        extra = []
    else:
        path = tmp_path / "mat.mtx"
        scipy.io.mmwrite(path, symmetric_dense(n))
        extra = []
    out = tmp_path / "out"
    assert main(["spectrum", str(path), "--out", str(out), *FAST, *extra]) == 0
    summary = check_outputs(out, "mat", n)
    assert summary["input"]["kind"] == "file"
    assert summary["input"]["shape"] == [n, n]
    assert "exact" not in summary
    if kind in ("sparse-npz", "mtx"):
        assert summary["input"]["storage"].startswith("sparse")
        assert 0 <= summary["range"]["min"] and summary["range"]["max"] <= 4


def test_formats_options_and_default_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["spectrum", "--example", "uniform", "--n", "300", *FAST, "--format", "svg",
                 "--sigma", "0.05", "--kernel", "lorentzian", "--linear",
                 "--reorth", "local", "--probe-kind", "sphere"]) == 0
    summary = check_outputs(tmp_path / "specdens-out", "uniform-n300", 300, fmt="svg")
    assert summary["settings"]["sigma"] == 0.05 and summary["reorth"] == "local"
    assert summary["probe_kind"] == "sphere"
    assert main(["spectrum", "--example", "semicircle", "--n", "200", *FAST, "--format",
                 "pdf"]) == 0
    assert (tmp_path / "specdens-out" / "semicircle-n200-density.pdf").read_bytes()[:4] == b"%PDF"
    assert main(["spectrum", "--example", "laplacian_1d", "--n", "100", *FAST,
                 "--no-plot"]) == 0
    assert not (tmp_path / "specdens-out" / "laplacian_1d-n100-density.png").exists()
    assert (tmp_path / "specdens-out" / "laplacian_1d-n100-summary.json").exists()


def test_without_matplotlib_the_plot_is_skipped(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m.startswith("matplotlib")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["spectrum", "--example", "uniform", "--n", "100", "--out", str(tmp_path),
                 *FAST]) == 0
    assert not (tmp_path / "uniform-n100-density.png").exists()
    assert (tmp_path / "uniform-n100-summary.json").exists()
    assert "pip install 'specdens[plot]'" in capsys.readouterr().err


def one_line_error(capsys, *needles):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("specdens: error:"), err
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize("argv, needles", [
    (["spectrum", "missing.npy"], ["no such file", "missing.npy"]),
    (["spectrum", "--example", "nope"], ["unknown example 'nope'", "hessian_like"]),
    (["spectrum"], ["PATH", "--example"]),
    (["spectrum", "x.npy", "--example", "uniform"], ["not allowed"]),
    (["spectrum", "--example", "uniform", "--steps", "0"], ["--steps", "positive integer"]),
    (["spectrum", "--example", "uniform", "--steps", "abc"], ["--steps"]),
    (["spectrum", "--example", "uniform", "--sigma", "-1"], ["--sigma"]),
    (["spectrum", "--example", "uniform", "--reorth", "selective"], ["--reorth"]),
    (["spectrum", "--example", "uniform", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["spectrum", "--example", "uniform", "--key", "H"], ["--key"]),
    (["frobnicate"], ["invalid choice"]),
])
def test_usage_errors_exit_2(tmp_path, monkeypatch, capsys, argv, needles):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    one_line_error(capsys, *needles)
    assert not (tmp_path / "specdens-out").exists() or argv[:2] == ["spectrum", "--example"]


@pytest.mark.parametrize("name, content, needles", [
    ("rect.npy", np.zeros((3, 4)), ["non-square", "3 x 4"]),
    ("vec.npy", np.zeros(5), ["shape (5,)", "2 dimensions"]),
    ("asym.npy", np.arange(9.0).reshape(3, 3), ["not symmetric"]),
    ("nan.npy", np.full((2, 2), np.nan), ["NaN"]),
    ("cplx.npy", np.eye(3) * 1j, ["complex"]),
    ("two.npz", {"a": np.eye(2), "b": np.eye(2)}, ["2 arrays", "a, b", "--key"]),
    ("bad.npz", b"this is not a zip file", ["not a readable .npz"]),
    ("bad.npy", b"\x93NUMPY garbage", ["not a readable .npy"]),
    ("bad.mtx", b"%%MatrixMarket nonsense\n1 2\n", ["Matrix Market"]),
    ("mat.txt", b"1 0\n0 1\n", ["unsupported file type '.txt'", ".npy", ".mtx"]),
])
def test_bad_matrix_files_exit_2(tmp_path, capsys, name, content, needles):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    else:
        np.save(path, content)
    assert main(["spectrum", str(path), "--out", str(tmp_path / "o"), "-q"]) == 2
    one_line_error(capsys, *needles)


def test_a_matrix_too_small_for_the_arithmetic_exits_1(tmp_path, capsys):
    """A valid symmetric matrix scaled by 1e-310: slq's ValueError about the operator's
    scale is a failed computation (one line, exit 1), not a traceback; the same matrix at
    a resolvable scale runs."""
    path = tmp_path / "tiny.npy"
    np.save(path, symmetric_dense(50) * 1e-310)
    assert main(["spectrum", str(path), "--out", str(tmp_path / "o"), *FAST]) == 1
    err = one_line_error(capsys, "the computation failed", "the operator's scale",
                         "too small for float64")
    assert err.startswith("specdens: error:")
    assert not (tmp_path / "o" / "tiny-slq.npz").exists()
    np.save(path, symmetric_dense(50) * 1e-100)
    assert main(["spectrum", str(path), "--out", str(tmp_path / "o"), "--no-plot",
                 *FAST]) == 0
    exact = np.linalg.eigvalsh(symmetric_dense(50) * 1e-100)
    summary = json.loads((tmp_path / "o" / "tiny-summary.json").read_text())
    assert summary["range"]["min"] == pytest.approx(exact[0], rel=1e-8)
    assert summary["range"]["max"] == pytest.approx(exact[-1], rel=1e-8)


def test_version_help_and_examples(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"specdens {specdens.__version__}"
    assert main(["spectrum", "--help"]) == 0
    assert "--example" in capsys.readouterr().out
    assert main(["examples"]) == 0
    out = capsys.readouterr().out
    for name in ("hessian_like", "marchenko_pastur", "uniform", "laplacian_1d"):
        assert name in out
    assert main([]) == 2


def test_investigate_is_a_subcommand(capsys):
    """Its help lists the options; parsing it imports no framework (the end-to-end run is
    in test_investigate.py)."""
    assert main(["investigate", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--backend", "--width", "--depth", "--steps", "--records",
                   "--lanczos-steps", "--probes", "--k", "--out", "--seed", "--resume",
                   "--threads"):
        assert option in out, option
    assert main(["--help"]) == 0
    assert "investigate" in capsys.readouterr().out
    code = ("import sys; from specdens.cli import build_parser; build_parser(); "
            "print([m for m in ('torch', 'jax', 'tensorflow', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_python_dash_m(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "specdens", "spectrum", "--example", "marchenko_pastur",
         "--n", "500", "--out", str(tmp_path), "--steps", "40", "--probes", "2"],
        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "outliers          3" in ok.stdout
    check_outputs(tmp_path, "marchenko_pastur-n500", 500)
    bad = subprocess.run([sys.executable, "-m", "specdens", "spectrum", str(tmp_path / "no.npy")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("specdens: error: no such file")
    assert "Traceback" not in bad.stderr


# -- load_matrix -------------------------------------------------------------------------
def test_load_matrix_types(tmp_path):
    A = symmetric_dense(10).astype(np.float32)
    np.save(tmp_path / "a.npy", A)
    got = load_matrix(tmp_path / "a.npy")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, A)
    np.save(tmp_path / "i.npy", np.eye(4, dtype=np.int64))
    assert load_matrix(tmp_path / "i.npy").dtype == np.float64
    S = laplacian(30)
    scipy.sparse.save_npz(tmp_path / "s.npz", scipy.sparse.csr_array(S))
    got = load_matrix(tmp_path / "s.npz")
    assert scipy.sparse.issparse(got) and got.format == "csr"
    assert abs(got - S).max() == 0
    op = specdens.aslinearoperator(got)
    np.testing.assert_allclose(op @ np.ones(30), S @ np.ones(30))
    scipy.io.mmwrite(tmp_path / "s.mtx", scipy.sparse.coo_matrix(S), symmetry="symmetric")
    assert abs(load_matrix(tmp_path / "s.mtx") - S).max() == 0
    # a specdens result file is not a matrix
    d = specdens.slq(S.toarray(), num_steps=5)
    d.save(tmp_path / "r.npz")
    with pytest.raises(MatrixFileError, match="result file"):
        load_matrix(tmp_path / "r.npz")
    with pytest.raises(FileNotFoundError):
        load_matrix(tmp_path / "none.npy")
    with pytest.raises(MatrixFileError, match="directory"):
        load_matrix(tmp_path)
    with pytest.raises(MatrixFileError, match="key"):
        load_matrix(tmp_path / "a.npy", key="x")
    np.savez(tmp_path / "k.npz", x=np.eye(2))
    with pytest.raises(MatrixFileError, match="no array 'y'.*x"):
        load_matrix(tmp_path / "k.npz", key="y")
    np.save(tmp_path / "o.npy", np.array([[1, None]], dtype=object), allow_pickle=True)
    with pytest.raises(MatrixFileError, match="pickled"):
        load_matrix(tmp_path / "o.npy")
    # symmetry is checked to sqrt(eps) of the dtype, and can be switched off
    B = symmetric_dense(5)
    B[0, 1] += 1e-3
    np.save(tmp_path / "b.npy", B)
    with pytest.raises(MatrixFileError, match="not symmetric"):
        load_matrix(tmp_path / "b.npy")
    assert load_matrix(tmp_path / "b.npy", check_symmetric=False).shape == (5, 5)


def _sparse_npz(path, **arrays):
    """A scipy sparse .npz written member by member, so that it can be corrupt."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.save(buf, value)
            z.writestr(name + ".npy", buf.getvalue())


def _npy_header(path, shape, descr="<f8", data=b"\0" * 64):
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": descr, "fortran_order": False, "shape": shape})
        fh.write(data)


def test_unreadable_matrix_files_are_matrix_file_errors(tmp_path, capsys):
    """Files that escaped as OverflowError (an integer beyond 64 bits in a .mtx),
    MemoryError (a header declaring a 100000 x 100000 array over one value, a .npy
    header declaring 298 GiB over 64 bytes) or ValueError (a sparse .npz whose index
    pointer decreases, from sum_duplicates) or zlib.error (a damaged compressed .npz), with
    a traceback from the command line: each
    is now a MatrixFileError, and `specdens spectrum` prints one line and exits 2. A
    sparse index out of range was reported as 'not symmetric' (or crashed the process):
    it is a corrupt file."""
    mm = "%%MatrixMarket matrix "
    cases = {
        "int.mtx": (mm + "coordinate integer symmetric\n2 2 2\n1 1 99999999999999999999\n"
                    "2 1 1\n", "Integer out of range"),
        "dims.mtx": (mm + "coordinate real symmetric\n99999999999999999999 "
                     "99999999999999999999 1\n1 1 1\n", "Integer out of range"),
        "bigdense.mtx": (mm + "array real general\n100000 100000\n1\n",
                         "declares a 100000 x 100000 array matrix"),
        "bigcoo.mtx": (mm + "coordinate real general\n3 3 1000000000\n1 1 1\n",
                       "truncated or corrupt"),
    }
    for name, (text, _) in cases.items():
        (tmp_path / name).write_text(text)
    _npy_header(tmp_path / "hugehdr.npy", (200000, 200000))
    import zipfile

    with zipfile.ZipFile(tmp_path / "hugemember.npz", "w") as z:
        _npy_header(tmp_path / "member.npy", (100000, 100000))
        z.write(tmp_path / "member.npy", "H.npy")
    csr = dict(format=np.array(b"csr"), shape=np.array([3, 3]))
    _sparse_npz(tmp_path / "indptr.npz", **csr, data=np.ones(2), indices=np.array([0, 1]),
                indptr=np.array([0, 2, 1, 2]))
    _sparse_npz(tmp_path / "index.npz", **csr, data=np.ones(2), indices=np.array([0, 5]),
                indptr=np.array([0, 1, 2, 2]))
    _sparse_npz(tmp_path / "index2.npz", **csr, data=np.ones(1), indices=np.array([5]),
                indptr=np.array([0, 1, 1, 1]))
    np.savez_compressed(tmp_path / "deflate.npz", H=np.eye(200))
    damaged = bytearray((tmp_path / "deflate.npz").read_bytes())
    damaged[60] ^= 0xFF  # inside the compressed stream: zlib.error, not a zip error
    damaged[61] ^= 0x55
    (tmp_path / "deflate.npz").write_bytes(bytes(damaged))
    expected = {
        **{name: needle for name, (_, needle) in cases.items()},
        "deflate.npz": "not a readable .npz file",
        "hugehdr.npy": "declares a float64 array of shape (200000, 200000)",
        "hugemember.npz": "member H.npy",
        "indptr.npz": "corrupt sparse matrix",
        "index.npz": "corrupt sparse matrix (indices must be < 3)",
        "index2.npz": "corrupt sparse matrix (indices must be < 3)",
    }
    for name, needle in expected.items():
        with pytest.raises(MatrixFileError, match=re.escape(needle)):
            load_matrix(tmp_path / name)
        assert main(["spectrum", str(tmp_path / name), "--out", str(tmp_path / "o"),
                     "-q"]) == 2
        err = one_line_error(capsys, name, needle)
        assert "not symmetric" not in err


def test_a_matrix_too_large_for_the_memory_is_a_matrix_file_error(tmp_path, monkeypatch):
    """A reader's MemoryError (a valid file declaring more than the memory holds; a
    compressed .mtx.gz cannot be checked against its size first) is a MatrixFileError."""
    path = tmp_path / "big.mtx.gz"
    scipy.io.mmwrite(tmp_path / "big.mtx", np.eye(3))
    import gzip

    path.write_bytes(gzip.compress((tmp_path / "big.mtx").read_bytes()))

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 74.5 GiB for an array")

    monkeypatch.setattr(scipy.io, "mmread", no_memory)
    with pytest.raises(MatrixFileError, match="too large for the memory available"):
        load_matrix(path)


def test_big_endian_float32_stays_float32(tmp_path):
    """A big-endian float32 .npy ('>f4') came back as float64 (the dtype comparison saw
    the byte order); it is float32 in native byte order, as are the float64 ones."""
    A = symmetric_dense(6)
    for descr, native in ((">f4", np.float32), (">f8", np.float64), ("<f4", np.float32)):
        np.save(tmp_path / "a.npy", A.astype(descr))
        got = load_matrix(tmp_path / "a.npy")
        assert got.dtype == np.dtype(native) and got.dtype.isnative, descr
        np.testing.assert_array_equal(got, A.astype(native))


def test_a_matrix_too_large_for_the_arithmetic_exits_1_naming_the_scale(tmp_path, capsys):
    """Eigenvalues 1e160, 2e160, 3e160 (a valid, finite, symmetric matrix): the squared
    norms overflow float64 and the engine reported NaN or Inf from the operator, which the
    command line passed on as 'a broken matvec'. It now names the scale and the remedy,
    like the tiny-scale message; just below the overflow the summary's second moment
    overflowed with a traceback. 1e150 runs. (numpy's overflow warnings are not shown.)"""
    path = tmp_path / "huge.npy"
    for scale in (1e160, 1e154):
        np.save(path, scale * np.diag([1.0, 2.0, 3.0] + [0.5] * 20))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a RuntimeWarning would print more than one line
            assert main(["spectrum", str(path), "--out", str(tmp_path / "o"), *FAST]) == 1
        err = one_line_error(capsys, "the computation failed", "too large for float64",
                             "Divide the matrix by a power of ten",
                             "multiply the spectrum back")
        assert "broken matvec" not in err
        assert not (tmp_path / "o" / "huge-slq.npz").exists()
    np.save(path, 1e150 * np.diag([1.0, 2.0, 3.0]))
    assert main(["spectrum", str(path), "--out", str(tmp_path / "o"), "--no-plot",
                 *FAST]) == 0
    summary = json.loads((tmp_path / "o" / "huge-summary.json").read_text())
    assert summary["range"]["max"] == pytest.approx(3e150, rel=1e-12)


# -- errors that escaped, misled or were silent --------------------------------------------
def test_a_plot_that_cannot_be_written_exits_2(tmp_path, capsys):
    """An OSError from savefig (here the plot's path is a directory) was a traceback."""
    (tmp_path / "o" / "uniform-n100-density.png").mkdir(parents=True)
    assert main(["spectrum", "--example", "uniform", "--n", "100", "--out",
                 str(tmp_path / "o"), *FAST]) == 2
    one_line_error(capsys, "cannot write into", "uniform-n100-density.png")


def test_sigma_outside_what_the_plot_resolves_exits_2(tmp_path, capsys):
    """--sigma 1e308 overflowed in the plot's grid (a traceback), 1e307 and 1e-300 printed
    RuntimeWarnings; a width is now refused outside [64 eps s, s / (64 eps)] for the
    spectrum's scale s (here about 1), before anything is written, and the bounds work."""
    run = ["spectrum", "--example", "uniform", "--n", "100", "--out", str(tmp_path), *FAST]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for sigma in ("1e308", "1e307", "1e-300"):
            assert main([*run, "--sigma", sigma]) == 2
            one_line_error(capsys, f"--sigma {float(sigma):.3g}", "use a width between")
        assert not list(tmp_path.iterdir())
        assert main([*run, "--sigma", "1e13", "--kernel", "lorentzian"]) == 0
        assert main([*run, "--sigma", "1e-13", "--linear"]) == 0


def test_a_closed_stdout_exits_quietly(tmp_path):
    """`specdens spectrum ... | head -1`: the summary's print raised BrokenPipeError with a
    traceback; it now exits as a command killed by SIGPIPE would (141), silently."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "specdens", "spectrum", "--example", "uniform", "--n", "100",
         "--out", str(tmp_path), "--steps", "20", "--probes", "2", "--no-plot"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the summary is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert (tmp_path / "uniform-n100-summary.json").exists()


def test_a_float32_matrix_is_too_large_for_its_products_not_for_its_squares(tmp_path,
                                                                              capsys):
    """The message for a float32 matrix said squares overflow once ||A|| passes 1.8e19,
    float32's sqrt(max); the arithmetic is float64 and such matrices run. What overflows is
    the float32 products, at 3.4e38."""
    S = symmetric_dense(40, seed=1)
    S /= np.abs(S).max()
    np.save(tmp_path / "big.npy", (S * 1e25).astype(np.float32))
    assert main(["spectrum", str(tmp_path / "big.npy"), "--out", str(tmp_path / "o"),
                 "--no-plot", *FAST]) == 0
    # 1.5e38 (J + I), J all ones (largest entry 3e38): the second Lanczos vector is close
    # to the all-positive top eigenvector, whose product has entries ~1.5e38 sqrt(n), past
    # float32's 3.4e38 in any order of summation (a random S * 3e38 overflowed or not by
    # the BLAS kernel's order of summation)
    huge = 1.5e38 * (np.ones((41, 41)) + np.eye(41))
    np.save(tmp_path / "huge.npy", huge.astype(np.float32))
    assert main(["spectrum", str(tmp_path / "huge.npy"), "--out", str(tmp_path / "o"),
                 "--no-plot", *FAST]) == 1
    err = one_line_error(capsys, "the computation failed", "too large for float32 products",
                         "overflow once ||A q|| passes 3.4e+38", "Save the matrix as float64")
    assert "1.8e+19" not in err


def test_investigate_into_an_existing_file_says_so(tmp_path, capsys):
    """`investigate --out FILE` printed only '[Errno 17] File exists: ...'."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torch")
    (tmp_path / "afile").write_text("")
    for command in (["investigate", "--steps", "1", "--records", "1", "--width", "4",
                     "--depth", "1", "--k", "2"], ["spectrum", "--example", "uniform"]):
        assert main([*command, "--out", str(tmp_path / "afile"), "-q"]) == 2
        one_line_error(capsys, f"cannot create the output directory {tmp_path / 'afile'}",
                       "a file of that name exists", "another --out")


def test_inputs_of_the_same_stem_do_not_overwrite_each_other(tmp_path, capsys):
    """a.npy and a.npz (or two --key arrays of one .npz) wrote the same a-* files in one
    --out, silently. The same input again replaces its outputs; another one is refused."""
    np.save(tmp_path / "a.npy", symmetric_dense(20))
    np.savez(tmp_path / "a.npz", x=symmetric_dense(20, seed=1), y=symmetric_dense(20, seed=2))
    out = ["--out", str(tmp_path / "o"), "--no-plot", *FAST]
    assert main(["spectrum", str(tmp_path / "a.npy"), *out]) == 0
    assert main(["spectrum", str(tmp_path / "a.npy"), *out]) == 0
    assert main(["spectrum", str(tmp_path / "a.npz"), "--key", "x", *out]) == 2
    one_line_error(capsys, "a-summary.json holds the results of", "a.npy", "another --out")
    summary = json.loads((tmp_path / "o" / "a-summary.json").read_text())
    assert summary["input"]["path"].endswith("a.npy")
    assert main(["spectrum", str(tmp_path / "a.npz"), "--key", "x", "--out",
                 str(tmp_path / "p"), "--no-plot", *FAST]) == 0
    assert main(["spectrum", str(tmp_path / "a.npz"), "--key", "y", "--out",
                 str(tmp_path / "p"), "--no-plot", *FAST]) == 2
    one_line_error(capsys, "a.npz --key x")


def test_stem_check_compares_resolved_paths(tmp_path, capsys, monkeypatch):
    """The check compared only the file name: d2/a.npy (another matrix) after a.npy
    silently overwrote a-*. It compares the resolved absolute paths."""
    (tmp_path / "d2").mkdir()
    np.save(tmp_path / "a.npy", symmetric_dense(20))
    np.save(tmp_path / "d2" / "a.npy", symmetric_dense(20, seed=1))
    monkeypatch.chdir(tmp_path)
    out = ["--out", "o", "--no-plot", *FAST]
    assert main(["spectrum", "a.npy", *out]) == 0
    assert main(["spectrum", str(tmp_path / "a.npy"), *out]) == 0  # the same file
    assert main(["spectrum", "d2/a.npy", *out]) == 2
    one_line_error(capsys, "a-summary.json holds the results of", str(tmp_path / "a.npy"),
                   "another --out")
    summary = json.loads((tmp_path / "o" / "a-summary.json").read_text())
    assert summary["input"]["resolved_path"] == str(tmp_path / "a.npy")


def test_stem_check_takes_the_array_read_for_the_key(tmp_path, monkeypatch):
    """single.npz, then single.npz --key arr_0 (the same array named explicitly) was
    refused: the key compared is the one actually read."""
    np.savez(tmp_path / "single.npz", symmetric_dense(20, seed=2))
    (tmp_path / "d2").mkdir()
    monkeypatch.chdir(tmp_path)
    out = ["--out", "o", "--no-plot", *FAST]
    assert main(["spectrum", "single.npz", *out]) == 0
    assert main(["spectrum", "single.npz", "--key", "arr_0", *out]) == 0
    summary = json.loads((tmp_path / "o" / "single-summary.json").read_text())
    assert summary["input"]["key"] == "arr_0"  # the array read
    assert main(["spectrum", "d2/../single.npz", *out]) == 0


def test_plot_options_with_no_plot_are_refused(tmp_path, capsys):
    """--sigma, --kernel, --format and --linear were accepted and ignored with --no-plot
    (sigma and kernel even recorded in the settings)."""
    run = ["spectrum", "--example", "uniform", "--n", "100", "--out", str(tmp_path),
           "--no-plot", *FAST]
    assert main([*run, "--sigma", "0.1"]) == 2
    one_line_error(capsys, "--sigma sets the plot", "--no-plot")
    assert main([*run, "--kernel", "gaussian", "--format", "png", "--linear"]) == 2
    one_line_error(capsys, "--kernel, --format and --linear set the plot")
    assert not list(tmp_path.iterdir())
