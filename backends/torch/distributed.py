"""``torch.distributed`` reduction of products, and a check that all ranks agree.

Each rank passes over its own shard of the data; the operator all-reduces the unnormalised
sums ``sum_b n_b (H_b v)`` and the sample counts ``sum_b n_b`` (both as float64 sums in
the operator's dtype), so every rank divides the same numbers and holds the same product.
Lanczos is deterministic given its inputs, so every rank then runs the same recurrence;
:func:`check_consistent` verifies it at the end.

At construction, one small collective (:func:`agree_and_sum`) sums the sample counts
and checks that every rank built the same thing (function, vector space, loss, BatchNorm
mode, weight decay, regularizer) before any vector-sized reduction; a rank that raised
while building joins it flagged as failed (:func:`join_failed`), so that the others raise
at once. A rank's shard may be empty; only data that is empty on every rank raises, on
every rank. Each estimator, before its first product, gathers its name and settings
(:func:`agree_on_run`): ranks that would make different numbers of products, or products
of other block sizes, raise there instead of waiting in a product until the group's
timeout. Each product's all-reduce carries a checksum of the vectors it multiplies
(:class:`InputChecksum`), which finds ranks that multiply different ones.
"""

from __future__ import annotations

import functools
import hashlib
import math
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def resolve_group(process_group: Any) -> Any:
    """The process group to reduce over: ``process_group`` if given, else the default
    group when ``torch.distributed`` is initialised, else ``None`` (single process)."""
    available = torch.distributed.is_available()
    initialised = available and torch.distributed.is_initialized()
    if process_group is None:
        return torch.distributed.group.WORLD if initialised else None
    if not initialised:
        raise RuntimeError("process_group was given but torch.distributed is not initialised; "
                           "call torch.distributed.init_process_group first")
    return process_group


class _DefaultGroup:
    """The default process group, looked up by ``torch.distributed`` at each reduction."""

    def __repr__(self) -> str:
        return "<the default process group>"


DEFAULT_GROUP = _DefaultGroup()


def stored_group(process_group: Any) -> Any:
    """:func:`resolve_group` for an object that keeps it (an operator): the default group
    as :data:`DEFAULT_GROUP` rather than the ``ProcessGroup`` itself.

    An operator that held the default ``ProcessGroup`` kept it alive after
    ``destroy_process_group()``; its gloo threads were then torn down at interpreter exit,
    which aborted the process ("terminate called without an active exception") in 4 of
    12 two-rank ``torchrun`` runs whose script kept the operator to the end.
    """
    group = resolve_group(process_group)
    if group is not None and process_group is None:
        return DEFAULT_GROUP
    return group


def all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place (nothing when ``group`` is None;
    the default group for :data:`DEFAULT_GROUP`)."""
    if group is not None:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM,
                                     group=None if group is DEFAULT_GROUP else group)
    return tensor


def world_size(group: Any) -> int:
    """The number of ranks of ``group`` (not None)."""
    return torch.distributed.get_world_size(None if group is DEFAULT_GROUP else group)


def no_data_error(group: Any) -> ValueError:
    """The error of data that yielded no batch on any rank of ``group``: raised on every
    rank, since all of them see the same all-reduced count of 0."""
    pg = None if group is DEFAULT_GROUP else group
    return ValueError(f"data yielded no batches on any of the "
                      f"{torch.distributed.get_world_size(pg)} ranks (every rank's shard is "
                      "empty)")


_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# What the construction of each function's result is called in the descriptor (its index)
KINDS = ("hessian", "ggn", "gradient", "evaluate")
BATCHNORM_MODES = ("batch", "population")
# Per-rank sums the construction's collective adds up (the sample count; evaluate's sums)
_SUMS = 5


def _hash48(text: str) -> float:
    """A 48-bit hash of ``text`` as a float64 (exact: below 2**53)."""
    return float(int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big"))


def _gather_rows(group: Any, device: torch.device | None, row: list[float]) -> list[list[float]]:
    """Every rank's ``row`` (fixed size, float64), by rank: one ``all_gather``."""
    pg = None if group is DEFAULT_GROUP else group
    if torch.distributed.get_backend(pg) != "nccl":
        device = torch.device("cpu")
    elif device is None or device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor(row, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size(pg))]
    torch.distributed.all_gather(gathered, mine, group=pg)
    return [g.cpu().tolist() for g in gathered]


