"""``specdens investigate``: the paper's BatchNorm experiment, scaled down to run in minutes.

Ghorbani, Krishnan & Xiao (2019) follow the Hessian spectrum through training and find
that (1) without BatchNorm large isolated eigenvalues appear early, (2) the gradient
concentrates in their eigenspace, (3) with BatchNorm (batch statistics) both effects
almost vanish, and (4) with BatchNorm normalising by population statistics they come back
and training is much slower. :func:`run_investigation` repeats that on scikit-learn's
digits (shipped with scikit-learn, no download): the same MLP trained three ways,

``no-bn``
    Linear-ReLU layers without normalisation.
``bn-batch``
    Linear-BatchNorm-ReLU layers, normalising by the statistics of each mini-batch in
    training (the usual BatchNorm); its Hessian is taken with batch statistics over fixed
    batches of the training batch size (as in the paper; a last batch of one sample is
    merged into the one before it: :func:`hessian_batches`).
``bn-population``
    The same layers normalising by population statistics in training: before each step
    the running averages are updated from the mini-batch (PyTorch's momentum 0.1), then
    the loss normalises by them, as constants (no gradient flows through them); its
    Hessian is taken with the same running statistics.

It records the spectrum at log-spaced steps with :class:`specdens.tracker.SpectrumTracker`
(SLQ density, top-``k`` eigenvalues with ``k`` the number of classes, gradient
concentration, outliers, bulk edge, negative mass, loss and accuracy), and writes into
the output folder the record file, the figures, ``summary.json`` and ``report.md``: the
measured numbers and, for each finding, whether it reproduced by criteria fixed before
the run (:data:`CRITERIA`).

The setup is chosen from the paper, not tuned to its results: SGD with momentum 0.9,
learning rate 0.1, batch size 128 and weight decay 2e-4 (its ResNet recipe, weight decay
included in the Hessian), default PyTorch initialisation, inputs standardised per pixel
on the training split, float64 throughout (the products and the Lanczos arithmetic).

Backends. The study runs on PyTorch (``specdens._investigate_torch``), JAX
(``specdens._investigate_jax``) or TensorFlow/Keras (``specdens._investigate_tf``), each
with the backend's own Hessian, gradient and records
(:mod:`specdens.backends.torch`, :mod:`specdens.backends.jax`,
:mod:`specdens.backends.tf`). The three mean the same thing: the same architecture,
data split, SGD of PyTorch's semantics (momentum buffer, weight decay added to the
gradient), BatchNorm of PyTorch's semantics (epsilon 1e-5; running averages with
momentum 0.1 and the unbiased batch variance), the ``bn-batch`` Hessian's batches
(:func:`hessian_batches`), record schedule and record contents. They
differ in their random draws: torch initialises and orders the batches with torch's
generator; JAX and TensorFlow draw the same distributions (PyTorch's default
initialisation) with numpy, so that those two start from the same weights and see the
same batches. ``initial_weights`` puts any backend at given weights (to compare
backends at one point).

The frameworks (and matplotlib, for the figures) are imported when the investigation
runs, not when this module is imported.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import numbers
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _checks
from ._json import plain
from ._progress import ProgressBar
from .tracker import (
    SpectrumRecord,
    SpectrumTracker,
    TrackerFileError,
    TrackerFileWarning,
    log_spaced_steps,
    read_records,
)

__all__ = [
    "BACKENDS",
    "BATCHNORM_EPS",
    "BATCHNORM_MOMENTUM",
    "CRITERIA",
    "RUNS",
    "InvestigationConfig",
    "InvestigationResult",
    "hessian_batches",
    "load_backend",
    "run_investigation",
    "sample_order",
    "torch_default_weights",
]

BACKENDS = ("torch", "jax", "tf")
"""Backends the investigation runs on."""

_FRAMEWORKS = {"torch": ("torch", "torch", "specdens[torch]"),
               "jax": ("jax", "JAX", "specdens[jax]"),
               "tf": ("tensorflow", "TensorFlow (with Keras 3)", "specdens[tf]")}

RUNS = ("no-bn", "bn-batch", "bn-population")
"""The three trainings, in the order they run."""

CLASSES = 10
"""Classes of the digits, the outputs of the MLP."""

TRAIN_SAMPLES = 1536
"""Training samples of the digits split (:func:`_digits`; the other 261 are the test
split): the largest batch size."""

MAX_SEED = 2**64 - 1
"""The largest seed (torch's generators take 64-bit seeds)."""

BATCHNORM_EPS = 1e-5
"""BatchNorm's epsilon (PyTorch's default), on every backend."""
BATCHNORM_MOMENTUM = 0.1
"""Weight of the new batch in BatchNorm's running averages (PyTorch's convention), on
every backend; the running variance is updated with the unbiased batch variance."""

RECORD_FILE = "records.jsonl"
FIGURES = {
    "densities": "densities.png",
    "heatmap": "density_heatmap.png",
    "top_eigenvalues": "top_eigenvalues.png",
    "concentration": "gradient_concentration.png",
    "loss": "loss.png",
}
REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"

CRITERIA = {
    "outliers_early": (
        "without BatchNorm, at least one outlier (by the rule of specdens.summary) at the "
        "first recorded step >= 1 that is at most a tenth of the training, and in at least "
        "75% of the records from then on"),
    "concentration": (
        "without BatchNorm, the median over records (step >= 1) of ||P_k g||^2 / ||g||^2 "
        "is at least 0.5"),
    "batchnorm_suppresses": (
        "with BatchNorm (batch statistics), over records with step >= 1: median outlier "
        "count at most half, median ratio of the top eigenvalue to the bulk edge at most a "
        "third, and median gradient concentration at most half of those without "
        "BatchNorm (all three: reproduces; one or two: partly); the outlier count is not "
        "met when there are no outliers without BatchNorm (nothing to suppress)"),
    "population_returns": (
        "with BatchNorm on population statistics, over records with step >= 1: median "
        "outlier count at least twice and median edge ratio at least three times those "
        "with batch statistics (outliers return), and the training loss at the last "
        "recorded step at least twice that with batch statistics (slower training)"),
}
"""The criteria the report applies to decide whether each finding reproduced. They were
written before the default run and are not adjusted to its outcome."""


@dataclass(frozen=True)
class InvestigationConfig:
    """Settings of :func:`run_investigation` (the defaults are the command line's).

    Integer settings may be numpy integers; they are stored as Python ints.

    Attributes
    ----------
    backend : str
        ``"torch"``, ``"jax"`` or ``"tf"`` (TensorFlow with Keras 3): the framework of the
        model, the training and the Hessian products.
    width, depth : int
        Hidden layer width and number of hidden layers of the MLP (64 -> width ... ->
        10); the defaults give 8,970 parameters without BatchNorm (9,226 with).
    steps : int
        Training steps (mini-batches) per run.
    records : int
        Recorded steps: 0, then ``records - 1`` log-spaced steps up to ``steps``.
    lanczos_steps, probes : int
        SLQ settings (Lanczos steps per probe, probes).
    k : int
        Top eigenvalues and the dimension of the gradient's projection (the number of
        classes, 10); smaller than the number of parameters of every run
        (:meth:`parameters`).
    batch_size, lr, momentum, weight_decay : number
        SGD settings; the weight decay term is part of the Hessian and the gradient.
        ``batch_size`` is at most the number of training samples
        (:data:`TRAIN_SAMPLES`, 1536: an epoch is cut into full batches, the incomplete
        last one dropped) and at least 2 when a BatchNorm run is trained (a BatchNorm
        training step needs two samples); the ``bn-batch`` Hessian's batches are
        ``batch_size`` consecutive training samples, a last batch of one sample being
        merged into the one before it (see :func:`hessian_batches`).
    seed : int
        Seeds the data split, the initialisation (the same for the three runs), the
        batch order and the probes; at most ``2**64 - 1`` (:data:`MAX_SEED`).
    dtype : str
        ``"float64"`` or ``"float32"`` for the model, the data and the products (JAX:
        float64 inside a ``jax.enable_x64`` scope around the investigation only).
    runs : tuple of str
        Which of :data:`RUNS` to train.
    threads : int
        torch's intra-op threads during the investigation (restored afterwards). One is
        fastest for these small matrices, where threads mostly wait on each other, and
        leaves the other cores free; on a loaded machine two threads were 10 to 40 times
        slower than one. JAX and TensorFlow keep their own thread pools (they are fixed
        when the framework starts: ``XLA_FLAGS``, ``TF_NUM_INTRAOP_THREADS``), so it does
        not apply to them.
    """

    backend: str = "torch"
    width: int = 64
    depth: int = 2
    steps: int = 1024
    records: int = 10
    lanczos_steps: int = 80
    probes: int = 3
    k: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    seed: int = 0
    dtype: str = "float64"
    runs: tuple = RUNS
    threads: int = 1

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}; choose one of {', '.join(BACKENDS)}")
        # Stored as Python ints (a numpy integer is accepted and converted): torch's
        # generators and the JSON header take those only.
        for name in ("width", "depth", "steps", "records", "lanczos_steps", "probes", "k",
                     "batch_size", "threads"):
            object.__setattr__(self, name, _checks.positive_int(getattr(self, name), name))
        seed = _checks.nonnegative_int(self.seed, "seed")
        if seed > MAX_SEED:
            raise ValueError(f"seed must be at most 2**64 - 1 = {MAX_SEED} (torch's "
                             f"generators take 64-bit seeds); got {seed}")
        object.__setattr__(self, "seed", seed)
        for name in ("lr", "momentum", "weight_decay"):
            v = getattr(self, name)
            # (numpy scalars too, stored as Python floats for the JSON header)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must be a real number; got {v!r}")
            v = float(v)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0; got {v!r}")
            object.__setattr__(self, name, v)
        if not self.lr > 0:
            raise ValueError(f"lr must be positive; got {self.lr}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype={self.dtype!r}; choose 'float32' or 'float64'")
        runs = tuple(self.runs)
        if not runs or any(r not in RUNS for r in runs) or len(set(runs)) != len(runs):
            raise ValueError(f"runs={self.runs!r}; choose distinct names among "
                             f"{', '.join(RUNS)}")
        object.__setattr__(self, "runs", runs)
        if self.batch_size > TRAIN_SAMPLES:
            raise ValueError(f"batch_size={self.batch_size} is larger than the training "
                             f"set ({TRAIN_SAMPLES} samples): an epoch is cut into full "
                             f"batches, so no batch could be drawn; choose at most "
                             f"{TRAIN_SAMPLES}")
        if self.batch_size < 2 and any(r != "no-bn" for r in runs):
            raise ValueError("batch_size must be at least 2 for the BatchNorm runs: a "
                             "BatchNorm training step normalises by the statistics of its "
                             "batch, which one sample does not have")
        n, run = min((self.parameters(r), r) for r in runs)
        if self.k >= n:
            raise ValueError(f"k={self.k} must be smaller than the number of parameters "
                             f"(the Hessian's size): run {run} has {n} (width {self.width}, "
                             f"depth {self.depth}); choose a smaller k or a wider or deeper "
                             "MLP")

    def parameters(self, run: str) -> int:
        """The number of parameters of ``run``'s MLP (the size of its Hessian): the
        linear layers' weights and biases, and with BatchNorm a scale and a shift per
        hidden unit."""
        if run not in RUNS:
            raise ValueError(f"run={run!r}; choose one of {', '.join(RUNS)}")
        n = sum(n_out * n_in + n_out for n_out, n_in in _layer_shapes(self, CLASSES))
        return n + (2 * self.width * self.depth if run != "no-bn" else 0)

    def schedule(self) -> list[int]:
        """The recorded steps."""
        return log_spaced_steps(self.steps, self.records)

    def meta(self) -> dict:
        """The settings as JSON values (the record file's header)."""
        d = asdict(self)
        d["runs"] = list(self.runs)
        return d


