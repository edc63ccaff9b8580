"""A specdens operator whose product is a sample-weighted pass over the data.

Subclasses say how to build the per-batch state (``_build``: usually a first-order
autograd graph) and how to apply it to a block of vectors (``_apply``). This class keeps
the states of a prefix of the batches while their measured size fits the memory budget,
rebuilds the others in every product, weights batches by their sample counts, reduces over
``torch.distributed`` ranks and adds the regularisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import array_api_compat.torch as torch_xp
import torch

from specdens import LinearOperatorBase, _checks, _memory

from ._data import Batches, fingerprint
from ._loss import BatchLoss, autograd, gradients
from ._meter import SavedBytes
from ._params import stack_columns
from .distributed import (
    InputChecksum,
    agree_and_count,
    agree_on_run,
    all_reduce_sum,
    join_failed,
    no_data_error,
    stored_group,
    world_size,
)

_CHANGED_DATA = (
    "the data yielded different batches in this pass than when the operator was built (a "
    "shuffling DataLoader or random augmentation?); products need the same batches on "
    "every pass: use shuffle=False and deterministic transforms")


_DIFFERENT_VECTORS = (
    "the ranks multiplied different vectors in the same product: every rank must call the "
    "estimator (lanczos, slq, eigsh, trace, diagonal...) with the same arguments (seed, "
    "num_steps, num_probes, k...), so that every rank holds the same vectors")


class DataOperator(LinearOperatorBase):
    """Base class of :class:`HessianOperator` and :class:`GGNOperator`.

    Attributes
    ----------
    param_names, param_shapes : list
        The selected parameters, in the order of the flat vectors.
    num_samples : float
        The total weight ``sum_b n_b`` over all batches (and all ranks): samples, or for
        ``CrossEntropyLoss``/``NLLLoss`` with class-index targets the criterion's own
        denominator (class-weighted targets that are not ``ignore_index``).
    num_batches : int
        Batches on this rank (0 for an empty shard under a process group).
    num_stored : int
        Batches whose graphs are kept between products.
    graph_bytes : int
        Measured size of the kept graphs (saved tensors).
    """

    symmetric = True

    kind = ""   # the function that builds it (a name of distributed.KINDS)

    def __init__(self, loss: BatchLoss, data: Any, *, weight_decay: float,
                 regularizer: Callable[[dict], Any] | None, graph_memory: int | None,
                 check_determinism: bool, process_group: Any, store: bool):
        space = loss.space
        super().__init__((space.n, space.n), space.dtype, torch_xp, space.device)
        self.loss = loss
        self.space = space
        self.param_names = list(space.names)
        self.param_shapes = list(space.shapes)
        self.group = stored_group(process_group)
        # everything this rank does on its own, which may raise on this rank alone: the
        # rank then still joins the construction's collective, flagged as failed, so that
        # the others raise at once instead of waiting in it
        try:
            self._check_options()
            # with a process group, this rank's shard may be empty (more ranks than
            # samples, or an uneven split): it then adds nothing, and only no data on any
            # rank raises
            self.batches = Batches(data, space.device, allow_empty=self.group is not None)
            self.weight_decay = _checks.finite_number(weight_decay, "weight_decay")
            self._leaves = loss.leaves()
            self._leaf_list = [self._leaves[n] for n in space.names]
            self._reg_grads = self._regularizer_graph(regularizer)
            if graph_memory is None:
                graph_memory = _memory.available_bytes(torch_xp, space.device) // 2
            if isinstance(graph_memory, bool) or not isinstance(graph_memory, int) \
                    or graph_memory < 0:
                raise ValueError(f"graph_memory must be a number of bytes >= 0 or None; got "
                                 f"{graph_memory!r}")
            self.graph_memory = graph_memory if store else 0
            total = self._first_pass(check_determinism)
            self._checksum = (InputChecksum(world_size(self.group), space.n, space.dtype,
                                            space.device)
                              if self.group is not None else None)
        except Exception:
            join_failed(self.group, space.device)   # the others learn of it; this rank raises
            raise
        # one small collective, before any vector-sized one: the ranks' operators must
        # agree; the count of all ranks' samples
        self.num_samples = agree_and_count(self.group, loss, kind=self.kind, count=total,
                                           weight_decay=self.weight_decay,
                                           regularizer=regularizer)
        if self.num_samples == 0:   # the same on every rank: all raise
            raise no_data_error(self.group)

    def _check_options(self) -> None:
        """Validate a subclass's options (in the construction's ``try``)."""

    def _check_first_batch(self, batch: Any) -> None:
        """Check that a product can be computed, on the first batch (in the construction's
        ``try``)."""

    # -- construction: one pass ---------------------------------------------------
    def _first_pass(self, check_determinism: bool) -> float:
        """Pass over this rank's shard: count it, keep the graphs that fit, fingerprint the
        batches; this rank's count."""
        self._stored: list[tuple[Any, float]] = []
        self._counts: list[float] = []
        fps, total, used, full = [], 0.0, 0, self.graph_memory == 0
        exclude = list(self._leaf_list) + list(self.loss.frozen.values())
        for i, batch in enumerate(self.batches):
            fps.append(fingerprint(batch))
            with self.batches.at(i):
                if i == 0:
                    if check_determinism:
                        self.loss.check_deterministic(batch)
                    self._check_first_batch(batch)
                if not full:
                    with autograd(), SavedBytes(exclude) as meter:
                        state, count = self._build(batch)
                    self._counts.append(count)
                    if used + meter.nbytes <= self.graph_memory:
                        self._stored.append((state, count))
                        used += meter.nbytes
                        total += count
                        continue
                    full = True
                    del state
                else:
                    self._counts.append(self.loss.count_of(batch))
            total += self._counts[-1]
        self._fingerprints = (torch.stack([f.to(self.space.device) for f in fps]) if fps
                              else torch.zeros((0, 2), dtype=torch.float64,
                                               device=self.space.device))
        self.num_batches = len(fps)
        self.num_stored = len(self._stored)
        self.graph_bytes = used
        self._local_count = total
        return total

    def _regularizer_graph(self, regularizer: Any) -> Any:
        if regularizer is None:
            return None
        if not callable(regularizer):
            raise TypeError("regularizer must be a callable(params: dict[str, Tensor]) -> "
                            "scalar tensor")
        with autograd():
            r = regularizer(dict(self._leaves))
            if not isinstance(r, torch.Tensor) or r.numel() != 1:
                raise ValueError("regularizer must return a scalar tensor")
            return gradients(r.reshape(()), self._leaf_list, create_graph=True)

    # -- subclass hooks -----------------------------------------------------------
    def _build(self, batch: Any) -> tuple[Any, float]:
        raise NotImplementedError

    def _apply(self, state: Any, V: torch.Tensor, retain: bool) -> torch.Tensor:
        raise NotImplementedError

    def _apply_stored(self, V: torch.Tensor, acc: torch.Tensor) -> None:
        """Add ``sum_b n_b P_b V`` over the batches whose states are kept to ``acc``."""
        for state, count in self._stored:
            acc.add_(self._apply(state, V, True), alpha=count)

    # -- products -----------------------------------------------------------------
    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._matmat(v.reshape(-1, 1))[:, 0]

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self._check_block(V)
        n, k = V.shape
        # one buffer for the reduction: the block (stored column by column, as
        # stack_columns does) and, with a process group, the checksum of V
        extra = self._checksum.size if self._checksum is not None else 0
        buf = torch.zeros(k * n + extra, dtype=self.dtype, device=self.device)
        acc = buf[:k * n].view(k, n).T
        # (products of stored graphs alone record nothing: they work in inference mode)
        with autograd(records=self.num_stored < self.num_batches):
            total, changed = self._pass(V, acc)
        if total != self._local_count:
            if self._raises_at_once():
                raise RuntimeError(_CHANGED_DATA)
            changed = torch.ones((), dtype=torch.bool, device=acc.device)
        if changed is not None:
            # data that changed between passes, found but not raised here (see
            # _raises_at_once): the product is made NaN, on every rank through the
            # reduction, and the engine reports it, with this cause among those it names
            acc.masked_fill_(changed, math.nan)
        local = None
        if extra:
            local = self._checksum(V)
            buf[k * n:] = local
        all_reduce_sum(buf, self.group)
        # the global count is the one found when the operator was built (the batches are
        # the same, checked above): a Python number, so no host-to-device copy, which
        # would synchronise with the device at every product
        out = acc / self.num_samples
        if local is not None:
            # ranks that multiplied different vectors (another seed...): every
            # rank finds it in the same product. On the CPU that costs no synchronisation
            # and every rank raises here; elsewhere the product is made NaN on every rank
            # and the engine reports it at its end
            differs = self._checksum.differs(buf[k * n:], local)
            if self._host_checks():
                if bool(differs):
                    raise RuntimeError(_DIFFERENT_VECTORS)
            else:
                out.masked_fill_(differs, math.nan)
        if self.weight_decay:
            out = out + self.weight_decay * V
        if self._reg_grads is not None:
            with autograd(records=False):
                out = out + graph_products(self._reg_grads, self._leaf_list, V, self.space,
                                           retain=True, batched=False)
        return out

    def _pass(self, V: torch.Tensor, acc: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        """Add this rank's ``sum_b n_b P_b V`` to ``acc``; its count, and whether the data
        changed (see :meth:`_check_fingerprints`)."""
        total, changed = 0.0, None
        if self._stored:
            self._apply_stored(V, acc)
            total += sum(count for _, count in self._stored)
        if self.num_stored < self.num_batches:
            fps = []
            for i, batch in enumerate(self.batches):
                fps.append(fingerprint(batch))
                if i < self.num_stored:
                    continue
                # (a batch beyond the first pass's makes the fingerprint check fail)
                known = self._counts[i] if i < len(self._counts) else None
                with self.loss.known_count(known), self.batches.at(i):
                    state, count = self._build(batch)
                acc.add_(self._apply(state, V, False), alpha=count)
                total += count
                del state
            changed = self._check_fingerprints(fps)
        return total, changed

    def _check_block(self, V: torch.Tensor) -> None:
        if V.dtype != self.dtype:
            raise TypeError(f"the operator has dtype {self.dtype} (the model's); got a vector "
                            f"of dtype {V.dtype}. Cast it: v.to({self.dtype})")

    def agree_on_run(self, what: str, settings: dict[str, Any]) -> None:
        """With a process group: check that every rank starts the same run
        (:func:`~specdens.backends.torch.distributed.agree_on_run`)."""
        if self.group is not None:
            agree_on_run(self.group, self.device, what, settings)

    def _host_checks(self) -> bool:
        """Whether reading a value of the operator's device costs no synchronisation."""
        return self.device.type == "cpu"

    def _raises_at_once(self) -> bool:
        """Whether data that changed between passes raises in the product itself: on the
        CPU in a single process. Off the CPU, reading the finding back would synchronise
        with the device at every product; with a process group, a rank that raised alone
        would leave the others waiting in the all-reduce. There the product is made NaN
        instead, and the Lanczos run raises at its end, on every rank."""
        return self._host_checks() and self.group is None

    def _check_fingerprints(self, fps: list[torch.Tensor]) -> torch.Tensor | None:
        """Raise if this pass's batches differ from the first pass's, or (see
        :meth:`_raises_at_once`) return the finding as a 0-d boolean tensor on the device
        instead of reading it."""
        if len(fps) != self.num_batches:
            if not self._raises_at_once():
                return torch.ones((), dtype=torch.bool, device=self.device)
            raise RuntimeError(f"the data yielded {len(fps)} batches in this pass and "
                               f"{self.num_batches} when the operator was built; it must yield "
                               "the same batches on every pass")
        now = torch.stack([f.to(self.device) for f in fps])
        tol = 1e-12 * torch.clamp(self._fingerprints.abs(), min=1.0)
        changed = ((now - self._fingerprints).abs() > tol).any()
        if not self._raises_at_once():
            return changed
        if bool(changed):
            raise RuntimeError(_CHANGED_DATA)
        return None

    # -- vectors <-> parameters ---------------------------------------------------
    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector as a dict of parameter-shaped tensors, by parameter name."""
        return dict(zip(self.space.names, self.space.split(v), strict=True))

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """A dict of parameter-shaped tensors (by name) as a flat vector."""
        missing = [n for n in self.space.names if n not in tensors]
        if missing:
            raise KeyError(f"missing parameters {missing}")
        return self.space.flatten([tensors[n] for n in self.space.names])


def graph_products(grads: list[Any], leaves: list[torch.Tensor], V: torch.Tensor, space: Any,
                   *, retain: bool, batched: bool) -> torch.Tensor:
    """``d(grads . v)/d leaves`` for every column ``v`` of ``V``: products with the
    Jacobian of ``grads`` (a first-order gradient built with ``create_graph=True``), one
    backward per column or one batched backward (``is_grads_batched``). ``grads`` may
    hold the gradients of several batches one after the other (``len(leaves)`` each):
    the products are then summed over them."""
    p = len(leaves)
    if len(grads) % p:
        raise ValueError(f"{len(grads)} gradients for {p} parameters")
    idx = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    k = V.shape[1]
    if not idx:
        return torch.zeros(V.shape, dtype=V.dtype, device=V.device)
    outs = [grads[i] for i in idx]
    if batched:
        blocks = space.split_block(V)
        res = torch.autograd.grad(outs, leaves, grad_outputs=[blocks[i % p] for i in idx],
                                  retain_graph=retain, allow_unused=True,
                                  is_grads_batched=True)
        return space.flatten_block(res, k)
    cols = []
    for j in range(k):
        parts = space.split(V[:, j])
        res = torch.autograd.grad(outs, leaves, grad_outputs=[parts[i % p] for i in idx],
                                  retain_graph=retain or j < k - 1, allow_unused=True)
        cols.append(space.flatten(res))
    return stack_columns(cols)