# the descriptor: the fields the ranks must agree on, then the failure flag and the sums
_FIELDS = 8
_FAILED = _FIELDS
_ROW = _FIELDS + 1 + _SUMS


def join_failed(group: Any, device: torch.device | None = None) -> None:
    """Join the construction's collective flagged as failed (this rank raised before or
    during its pass over its shard), so that the other ranks raise at once instead of
    waiting in it until the process group's timeout.

    Call it from the ``except`` block and re-raise after it. (Re-raising there, rather
    than keeping the exception in a variable, leaves no reference cycle through its
    traceback: one that kept the process group alive past ``destroy_process_group()``
    aborted the process at exit.) Nothing when ``group`` is None. ``device``: the model's,
    where known (NCCL gathers on a GPU; default: the current CUDA device).
    """
    if group is None:
        return
    row = [0.0] * _ROW
    row[_FAILED] = 1.0
    _gather_rows(group, device, row)     # (the caller re-raises its own error)


def agree_and_sum(group: Any, loss: Any, *, kind: str, sums: Sequence[float],
                  weight_decay: float = 0.0, regularizer: Any = None) -> list[float]:
    """Check that every rank of ``group`` built the same thing, and return the sums of
    ``sums`` over all ranks (``sums`` when ``group`` is None).

    ``loss`` is the :class:`~specdens.backends.torch._loss.BatchLoss` (its vector space,
    its criterion or ``loss_fn``, its BatchNorm mode); ``kind`` one of :data:`KINDS`.

    One ``all_gather`` of a fixed-size float64 descriptor per rank, called once at
    construction, before any vector-sized collective: the kind, ``n``, the dtype, a hash
    of the selected parameters' names and shapes, a hash of the loss (the criterion's type,
    settings and tensors, or ``loss_fn``'s qualified name; ``batch_size_fn``'s), the
    BatchNorm mode, ``weight_decay``, a hash of the regularizer (0: none), whether this
    rank failed (:func:`join_failed`), and the local ``sums``. Ranks whose vectors differ
    in size or dtype would otherwise abort inside gloo ("Received data size doesn't match
    expected size") or hang; ranks with other operators, criteria, BatchNorm modes,
    parameters, weight decay or regularizers would silently mix different operators. (48-bit
    hashes are exact in float64.) The sums are added in rank order, the same on every rank.

    Raises
    ------
    RuntimeError
        On every rank, when the descriptors differ; names what differs and on which ranks.
        When some rank failed (it re-raises its own error).
    """
    if len(sums) > _SUMS:
        raise ValueError(f"at most {_SUMS} sums")
    if group is None:
        return [float(s) for s in sums]
    space = loss.space
    digest = _hash48(repr([(str(a), tuple(int(d) for d in s))
                           for a, s in zip(space.names, space.shapes, strict=True)]))
    dtype = space.dtype
    code = _DTYPES.index(dtype) if dtype in _DTYPES else 100 + int.from_bytes(
        hashlib.sha256(str(dtype).encode()).digest()[:4], "big")
    described = loss.description()
    reg = 0.0 if regularizer is None else max(_hash48(describe(regularizer)), 1.0)
    local = [float(KINDS.index(kind)), float(space.n), float(code), digest,
             _hash48(described), float(BATCHNORM_MODES.index(loss.batchnorm)),
             float(weight_decay), reg, 0.0]
    local += [float(s) for s in sums] + [0.0] * (_SUMS - len(sums))
    rows = _gather_rows(group, space.device, local)
    raise_if_others_failed([r for r, row in enumerate(rows) if row[_FAILED]])
    fields = [("the function", lambda r: f"{KINDS[int(r[0])]}()"),
              ("the number of selected parameter scalars n", lambda r: int(r[1])),
              ("the dtype (the model's)",
               lambda r: str(_DTYPES[int(r[2])]) if r[2] < len(_DTYPES)
               else str(dtype) if r[2] == code else f"another dtype (code {int(r[2])})"),
              ("the selected parameters (names and shapes; hash)", lambda r: f"{int(r[3]):012x}"),
              (f"the loss (criterion with its settings, or loss_fn, and batch_size_fn; hash; "
               f"this rank's: {described})", lambda r: f"{int(r[4]):012x}"),
              ("batchnorm", lambda r: repr(BATCHNORM_MODES[int(r[5])])),
              ("weight_decay", lambda r: r[6]),
              ("the regularizer (hash)", lambda r: f"{int(r[7]):012x}" if r[7] else "none")]
    diffs = []
    for what, show in fields:
        by_value: dict[Any, list[int]] = {}
        for rank, row in enumerate(rows):
            by_value.setdefault(show(row), []).append(rank)
        if len(by_value) > 1:
            diffs.append(f"{what}: " + ", ".join(f"{v} on rank{'s' if len(r) > 1 else ''} "
                                                  f"{', '.join(map(str, r))}"
                                                  for v, r in by_value.items()))
    if diffs:
        raise RuntimeError(
            "the ranks built different operators: " + "; ".join(diffs) + ". Every rank must "
            "call the same function with the same model (dtype included), criterion or "
            "loss_fn, params, batchnorm, weight_decay and regularizer")
    # the same sums, in the same order, on every rank
    totals = [0.0] * len(sums)
    for row in rows:
        for i in range(len(sums)):
            totals[i] += row[_FAILED + 1 + i]
    return totals


