"""Batches: what counts as one batch, how many samples it holds, and a check that the data
is the same on every pass.

Weighting rule (exact for uneven batches). The loss of the data set is the mean over all
``N`` samples, ``L = sum_b (n_b / N) L_b``, where ``L_b`` is the mean loss of batch ``b``
over its ``n_b`` samples. Every operator accumulates ``sum_b n_b * (product of L_b)`` and
``sum_b n_b`` over one pass, on the device, and divides the first by the second. A batch
(or, with a mesh, a shard of one) whose count is 0 contributes exactly nothing, although
its mean loss is 0/0 (all padding, say); a NaN from a batch with samples comes through.
Counts must be finite and non-negative, their total positive (a ValueError otherwise).

Counting rule. ``n_b`` is, in this order of precedence: the second item when ``loss_fn``
returns a pair ``(mean_loss, count)`` (e.g. the number of non-padding tokens);
``batch_size_fn(batch)`` when given; otherwise the leading dimension of the first array
leaf of the batch in :func:`jax.tree_util.tree_leaves` order (dict keys sorted: for
``{"x": ..., "y": ...}`` that is ``x``). Counts are evaluated inside the compiled product,
on the batch as the device sees it (its shard, with a mesh), so ``batch_size_fn`` must be
traceable: use shapes or ``jnp`` functions, not ``float(...)`` or numpy.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_array(x: Any) -> bool:
    """A numpy or jax array (or anything array-like with ``shape`` and ``dtype`` and
    ``__array__``, such as a CPU torch tensor)."""
    if isinstance(x, (jax.Array, np.ndarray)):
        return True
    return hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__array__")


def is_single_batch(data: Any) -> bool:
    """``data`` is one batch: an array, a dict, a tuple/list whose first item is an array
    (``(inputs, targets)``), or a tuple whose first item is a mapping and whose items are
    not all mappings (``({"image": x, "mask": m}, targets)``, as in the TensorFlow
    backend).

    A list of dicts, or a tuple of dicts only, is a sequence of batches (dict batches):
    wrap a batch whose inputs and targets are both dicts in a list,
    ``[(inputs, targets)]``."""
    if is_array(data) or isinstance(data, dict):
        return True
    if not isinstance(data, (tuple, list)) or not data:
        return False
    if is_array(data[0]):
        return True
    return (isinstance(data, tuple) and isinstance(data[0], Mapping)
            and not all(isinstance(item, Mapping) for item in data))


def one_batch_hint(data: Any, advice: str) -> str | None:
    """For ``data`` that is a list or tuple of two or more arrays alike but for their
    leading dimension (same trailing shape and dtype) -- one batch by
    :func:`is_single_batch`, though it looks like a list of batches of one array each --
    what the rule made of it and ``advice``; None for other data (``(inputs, targets)``
    of different shapes or dtypes, say)."""
    if not (isinstance(data, (tuple, list)) and len(data) > 1
            and all(is_array(x) and len(x.shape) > 0 for x in data)):
        return None
    kinds = {(tuple(x.shape[1:]), np.dtype(x.dtype).name) for x in data}
    if len(kinds) != 1:
        return None
    return (f"data is a {type(data).__name__} of {len(data)} arrays, which is read as ONE "
            "batch (a tuple/list whose first item is an array, such as (inputs, targets)), "
            f"passed whole to the loss; {advice}")


LOSS_ADVICE = ("if it is a list of batches of one array each, wrap each batch in a tuple, "
               "data = [(x,) for x in batches], and unpack it in loss_fn: (x,) = batch")


@contextmanager
def explain_one_batch(hint: str | None, what: str) -> Iterator[None]:
    """With a ``hint`` (see :func:`one_batch_hint`), re-raise an error of the loss on the
    data with the hint, chained to it: as the same type for the common built-in errors,
    else as a TypeError. Without one, errors pass unchanged."""
    try:
        yield
    except Exception as exc:
        if hint is None:
            raise
        kind = type(exc) if type(exc) in (TypeError, ValueError, IndexError,
                                          AttributeError) else TypeError
        raise kind(f"{what} raised {type(exc).__name__}: {exc}\nNote: {hint}") from exc


def default_count(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first array leaf."""
    for leaf in jax.tree_util.tree_leaves(batch):
        if hasattr(leaf, "shape") and len(leaf.shape) > 0:
            return int(leaf.shape[0])
        break
    raise ValueError(
        f"cannot tell how many samples a batch of type {type(batch).__name__} holds (its "
        "first leaf is not an array with a leading dimension); return (mean_loss, count) from "
        "loss_fn, or pass batch_size_fn=lambda batch: ...")


def as_device_batch(batch: Any) -> Any:
    """``batch`` with every array-like leaf as a numpy or jax array (jax arrays kept)."""
    def conv(x: Any) -> Any:
        if isinstance(x, (jax.Array, np.ndarray)):
            return x
        if is_array(x):
            return np.asarray(x)
        if isinstance(x, (bool, int, float, complex, np.generic)):
            return np.asarray(x)
        raise TypeError(f"a batch leaf of type {type(x).__name__} cannot be passed to a "
                        "compiled function; batches hold arrays (numpy or jax) and numbers")
    return jax.tree_util.tree_map(conv, batch)


def signature(batch: Any) -> tuple:
    """Tree structure, shapes and dtypes of a batch: the key of its compiled product."""
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    return (treedef, tuple((tuple(x.shape), np.dtype(x.dtype).name) for x in leaves))


