"""The ``specdens`` command line.

Usage::

    specdens spectrum MATRIX_FILE [options]     # .npy, .npz, scipy sparse .npz, .mtx
    specdens spectrum --example NAME [--n N]    # a built-in operator with known spectrum
    specdens examples                           # list the built-in examples
    specdens investigate [options]              # the paper's BatchNorm experiment
    specdens --version

``spectrum`` runs stochastic Lanczos quadrature and writes, into ``--out`` (default
``specdens-out/``), three files named after the input's stem: ``STEM-density.png``
(the smoothed density on a log axis), ``STEM-slq.npz`` (the full result,
:meth:`specdens.SpectralDensity.save`) and ``STEM-summary.json``
(:func:`specdens.summary.summarize` plus the input, the settings and timings), and
prints a short summary. Running the same input again replaces its files; another input
with the same stem (``a.npy`` after ``a.npz``, or another ``--key`` of one ``.npz``) is
refused rather than overwrite them (pass another ``--out``). ``--sigma``, ``--kernel``,
``--format`` and ``--linear`` set the plot and are refused with ``--no-plot``; ``--sigma``
must lie between ``64 eps s`` and ``s / (64 eps)`` for the spectrum's scale ``s`` (its
largest Ritz value in magnitude), the widths a float64 plot can resolve.

Usage errors (a missing file, an unknown example, bad options, an output that cannot be
written) print one line to stderr and exit with status 2, and so does a matrix file that
cannot be read (:class:`specdens.matrix_io.MatrixFileError`: corrupt, truncated, out of
range, too large for the memory, not symmetric...); a failed computation (also a valid
matrix too small or too large in magnitude for its arithmetic, entries around 1e-300 or
1e160 in float64, or 1e38 in float32, whose products are float32, which names the remedy:
scale the matrix by a power of ten and the spectrum back) prints one line and exits with
1. When the reader of stdout goes away (``specdens ... | head -1``) the command stops
quietly with status 141, as one killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main"]

PLOT_FORMATS = ("png", "svg", "pdf")
EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
    """A problem with the command line or its inputs: reported in one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`UsageError` instead of printing usage and
    exiting, so that every usage error is one line and ``main`` returns its status."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _number(kind: type, ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` that must satisfy ``ok``, else says ``what``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive finite number")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``specdens`` command."""
    from . import __version__
    from .algorithms.lanczos import REORTH_MODES
    from .algorithms.probes import PROBE_KINDS
    from .density import KERNELS
    from .examples import EXAMPLES

    parser = _Parser(
        prog="specdens",
        description="Eigenvalue densities of large symmetric matrices by stochastic Lanczos "
                    "quadrature.",
    )
    parser.add_argument("--version", action="version", version=f"specdens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sp = sub.add_parser(
        "spectrum", help="estimate the eigenvalue density of a matrix file or an example",
        description="Estimate the eigenvalue density of a symmetric matrix (a .npy, .npz, "
                    "scipy sparse .npz or Matrix Market .mtx file) or of a built-in example, "
                    "and write the plot, the result and a JSON summary into --out.",
    )
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("path", nargs="?", metavar="PATH", help="matrix file")
    src.add_argument("--example", metavar="NAME",
                     help=f"a built-in example: {', '.join(EXAMPLES)}")
    sp.add_argument("--n", type=_positive_int, metavar="N",
                    help="size of the example (default 3000)")
    sp.add_argument("--key", metavar="KEY",
                    help="the array to read from a .npz holding several")
    sp.add_argument("--steps", type=_positive_int, default=90,
                    help="Lanczos steps per probe (default 90)")
    sp.add_argument("--probes", type=_positive_int, default=10,
                    help="random probe vectors (default 10)")
    sp.add_argument("--seed", type=_nonnegative_int, default=0,
                    help="random seed of the probes and of the example (default 0)")
    sp.add_argument("--reorth", choices=REORTH_MODES, default="auto",
                    help="reorthogonalisation (default auto: full when the basis fits in "
                         "memory)")
    sp.add_argument("--probe-kind", choices=PROBE_KINDS, default="rademacher",
                    help="distribution of the probes (default rademacher)")
    sp.add_argument("--out", type=Path, default=Path("specdens-out"), metavar="DIR",
                    help="output directory (default ./specdens-out)")
    sp.add_argument("--sigma", type=_positive_float, metavar="S",
                    help="kernel width of the plotted density (default: the median gap "
                         "between Ritz values, or an eighth of the smallest gap when every "
                         "probe broke down before dimension n, as "
                         "SpectralDensity.default_sigma)")
    sp.add_argument("--kernel", choices=KERNELS,
                    help="smoothing kernel of the plot (default gaussian)")
    sp.add_argument("--format", choices=PLOT_FORMATS, dest="plot_format",
                    help="image format of the plot (default png)")
    sp.add_argument("--linear", action="store_true",
                    help="linear density axis (default: log, as in the paper)")
    sp.add_argument("--no-plot", action="store_true",
                    help="do not draw the plot (then --sigma, --kernel, --format and --linear "
                         "are refused)")
    sp.add_argument("-q", "--quiet", action="store_true",
                    help="no progress bar and no printed summary")

    sub.add_parser("examples", help="list the built-in examples",
                   description="List the built-in example operators with known spectra.")
    _add_investigate(sub)
    return parser


def _add_investigate(sub: Any) -> None:
    """The ``investigate`` subcommand (the logic is in :mod:`specdens.investigate`)."""
    from .investigate import BACKENDS, TRAIN_SAMPLES, InvestigationConfig

    d = InvestigationConfig()
    ip = sub.add_parser(
        "investigate",
        help="Hessian spectra through training with and without BatchNorm (the paper's "
             "experiment on scikit-learn's digits)",
        description="Train the same small MLP on scikit-learn's digits three ways (no "
                    "BatchNorm, BatchNorm on batch statistics, BatchNorm on population "
                    "statistics) with PyTorch, JAX or TensorFlow (--backend), record the "
                    "Hessian spectrum at log-spaced steps, and write the record file, figures, "
                    "summary.json and a Markdown report into --out.",
    )
    ip.add_argument("--backend", choices=BACKENDS, default=d.backend,
                    help="framework of the model, the training and the Hessian: torch "
                         "(default), jax or tf (TensorFlow with Keras 3)")
    ip.add_argument("--width", type=_positive_int, default=d.width,
                    help=f"hidden layer width (default {d.width})")
    ip.add_argument("--depth", type=_positive_int, default=d.depth,
                    help=f"number of hidden layers (default {d.depth})")
    ip.add_argument("--steps", type=_positive_int, default=d.steps,
                    help=f"training steps per run (default {d.steps})")
    ip.add_argument("--records", type=_positive_int, default=d.records,
                    help=f"recorded steps: 0 and log-spaced up to --steps (default {d.records})")
    ip.add_argument("--lanczos-steps", type=_positive_int, default=d.lanczos_steps,
                    help=f"Lanczos steps per SLQ probe (default {d.lanczos_steps})")
    ip.add_argument("--probes", type=_positive_int, default=d.probes,
                    help=f"SLQ probes (default {d.probes})")
    ip.add_argument("--k", type=_positive_int, default=d.k,
                    help=f"top eigenvalues and gradient-concentration dimension (default {d.k}, "
                         "the number of classes); smaller than the number of parameters")
    ip.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                    help=f"SGD batch size, at least 2 (BatchNorm) and at most the "
                    f"{TRAIN_SAMPLES} training samples (default {d.batch_size})")
    ip.add_argument("--lr", type=_positive_float, default=d.lr,
                    help=f"SGD learning rate (default {d.lr})")
    ip.add_argument("--seed", type=_nonnegative_int, default=d.seed,
                    help=f"seed of the split, the initialisation, the batches and the probes "
                         f"(default {d.seed})")
    ip.add_argument("--dtype", choices=("float64", "float32"), default=d.dtype,
                    help=f"model and product dtype (default {d.dtype})")
    ip.add_argument("--threads", type=_positive_int, default=d.threads,
                    help=f"torch threads (default {d.threads}: fastest for these small "
                         "matrices); jax and tf keep their own thread pools")
    ip.add_argument("--out", type=Path, default=Path("specdens-investigate"), metavar="DIR",
                    help="output directory (default ./specdens-investigate)")
    ip.add_argument("--resume", action="store_true",
                    help="continue the record file in --out (same settings): recorded steps "
                         "are not computed again")
    ip.add_argument("-q", "--quiet", action="store_true",
                    help="no progress bar and no printed summary")


def main(argv: list[str] | None = None) -> int:
    """Run the ``specdens`` command line; returns the exit status.

    Parameters
    ----------
    argv
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 2 for a usage error (one line on stderr), 1 when the computation
        fails.
    """
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        if args.command == "examples":
            status = _cmd_examples()
        elif args.command == "investigate":
            status = _cmd_investigate(args)
        else:
            status = _cmd_spectrum(args)
        sys.stdout.flush()  # (a closed pipe shows here, not at the interpreter's exit)
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def _stdout_closed() -> int:
    """The reader of stdout went away (``specdens ... | head -1``): exit quietly, as a
    command killed by SIGPIPE would (status 141), with stdout pointed at the null device
    so that the interpreter's final flush does not fail again with a traceback. The
    output files were written before the summary was printed."""
    import os
    import signal

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):  # (a stdout without a file descriptor)
        pass
    return 128 + int(getattr(signal, "SIGPIPE", 13))


def _make_out_dir(out_dir: Path) -> None:
    """Create the output directory (and its parents), or raise a :class:`UsageError`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"cannot create the output directory {out_dir}: a file of that name "
                         "exists; pass another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output directory {out_dir}: {exc}") from None


