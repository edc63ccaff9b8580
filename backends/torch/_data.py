"""Batches: what counts as one batch, moving them to the model's device, sample counts,
and fingerprints that detect data that changes between passes.

Weighting rule (exact for uneven batches). The loss of the data set is the mean over all
``N`` samples, ``L = sum_b (n_b / N) L_b``, where ``L_b`` is the mean loss of batch ``b``
over its ``n_b`` samples. Every operator accumulates ``sum_b n_b * (product of L_b)`` over
a pass and divides by ``N = sum_b n_b`` of that same pass.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch


def is_single_batch(data: Any) -> bool:
    """``data`` is one batch: a tensor, a mapping (a dict, a ``UserDict``, a tokenizer's
    ``BatchEncoding``), a tuple/list whose first item is a tensor, or a pair
    ``(inputs, targets)`` whose targets are a tensor and whose inputs are a tuple, list or
    mapping of tensors (a model with several inputs).

    A tuple or list whose first item is a tensor is always one batch, also when every
    item is a tensor: ``[x, y]`` is the batch a ``DataLoader`` over a ``TensorDataset``
    yields, so ``[x1, x2]`` is one batch too (the loss receives the list), never two
    batches that are bare tensors; wrap each of those, ``[(x1,), (x2,)]`` (what a
    ``DataLoader`` over ``TensorDataset(X)`` yields, as lists). A list whose items are
    batches of another form (``(x, y)`` pairs, mappings, ``[(x1,), (x2,)]``) is a list
    of batches: its first item is not a tensor, and its second one is not one either.
    """
    if isinstance(data, (torch.Tensor, Mapping)):
        return True
    if not isinstance(data, (tuple, list)) or len(data) == 0:
        return False
    if isinstance(data[0], torch.Tensor):
        return True
    return (len(data) == 2 and isinstance(data[1], torch.Tensor)
            and _is_tensor_collection(data[0]))


def _is_tensor_collection(x: Any) -> bool:
    if isinstance(x, Mapping):
        items = list(x.values())
    elif isinstance(x, (tuple, list)):
        items = list(x)
    else:
        return False
    return len(items) > 0 and all(isinstance(t, torch.Tensor) for t in items)


class Batches:
    """A re-iterable view of the data as a sequence of batches on one device.

    Parameters
    ----------
    data
        One batch (see :func:`is_single_batch`) or a re-iterable of batches (a list, a
        ``torch.utils.data.DataLoader``). A one-shot iterator (a generator) is refused:
        products need one pass over the data each.
    device
        Tensors in every batch (nested in tuples, lists and dicts) are moved there; their
        dtypes are kept.
    allow_empty
        Whether data that yields no batch is accepted (this rank's shard under a process
        group, whose samples are counted over all ranks); otherwise it raises a ValueError.
    """

    def __init__(self, data: Any, device: torch.device, *, allow_empty: bool = False):
        if is_single_batch(data):
            self._data: Iterable[Any] = [data]
        elif isinstance(data, Iterator):
            raise TypeError(
                f"data is a one-shot iterator ({type(data).__name__}); every product is a pass "
                "over the data, so pass a list of batches or a DataLoader instead"
            )
        elif isinstance(data, Iterable):
            self._data = data
        else:
            raise TypeError(f"data must be one (inputs, targets) batch or an iterable of "
                            f"batches (a DataLoader); got {type(data).__name__}")
        self.device = device
        self.allow_empty = allow_empty
        self._rng: torch.Tensor | None = None  # the passes' own random stream (__iter__)
        # one batch that is a list of bare tensors: a list of batches meant as such
        # ([x1, x2]) reads as one batch, which an error then explains (see at; not for
        # a tuple, the (inputs, targets) of every example, where the note would be noise)
        self._reading = (_ONE_BATCH_NOTE.format(kind=type(data).__name__, n=len(data))
                         if isinstance(data, list) and len(data) >= 2
                         and all(isinstance(t, torch.Tensor) for t in data) else None)
        # a tuple of two collections of tensors: ((x1, x2), (y1, y2)), one batch of
        # several inputs and targets, reads as two batches, whose error then says so
        if (self._reading is None and type(data) is tuple and len(data) == 2
                and all(_is_tensor_collection(item) for item in data)):
            self._reading = _TWO_BATCHES_NOTE.format(
                kinds=" and a ".join(type(item).__name__ for item in data))
        warn_padding_sampler(self._data)

    @contextlib.contextmanager
    def at(self, index: int) -> Iterator[None]:
        """Evaluate batch ``index``: a :class:`CountError` (a batch without samples) is
        raised again naming the batch, and an error on data that is one list of bare
        tensors gets a note on how it was read."""
        try:
            yield
        except CountError as exc:
            raise CountError(f"batch {index} of the data: {exc}") from None
        except Exception as exc:
            if self._reading is not None:
                exc.add_note(self._reading)
            raise

    def __iter__(self) -> Iterator[Any]:
        # A DataLoader draws its workers' base seed (and a shuffling sampler its order,
        # a random transform its draws) from torch's global generator at every pass: the
        # operators' passes moved the user's random stream on, so that recording the
        # spectrum changed the training run's later dropout masks and shuffles. The
        # passes draw from a stream of their own instead, forked from the user's at the
        # first pass and continued from pass to pass (so that a shuffle or a random
        # augmentation still differs between passes, and is caught), and the user's
        # stream is put back after each. (Lists of batches draw nothing.)
        user = None if isinstance(self._data, (list, tuple)) else torch.get_rng_state()
        if user is not None and self._rng is not None:
            torch.set_rng_state(self._rng)
        try:
            empty = True
            for batch in self._data:
                empty = False
                yield to_device(batch, self.device)
            if empty and not self.allow_empty:
                raise ValueError("data yielded no batches")
        finally:
            if user is not None:
                self._rng = torch.get_rng_state()
                torch.set_rng_state(user)


_ONE_BATCH_NOTE = (
    "specdens read data, a {kind} of {n} tensors, as ONE batch (as it reads the [inputs, "
    "targets] lists a DataLoader over a TensorDataset yields); the loss received that "
    "{kind}. For {n} batches that are each a single tensor, wrap each one: data=[(x1,), "
    "(x2,), ...] (loss_fn then receives the tuple (x,)), or pass a DataLoader over "
    "TensorDataset(X)")


_TWO_BATCHES_NOTE = (
    "specdens read data, a tuple of two collections of tensors (a {kinds}), as TWO "
    "batches, as it reads a list of batches; the loss received each of them. If it is ONE "
    "batch (inputs, targets) with several input or target tensors, pass it in a list: "
    "data=[((x1, x2), (y1, y2))]")


class CountError(ValueError):
    """A batch whose sample count is not positive (no samples, a count of 0 from
    ``batch_size_fn`` or ``loss_fn``, no target that a criterion counts): every entry
    point refuses it, naming the batch (see :meth:`Batches.at`), instead of weighting a
    NaN loss by 0."""


PADDING_WARNING = (
    "the data is a DataLoader with a DistributedSampler(drop_last=False) over {size} "
    "samples and {replicas} replicas: {size} is not a multiple of {replicas}, so the sampler "
    "pads the shards by repeating {extra} sample(s), which then count twice in the Hessian "
    "(and the gradient and the loss). Shard without padding instead, e.g. "
    "DataLoader(Subset(dataset, range(rank, len(dataset), world_size)), ...); an empty shard "
    "is allowed")
SAMPLER_DROP_WARNING = (
    "the data is a DataLoader with a DistributedSampler(drop_last=True) over {size} samples "
    "and {replicas} replicas: {size} is not a multiple of {replicas}, so the sampler leaves "
    "{extra} sample(s) out of the Hessian (and the gradient and the loss). Shard without "
    "dropping instead, e.g. DataLoader(Subset(dataset, range(rank, len(dataset), "
    "world_size)), ...); an empty shard is allowed")
BATCH_DROP_WARNING = (
    "the data is a DataLoader with drop_last=True: its {size} samples are not a multiple of "
    "batch_size={batch_size}, so the last {extra} sample(s) are left out of the Hessian (and "
    "the gradient and the loss). Pass a DataLoader with drop_last=False to use all the data")


def warn_padding_sampler(data: Any) -> None:
    """Warn when ``data`` is a ``DataLoader`` that repeats or leaves out samples, which
    silently changes the operator: a ``DistributedSampler`` over a data set whose size is
    not a multiple of ``num_replicas`` (it pads with ``drop_last=False`` and drops with
    ``drop_last=True``), or ``drop_last=True`` with a last incomplete batch."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(data, DataLoader):
        return
    for sampler in (getattr(data, "sampler", None),
                    getattr(getattr(data, "batch_sampler", None), "sampler", None)):
        if not isinstance(sampler, DistributedSampler):
            continue
        try:
            size, replicas = len(sampler.dataset), int(sampler.num_replicas)
        except TypeError:       # a data set without a length
            continue
        if replicas > 0 and size % replicas:
            text = SAMPLER_DROP_WARNING if sampler.drop_last else PADDING_WARNING
            extra = size % replicas if sampler.drop_last else replicas - size % replicas
            warnings.warn(text.format(size=size, replicas=replicas, extra=extra),
                          UserWarning, stacklevel=3)
            break
    batch_size = getattr(data, "batch_size", None)
    if getattr(data, "drop_last", False) and batch_size:
        try:
            size = len(data.sampler)
        except TypeError:       # an iterable data set without a length
            return
        if size % batch_size:
            warnings.warn(BATCH_DROP_WARNING.format(size=size, batch_size=batch_size,
                                                    extra=size % batch_size),
                          UserWarning, stacklevel=3)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (nested in tuples, lists, dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        if type(batch) is dict:
            return moved
        try:  # keep the mapping's type (UserDict, BatchEncoding...) where it allows it
            return type(batch)(moved)
        except Exception:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def default_count(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (``len(inputs)``; for inputs
    that are a tuple, list or mapping of tensors, the length of the first of them). A
    length of 0 raises a :class:`CountError`."""
    first = batch
    for _ in range(2):
        if isinstance(first, Mapping):
            first = next(iter(first.values()), None)
        elif isinstance(first, (tuple, list)):
            first = first[0] if first else None
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        if first.shape[0] == 0:
            raise CountError("it holds no samples (the leading dimension of its first tensor "
                             "is 0), so its mean loss is undefined; leave empty batches out of "
                             "the data")
        return int(first.shape[0])
    raise ValueError(
        f"cannot tell how many samples a batch of type {type(batch).__name__} holds; return "
        "(mean_loss, count) from loss_fn, or pass batch_size_fn=lambda batch: ..."
    )


def batch_count(batch: Any, batch_size_fn: Callable[[Any], Any] | None) -> float:
    """Samples in ``batch``: ``batch_size_fn(batch)`` when given, else :func:`default_count`."""
    if batch_size_fn is None:
        return float(default_count(batch))
    return as_count(batch_size_fn(batch), "batch_size_fn")


def as_count(value: Any, what: str) -> float:
    """A positive sample count from an int, a float or a 0-d tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} returned a count of shape {tuple(value.shape)}; expected "
                             "a number")
        value = value.item()
    try:
        count = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} returned {type(value).__name__} as a sample count; expected "
                        "a number") from None
    if not count > 0:
        raise CountError(f"{what} returned a sample count of {count}; counts must be positive "
                         "(leave batches without samples out of the data)")
    return count


