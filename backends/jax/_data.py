"""Batches: what counts as one batch, how many samples it holds, and a check that the data
is the same on every pass.

Weighting rule (exact for uneven batches). The loss of the data set is the mean over all
``N`` samples, ``L = sum_b (n_b / N) L_b``, where ``L_b`` is the mean loss of batch ``b``
over its ``n_b`` samples. Every operator accumulates ``sum_b n_b * (product of L_b)`` and
``sum_b n_b`` over one pass, on the device, and divides the first by the second. A batch
must hold samples: a batch whose count is 0 (an empty array, all padding, a count of 0
from ``loss_fn`` or ``batch_size_fn``) is refused with a :class:`CountError` (a
ValueError) naming the batch, rather than weighting its 0/0 mean loss by 0, as the torch
backend does; counts must be finite and non-negative (a ValueError otherwise). Counts
are read on the host when the operator (or the gradient) is built. With a mesh, a *shard*
of a batch may hold no samples (all its samples padding): it contributes exactly nothing.
A NaN from a batch with samples comes through. Counts and running sums are kept in at
least float32 (``jnp.promote_types(dtype, float32)``), whatever the params' dtype.

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
    (``(inputs, targets)``), a tuple whose first item is a mapping and whose items are
    not all mappings (``({"image": x, "mask": m}, targets)``, as in the TensorFlow
    backend), or a pair ``(inputs, targets)`` whose targets are an array and whose inputs
    are a tuple or list of arrays (``([x1, x2], y)``, a model of several inputs, as in
    the TensorFlow and PyTorch backends).

    A list of dicts, or a tuple of dicts only, is a sequence of batches (dict batches):
    wrap a batch whose inputs and targets are both dicts in a list,
    ``[(inputs, targets)]``."""
    if is_array(data) or isinstance(data, dict):
        return True
    if not isinstance(data, (tuple, list)) or not data:
        return False
    if is_array(data[0]):
        return True
    if (len(data) == 2 and is_array(data[1]) and isinstance(data[0], (tuple, list))
            and data[0] and all(is_array(x) for x in data[0])):
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
    kinds = {(tuple(x.shape[1:]), str(x.dtype)) for x in data}
    if len(kinds) != 1:
        return None
    return (f"data is a {type(data).__name__} of {len(data)} arrays, which is read as ONE "
            "batch (a tuple/list whose first item is an array, such as (inputs, targets)), "
            f"passed whole to the loss; {advice}")


def several_batches_hint(data: Any) -> str | None:
    """For a tuple of two or more mappings (``({"x": X}, {"y": Y})``) or of sequences of
    arrays (``((x1, x2), (y1, y2))``) -- several batches by :func:`is_single_batch`, as a
    list of batches is, though it may be meant as one batch whose inputs and targets are
    collections -- what the rule made of it and how to write one batch; None for other
    data."""
    if not (type(data) is tuple and len(data) > 1):
        return None
    if all(isinstance(x, Mapping) for x in data):
        kind = "dicts"
    elif all(isinstance(x, (tuple, list)) and x and all(is_array(t) for t in x)
             for x in data):
        kind = "sequences of arrays"
    else:
        return None
    return (f"data is a tuple of {len(data)} {kind}, which is read as {len(data)} BATCHES "
            "(as a list of batches is), each passed to the loss; if it is ONE batch whose "
            "inputs and targets are collections of arrays, wrap it in a list: "
            "data = [(inputs, targets)]")


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


class CountError(ValueError):
    """A batch whose sample count is 0 (no samples, a count of 0 from ``batch_size_fn``
    or ``loss_fn``): every entry point refuses it, naming the batch, instead of weighting
    a 0/0 mean loss by 0 (as the torch backend does)."""


def empty_batch_error(index: int, how: str) -> CountError:
    """The error for batch ``index`` whose count is 0; ``how`` says where the count came
    from."""
    return CountError(f"batch {index} of the data: it holds no samples ({how}), so its mean "
                      "loss is undefined; leave empty batches out of the data")


def count_source(pair: bool, batch_size_fn: Any) -> str:
    """Where a count of 0 came from, for :func:`empty_batch_error`."""
    if pair:
        return "loss_fn returned a count of 0"
    if batch_size_fn is not None:
        return "batch_size_fn returned 0"
    return "the leading dimension of its first array leaf is 0"