def _error(message: str) -> None:
    print(f"specdens: error: {' '.join(str(message).split())}", file=sys.stderr)


def _cmd_examples() -> int:
    from .examples import EXAMPLES

    width = max(len(name) for name in EXAMPLES)
    for name, factory in EXAMPLES.items():
        doc = (factory.__doc__ or "").strip().splitlines()[0].replace("``", "")
        print(f"{name:<{width}}  {doc}")
    return 0


def _cmd_investigate(args: argparse.Namespace) -> int:
    from .investigate import InvestigationConfig, load_backend, run_investigation

    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise UsageError("investigate needs scikit-learn for its data (the digits): pip "
                         "install scikit-learn") from None
    if args.backend == "tf" and "tensorflow" not in sys.modules:
        import os

        # TensorFlow's C++ start-up messages (CPU features, oneDNN) on stderr, unless the
        # user asked for them; errors are still shown.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        load_backend(args.backend)
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    try:
        config = InvestigationConfig(
            backend=args.backend, width=args.width, depth=args.depth, steps=args.steps,
            records=args.records, lanczos_steps=args.lanczos_steps, probes=args.probes,
            k=args.k, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            dtype=args.dtype, threads=args.threads)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _make_out_dir(args.out)
    try:
        result = run_investigation(config, args.out, resume=args.resume,
                                   progress=not args.quiet)
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:
        if args.resume:
            raise UsageError(str(exc)) from None
        raise
    except OSError as exc:
        raise UsageError(f"cannot write into {args.out}: {exc}") from None
    except FloatingPointError as exc:
        _error(f"the computation failed: {exc}")
        return EXIT_FAILURE
    for note in result.notes:
        print(f"specdens: note: {note}", file=sys.stderr)
    if not args.quiet:
        print(_investigate_summary(result))
    return 0