@dataclass(frozen=True)
class InvestigationResult:
    """What :func:`run_investigation` wrote and measured.

    Attributes
    ----------
    out_dir : Path
    files : dict
        Paths by role: ``records``, ``report``, ``summary`` and one per figure (figures are
        missing when matplotlib is not installed, and a figure matplotlib cannot draw,
        e.g. a log axis of a diverged run's values, is skipped: ``notes`` says so).
    summary : dict
        The numbers of ``summary.json`` (per run and per recorded step, and the verdicts).
    wall_time : float
        Seconds for the whole investigation.
    notes : tuple of str
        Warnings for the reader (a skipped figure, a diverged run).
    """

    out_dir: Path
    files: dict
    summary: dict
    wall_time: float
    notes: tuple = field(default_factory=tuple)


# -- data and initial weights -----------------------------------------------------------
def _digits(seed: int) -> dict:
    """scikit-learn's digits, split with ``seed`` into 1536 training and 261 test samples,
    standardised per pixel with the training split's mean and standard deviation
    (constant pixels are only centred)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = np.asarray(d.data, dtype=np.float64)
    y = np.asarray(d.target, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, te = perm[:TRAIN_SAMPLES], perm[TRAIN_SAMPLES:]
    mean = X[tr].mean(axis=0)
    std = X[tr].std(axis=0)
    std[std == 0] = 1.0
    Z = (X - mean) / std
    return {"x_train": Z[tr], "y_train": y[tr], "x_test": Z[te], "y_test": y[te],
            "classes": int(y.max()) + 1}


def _layer_shapes(config: InvestigationConfig, classes: int) -> list[tuple[int, int]]:
    """``(out, in)`` of every linear layer of the MLP."""
    dims = [64] + [config.width] * config.depth + [classes]
    return [(dims[i + 1], dims[i]) for i in range(len(dims) - 1)]


def torch_default_weights(config: InvestigationConfig, classes: int = 10
                          ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Initial weights of the MLP's linear layers, drawn with numpy from PyTorch's default
    distribution: weight and bias uniform on ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``
    (``torch.nn.Linear``'s ``kaiming_uniform_(a=sqrt(5))`` and bias rule).

    The JAX and TensorFlow investigations start from these; torch's own draws come from
    torch's generator, so its numbers differ.

    Parameters
    ----------
    config
        The settings (``width``, ``depth``, ``seed``).
    classes
        Outputs of the last layer.

    Returns
    -------
    list of (numpy.ndarray, numpy.ndarray)
        ``(W, b)`` per linear layer in PyTorch's layout: ``W`` of shape ``(out, in)``,
        float64.
    """
    rng = np.random.default_rng([config.seed, 1])  # a stream apart from the split's
    out = []
    for n_out, n_in in _layer_shapes(config, classes):
        bound = 1.0 / math.sqrt(n_in)
        W = rng.uniform(-bound, bound, size=(n_out, n_in))
        b = rng.uniform(-bound, bound, size=n_out)
        out.append((W, b))
    return out