def check_counts(counts: list[float], how: str) -> float:
    """The total of the per-batch ``counts``, checked on the host: a count that is not
    finite or negative raises a ValueError, a count of 0 a :class:`CountError`, both
    naming the batch."""
    for i, c in enumerate(counts):
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"batch {i} of the data: sample count {c}: counts must be "
                             "finite and non-negative (check loss_fn's count or "
                             "batch_size_fn)")
        if c == 0:
            raise empty_batch_error(i, how)
    n = float(sum(counts))
    if not math.isfinite(n):
        raise ValueError(f"sample counts {counts} (total {n}): counts must be finite and "
                         "non-negative (check loss_fn's count or batch_size_fn)")
    return n


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
    return (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))


def checksum(batch: Any) -> tuple:
    """A summary of every leaf of ``batch`` that changes when its values or their order
    change (a random flip, a shuffle within the batch, one entry changed by one unit in
    the last place); the same data in the same order gives the same summary bit for bit.

    A numpy leaf is summarised by a hash of its bytes, on the host. A jax leaf, on its
    device, by two sums of its bits: the leaf viewed as 32-bit words (a typed PRNG key by
    :func:`jax.random.key_data`), each word mixed with its position by a bijective 32-bit
    hash and summed in uint32 arithmetic (exact, wrapping). A change of one entry always
    changes both sums; any other change (a shuffle) leaves one unchanged with a chance of
    about 2**-32. The two words of every leaf are read back together: one small transfer
    per leaf. Safe to call while a compiled program is traced (the sums are computed
    eagerly on the concrete data).
    """
    out: list[Any] = []
    with jax.ensure_compile_time_eval():
        for leaf in jax.tree_util.tree_leaves(batch):
            if isinstance(leaf, jax.Array):
                out.extend(int(v) for v in np.asarray(jax.device_get(_device_sums(leaf))))
            else:
                arr = np.ascontiguousarray(leaf)
                out.append(hashlib.blake2b(arr.view(np.uint8), digest_size=16).digest())
    return tuple(out)