def agree_and_count(group: Any, loss: Any, *, kind: str, count: float,
                    weight_decay: float = 0.0, regularizer: Any = None) -> float:
    """:func:`agree_and_sum` of this rank's sample count: the count of all ranks."""
    return agree_and_sum(group, loss, kind=kind, sums=[count], weight_decay=weight_decay,
                         regularizer=regularizer)[0]


def describe(obj: Any) -> str:
    """What a criterion, ``loss_fn``, ``batch_size_fn`` or regularizer is, in words that
    are the same in every process for the same object (no memory addresses): a function's
    or a method's qualified name; an object's type and its public attributes (numbers,
    strings, tensors by dtype, shape and a hash of their values; other values by type), a
    module's parameters and buffers too (a criterion's class ``weight``, ``pos_weight``);
    a ``functools.partial``'s function and arguments. What a closure captures is not
    seen."""
    if obj is None:
        return "None"
    if isinstance(obj, functools.partial):
        args = [describe_value(a) for a in obj.args]
        args += [f"{k}={describe_value(v)}" for k, v in sorted(obj.keywords.items())]
        return f"partial({describe(obj.func)}, {', '.join(args)})"
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)):
        return f"{getattr(obj, '__module__', None)}.{obj.__qualname__}"
    if isinstance(obj, types.MethodType):   # (not its object's attributes: a trainer's
        return describe(obj.__func__)        # rank or device may differ between ranks)
    attrs = {k: v for k, v in sorted(getattr(obj, "__dict__", {}).items())
             if not k.startswith("_") and k != "training"}
    if isinstance(obj, torch.nn.Module):
        attrs.update(obj.named_parameters())
        attrs.update(obj.named_buffers())
    t = type(obj)
    return (f"{t.__module__}.{t.__qualname__}("
            + ", ".join(f"{k}={describe_value(v)}" for k, v in attrs.items()) + ")")