# The golden ratio's fractional part: position i weighs frac((i + 1) * GOLDEN), a sequence
# equidistributed in (0, 1), never 0, with no linear relation between positions
GOLDEN = 0.6180339887498949


def fingerprint(batch: Any) -> torch.Tensor:
    """Two float64 numbers summarising every tensor of ``batch``, on the batch's device:
    the sum of its entries plus their count, and the sum of its entries weighted by their
    position. The same data in the same order gives the same values bit for bit.

    The weighted sum makes the fingerprint sensitive to order: a random flip or rotation,
    a permutation within the batch or a mixup of its samples keeps the plain sum but moves
    the weighted one. The tensor is seen as a matrix (its last dimension as columns) and
    entry ``(i, j)`` weighs ``w(i) w(j)`` with ``w(i) = frac((i + 1) * 0.618...)``: weights
    that are not linear in the position, so that changes symmetric about the middle (whose
    first moment vanishes) move the sum too, and that take no more memory than a row and a
    column. Everything stays on the device: no value is read back.
    """
    total = None
    for t in _tensors(batch):
        x = t.detach().to(torch.float64)
        cols = x.shape[-1] if x.dim() > 0 and x.shape[-1] > 0 else 1
        x = x.reshape(x.numel() // cols, cols)
        weighted = _position_weights(x.shape[0], x.device) @ (
            x @ _position_weights(cols, x.device))
        s = torch.stack([x.sum() + x.numel(), weighted])
        total = s if total is None else total + s
    return total if total is not None else torch.zeros(2, dtype=torch.float64)


def _position_weights(n: int, device: torch.device) -> torch.Tensor:
    """``frac((i + 1) * GOLDEN)`` for ``i < n``, float64, on ``device``."""
    return torch.arange(1, n + 1, dtype=torch.float64, device=device).mul_(GOLDEN).frac_()


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from _tensors(v)