def checksum(batch: Any) -> tuple:
    """A summary of every leaf of ``batch`` that changes when its values or their order
    change (a random flip, a shuffle within the batch); the same data in the same order
    gives the same summary bit for bit.

    A numpy leaf is summarised by a hash of its bytes, on the host. A jax leaf, by the sum
    of its entries and their sum weighted by position (entry ``i`` of the ``s`` entries
    of the flattened leaf by ``(i + 1) / s``), computed on its device in float64 (float32
    without ``jax_enable_x64``) and read back together: one small transfer per leaf.
    """
    out: list[Any] = []
    for leaf in jax.tree_util.tree_leaves(batch):
        if isinstance(leaf, jax.Array):
            out.extend(np.asarray(jax.device_get(_device_sums(leaf))).tolist())
        else:
            arr = np.ascontiguousarray(leaf)
            out.append(hashlib.blake2b(arr.view(np.uint8), digest_size=16).digest())
    return tuple(out)


@jax.jit
def _device_sums(leaf: Any) -> Any:
    """``[sum of entries, sum weighted by (i + 1) / size]`` of a jax leaf, on its device."""
    dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    x = jnp.ravel(leaf).astype(dtype)
    position = jnp.arange(1, x.size + 1, dtype=dtype) / max(x.size, 1)
    return jnp.stack([jnp.sum(x), jnp.sum(x * position)])


def _same(a: tuple, b: tuple | None) -> bool:
    """Equal checksums (NaN data gives NaN sums on both passes)."""
    if b is None or len(a) != len(b):
        return False

    def nan(x: Any) -> bool:
        return isinstance(x, float) and math.isnan(x)

    return all(x == y or (nan(x) and nan(y)) for x, y in zip(a, b, strict=True))


class Batches:
    """A re-iterable view of the data as a sequence of batches, checked on every pass.

    Parameters
    ----------
    data
        One batch (see :func:`is_single_batch`) or a re-iterable of batches (a list, a
        tuple, a loader object that can be iterated again). A one-shot iterator (a
        generator) is refused: every product is a pass over the data.
    check
        Whether :meth:`passes` verifies that each pass yields the batches of the first
        one: the same array objects (free), or failing that the same shapes, dtypes and
        :func:`checksum` values, which see the order of the entries too (a hash of the
        bytes of numpy leaves; for jax leaves that are new objects, two sums on their
        device read back, one small transfer per leaf). The identity check accepts a
        batch of a list or tuple whose leaves are the very objects of the first pass
        without looking at their values: a numpy array changed in place between products
        (``batch[0][:] *= 3``, a reused buffer, in-place augmentation) is *not* detected,
        and the next product silently uses the new values. Keeping the arrays of a list
        of batches unchanged while an operator uses them is the caller's responsibility
        (jax arrays are immutable and cannot change so).

    Attributes
    ----------
    num_batches : int
    """

    def __init__(self, data: Any, *, check: bool = True):
        self._single = is_single_batch(data)
        if self._single:
            self._data: Iterable[Any] = [data]
        elif isinstance(data, Iterator):
            raise TypeError(
                f"data is a one-shot iterator ({type(data).__name__}); every product is a "
                "pass over the data, so pass a list of batches or a re-iterable loader")
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
            self._data = data
        else:
            raise TypeError(f"data must be one batch (an array, a dict, an (inputs, targets) "
                            f"tuple) or an iterable of batches; got {type(data).__name__}")
        self.check = check
        # Keep the leaves of a list or tuple (alive anyway) for the identity check; a loader's
        # fresh arrays are not kept, only their signatures and checksums.
        keep = isinstance(self._data, (list, tuple))
        self._refs: list[list[Any] | None] = []
        self._sigs: list[tuple] = []
        self._sums: list[tuple | None] = []
        for batch in self._iterate():
            leaves = jax.tree_util.tree_leaves(batch)
            self._refs.append(leaves if keep else None)
            self._sigs.append(signature(batch))
            self._sums.append(checksum(batch) if check else None)
        self.num_batches = len(self._refs)

    def _iterate(self) -> Iterator[Any]:
        empty = True
        for batch in self._data:
            empty = False
            yield as_device_batch(batch)
        if empty:
            raise ValueError("data yielded no batches")

    def one_batch_hint(self, advice: str) -> str | None:
        """:func:`one_batch_hint` of the data when it was read as one batch."""
        return one_batch_hint(next(iter(self._data)), advice) if self._single else None

    def first(self) -> Any:
        """The first batch (for tracing at construction)."""
        return next(iter(self._iterate()))

    def __iter__(self) -> Iterator[Any]:
        """One pass; raises a RuntimeError when it differs from the first pass."""
        i = -1
        for i, batch in enumerate(self._iterate()):
            if i >= self.num_batches:
                raise RuntimeError(self._count_message(i + 1))
            if self.check:
                self._verify(i, batch)
            yield batch
        if i + 1 != self.num_batches:
            raise RuntimeError(self._count_message(i + 1))

    def _count_message(self, got: int) -> str:
        return (f"the data yielded {got} batches in this pass and {self.num_batches} when the "
                "operator was built; it must yield the same batches on every pass")

    def _verify(self, i: int, batch: Any) -> None:
        leaves = jax.tree_util.tree_leaves(batch)
        ref = self._refs[i]
        if ref is not None and len(leaves) == len(ref) and all(
                a is b for a, b in zip(leaves, ref, strict=True)):
            return
        if signature(batch) != self._sigs[i] or not _same(checksum(batch), self._sums[i]):
            raise RuntimeError(
                f"the data yielded a different batch at position {i} in this pass than when "
                "the operator was built (a shuffling loader or random augmentation?); "
                "products need the same batches on every pass: iterate without shuffling, "
                "with deterministic transforms")
