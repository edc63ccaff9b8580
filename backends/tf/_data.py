"""Batches: what counts as one batch, their relaxed signatures, sample counts, and
fingerprints that detect data that changes between passes.

Weighting rule (exact for uneven batches). The loss of the data set is the mean over all
``N`` samples, ``L = sum_b (n_b / N) L_b``, where ``L_b`` is the mean loss of batch ``b``
over its ``n_b`` samples. Every operator accumulates ``sum_b n_b * (product of L_b)`` over
a pass and divides by ``N = sum_b n_b`` of that same pass (the counts summed in float64).
Under a ``tf.distribute`` strategy each replica's share of a batch is a batch of its own
(``n_b`` its number of samples, possibly 0, whose term is then skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf


def _is_array(x: Any) -> bool:
    return isinstance(x, (tf.Tensor, tf.Variable, np.ndarray))


def is_single_batch(data: Any) -> bool:
    """``data`` is one batch: a tensor or array, a dict, a tuple/list whose first item is a
    tensor or an array, or a tuple whose first item is a dict (of model inputs; a *list*
    of dicts is a list of batches)."""
    if _is_array(data) or isinstance(data, dict):
        return True
    if not isinstance(data, (tuple, list)) or not data:
        return False
    return _is_array(data[0]) or (isinstance(data, tuple) and isinstance(data[0], dict))


def as_tensors(batch: Any) -> Any:
    """``batch`` with every numpy array (nested in tuples, lists, dicts) a ``tf.Tensor``."""
    return tf.nest.map_structure(
        lambda t: tf.convert_to_tensor(t) if isinstance(t, np.ndarray) else t, batch)


class Batches:
    """A re-iterable view of the data as a sequence of batches of tensors.

    Parameters
    ----------
    data
        One batch (see :func:`is_single_batch`), a ``tf.data.Dataset`` of batches, or any
        re-iterable of batches (a list, a ``keras.utils.PyDataset``). A one-shot iterator
        (a generator) is refused: products need one pass over the data each.
    """

    def __init__(self, data: Any):
        self.dataset = None
        if isinstance(data, tf.data.Dataset):
            self.dataset = data
            self._data: Iterable[Any] = data
        elif is_single_batch(data):
            self._data = [as_tensors(data)]
        elif isinstance(data, Iterator):
            raise TypeError(
                f"data is a one-shot iterator ({type(data).__name__}); every product is a pass "
                "over the data, so pass a tf.data.Dataset, a list of batches or another "
                "re-iterable instead"
            )
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
            self._data = data
        else:
            raise TypeError(f"data must be one (inputs, targets) batch, a tf.data.Dataset or "
                            f"an iterable of batches; got {type(data).__name__}")

    def __iter__(self) -> Iterator[Any]:
        empty = True
        for batch in self._data:
            empty = False
            yield as_tensors(batch) if self.dataset is None else batch
        if empty:
            raise ValueError("data yielded no batches")

    def as_dataset(self) -> tf.data.Dataset:
        """The batches as a ``tf.data.Dataset`` (re-iterated on every pass), for
        ``tf.distribute``: a dataset as is, other data through ``from_generator`` with the
        signature of all the batches (:func:`merged_spec`: the sample dimension left
        unknown, and every other dimension in which the batches differ, such as sequence
        batches of different lengths)."""
        if self.dataset is not None:
            return self.dataset
        spec = merged_spec(self._data)
        return tf.data.Dataset.from_generator(lambda: iter(self), output_signature=spec)


def relaxed_spec(batch: Any) -> Any:
    """The ``tf.TensorSpec`` structure of ``batch`` with the leading (sample) dimension of
    every tensor of rank >= 1 left unknown, so that one trace serves every batch size."""

    def spec(t: Any) -> tf.TensorSpec:
        shape, dtype = _shape_dtype(t)
        if shape:
            shape[0] = None
        return tf.TensorSpec(shape, dtype)

    return tf.nest.map_structure(spec, batch)


def _shape_dtype(t: Any) -> tuple[list, tf.DType]:
    """The shape (a list) and dtype of a tensor, a variable or an array (without copying
    it), or of anything else as ``tf.convert_to_tensor`` makes it."""
    if isinstance(t, (tf.Tensor, tf.Variable)):
        return t.shape.as_list(), t.dtype
    if isinstance(t, np.ndarray) and t.dtype.kind in "biufc":
        return list(t.shape), tf.as_dtype(t.dtype)
    t = tf.convert_to_tensor(t)
    return t.shape.as_list(), t.dtype


def merged_spec(batches: Iterable[Any]) -> Any:
    """One spec structure that every batch of ``batches`` fits (one pass; no batch is
    kept): :func:`relaxed_spec` with every dimension in which two batches differ (or
    whose rank differs) left unknown too. Batches of different structures or dtypes raise
    a ValueError."""
    merged = None
    for i, batch in enumerate(batches):
        spec = relaxed_spec(batch)
        if merged is None:
            merged = spec
            continue
        try:
            tf.nest.assert_same_structure(merged, spec)
        except (TypeError, ValueError) as err:
            raise ValueError(f"batch {i} is structured differently from batch 0 ({err}); "
                             "every batch must have the same structure") from None

        def merge(a: tf.TensorSpec, b: tf.TensorSpec, i: int = i) -> tf.TensorSpec:
            if a.dtype != b.dtype:
                raise ValueError(f"batch {i} holds a tensor of dtype {b.dtype.name} where "
                                 f"batch 0 holds {a.dtype.name}; every batch must have the "
                                 "same dtypes")
            return tf.TensorSpec(a.shape.most_specific_compatible_shape(b.shape), a.dtype)

        merged = tf.nest.map_structure(merge, merged, spec)
    if merged is None:
        raise ValueError("data yielded no batches")
    return merged


def spec_key(spec: Any) -> tuple:
    """A hashable key of a spec structure (its leaves and its nesting)."""
    return (tuple(tf.nest.flatten(spec)),
            repr(tf.nest.map_structure(lambda _: 0, spec)))


def leading_count(batch: Any, inputs: Any) -> tf.Tensor:
    """Samples of a batch in a traced function: the leading dimension of the first tensor
    of ``inputs`` (float64)."""
    leaves = [t for t in tf.nest.flatten(inputs) if isinstance(t, (tf.Tensor, tf.Variable))]
    if not leaves or leaves[0].shape.rank == 0:
        raise ValueError(
            f"cannot tell how many samples a batch of type {type(batch).__name__} holds; "
            "return (mean_loss, count) from loss_fn, or pass batch_size_fn=lambda batch: ..."
        )
    return tf.cast(tf.shape(leaves[0])[0], tf.float64)


def count_of(batch: Any, inputs: Any, batch_size_fn: Callable[[Any], Any] | None) -> tf.Tensor:
    """``batch_size_fn(batch)`` when given, else :func:`leading_count`, as a float64 scalar."""
    if batch_size_fn is None:
        return leading_count(batch, inputs)
    return as_count(batch_size_fn(batch), "batch_size_fn")


def checked_total(counts: list[Any]) -> float:
    """The total of the batches' sample counts (tensors), read back once and checked:
    every count finite and >= 0, the total > 0."""
    host = np.asarray(tf.stack(counts).numpy(), dtype=np.float64)
    if not np.all(np.isfinite(host)) or np.any(host < 0):
        raise ValueError(f"the sample counts of the batches must be finite and >= 0; got "
                         f"{host.tolist()}")
    if not host.sum() > 0:
        raise ValueError("the data holds no samples (every batch has a count of 0)")
    return float(host.sum())


def as_count(value: Any, what: str) -> tf.Tensor:
    """A sample count (a number or a tensor of one element) as a float64 scalar tensor."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} returned a bool as a sample count; expected a number")
    try:
        t = tf.convert_to_tensor(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} returned {type(value).__name__} as a sample count; expected "
                        "a number") from None
    if t.shape.num_elements() != 1:
        raise ValueError(f"{what} returned a count of shape {tuple(t.shape)}; expected a "
                         "number")
    if not (t.dtype.is_floating or t.dtype.is_integer):
        raise TypeError(f"{what} returned a count of dtype {t.dtype.name}; expected a number")
    return tf.reshape(tf.cast(t, tf.float64), [])


def fingerprint(batch: Any) -> tf.Tensor:
    """A float64 scalar summarising every numeric tensor of ``batch``: the sum of its
    entries, plus their sum weighted by position (entry ``i`` of the ``s`` entries of the
    flattened tensor by ``(i + 1) / s``, so that a permutation -- a random flip, a shuffle
    within the batch -- changes it too), plus their count. Computed on the device inside
    the traced function (no read-back of its own); the same data in the same order gives
    the same value bit for bit."""
    total = tf.zeros((), tf.float64)
    for t in tf.nest.flatten(batch):
        if not isinstance(t, (tf.Tensor, tf.Variable)):
            continue
        if t.dtype.is_floating or t.dtype.is_integer or t.dtype == tf.bool:
            x = tf.reshape(tf.cast(t, tf.float64), [-1])
            size = tf.cast(tf.size(x), tf.float64)
            position = tf.range(1.0, size + 1.0, dtype=tf.float64) / tf.maximum(size, 1.0)
            total += tf.reduce_sum(x * (1.0 + position)) + size
    return total