def hessian_batches(n_train: int, batch_size: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` of the fixed batches of the ``bn-batch`` run's Hessian, on
    every backend: consecutive training samples, ``batch_size`` at a time; a last batch of
    one sample (``n_train % batch_size == 1``) is merged into the one before it, since
    BatchNorm's batch statistics need two samples (other remainders stay a smaller last
    batch).

    >>> hessian_batches(11, 5)
    [(0, 5), (5, 11)]
    >>> hessian_batches(12, 5)
    [(0, 5), (5, 10), (10, 12)]
    """
    n_train = _checks.positive_int(n_train, "n_train")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    out = [(i, min(i + batch_size, n_train)) for i in range(0, n_train, batch_size)]
    if len(out) > 1 and out[-1][1] - out[-1][0] == 1:
        out[-2:] = [(out[-2][0], n_train)]
    return out


def sample_order(seed: int) -> np.random.Generator:
    """The generator of the JAX and TensorFlow batch orders (one permutation per epoch):
    a stream apart from the data split's and the initialisation's."""
    return np.random.default_rng([seed, 2])


def _check_weights(weights: Any, config: InvestigationConfig, classes: int
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``initial_weights`` as float64 ``(W, b)`` pairs of the MLP's shapes."""
    shapes = _layer_shapes(config, classes)
    expected = ", ".join(f"({o}, {i}) and ({o},)" for o, i in shapes)
    if not isinstance(weights, (list, tuple)) or len(weights) != len(shapes):
        raise ValueError(f"initial_weights must be a list of {len(shapes)} (weight, bias) "
                         f"pairs, one per linear layer, of shapes {expected}")
    out = []
    for j, ((n_out, n_in), pair) in enumerate(zip(shapes, weights, strict=True)):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"initial_weights[{j}] must be a (weight, bias) pair")
        W = np.array(pair[0], dtype=np.float64, copy=True)
        b = np.array(pair[1], dtype=np.float64, copy=True)
        if W.shape != (n_out, n_in) or b.shape != (n_out,):
            raise ValueError(f"initial_weights[{j}] has shapes {W.shape} and {b.shape}; "
                             f"layer {j} needs ({n_out}, {n_in}) (PyTorch's (out, in) "
                             f"layout) and ({n_out},)")
        if not (np.isfinite(W).all() and np.isfinite(b).all()):
            raise ValueError(f"initial_weights[{j}] has NaN or Inf entries")
        out.append((W, b))
    return out


def _fingerprint(weights: list[tuple[np.ndarray, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for W, b in weights:
        h.update(np.ascontiguousarray(W).tobytes())
        h.update(np.ascontiguousarray(b).tobytes())
    return "sha256:" + h.hexdigest()[:16]


# -- backends ---------------------------------------------------------------------------
def load_backend(backend: str) -> Any:
    """The training module of ``backend`` (``specdens._investigate_<backend>``), which
    imports the framework.

    Parameters
    ----------
    backend
        One of :data:`BACKENDS`.

    Returns
    -------
    module
        With ``Run``, ``session``, ``versions`` and the setup's descriptions.

    Raises
    ------
    ImportError
        When the framework is not installed or not usable (one line saying what to
        install or set).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {', '.join(BACKENDS)}")
    module, label, extra = _FRAMEWORKS[backend]
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"investigate --backend {backend} needs {label}: pip install "
                          f"'{extra}'")
    try:
        return importlib.import_module(f"specdens._investigate_{backend}")
    except ImportError as exc:
        hint = f"; pip install '{extra}'" if exc.name else ""  # a missing module
        raise ImportError(f"investigate --backend {backend} cannot start {label}: "
                          f"{exc}{hint}") from exc


# -- the investigation ------------------------------------------------------------------
def run_investigation(config: InvestigationConfig, out_dir: str | Path, *,
                      resume: bool = False, progress: bool | Callable = True,
                      figures: bool = True, initial_weights: Any = None
                      ) -> InvestigationResult:
    """Train the three networks, record their spectra, write figures and the report.

    Parameters
    ----------
    config
        The settings (``config.backend`` picks the framework).
    out_dir
        Output folder (created). It holds ``records.jsonl``, the figures,
        ``summary.json`` and ``report.md``.
    resume
        Continue an existing record file of the same settings (steps already recorded
        are not computed again; the training is replayed, deterministically, to reach
        the later ones). Without it an existing record file is an error. A record file
        without records (left by a run that failed before its first record) counts as
        absent either way: it is replaced.
    progress
        ``True`` for a progress bar on stderr (shown on runs longer than 2 s), or a
        callable ``(done, total)`` counting recorded steps.
    figures
        Draw the figures (needs matplotlib). A figure that cannot be drawn is skipped
        with a note in the summary and the report, and values outside
        :data:`LOG_AXIS_RANGE` (a diverged run's loss, say) are left out of the log axes
        of ``loss.png``, also with a note: the summary and the report are always
        written.
    initial_weights
        ``[(W, b), ...]``, one pair per linear layer in PyTorch's layout (``W`` of shape
        ``(out, in)``), to start every run from (BatchNorm parameters start at 1 and 0);
        default: torch's own initialisation on torch, :func:`torch_default_weights` on
        JAX and TensorFlow. With the same weights the backends' first records agree to
        rounding. A fingerprint of them is stored in the record file's header.

    Returns
    -------
    InvestigationResult

    Raises
    ------
    FileExistsError
        When ``out_dir`` holds a record file with records and ``resume`` is False.
    ValueError
        For a record file of other settings (with ``resume``), or initial weights of
        other shapes. (Settings that cannot run, such as ``k`` not below the number of
        parameters, are refused earlier, by :class:`InvestigationConfig`.)
    ImportError
        When the backend's framework is missing (:func:`load_backend`).
    """
    if not isinstance(config, InvestigationConfig):
        raise TypeError(f"config must be an InvestigationConfig; got {type(config).__name__}")
    t0 = time.perf_counter()
    # (the arguments are checked before the output folder is made or touched)
    tick: Callable | None
    if progress is True:
        tick = ProgressBar("investigate")
    elif progress is False or progress is None:
        tick = None
    elif callable(progress):
        tick = progress
    else:
        raise TypeError("progress must be True, False or a callable(done, total)")
    data = _digits(config.seed)
    meta = config.meta()
    weights = None
    if initial_weights is not None:
        weights = _check_weights(initial_weights, config, data["classes"])
        meta["initial_weights"] = _fingerprint(weights)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir={str(out)!r} is a file; the investigation writes "
                                 "a folder of outputs: choose a folder's path")
    out.mkdir(parents=True, exist_ok=True)
    rec_path = out / RECORD_FILE
    if rec_path.exists() and not _holds_records(rec_path):
        # A record file without records (left by a run that failed before its first
        # record): nothing to continue or to lose, so start afresh, with these settings.
        rec_path.unlink()
    if rec_path.exists() and not resume:
        raise FileExistsError(f"{rec_path} exists; pass resume=True (--resume) to continue it, "
                              "or choose another output folder")
    trainer = load_backend(config.backend)
    backend_info = {"name": config.backend, "batchnorm": trainer.BATCHNORM_TEXT,
                    "initialisation": (trainer.INIT_TEXT if weights is None else
                                       f"given by the caller ({meta['initial_weights']})"),
                    "batch_order": trainer.ORDER_TEXT, "versions": trainer.versions()}
    if weights is None and config.backend != "torch":
        weights = torch_default_weights(config, data["classes"])
    schedule = config.schedule()
    total = len(schedule) * len(config.runs)
    done = 0
    notes: list[str] = []
    run_info: dict[str, dict] = {}
    with trainer.session(config) as env:
        for name in config.runs:
            t_run = time.perf_counter()
            tracker = SpectrumTracker(rec_path, run=name, steps=schedule, k=config.k,
                                      which="LA", num_steps=config.lanczos_steps,
                                      num_probes=config.probes, seed=config.seed, meta=meta,
                                      progress=False)
            run = trainer.Run(name, config, data, weights)
            info, done = _train_run(run, config, tracker, schedule, tick, done, total)
            info["wall_time"] = time.perf_counter() - t_run
            run_info[name] = info
            if info.get("diverged_at") is not None:
                notes.append(f"run {name} diverged (non-finite loss or parameters) at "
                             f"step {info['diverged_at']}; nothing after its last finite "
                             "state was recorded")
    if tick is not None:
        tick(total, total)
    records = read_records(rec_path)
    t_train = time.perf_counter() - t0
    files = {"records": rec_path}
    if figures:
        try:
            drawn, figure_notes = _write_figures(records, out, config.runs)
        except ImportError as exc:
            notes.append(f"figures skipped: {exc}")
        else:
            files.update(drawn)
            notes += figure_notes
    summary = summarize_runs(records, config, run_info)
    wall = time.perf_counter() - t0
    summary["backend"] = backend_info
    summary["timings"] = {"total_s": wall, "train_and_record_s": t_train,
                          "per_run_s": {n: run_info[n]["wall_time"] for n in config.runs}}
    summary["environment"] = {"python": platform.python_version(),
                              "backend": config.backend, **trainer.versions(), **env,
                              "machine": platform.machine()}
    summary["notes"] = notes
    files["summary"] = out / SUMMARY_FILE
    files["report"] = out / REPORT_FILE
    files["summary"].write_text(json.dumps(plain(summary, where="the summary"), indent=2,
                                           allow_nan=False)
                                + "\n")
    files["report"].write_text(render_report(summary, files))
    return InvestigationResult(out_dir=out, files=files, summary=summary, wall_time=wall,
                               notes=tuple(notes))


def _holds_records(path: Path) -> bool:
    """Whether the record file at ``path`` holds a record, or is not a readable tracker
    file (which is then not ours to remove): False for an empty file, a file holding only
    a (possibly torn) header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TrackerFileWarning)
            return bool(read_records(path))
    except (TrackerFileError, OSError):
        return True


def _train_run(run: Any, config: InvestigationConfig, tracker: SpectrumTracker,
               schedule: list[int], tick: Callable | None, done: int, total: int
               ) -> tuple[dict, int]:
    """Train one of the three networks (``run``: a backend's ``Run``) and record its
    spectrum at the scheduled steps.

    Every backend goes through this loop: an epoch is a permutation of the training
    samples (``run.permutation()``) cut into full batches (the incomplete last one is
    dropped); step ``s`` is recorded before the ``s``-th update; a non-finite mini-batch
    loss stops the run, and so does a state that cannot be recorded (``run.finite()``
    False before a scheduled record: non-finite parameters, BatchNorm statistics or loss
    on the Hessian's data, after a last update that overflowed). Either way the run is
    noted as diverged at that step; the steps not recorded are counted as done for the
    progress. A FloatingPointError from a record of a finite state is not a divergence
    and propagates."""
    bs = config.batch_size
    n_train = run.n_train
    if bs > n_train:  # (InvestigationConfig refuses it for the digits already)
        raise ValueError(f"batch_size={bs} is larger than the training set ({n_train} "
                         "samples): no full batch can be drawn")
    order = run.permutation()
    pos = 0
    epoch = 0
    diverged_at = None
    unrecordable = False
    last_loss = float("nan")
    step = 0
    while True:
        if tracker.due(step):
            if not run.finite():
                # The last update overflowed (or the loss on the Hessian's data does):
                # nothing to record from here on.
                diverged_at = step
                unrecordable = True
                break
            run.record(tracker, step, {"epoch": epoch, "minibatch_loss": last_loss})
            done += 1
            if tick is not None:
                tick(done, total)
        if step >= config.steps:
            break
        if pos + bs > n_train:  # a new epoch: reshuffle, drop the incomplete batch
            order = run.permutation()
            pos = 0
            epoch += 1
        idx = order[pos:pos + bs]
        pos += bs
        last_loss = run.train_step(idx)
        if not math.isfinite(last_loss):
            diverged_at = step
            break
        step += 1
    if diverged_at is not None:
        # the steps after it, and the step itself when its record was the one refused
        done += sum(1 for s in schedule if s > diverged_at) + int(unrecordable)
        if tick is not None:
            tick(done, total)
    return {"parameters": run.parameters, "batchnorm": run.batchnorm,
            "hessian_batches": run.hessian_batches, "diverged_at": diverged_at}, done


# -- figures ------------------------------------------------------------------------------
LOG_AXIS_RANGE = (1e-100, 1e100)
"""Values a log axis of the figures shows: a diverged run's loss (1e276, say) is left out
of it, since matplotlib's log axis fails on spans near float64's range."""


def _write_figures(records: list[SpectrumRecord], out: Path, runs: tuple
                   ) -> tuple[dict, list[str]]:
    """Draw the figures into ``out``: ``({role: path}, notes)``. A figure matplotlib
    cannot draw (a ValueError or an arithmetic error, e.g. the overflow of a log axis
    spanning hundreds of decades) is skipped, with a note; values outside
    :data:`LOG_AXIS_RANGE` are left out of the log axes of ``loss.png``, with a note.
    Raises ImportError when matplotlib is missing."""
    from .plotting import plot_runs, plot_series, require_matplotlib

    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    present = [r for r in runs if any(rec.run == r for rec in records)]
    files: dict[str, Path] = {}
    notes: list[str] = []

    def draw(role: str, make: Callable[[], tuple[Any, list[str]]]) -> None:
        path = out / FIGURES[role]
        try:
            fig, fig_notes = make()
            fig.savefig(path, dpi=120)
        except (ValueError, ArithmeticError) as exc:
            path.unlink(missing_ok=True)  # no partial or stale figure under this name
            notes.append(f"figure {path.name} skipped: matplotlib could not draw it "
                         f"({type(exc).__name__}: {exc})")
        else:
            files[role] = path
            notes.extend(fig_notes)

    for view in ("densities", "heatmap", "top_eigenvalues", "concentration"):
        draw(view, lambda view=view: (plot_runs(records, view, runs=present), []))

    def loss_figure() -> tuple[Any, list[str]]:
        fig = Figure(figsize=(11, 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        left_out = {}
        for j, name in enumerate(("loss", "edge_ratio")):
            ax = plot_series(records, name, fig.add_subplot(1, 3, j + 1), runs=present,
                             yscale="log")
            left_out[name] = _leave_out_of_log_axis(ax)
        plot_series(records, "num_outliers", fig.add_subplot(1, 3, 3), runs=present)
        if not any(left_out.values()):
            return fig, []
        lo, hi = LOG_AXIS_RANGE
        return fig, [f"{FIGURES['loss']}: "
                     + ", ".join(f"{n} value(s) of the {name.replace('_', ' ')}"
                                 for name, n in left_out.items() if n)
                     + f" outside [{lo:.0e}, {hi:.0e}] (a diverged run) are left out of its "
                     "log axes; summary.json and the tables hold them"]

    draw("loss", loss_figure)
    return files, notes


def _leave_out_of_log_axis(ax: Any) -> int:
    """Blank the points of ``ax``'s curves outside :data:`LOG_AXIS_RANGE` (a gap in the
    curve) and rescale the axis; the number of points left out."""
    lo, hi = LOG_AXIS_RANGE
    count = 0
    for line in ax.get_lines():
        y = np.asarray(line.get_ydata(), dtype=np.float64)
        bad = np.isfinite(y) & (y > 0) & ((y < lo) | (y > hi))
        if bad.any():
            count += int(bad.sum())
            line.set_ydata(np.where(bad, np.nan, y))
    if count:
        ax.relim()
        ax.autoscale_view()
    return count


# -- numbers and verdicts -----------------------------------------------------------------
def _med(values: list[float]) -> float:
    """Median of the finite values (NaN when there are none): a NaN is never averaged in."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    return float(np.median(v)) if v.size else float("nan")


_MEDIAN_KEYS = ("num_outliers", "edge_ratio", "concentration", "negative_mass",
                "top_eigenvalue", "num_top_above")


def _paired(a: dict, b: dict, names: tuple[str, str]) -> tuple[dict, dict, dict, dict, str]:
    """Medians after step 0 and last rows of two runs over the steps both recorded, and a
    note saying so where that is not all of either run's steps.

    A run that diverged stops recording at its last finite step: comparing its "final"
    loss with the other run's at a later step counted the blow-up as slower training, and
    medians over different stretches of training compared different things."""
    own = [{r["step"] for r in run["records"] if r["step"] >= 1} for run in (a, b)]
    steps = own[0] & own[1]
    if not steps or own[0] == own[1]:
        return (a["median_after_step_0"], b["median_after_step_0"], a["final"], b["final"],
                "")
    rows = [[r for r in run["records"] if r["step"] in steps] for run in (a, b)]
    med = [{key: _med([r.get(key) for r in rs]) for key in _MEDIAN_KEYS} for rs in rows]
    diverged = [f"{name} diverged at step {run['diverged_at']}"
                for name, run in zip(names, (a, b), strict=True)
                if run.get("diverged_at") is not None]
    note = (f" (compared over the {len(steps)} step(s) after step 0 that both runs "
            f"recorded, up to step {max(steps)}"
            + (f"; {', '.join(diverged)}" if diverged else "") + ")")
    return med[0], med[1], rows[0][-1], rows[1][-1], note


def summarize_runs(records: list[SpectrumRecord], config: InvestigationConfig,
                   run_info: dict | None = None) -> dict:
    """The measured numbers per run and step, their medians over training, and the
    verdicts of :data:`CRITERIA`."""
    runs: dict[str, Any] = {}
    for name in config.runs:
        rs = sorted((r for r in records if r.run == name), key=lambda r: r.step)
        rows = []
        for r in rs:
            st, c = r.stats, r.concentration
            rows.append({
                "step": r.step, "loss": r.loss, "accuracy": r.accuracy,
                "test_accuracy": r.extra.get("test_accuracy"),
                "top_eigenvalue": r.top_eigenvalue,
                "top_eigenvalues": [float(v) for v in np.sort(r.eigenvalues)[::-1]],
                "bulk_edge": st.bulk.upper if st else float("nan"),
                "outlier_threshold": st.bulk.upper_threshold if st else float("nan"),
                "edge_ratio": st.edge_ratio if st else float("nan"),
                "num_outliers": st.num_outliers if st else None,
                "num_lower_outliers": st.num_lower_outliers if st else None,
                "num_top_above": st.num_top_above if st else None,
                "outliers": [o.value for o in st.outliers if o.side == "upper"] if st else [],
                "concentration": c.fraction if c else float("nan"),
                "concentration_error_estimate": c.error_estimate if c else float("nan"),
                "concentration_gap": c.gap if c else float("nan"),
                "eigsh_converged": c.converged if c else None,
                "negative_mass": st.negative_mass if st else float("nan"),
                "negative_mass_stderr": st.negative_mass_stderr if st else float("nan"),
                "negative_mass_bounds": list(st.negative_mass_bounds) if st else [],
                "gradient_norm": c.gradient_norm if c else float("nan"),
                "data_gradient_norm": r.extra.get("data_gradient_norm"),
                "weight_decay_gradient_norm": r.extra.get("weight_decay_gradient_norm"),
                "wall_time": r.wall_time,
            })
        later = [row for row in rows if row["step"] >= 1]
        med = {key: _med([row[key] for row in later]) for key in _MEDIAN_KEYS}
        runs[name] = {"records": rows, "median_after_step_0": med,
                      "final": rows[-1] if rows else None,
                      **({} if run_info is None else
                         {k: v for k, v in run_info.get(name, {}).items() if k != "wall_time"})}
    return {"config": config.meta(), "schedule": config.schedule(), "runs": runs,
            "criteria": dict(CRITERIA), "verdicts": _verdicts(runs, config)}


def _verdicts(runs: dict, config: InvestigationConfig) -> dict:
    out: dict[str, dict] = {}
    nb, bb, bp = (runs.get(n) for n in RUNS)

    def missing(*names: str) -> dict:
        return {"verdict": "not tested",
                "why": f"needs the run(s) {', '.join(names)} with records after step 0"}

    def has(run: dict | None) -> bool:
        return run is not None and any(r["step"] >= 1 for r in run["records"])

    if has(nb):
        rows = [r for r in nb["records"] if r["step"] >= 1]
        early = [r for r in rows if r["step"] <= max(1, config.steps // 10)]
        first = early[0] if early else None
        if first is None:
            out["outliers_early"] = {"verdict": "not tested",
                                     "why": "no recorded step within the first tenth"}
        else:
            later = [r for r in rows if r["step"] >= first["step"]]
            share = np.mean([(r["num_outliers"] or 0) >= 1 for r in later])
            ok = (first["num_outliers"] or 0) >= 1 and share >= 0.75
            out["outliers_early"] = {
                "verdict": "reproduces" if ok else "does not reproduce",
                "why": (f"{first['num_outliers']} outlier(s) at step {first['step']} "
                        f"(top eigenvalue {first['top_eigenvalue']:.4g}, bulk edge "
                        f"{first['bulk_edge']:.3g}); outliers in {100 * share:.0f}% of the "
                        f"records from then on")}
        med = nb["median_after_step_0"]["concentration"]
        out["concentration"] = {
            "verdict": "not tested" if not math.isfinite(med) else
            ("reproduces" if med >= 0.5 else "does not reproduce"),
            "why": f"median concentration {med:.3f} over {len(rows)} records (k = {config.k})"}
    else:
        out["outliers_early"] = missing("no-bn")
        out["concentration"] = missing("no-bn")
    if has(nb) and has(bb):
        a, b, _, _, paired = _paired(nb, bb, ("no-bn", "bn-batch"))
        tests = {
            # no outliers without BatchNorm: nothing to suppress (0 <= 0.5 * 0 is no
            # evidence), so this part is not met
            "outlier count": (b["num_outliers"], a["num_outliers"], a["num_outliers"] > 0
                              and b["num_outliers"] <= 0.5 * a["num_outliers"]),
            "edge ratio": (b["edge_ratio"], a["edge_ratio"], b["edge_ratio"] <=
                           a["edge_ratio"] / 3),
            "concentration": (b["concentration"], a["concentration"], b["concentration"] <=
                              0.5 * a["concentration"]),
        }
        passed = [k for k, (_, _, ok) in tests.items() if ok]
        verdict = ("reproduces" if len(passed) == 3 else
                   "partly reproduces" if passed else "does not reproduce")
        notes = {k: "met" if ok else "not met" for k, (_, _, ok) in tests.items()}
        if not a["num_outliers"] > 0:
            notes["outlier count"] = "not met: no outliers without BatchNorm"
        out["batchnorm_suppresses"] = {
            "verdict": verdict,
            "why": "; ".join(f"{k}: {v:.3g} with BatchNorm vs {w:.3g} without ({notes[k]})"
                             for k, (v, w, _) in tests.items()) + paired}
    else:
        out["batchnorm_suppresses"] = missing("no-bn", "bn-batch")
    if has(bb) and has(bp):
        a, b, fa, fb, paired = _paired(bb, bp, ("bn-batch", "bn-population"))
        la, lb = fa["loss"], fb["loss"]
        returns = (b["num_outliers"] >= 2 * a["num_outliers"] and b["num_outliers"] > 0
                   and b["edge_ratio"] >= 3 * a["edge_ratio"])
        slower = lb >= 2 * la
        verdict = ("reproduces" if returns and slower else
                   "partly reproduces" if returns or slower else "does not reproduce")
        out["population_returns"] = {
            "verdict": verdict,
            "why": (f"median outlier count {b['num_outliers']:.3g} vs {a['num_outliers']:.3g}, "
                    f"median edge ratio {b['edge_ratio']:.3g} vs {a['edge_ratio']:.3g} (outliers "
                    f"{'return' if returns else 'do not return'}); final loss {lb:.3g} vs "
                    f"{la:.3g} ({'slower' if slower else 'not slower'})" + paired)}
    else:
        out["population_returns"] = missing("bn-batch", "bn-population")
    return out


# -- the report ----------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


_TORCH_TEXTS = {"name": "torch", "batchnorm": "`torch.nn.BatchNorm1d`",
                "initialisation": "PyTorch's default", "batch_order": "torch.randperm",
                "versions": {}}
"""What the report says of a summary without a ``backend`` entry (written before there
were other backends)."""


def render_report(summary: dict, files: dict) -> str:
    """The Markdown report of an investigation (:func:`summarize_runs`' numbers)."""
    c = summary["config"]
    runs = summary["runs"]
    t = summary.get("timings", {})
    env = summary.get("environment", {})
    b = summary.get("backend") or _TORCH_TEXTS
    lines = [
        "# Hessian spectra through training, with and without BatchNorm",
        "",
        "A scaled-down repetition of Ghorbani, Krishnan & Xiao (ICML 2019), *An "
        "Investigation into Neural Net Optimization via Hessian Eigenvalue Density*, "
        "written by `specdens investigate`.",
        "",
        "## Setup",
        "",
        f"- Data: scikit-learn's digits (8x8 images, 10 classes), 1536 training and 261 test "
        f"samples (split by seed {c['seed']}), pixels standardised on the training split.",
        f"- Backend: `{b['name']}` ("
        + ", ".join(f"{k} {v}" for k, v in b.get("versions", {}).items())
        + f"): the model, the training and the Hessian and gradient products "
        f"(`specdens.backends.{b['name']}`). Initialisation: {b['initialisation']}; batch "
        f"order: {b['batch_order']}. Runs of the same settings on other backends differ "
        "by these random draws (and by rounding), not by the method.",
        f"- Model: MLP 64 -> {' -> '.join([str(c['width'])] * c['depth'])} -> 10 with ReLU; "
        f"the BatchNorm runs put BatchNorm after each hidden linear layer "
        f"({b['batchnorm']}). Parameters: "
        + ", ".join(f"{n} {runs[n].get('parameters', 'n/a')}" for n in runs) + ".",
        f"- Training: SGD, learning rate {c['lr']}, momentum {c['momentum']}, weight decay "
        f"{c['weight_decay']}, batch size {c['batch_size']}, {c['steps']} steps, the same "
        f"initialisation and batch order for every run, {c['dtype']}.",
        "- Runs: `no-bn` (no normalisation); `bn-batch` (BatchNorm on mini-batch statistics; "
        "its Hessian with batch statistics over fixed batches of the training batch size); "
        "`bn-population` (BatchNorm normalising by running population statistics in "
        "training, updated from each mini-batch before the step and held constant in it; "
        "its Hessian with the same statistics).",
        f"- Hessian: of the mean training loss over all 1536 training samples plus the "
        f"weight decay term; recorded at steps {', '.join(map(str, summary['schedule']))}.",
        f"- Estimates: SLQ with {c['lanczos_steps']} Lanczos steps (full "
        f"reorthogonalisation) x {c['probes']} Rademacher probes; the top {c['k']} "
        f"eigenpairs by thick-restart Lanczos (`specdens.eigsh`); gradient concentration "
        f"||P_k g||^2 / ||g||^2 of the full-data gradient, k = {c['k']}"
        + (" (the number of classes)." if c["k"] == CLASSES else "."),
        "- Outliers: converged Ritz values more than half a bulk width above the bulk's "
        "upper edge, the bulk being the 1%-99% quantile range of the SLQ distribution with "
        "the outliers removed (iterated); the edge ratio is the top eigenvalue divided by "
        "that upper edge (`specdens.summary`). The negative mass is the SLQ estimate of the "
        "fraction of eigenvalues below 0 (+/- its standard error over probes).",
        f"- Wall time: {_fmt(t.get('total_s'), '.1f')} s in all ("
        + ", ".join(f"{n} {_fmt(v, '.1f')} s" for n, v in t.get("per_run_s", {}).items())
        + f"); {env.get('threads_note', 'threads')}: {env.get('threads', 'n/a')}.",
        "",
        "## Findings",
        "",
        "Each finding is checked by a criterion fixed before the run (listed below the "
        "table); the setup was not tuned towards the paper's results.",
        "",
        "| finding (paper) | verdict | measured |",
        "|---|---|---|",
    ]
    names = {
        "outliers_early": "Without BatchNorm, large isolated eigenvalues appear early",
        "concentration": "Without BatchNorm, the gradient concentrates in the top-k "
                         "eigenspace",
        "batchnorm_suppresses": "With BatchNorm (batch statistics) both effects almost "
                                "vanish",
        "population_returns": "With BatchNorm on population statistics the outliers return "
                              "and training is slower",
    }
    for key, title in names.items():
        v = summary["verdicts"].get(key, {"verdict": "not tested", "why": ""})
        lines.append(f"| {title} | **{v['verdict']}** | {v['why']} |")
    lines += ["", "Criteria:", ""]
    lines += [f"- *{names[k]}*: {text}." for k, text in summary["criteria"].items()]
    lines += ["", "## Over training", ""]
    lines += ["Medians over the records after step 0:", "",
              "| run | outliers | top eigenvalue | edge ratio | concentration (k = "
              f"{c['k']}) | negative mass | final loss | final train / test accuracy |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        m, f = r["median_after_step_0"], r["final"] or {}
        lines.append(
            f"| {name} | {_fmt(m['num_outliers'])} | {_fmt(m['top_eigenvalue'], '.4g')} | "
            f"{_fmt(m['edge_ratio'])} | {_fmt(m['concentration'], '.3f')} | "
            f"{_fmt(m['negative_mass'], '.3f')} | {_fmt(f.get('loss'), '.3g')} | "
            f"{_fmt(f.get('accuracy'), '.3f')} / {_fmt(f.get('test_accuracy'), '.3f')} |")
    for name, r in runs.items():
        lines += ["", f"### {name}", ""]
        if r.get("diverged_at") is not None:
            lines += [f"Diverged (non-finite loss or parameters) at step "
                      f"{r['diverged_at']}.", ""]
        lines += ["| step | loss | train acc | top eigenvalue | bulk edge | edge ratio | "
                  "outliers | top-k above threshold | concentration | gradient norm (data; "
                  "weight decay) | negative mass (quadrature bounds) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in r["records"]:
            bounds = row.get("negative_mass_bounds") or [None, None]
            lines.append(
                f"| {row['step']} | {_fmt(row['loss'], '.4g')} | {_fmt(row['accuracy'], '.3f')}"
                f" | {_fmt(row['top_eigenvalue'], '.4g')} | {_fmt(row['bulk_edge'], '.3g')} | "
                f"{_fmt(row['edge_ratio'], '.3g')} | {_fmt(row['num_outliers'], 'd')} | "
                f"{_fmt(row['num_top_above'], 'd')} | {_fmt(row['concentration'], '.3f')} | "
                f"{_fmt(row['gradient_norm'], '.3g')} ({_fmt(row['data_gradient_norm'], '.3g')}"
                f"; {_fmt(row['weight_decay_gradient_norm'], '.3g')}) | "
                f"{_fmt(row['negative_mass'], '.3f')} +/- "
                f"{_fmt(row['negative_mass_stderr'], '.1g')} "
                f"[{_fmt(bounds[0], '.2f')}, {_fmt(bounds[1], '.2f')}] |")
    lines += ["", "## Interpretation and caveats", ""]
    lines += [f"- {text}" for text in _interpretation(summary)]
    figs = [(k, v) for k, v in files.items() if k in FIGURES]
    if figs:
        lines += ["", "## Figures", ""]
        lines += [f"![{k}]({Path(v).name})" for k, v in figs]
    lines += ["", f"Records: `{Path(files['records']).name}` (JSON Lines, read with "
              "`specdens.tracker.read_records`); numbers: `summary.json`.", ""]
    notes = summary.get("notes") or []
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _interpretation(summary: dict) -> list[str]:
    """Caveats that hold for every run, and readings of what was measured. Statements about
    causes are marked as hypotheses: the investigation does not test them."""
    c, runs, v = summary["config"], summary["runs"], summary["verdicts"]
    k = c["k"]
    first = runs[next(iter(runs))]
    out = [
        f"Scale: the paper's networks are ResNets with 0.46M (CIFAR-10) to ~11M parameters "
        f"trained for tens of thousands of steps; this is an MLP with "
        f"{first.get('parameters', 'n/a')} parameters on 1536 images for {c['steps']} "
        "steps. Agreement or disagreement here says how far the findings carry to a small "
        "fully connected network, not whether the paper is right at its scale.",
        "Outlier counts: the rule counts every converged Ritz value more than half a bulk "
        "width above the bulk's 99% quantile. When the bulk is narrow that includes a sparse "
        "tail of eigenvalues, not only well separated spikes; `top-k above threshold` (at "
        f"most {k}) counts how many of the top {k} eigenvalues are beyond the threshold, and "
        "the figures show the spectra.",
    ]
    rows = {n: [row for row in r["records"] if row["step"] >= 1] for n, r in runs.items()}
    med = {n: r["median_after_step_0"] for n, r in runs.items()}
    edges = [f"{n} {_fmt(r['records'][0]['bulk_edge'])} -> {_fmt(r['records'][-1]['bulk_edge'])}"
             for n, r in runs.items() if len(r["records"]) >= 2]
    if edges:
        out.append("Bulk edge from the first to the last record: " + ", ".join(edges) + ".")
    # the concentration over time: where it is high, and what the gradient is made of
    for name in ("no-bn", "bn-batch", "bn-population"):
        rs = rows.get(name) or []
        high = [row["step"] for row in rs if _finite(row["concentration"])
                and row["concentration"] >= 0.5]
        if not rs:
            continue
        text = (f"{name}: the gradient concentration is >= 0.5 at steps "
                f"{', '.join(map(str, high)) or 'none'} of {', '.join(str(r['step']) for r in rs)}"
                f" (median {_fmt(med[name]['concentration'], '.3f')})")
        low_late = [row for row in rs if row["step"] > (high[-1] if high else 0)
                    and _finite(row["concentration"]) and row["concentration"] < 0.5]
        wd = [row for row in low_late if _finite(row["weight_decay_gradient_norm"])
              and _finite(row["gradient_norm"]) and row["gradient_norm"] > 0]
        if wd:
            shares = [row["weight_decay_gradient_norm"] / row["gradient_norm"] for row in wd]
            where = (f"after step {high[-1]}" if high else
                     f"at steps {', '.join(str(r['step']) for r in wd)}")
            text += (f"; {where} the norm of the weight-decay term wd * theta is "
                     f"{_fmt(min(shares), '.2f')} to {_fmt(max(shares), '.2f')} times that of "
                     "the whole gradient (the data and weight-decay terms are of one size and "
                     "partly cancel; their sum need not lie in the top eigenspace)")
        early = [row for row in rs if row["step"] < (high[0] if high else 0)
                 and (row["num_top_above"] or 0) < k]
        if early:
            text += (f"; before that, at steps {', '.join(str(r['step']) for r in early)}, "
                     f"fewer than {k} eigenvalues stand above the bulk, so the top-{k} "
                     "space is partly bulk")
        out.append(text + ".")
    if "no-bn" in med and "bn-batch" in med and \
            v.get("batchnorm_suppresses", {}).get("verdict") != "reproduces":
        a, b = med["no-bn"], med["bn-batch"]
        out.append(
            f"BatchNorm with batch statistics does not remove the outliers here: median "
            f"{_fmt(b['num_outliers'])} outliers and edge ratio {_fmt(b['edge_ratio'])} with "
            f"it, {_fmt(a['num_outliers'])} and {_fmt(a['edge_ratio'])} without, and "
            f"{_fmt(b['num_top_above'])} vs {_fmt(a['num_top_above'])} of the top {k} above "
            "the threshold. Hypotheses, not tested here: about as many outliers as classes "
            "are expected from the class structure of the Gauss-Newton part of the Hessian "
            "(Papyan 2019), which normalisation does not remove; and in a network with two "
            "hidden layers the unnormalised output layer, fed by post-ReLU features with "
            "non-zero mean, carries much of the curvature, whereas the paper's ResNets "
            "normalise dozens of layers.")
    if "bn-batch" in runs and "bn-population" in runs and rows.get("bn-batch") \
            and rows.get("bn-population"):
        a = max(rows["bn-batch"], key=lambda r: r["top_eigenvalue"])
        b = max(rows["bn-population"], key=lambda r: r["top_eigenvalue"])
        fa, fb = runs["bn-batch"]["final"], runs["bn-population"]["final"]
        out.append(
            f"Population statistics: the top eigenvalue peaks at {_fmt(b['top_eigenvalue'])} "
            f"(step {b['step']}) against {_fmt(a['top_eigenvalue'])} (step {a['step']}) with "
            f"batch statistics, and the final training loss is {_fmt(fb['loss'])} against "
            f"{_fmt(fa['loss'])}.")
    widths = [b[1] - b[0] for r in rows.values() for row in r
              for b in [row.get("negative_mass_bounds") or []] if len(b) == 2
              and _finite(b[0]) and _finite(b[1])]
    if widths and float(np.median(widths)) > 0.1:
        out.append(
            f"Negative mass: not resolved at this number of Lanczos steps. The quadrature "
            f"bounds (Chebyshev-Markov-Stieltjes) are {_fmt(float(np.median(widths)), '.2f')} "
            "wide in the median: the eigenvalues cluster around zero more tightly than the "
            "Gauss nodes are spaced, so the estimate swings with the sign of one heavy node. "
            "Read it with its bounds, not as a trend.")
    for name in runs:
        # (NaN: no (k+1)-th eigenvalue was computed, k = n - 1: the gap is unknown, which
        # is no evidence that the two are close)
        bad = [row["step"] for row in rows[name]
               if row["concentration_error_estimate"] is not None
               and not math.isnan(row["concentration_error_estimate"])
               and not (row["concentration_error_estimate"] <= 0.05)]
        if bad:
            out.append(
                f"{name}: at steps {', '.join(map(str, bad[:8]))} the {k}-th and "
                f"{k + 1}-th eigenvalues are close, so the top-{k} eigenspace is "
                "ill-determined (Davis-Kahan error estimate above 0.05 or infinite); the "
                "concentration there depends on which of the near-equal eigenvectors the "
                "solver returned.")
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