def _investigate_summary(result: Any) -> str:
    s = result.summary
    backend = s.get("backend", {}).get("name", "torch")
    lines = [f"specdens investigate ({backend}): {len(s['runs'])} runs in "
             f"{result.wall_time:.1f} s"]
    for name, r in s["runs"].items():
        m = r["median_after_step_0"]
        lines.append(f"  {name:<14} outliers {m['num_outliers']:.3g}, edge ratio "
                     f"{m['edge_ratio']:.3g}, concentration {m['concentration']:.3f} "
                     "(medians after step 0)")
    for key, v in s["verdicts"].items():
        lines.append(f"  {key:<21} {v['verdict']}")
    lines.append("  wrote             " + "\n                    ".join(
        str(v) for v in result.files.values()))
    return "\n".join(lines)


def _load_input(args: argparse.Namespace) -> tuple[Any, dict, str, Any, Any]:
    """The operator, a description of the input, the output stem, the exact spectrum
    (examples only) and the matrix read from the file (None for an example)."""
    from .examples import get_example
    from .matrix_io import MatrixFileError, describe_matrix, load_matrix
    from .operators import aslinearoperator

    if args.example is not None:
        if args.key is not None:
            raise UsageError("--key applies to .npz matrix files, not to --example")
        try:
            op = get_example(args.example, args.n, seed=args.seed)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        n = op.shape[0]
        info = {"kind": "example", "example": args.example, "n": n, "seed": args.seed,
                "description": getattr(op, "description", ""),
                "params": getattr(op, "params", {})}
        return op, info, f"{args.example}-n{n}", getattr(op, "eigenvalues", None), None
    if args.n is not None:
        raise UsageError("--n sets the size of an --example; a matrix file has its own size")
    path = Path(args.path)
    try:
        A = load_matrix(path, key=args.key)
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except (MatrixFileError, OSError) as exc:
        raise UsageError(str(exc)) from None
    resolved, key = _file_identity(path, args.key)
    info = {"kind": "file", "path": str(path), "resolved_path": resolved, "key": key,
            **describe_matrix(A)}
    stem = path.name
    for suffix in (".mtx.gz", ".npy", ".npz", ".mtx"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return aslinearoperator(A, symmetric=True), info, stem or "matrix", None, A


ARITHMETIC = "float64"
"""The dtype of the Lanczos arithmetic of ``spectrum``, whatever the matrix's dtype
(:func:`specdens.slq`'s default for NumPy and SciPy operators, passed explicitly)."""


def _overflow_message(A: Any) -> str | None:
    """Why a finite matrix ``A`` (as read from a file) made the computation overflow, or
    None when its scale cannot explain it.

    Two things overflow. The Lanczos vectors' norms are ``sqrt(w^T w)`` with ``||w|| <=
    ||A q|| <= ||A||_2 <= n max|a_ij|``, and the second moment averages squared Ritz
    values, which are at most ``||A||_2^2``: these squares are taken in the arithmetic's
    dtype (float64, :data:`ARITHMETIC`) and overflow only when ``||A||_2`` passes its
    ``sqrt(max)``, 1.3e154. The products ``A q`` are computed in the matrix's own dtype:
    for a float32 matrix they overflow once ``||A q||`` passes float32's ``max``, 3.4e38,
    long before the squares do. A finite matrix makes the engine see NaN or Inf only then,
    and it reports the operator; this names the scale instead.
    """
    import numpy as np
    import scipy.sparse

    values = A.data if scipy.sparse.issparse(A) else np.asarray(A)
    if values.size == 0:
        return None
    big = float(np.max(np.abs(values)))
    squares = float(np.sqrt(np.finfo(ARITHMETIC).max))
    products = float(np.finfo(A.dtype).max)
    limit = min(squares, products)
    if not (np.isfinite(big) and big * A.shape[0] >= limit):
        return None
    power = 10.0 ** math.floor(math.log10(big))
    if products < squares:
        what = (f"{A.dtype} products: the matrix-vector products, computed in the matrix's "
                f"dtype ({ARITHMETIC} is the Lanczos arithmetic's), overflow once ||A q|| "
                f"passes {limit:.1e}. Save the matrix as float64, or divide it")
    else:
        what = (f"{ARITHMETIC} arithmetic: squares (the Lanczos vectors' squared norms, the "
                f"second moment) overflow once ||A|| passes {limit:.1e}. Divide the matrix")
    return (f"the matrix's scale (largest entry {big:.1e}) is too large for {what} by a "
            f"power of ten (e.g. A / {power:.0e}) and multiply the spectrum back (eigenvalues, "
            f"bounds and outliers by {power:.0e}, moments tr(A^p)/n by {power:.0e}^p)")


def _check_stem(out_dir: Path, stem: str, info: dict) -> None:
    """Refuse to overwrite the outputs of another input named alike.

    The outputs are named after the input's stem, so ``a.npy``, ``a.npz`` and ``a.mtx``
    (or two ``--key`` arrays of one ``.npz``) would write the same ``a-*`` files. The
    input that wrote ``STEM-summary.json`` is recorded in it: running the same input again
    (the same file, by its resolved absolute path, and the same array read from it, or the
    same example and size) replaces its outputs, a different one is refused."""
    previous = out_dir / f"{stem}-summary.json"
    try:
        old = json.loads(previous.read_text()).get("input")
    except (OSError, ValueError, AttributeError):
        return  # (none, or not a summary that names its input)
    if not isinstance(old, dict) or _input_identity(old) == _input_identity(info):
        return
    what = (f"example {old.get('example')} (n = {old.get('n')})" if old.get("kind") == "example"
            else f"{old.get('resolved_path') or old.get('path')}"
            + (f" --key {old['key']}" if old.get("key") else ""))
    raise UsageError(f"{previous} holds the results of {what}, which this input would "
                     "overwrite (the outputs are named after the input's stem); pass another "
                     "--out, or remove that input's files first")


def _file_identity(path: Path, key: str | None) -> tuple[str, str | None]:
    """The resolved absolute path of a matrix file and the key of the array actually read
    from it: ``key`` when given; for an ``.npz`` without one, its only array's name
    (``arr_0`` for ``numpy.savez(f, A)``), or None for a sparse matrix
    (``scipy.sparse.save_npz``, several arrays); None for other files."""
    import zipfile

    resolved = str(Path(path).resolve())
    if key is not None or not str(path).lower().endswith(".npz"):
        return resolved, key
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = [m.filename[:-4] for m in archive.infolist()
                      if m.filename.endswith(".npy")]
    except (OSError, zipfile.BadZipFile):
        return resolved, None
    return resolved, (arrays[0] if len(arrays) == 1 else None)


def _input_identity(info: dict) -> tuple:
    if info.get("kind") == "example":
        return ("example", info.get("example"), info.get("n"))
    if "resolved_path" in info:
        return ("file", info.get("resolved_path"), info.get("key"))
    # (a summary written before it recorded the resolved path: resolved from here)
    return ("file", *_file_identity(Path(str(info.get("path", ""))), info.get("key")))


def _cmd_spectrum(args: argparse.Namespace) -> int:
    import numpy as np

    from . import __version__, _json
    from .algorithms.lanczos import ScaleError
    from .algorithms.slq import slq
    from .summary import summarize

    t_start = time.perf_counter()
    if args.no_plot:
        given = [name for name, value in (("--sigma", args.sigma), ("--kernel", args.kernel),
                                          ("--format", args.plot_format),
                                          ("--linear", args.linear or None))
                 if value is not None]
        if given:
            names = " and ".join([", ".join(given[:-1]), given[-1]] if len(given) > 1
                                 else given)
            raise UsageError(f"{names} set{'s' if len(given) == 1 else ''} the "
                             "plot, which --no-plot leaves out; drop "
                             f"{'it' if len(given) == 1 else 'them'} or --no-plot")
    kernel = args.kernel or "gaussian"
    plot_format = args.plot_format or "png"
    op, info, stem, exact, matrix = _load_input(args)
    out_dir: Path = args.out
    _make_out_dir(out_dir)
    _check_stem(out_dir, stem, info)
    t_loaded = time.perf_counter()

    try:
        # (numpy's overflow warnings are not shown: an overflow gives NaN or Inf, which
        # specdens refuses with the error below, so that the failure is one line)
        with np.errstate(over="ignore", invalid="ignore"):
            density = slq(op, num_steps=args.steps, num_probes=args.probes, seed=args.seed,
                          reorth=args.reorth, probes=args.probe_kind, dtype=ARITHMETIC,
                          progress=not args.quiet)
            t_slq = time.perf_counter()
            density = dataclasses.replace(density, extra={**density.extra, "input": info})
            # before any file is written: the second moment of a matrix near the overflow
            # scale overflows here (tr(A^2)/n > 1.8e308) after the run itself went through
            summary = summarize(density)
    except (FloatingPointError, MemoryError, ScaleError) as exc:
        # (ScaleError: a valid matrix whose scale the arithmetic cannot resolve, entries
        # ~1e-300, is a failure of the computation on this input; so is one whose squares
        # overflow, entries ~1e160, which the engine reports as a ScaleError of the
        # operator (or, in the summary's moments, NaN or Inf): for a finite matrix read from
        # a file it is named as a scale problem of the matrix, with the power of ten to use)
        why = (_overflow_message(matrix)
               if isinstance(exc, (FloatingPointError, ScaleError)) and matrix is not None
               else None)
        _error(f"the computation failed: {why or exc}")
        return EXIT_FAILURE

    files: dict[str, Path] = {}
    plot_note = None
    if not args.no_plot:
        if args.sigma is not None:
            _check_sigma(args.sigma, density)
        plot_path = out_dir / f"{stem}-density.{plot_format}"
        try:
            _write_plot(density, plot_path, args, exact, title=_title(info, density),
                        kernel=kernel, plot_format=plot_format)
            files["plot"] = plot_path
        except ImportError as exc:
            plot_note = f"plot skipped: {exc}"
        except OSError as exc:
            raise UsageError(f"cannot write into {out_dir}: {exc}") from None
    files["result"] = out_dir / f"{stem}-slq.npz"
    files["summary"] = out_dir / f"{stem}-summary.json"
    t_plot = time.perf_counter()

    summary["input"] = info
    summary["settings"] = {
        "steps": args.steps, "probes": args.probes, "seed": args.seed,
        "reorth_requested": args.reorth, "reorth": density.reorth,
        "probe_kind": args.probe_kind, "kernel": kernel,
        "sigma": args.sigma if args.sigma is not None else summary["sigma"],
    }
    if exact is not None:
        summary["exact"] = _exact_comparison(density, np.asarray(exact))
    try:
        density.save(files["result"])
        summary["timings"].update({
            "load_s": t_loaded - t_start, "slq_s": t_slq - t_loaded, "plot_s": t_plot - t_slq,
            "total_s": time.perf_counter() - t_start,
        })
        summary["files"] = {k: str(v) for k, v in files.items()}
        summary["specdens_version"] = __version__
        files["summary"].write_text(json.dumps(_json.plain(summary, where="the summary"),
                                               indent=2, allow_nan=False)
                                    + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write into {out_dir}: {exc}") from None
    if not args.quiet:
        print(_human_summary(summary, density))
    if plot_note:
        print(f"specdens: note: {plot_note}", file=sys.stderr)
    return 0


SIGMA_RESOLUTION = 64
"""``--sigma`` must lie within ``[R eps s, s / (R eps)]`` for the spectrum's scale ``s``
(the largest Ritz value in magnitude, 1 for a zero spectrum), ``R`` this factor and ``eps``
float64's: see :func:`_check_sigma`."""


def _sigma_bounds(density: Any) -> tuple[float, float, float]:
    """The widths ``--sigma`` accepts for ``density``, and the spectrum's scale (0 for a
    zero spectrum)."""
    import numpy as np

    loc = density.atoms()[0]
    scale = float(np.max(np.abs(loc))) if loc.size else 0.0
    unit = scale if scale > 0 else 1.0
    resolution = SIGMA_RESOLUTION * float(np.finfo(np.float64).eps)
    return resolution * unit, unit / resolution, scale


def _two_digits(x: float, up: bool) -> str:
    """``x`` to two significant digits, rounded up or down (so that the printed bounds
    are inside the accepted range)."""
    from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

    d = Decimal(repr(x))
    r = d.quantize(Decimal(1).scaleb(d.adjusted() - 1),
                   rounding=ROUND_CEILING if up else ROUND_FLOOR)
    return f"{float(r):.2g}"


def _check_sigma(sigma: float, density: Any) -> None:
    """Refuse a kernel width the plot cannot draw, relative to the spectrum's scale ``s``.

    Below ``64 eps s`` (the rounding of the Ritz values, the resolution that
    :meth:`specdens.SpectralDensity.default_sigma` uses too) the grid points around a Ritz
    value round to the value itself: the kernel is not resolved and its squared distances
    overflow. Above ``s / (64 eps)`` the plotted range (5 widths on either side) rounds the
    whole spectrum to one point: the plot is a single kernel, and near 1e308 the range
    itself overflows. In between every intermediate of the plot is a normal float64."""
    low, high, scale = _sigma_bounds(density)
    if not low <= sigma <= high:
        what = "narrower than the rounding of" if sigma < low else "too wide to resolve"
        spectrum = (f"this spectrum (Ritz values up to {scale:.3g} in magnitude)" if scale
                    else "a zero spectrum (taken at scale 1)")
        raise UsageError(
            f"--sigma {sigma:.3g} is {what} {spectrum} for a float64 plot; use a width "
            f"between {_two_digits(low, up=True)} and {_two_digits(high, up=False)}, or leave "
            "--sigma out for the default width (SpectralDensity.default_sigma)")


def _title(info: dict, density: Any) -> str:
    what = info.get("example") or Path(info.get("path", "matrix")).name
    return (f"{what}: n = {density.n}, {density.num_steps} steps x {density.num_probes} probes, "
            f"reorth {density.reorth}")


def _write_plot(density: Any, path: Path, args: argparse.Namespace, exact: Any,
                title: str, kernel: str, plot_format: str) -> None:
    from .plotting import plot_density, require_matplotlib

    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plot_density(density, ax, log_density=not args.linear, sigma=args.sigma,
                 kernel=kernel, reference=exact, mark_outliers=True,
                 color="tab:blue", label="SLQ")
    ax.set_title(title, fontsize="medium")
    fig.savefig(path, format=plot_format, dpi=150)


def _exact_comparison(density: Any, eigenvalues: Any) -> dict:
    """Errors against the known spectrum of an example."""
    import numpy as np
    from scipy.stats import wasserstein_distance

    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    loc, mass = density.atoms()
    spread = float(lam[-1] - lam[0])
    w1 = float(wasserstein_distance(loc, lam, mass, None))
    out = {
        "min": float(lam[0]), "max": float(lam[-1]),
        "negative_fraction": float(np.mean(lam < 0)),
        "moments": {"1": float(np.mean(lam)), "2": float(np.mean(lam * lam))},
        "wasserstein1": w1,
        "wasserstein1_over_range": w1 / spread if spread > 0 else None,
    }
    return out


def _pm(est: dict, fmt: str = ".6g") -> str:
    value, err = est.get("value"), est.get("stderr")
    if value is None:
        return "n/a"
    return f"{value:{fmt}}" + (f" +/- {err:.2g}" if err is not None else "")


def _human_summary(summary: dict, density: Any) -> str:
    inp = summary["input"]
    what = (f"example {inp['example']}" if inp["kind"] == "example"
            else f"{inp['path']} ({inp['storage']}, {inp['dtype']})")
    r = summary["range"]
    neg = summary["negative_fraction"]
    neg_txt = f"{100 * neg['value']:.2f}%" + (
        f" +/- {100 * neg['stderr']:.2f}%" if neg["stderr"] is not None else "")
    outl = summary["outliers"]
    by_size = sorted(outl, key=lambda o: -abs(o["value"]))
    shown = ", ".join(f"{o['value']:.6g}" for o in by_size[:12])
    if len(outl) > 12:
        shown += ", ..."
    t = summary["timings"]
    lines = [
        f"specdens {what}: n = {summary['n']}, {summary['steps']} steps x {summary['probes']} "
        f"probes, reorth {summary['reorth']}",
        f"  eigenvalue range  [{r['min']:.6g}, {r['max']:.6g}]  (residuals "
        f"{r['min_residual']:.1e}, {r['max_residual']:.1e})",
        f"  negative          {neg_txt}",
        f"  trace / n         {_pm(summary['moments']['1'])}",
        f"  tr(A^2) / n       {_pm(summary['moments']['2'])}",
        f"  outliers          {len(outl)}" + (f": {shown}" if outl else ""),
    ]
    if "exact" in summary and summary["exact"].get("wasserstein1_over_range") is not None:
        lines.append(f"  exact spectrum    W1 / range = "
                     f"{summary['exact']['wasserstein1_over_range']:.2e}")
    lines.append(f"  time              {t['slq_s']:.2f} s for {summary['matvecs']} matvecs "
                 f"({t['total_s']:.2f} s in all)")
    files = summary.get("files", {})
    lines.append("  wrote             " + "\n                    ".join(files.values()))
    return "\n".join(lines)