def _words(x: Any) -> Any:
    """The bits of a jax array as a flat uint32 array (bytes and half-words widened,
    64-bit entries as two words; sub-byte entries widened by value to a byte, or to a
    half-word for 4-bit floats, first)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    if x.dtype == jnp.bool_:
        return jnp.ravel(x).astype(jnp.uint32)
    if _bits(x.dtype) < 8:
        # sub-byte dtypes (int4, uint2, float4_e2m1fn) cannot be bitcast to a byte: widen
        # them first by value, which is exact and one-to-one (-0 stays apart from +0)
        if jnp.issubdtype(x.dtype, jnp.integer):
            wide = jnp.int8 if jnp.iinfo(x.dtype).min < 0 else jnp.uint8
        else:
            wide = jnp.float16
        x = x.astype(wide)
    size = jnp.dtype(x.dtype).itemsize
    if size >= 4:
        return jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))
    narrow = jnp.uint16 if size == 2 else jnp.uint8
    return jnp.ravel(jax.lax.bitcast_convert_type(x, narrow)).astype(jnp.uint32)


def _bits(dtype: Any) -> int:
    """Bits of one entry of ``dtype`` (4 for int4, whose itemsize says 1 byte)."""
    if jnp.issubdtype(dtype, jnp.integer):
        return int(jnp.iinfo(dtype).bits)
    if jnp.issubdtype(dtype, jnp.floating):
        return int(jnp.finfo(dtype).bits)
    return 8 * jnp.dtype(dtype).itemsize


def _mix(h: Any) -> Any:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that scrambles its bits."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


@jax.jit
def _device_sums(leaf: Any) -> Any:
    """Two uint32 sums of the position-mixed bits of a jax leaf, on its device."""
    w = _words(leaf)
    i = jnp.arange(w.size, dtype=jnp.uint32)
    a = jnp.sum(_mix(w ^ _mix(i)), dtype=jnp.uint32)
    b = jnp.sum(_mix(w + _mix(i ^ jnp.uint32(0x9E3779B9))) * (i * jnp.uint32(2) + 1),
                dtype=jnp.uint32)
    return jnp.stack([a, b])


def _same(a: tuple, b: tuple | None) -> bool:
    """Equal checksums."""
    return b is not None and a == b


def source(data: Any) -> tuple[bool, Iterable[Any]]:
    """``(is one batch, an iterable of batches)`` for ``data``; a one-shot iterator and
    anything that is neither a batch nor an iterable raise a TypeError."""
    if is_single_batch(data):
        return True, [data]
    if isinstance(data, Iterator):
        raise TypeError(
            f"data is a one-shot iterator ({type(data).__name__}); every product is a "
            "pass over the data, so pass a list of batches or a re-iterable loader")
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        return False, data
    raise TypeError(f"data must be one batch (an array, a dict, an (inputs, targets) "
                    f"tuple) or an iterable of batches; got {type(data).__name__}")


def iterate(batches: Iterable[Any]) -> Iterator[Any]:
    """The batches of an iterable of batches (see :func:`source`) with array-like leaves
    as numpy or jax arrays (:func:`as_device_batch`: a torch tensor becomes a numpy
    array, as the operators see it); a ValueError when there are none."""
    empty = True
    it = iter(batches)
    while True:
        # a loader's own jax operations (slicing a device array, say) run eagerly, also
        # while a compiled program that holds an operator is traced: its batches are then
        # concrete constants of the program, which the data check can read
        with jax.ensure_compile_time_eval():
            try:
                batch = next(it)
            except StopIteration:
                break
            batch = as_device_batch(batch)
        empty = False
        yield batch
    if empty:
        raise ValueError("data yielded no batches")


def check_device(batch: Any, device: Any, index: int) -> None:
    """Refuse a jax leaf of ``batch`` committed to another device than ``device`` (the
    params'): a compiled product cannot mix them. Numpy leaves and uncommitted jax arrays
    move to ``device``."""
    for leaf in jax.tree_util.tree_leaves(batch):
        if (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
                and leaf.committed):
            devs = leaf.devices()
            if devs != {device}:
                where = ", ".join(sorted(str(d) for d in devs))
                raise ValueError(
                    f"batch {index} of the data lives on {where} but the params on {device}: "
                    "a product cannot mix devices. Put the data on the params' device "
                    "(jax.device_put(batch, device), or leave it as numpy arrays, which move "
                    "there on every pass), or pass mesh=... to shard it over several devices")


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
    device
        The params' device without a mesh: a jax leaf committed to another device raises
        a ValueError naming both (see :func:`check_device`) on every pass; None: no check.

    Attributes
    ----------
    num_batches : int
    """

    def __init__(self, data: Any, *, check: bool = True, device: Any = None):
        self._single, self._data = source(data)
        self.check = check
        self.device = device
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
        for i, batch in enumerate(iterate(self._data)):
            if self.device is not None:
                check_device(batch, self.device, i)
            yield batch

    def one_batch_hint(self, advice: str) -> str | None:
        """:func:`one_batch_hint` of the data when it was read as one batch, or
        :func:`several_batches_hint` when it was read as several."""
        if self._single:
            return one_batch_hint(next(iter(self._data)), advice)
        return several_batches_hint(self._data)

    def first(self) -> Any:
        """The first batch (for tracing at construction)."""
        return next(iter(self._iterate()))

    def __iter__(self) -> Iterator[Any]:
        """One pass; raises a RuntimeError when it differs from the first pass. A batch
        whose leaves are the very arrays of the first pass (a list of batches) is neither
        checked for its device nor summed again: that was done when it was built."""
        i = -1
        for i, batch in enumerate(iterate(self._data)):
            if i >= self.num_batches:
                raise RuntimeError(self._count_message(i + 1))
            if not self._same_leaves(i, batch):
                if self.device is not None:
                    check_device(batch, self.device, i)
                if self.check:
                    self._verify(i, batch)
            yield batch
        if i + 1 != self.num_batches:
            raise RuntimeError(self._count_message(i + 1))

    def _count_message(self, got: int) -> str:
        return (f"the data yielded {got} batches in this pass and {self.num_batches} when the "
                "operator was built; it must yield the same batches on every pass")

    def _same_leaves(self, i: int, batch: Any) -> bool:
        """Whether the leaves of ``batch`` are the arrays kept from the first pass."""
        ref = self._refs[i]
        if ref is None:
            return False
        leaves = jax.tree_util.tree_leaves(batch)
        return len(leaves) == len(ref) and all(a is b for a, b in zip(leaves, ref, strict=True))

    def _verify(self, i: int, batch: Any) -> None:
        if signature(batch) != self._sigs[i] or not _same(checksum(batch), self._sums[i]):
            raise RuntimeError(
                f"the data yielded a different batch at position {i} in this pass than when "
                "the operator was built (a shuffling loader or random augmentation?); "
                "products need the same batches on every pass: iterate without shuffling, "
                "with deterministic transforms")