def describe_value(value: Any) -> str:
    """An attribute's value for :func:`describe`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, torch.Tensor):
        raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        return (f"tensor({str(value.dtype)}, {tuple(value.shape)}, "
                f"{hashlib.sha256(raw.tobytes()).hexdigest()[:12]})")
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe_value(v) for v in value) + ")"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        return describe(value)
    return type(value).__qualname__


def raise_if_others_failed(failed: Sequence[int]) -> None:
    """After a collective that told every rank which ranks failed (and that this one did
    not): raise a RuntimeError naming them."""
    if failed:
        s = "s" if len(failed) > 1 else ""
        raise RuntimeError(
            f"rank{s} {', '.join(map(str, failed))} raised an error while building "
            f"(checking {'their' if s else 'its'} arguments or passing over "
            f"{'their' if s else 'its'} data shard; see that rank's output); nothing was "
            "built on this rank either")


# settings an estimator's run start can carry (agree_on_run), each as _SLOTS numbers
_RUN_FIELDS = 15
_SLOTS = 3
_NUMBER, _BOOL, _TEXT, _NONE, _HASHED = 1.0, 2.0, 3.0, 4.0, 5.0


def _encoded(value: Any) -> list[float]:
    """A setting as :data:`_SLOTS` exact float64 numbers: a tag and the value (a number;
    text of up to 12 bytes, 6 per number; else a 48-bit hash of its repr)."""
    if value is None:
        return [_NONE, 0.0, 0.0]
    if isinstance(value, (bool, np.bool_)):
        return [_BOOL, float(value), 0.0]
    if isinstance(value, (int, np.integer)) and abs(int(value)) < 2**53:
        return [_NUMBER, float(value), 0.0]
    if isinstance(value, (float, np.floating)) and math.isfinite(value):
        return [_NUMBER, float(value), 0.0]
    if isinstance(value, str) and len(value.encode()) <= 12:
        raw = value.encode().ljust(12, b"\0")
        return [_TEXT, float(int.from_bytes(raw[:6], "big")),
                float(int.from_bytes(raw[6:], "big"))]
    return [_HASHED, _hash48(repr(value)), 0.0]


def _decoded(slots: Sequence[float]) -> str:
    """How :func:`_encoded` numbers show in a message."""
    tag, a, b = slots
    if tag == _NONE:
        return "None"
    if tag == _BOOL:
        return repr(bool(a))
    if tag == _NUMBER:
        return repr(int(a)) if a.is_integer() and abs(a) < 2**53 else repr(a)
    if tag == _TEXT:
        raw = int(a).to_bytes(6, "big") + int(b).to_bytes(6, "big")
        return repr(raw.rstrip(b"\0").decode(errors="replace"))
    return f"another value (hash {int(a):012x})"


def agree_on_run(group: Any, device: torch.device | None, what: str,
                 settings: dict[str, Any]) -> None:
    """Check that every rank of ``group`` starts the same run: the estimator ``what``
    with the same ``settings`` (:func:`specdens._checks.agree_on_run`), in one small
    ``all_gather`` before the run's first product.

    The number of products a run makes and their block sizes follow from its settings
    (``num_steps``, ``num_probes``, ``k``, ``num_matvecs``, ``block_size``...); a rank
    that made fewer would leave the others waiting in a product until the process group's
    timeout (30 minutes by default), and blocks of other sizes abort inside gloo.

    Raises
    ------
    RuntimeError
        On every rank, when the ranks started different estimators or the same one with
        different settings; names them, each rank's value and the ranks.
    """
    keys = sorted(settings)
    if len(keys) > _RUN_FIELDS:
        raise ValueError(f"at most {_RUN_FIELDS} settings")
    row = [_hash48(repr((what, keys)))]
    for key in keys:
        row += _encoded(settings[key])
    row += [0.0] * (1 + _RUN_FIELDS * _SLOTS - len(row))
    rows = _gather_rows(group, device, row)
    if all(r == row for r in rows):
        return
    advice = ("Every rank must call the estimators with the same arguments (only the data "
              "shard differs); ranks that differ would wait for each other in a product "
              "until the process group's timeout")
    other = [rank for rank, r in enumerate(rows) if r[0] != row[0]]
    if other:
        raise RuntimeError(
            f"the ranks started different computations: this rank {what}() (with settings "
            f"{', '.join(keys)}), rank{'s' if len(other) > 1 else ''} "
            f"{', '.join(map(str, other))} another estimator or another internal step. "
            + advice)
    diffs = []
    for i, key in enumerate(keys):
        by_value: dict[str, list[int]] = {}
        for rank, r in enumerate(rows):
            shown = _decoded(r[1 + _SLOTS * i: 1 + _SLOTS * (i + 1)])
            by_value.setdefault(shown, []).append(rank)
        if len(by_value) > 1:
            diffs.append(f"{key}: " + ", ".join(
                f"{v} on rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}"
                for v, r in by_value.items()))
    raise RuntimeError(f"the ranks started {what}() with different settings: "
                       + "; ".join(diffs) + ". " + advice)


# splitmix64's constants, as signed 64-bit integers (torch's int64 arithmetic wraps)
_MIX = (0x9E3779B97F4A7C15 - 2**64, 0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64)


def _mixed(i: torch.Tensor) -> torch.Tensor:
    """Pseudo-random odd 64-bit weights of the positions ``i`` (int64): splitmix64's
    mixing, so that no linear relation between positions cancels a difference."""
    x = i * _MIX[1] + _MIX[0]
    x = x ^ (x >> 31)
    x = x * _MIX[2]
    return (x ^ (x >> 29)) | 1      # odd: a product with it loses no bit


class InputChecksum:
    """A checksum of the block ``V`` a product multiplies, reduced with the product, that
    finds ranks which multiply different vectors (other seeds, probes or settings) in the
    product's own all-reduce: no other collective, no value read back.

    Each rank appends :attr:`size` numbers to the buffer it all-reduces: a sum of the bits
    of ``V`` (each entry's bits as an integer, weighted by pseudo-random odd 64-bit
    weights of its row and column), as a 64-bit integer, whose arithmetic wraps and is
    exact in any order (so on any device and with any number of threads), cut into chunks
    of ``b`` bits that the operator's dtype holds exactly even summed over all ranks. When
    every rank holds the same ``V`` bit for bit, the all-reduced chunks are exactly
    ``world_size`` times each rank's own; when the blocks differ, the sums differ (but
    for a chance of about 2**-32 for different random vectors) and then so do the
    all-reduced chunks from every rank's (except, with 3 ranks or more, a rank whose
    chunks are all the mean of the ranks' chunks). :meth:`differs` tells, as a 0-d
    boolean tensor on the device.

    ``size`` is 0 (no check) where the dtype cannot hold one bit per chunk summed over
    the ranks: bfloat16 over more than 128 ranks, float16 over more than 1024. It keeps
    the ``n`` row weights on the device (the memory of one float64 vector); a product
    spends about three passes over the block on it, and a temporary of its size in int64.
    """

    def __init__(self, world: int, n: int, dtype: torch.dtype, device: torch.device):
        self.world = world
        self.dtype = dtype
        precision = round(-math.log2(torch.finfo(dtype).eps)) + 1   # significand bits
        bits = precision - math.ceil(math.log2(self.world))
        self.size = -(-64 // bits) if bits >= 1 else 0
        self._int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[dtype.itemsize]
        self._mask = (1 << bits) - 1 if self.size else 0
        self._shifts = torch.arange(self.size, dtype=torch.int64, device=device) * bits
        self._rows = _mixed(torch.arange(n, dtype=torch.int64, device=device))
        self._cols: dict[int, torch.Tensor] = {}

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        """This rank's :attr:`size` numbers for the block ``V`` (n, k), in its dtype."""
        k = V.shape[1]
        cols = self._cols.get(k)
        if cols is None:
            cols = self._cols[k] = _mixed(torch.arange(k, dtype=torch.int64,
                                                       device=V.device))
        bits = V.T.view(self._int)          # (k, n): the engine's blocks are rows
        if self._int == torch.int64:
            # the high half (sign, exponent) folded into the low one: weighted, a change
            # of the top bits alone would only move the top bits of the sum
            weighted = bits >> 32
            weighted ^= bits
        else:
            weighted = bits.to(torch.int64)
        weighted *= self._rows
        total = (weighted.sum(1) * cols).sum()
        return ((total >> self._shifts) & self._mask).to(self.dtype)

    def differs(self, reduced: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Whether the ranks multiplied different blocks: ``reduced``, the all-reduced
        sum of the ranks' :meth:`__call__` values, against this rank's ``local`` ones."""
        return (reduced != local * self.world).any()


# the values check_consistent compares, by the attributes of the results that have them
_RESULT_FIELDS = ("alpha", "beta", "nodes", "weights", "eigenvalues", "residuals", "value")


def check_consistent(result: Any, group: Any = None) -> None:
    """Raise when the ranks of ``group`` hold different results.

    Parameters
    ----------
    result
        A :class:`specdens.LanczosResult` (``alpha``, ``beta``), a
        :class:`specdens.SpectralDensity` (``nodes``, ``weights``), a
        :class:`specdens.EigshResult` (``eigenvalues``, ``residuals``), a
        :class:`specdens.TraceEstimate` or a :class:`specdens.DiagonalEstimate`
        (``value``), or any object with those attributes, computed on every rank.
    group
        The process group (default: the default group).

    Raises
    ------
    RuntimeError
        When any rank's values differ bit for bit from rank 0's; names the ranks and the
        largest difference. Identical products on every rank give identical runs, so a
        difference means a rank used other data, probes or options.

    Notes
    -----
    This compares results after the run. Products already find ranks that multiply
    different vectors (another ``seed``) and raise on every rank. Ranks that run
    *different numbers of products* (other ``num_steps``, ``num_probes``, ``k`` or
    ``maxiter``) never get here: the rank that finishes first waits in this function's
    collective while the others wait in a product's all-reduce, until the process group's
    timeout (``init_process_group(..., timeout=datetime.timedelta(minutes=5))`` bounds
    it; by default gloo waits 30 minutes, NCCL 10). Pass the same settings on every
    rank.
    """
    group = resolve_group(group)
    if group is None:
        return
    fields = [f for f in _RESULT_FIELDS if hasattr(result, f)]
    if not fields:
        raise TypeError(f"check_consistent needs a LanczosResult, SpectralDensity, "
                        f"EigshResult, TraceEstimate or DiagonalEstimate; got "
                        f"{type(result).__name__}")
    local = np.concatenate([_as_float64(getattr(result, f)) for f in fields])
    backend = torch.distributed.get_backend(group)
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
              else torch.device("cpu"))
    size = torch.tensor([local.size], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(sizes, size, group=group)
    if len({int(s) for s in sizes}) != 1:
        raise RuntimeError(f"the ranks hold results of different sizes "
                           f"({[int(s) for s in sizes]} values of {', '.join(fields)}): they "
                           "used different num_steps, num_probes or k")
    mine = torch.from_numpy(local).to(device)
    gathered = [torch.zeros_like(mine) for _ in sizes]
    torch.distributed.all_gather(gathered, mine, group=group)
    ref = gathered[0].cpu().numpy()
    bad = []
    for rank, other in enumerate(gathered):
        o = other.cpu().numpy()
        same = np.array_equal(o.view(np.uint64), ref.view(np.uint64))
        if not same:
            with np.errstate(invalid="ignore"):
                bad.append((rank, float(np.nanmax(np.abs(o - ref)))))
    if bad:
        raise RuntimeError(
            f"the ranks disagree on the result ({', '.join(fields)}; "
            + ", ".join(f"rank {r}: max |difference| {d:.3e} from rank 0" for r, d in bad)
            + "): every rank must run the same operator (built with the same process group), "
            "the same probes and the same seed"
        )


def _as_float64(values: Any) -> np.ndarray:
    """A result's values (numbers, numpy arrays, torch tensors on any device) as a flat
    float64 array on the host."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)
