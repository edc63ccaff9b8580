"""``torch.distributed`` reduction of products, and a check that all ranks agree.

Each rank passes over its own shard of the data; the operator all-reduces the unnormalised
sums ``sum_b n_b (H_b v)`` and the sample counts ``sum_b n_b`` (both as float64 sums in
the operator's dtype), so every rank divides the same numbers and holds the same product.
Lanczos is deterministic given its inputs, so every rank then runs the same recurrence;
:func:`check_consistent` verifies it at the end.

At construction, one small collective (:func:`agree_and_count`) sums the sample counts
and checks that every rank built the same vector space (size, dtype, parameters, weight
decay) before any vector-sized reduction. A rank's shard may be empty; only data that is
empty on every rank raises, on every rank.
"""

from __future__ import annotations

import hashlib
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


def no_data_error(group: Any) -> ValueError:
    """The error of data that yielded no batch on any rank of ``group``: raised on every
    rank, since all of them see the same all-reduced count of 0."""
    pg = None if group is DEFAULT_GROUP else group
    return ValueError(f"data yielded no batches on any of the "
                      f"{torch.distributed.get_world_size(pg)} ranks (every rank's shard is "
                      "empty)")


_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def agree_and_count(group: Any, device: torch.device, *, n: int, dtype: torch.dtype,
                    names: Sequence[str], shapes: Sequence[tuple[int, ...]],
                    weight_decay: float, count: float, failed: bool = False) -> float:
    """Check that every rank of ``group`` built the same vector space, and return the
    sample count of all ranks (``count`` when ``group`` is None).

    ``failed``: this rank's own pass over its shard raised. Call this from the ``except``
    block and re-raise after it: the rank still joins the collective, so that the other
    ranks raise at once instead of waiting in it until the process group's timeout.
    (Re-raising there, rather than keeping the exception in a variable, leaves no
    reference cycle through its traceback: one that kept the process group alive past
    ``destroy_process_group()`` aborted the process at exit.)

    One ``all_gather`` of a fixed-size float64 descriptor per rank (``n``, the dtype, a
    hash of the selected parameters' names and shapes, ``weight_decay``, and the local
    sample count), called once at construction, before any vector-sized collective: ranks
    whose vectors differ in size or dtype would otherwise abort inside gloo ("Received
    data size doesn't match expected size") or hang, and ranks with other parameters or
    weight decay would silently mix different operators.

    Raises
    ------
    RuntimeError
        On every rank, when the descriptors differ; names what differs and on which ranks.
        On the other ranks when some rank passes ``failed`` (that rank returns, to
        re-raise its own error).
    """
    if group is None:
        return count
    digest = hashlib.sha256(repr([(str(a), tuple(int(d) for d in s))
                                  for a, s in zip(names, shapes, strict=True)]).encode())
    code = _DTYPES.index(dtype) if dtype in _DTYPES else 100 + int.from_bytes(
        hashlib.sha256(str(dtype).encode()).digest()[:4], "big")
    # a 48-bit hash is exact in float64
    local = [float(n), float(code), float(int.from_bytes(digest.digest()[:6], "big")),
             float(weight_decay), float(count), float(failed)]
    pg = None if group is DEFAULT_GROUP else group
    if torch.distributed.get_backend(pg) != "nccl":
        device = torch.device("cpu")
    mine = torch.tensor(local, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size(pg))]
    torch.distributed.all_gather(gathered, mine, group=pg)
    rows = [g.cpu().tolist() for g in gathered]
    if failed:
        return count    # (the caller re-raises its own error)
    raise_if_others_failed([r for r, row in enumerate(rows) if row[5]])
    fields = [("the number of selected parameter scalars n", lambda r: int(r[0])),
              ("the dtype (the model's)",
               lambda r: str(_DTYPES[int(r[1])]) if r[1] < len(_DTYPES)
               else str(dtype) if r[1] == code else f"another dtype (code {int(r[1])})"),
              ("the selected parameters (names and shapes; hash)", lambda r: f"{int(r[2]):012x}"),
              ("weight_decay", lambda r: r[3])]
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
            "pass the same model (dtype included), params and weight_decay")
    # the same sum, in the same order, on every rank
    total = 0.0
    for row in rows:
        total += row[4]
    return total


def raise_if_others_failed(failed: Sequence[int]) -> None:
    """After a collective that told every rank which ranks failed (and that this one did
    not): raise a RuntimeError naming them."""
    if failed:
        s = "s" if len(failed) > 1 else ""
        raise RuntimeError(
            f"rank{s} {', '.join(map(str, failed))} raised an error during the pass over "
            f"{'their' if s else 'its'} data shard (see that rank's output); nothing was "
            "built on this rank either")


def failure_row(group: Any, failed: bool) -> list[float]:
    """This rank's row of a ``(world size,)`` one-hot of failed ranks, to sum in an
    all-reduce (empty when ``group`` is None)."""
    if group is None:
        return []
    pg = None if group is DEFAULT_GROUP else group
    row = [0.0] * torch.distributed.get_world_size(pg)
    row[torch.distributed.get_rank(pg)] = float(failed)
    return row


def check_consistent(result: Any, group: Any = None) -> None:
    """Raise when the ranks of ``group`` hold different Lanczos coefficients.

    Parameters
    ----------
    result
        A :class:`specdens.LanczosResult` (``alpha``, ``beta``) or a
        :class:`specdens.SpectralDensity` (``nodes``, ``weights``), or any object with
        those attributes, computed on every rank.
    group
        The process group (default: the default group).

    Raises
    ------
    RuntimeError
        When any rank's coefficients differ bit for bit from rank 0's; names the ranks and
        the largest difference. Identical products on every rank give identical runs, so a
        difference means a rank used other data, probes or options.
    """
    group = resolve_group(group)
    if group is None:
        return
    fields = [f for f in ("alpha", "beta", "nodes", "weights") if hasattr(result, f)]
    if not fields:
        raise TypeError(f"check_consistent needs a LanczosResult or SpectralDensity; got "
                        f"{type(result).__name__}")
    local = np.concatenate([np.asarray(getattr(result, f), dtype=np.float64).reshape(-1)
                            for f in fields])
    backend = torch.distributed.get_backend(group)
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
              else torch.device("cpu"))
    size = torch.tensor([local.size], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(sizes, size, group=group)
    if len({int(s) for s in sizes}) != 1:
        raise RuntimeError(f"ranks ran different numbers of Lanczos coefficients "
                           f"({[int(s) for s in sizes]}): they used different num_steps or "
                           "num_probes")
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
            "the ranks disagree on the Lanczos coefficients ("
            + ", ".join(f"rank {r}: max |difference| {d:.3e} from rank 0" for r, d in bad)
            + "): every rank must run the same operator (built with the same process group), "
            "the same probes and the same seed"
        )
