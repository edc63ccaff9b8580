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

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

COMPOSITES = (tf.RaggedTensor, tf.SparseTensor)


def _is_array(x: Any) -> bool:
    return isinstance(x, (tf.Tensor, tf.Variable, np.ndarray) + COMPOSITES)


def is_single_batch(data: Any) -> bool:
    """``data`` is one batch: a tensor or array, a dict, a tuple/list whose first item is a
    tensor or an array, a tuple whose first item is a dict (of model inputs; a *list* of
    dicts is a list of batches), or a multi-input batch (:func:`is_multi_input_batch`:
    ``([x1, x2], y)``, Keras's convention for a model of several inputs)."""
    if _is_array(data) or isinstance(data, dict):
        return True
    if not isinstance(data, (tuple, list)) or not data:
        return False
    if _is_array(data[0]) or (isinstance(data, tuple) and isinstance(data[0], dict)):
        return True
    return is_multi_input_batch(data)


def is_multi_input_batch(data: Any) -> bool:
    """Whether ``data`` is one batch ``(inputs, targets)`` or ``(inputs, targets,
    weights)`` whose inputs are a list or tuple of tensors or arrays (``([x1, x2], y)``),
    and the rest tensors or arrays (or dicts of them). As a list of batches it would be
    batches of different structures (a list, then a bare tensor), which no data is, so
    this reading is the only one; but its arrays must share their leading (sample)
    dimension, and a ValueError explains both readings when they do not."""
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        return False
    inputs, rest = data[0], list(data[1:])
    if not isinstance(inputs, (tuple, list)) or not inputs \
            or not all(_is_array(x) for x in inputs):
        return False
    flat_rest = []
    for item in rest:
        if isinstance(item, dict) and item and all(_is_array(v) for v in item.values()):
            flat_rest.extend(item.values())
        elif _is_array(item):
            flat_rest.append(item)
        else:
            return False
    dims = [_leading(x) for x in list(inputs) + flat_rest]
    if len({d for d in dims if d is not None}) > 1:
        raise ValueError(
            f"data is a {type(data).__name__} of {len(data)} items whose first is a "
            f"{type(inputs).__name__} of {len(inputs)} arrays and whose others are arrays. "
            f"Read as one multi-input batch (([x1, x2], y), Keras's convention for a model "
            f"of several inputs), its arrays must share their leading (sample) dimension, "
            f"but they have {dims}; read as a list of batches, its batches would differ in "
            "structure (a list, then a bare array), which is not allowed either. Pass one "
            "batch as ((x1, x2), y) with as many samples in each array, or several batches "
            "as a list of (inputs, targets) tuples: [((x1_a, x2_a), y_a), ((x1_b, x2_b), "
            "y_b)]")
    return True


def _leading(x: Any) -> int | None:
    """The static leading dimension of a tensor or array (None: rank 0 or unknown)."""
    shape = getattr(x, "shape", None)
    if shape is None:
        return None
    shape = tf.TensorShape(shape)
    if shape.rank is None or shape.rank == 0:
        return None
    return shape[0]


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
            if int(data.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
                raise ValueError(
                    "data is an infinite tf.data.Dataset (its cardinality is "
                    "tf.data.INFINITE_CARDINALITY, from .repeat() without a count): every "
                    "product is one pass over the data, which would never end. Remove the "
                    ".repeat(), or pass dataset.take(n) for the n batches the operator "
                    "should average over")
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
            _check_finite_py_dataset(data)
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


def _check_finite_py_dataset(data: Any) -> None:
    """Refuse a ``keras.utils.PyDataset`` that iterates without end: one whose
    ``num_batches`` is None (Keras's mark of an infinite one) or that defines neither
    ``num_batches`` nor ``__len__`` (its ``__iter__`` then counts up forever)."""
    keras = sys.modules.get("keras")
    py_dataset = getattr(getattr(keras, "utils", None), "PyDataset", None)
    if py_dataset is None or not isinstance(data, py_dataset):
        return
    try:
        num = data.num_batches
    except NotImplementedError:
        num = None
    if num is None:
        raise ValueError(
            f"data is a keras.utils.PyDataset ({type(data).__name__}) without an end: its "
            "num_batches is None (or it defines neither num_batches nor __len__), so its "
            "iteration never stops, and every product is one pass over the data. Define "
            "__len__ (or num_batches) returning the number of batches")


def relaxed_spec(batch: Any) -> Any:
    """The ``tf.TensorSpec`` structure of ``batch`` with the leading (sample) dimension of
    every tensor of rank >= 1 left unknown, so that one trace serves every batch size."""

    def spec(t: Any) -> Any:
        if isinstance(t, COMPOSITES):
            return _relaxed_composite_spec(t)
        shape, dtype = _shape_dtype(t)
        if shape:
            shape[0] = None
        return tf.TensorSpec(shape, dtype)

    return tf.nest.map_structure(spec, batch)


def _relaxed_composite_spec(t: Any) -> Any:
    """The spec of a ``tf.RaggedTensor`` or ``tf.SparseTensor`` with the leading (sample)
    dimension left unknown (its ragged dimensions are unknown already)."""
    shape = t.shape.as_list() if t.shape.rank is not None else None
    if shape:
        shape[0] = None
    if isinstance(t, tf.RaggedTensor):
        return tf.RaggedTensorSpec(shape, t.dtype, ragged_rank=t.ragged_rank,
                                   row_splits_dtype=t.row_splits.dtype)
    return tf.SparseTensorSpec(shape, t.dtype)


def _shape_dtype(t: Any) -> tuple[list, tf.DType]:
    """The shape (a list) and dtype of a tensor, a variable or an array (without copying
    it), or of anything else as ``tf.convert_to_tensor`` makes it; a composite tensor
    other than ``tf.RaggedTensor`` and ``tf.SparseTensor`` raises a TypeError."""
    if isinstance(t, (tf.Tensor, tf.Variable)):
        return t.shape.as_list(), t.dtype
    if isinstance(t, np.ndarray) and t.dtype.kind in "biufc":
        return list(t.shape), tf.as_dtype(t.dtype)
    if isinstance(t, tf.__internal__.CompositeTensor):
        raise TypeError(
            f"a batch holds a {type(t).__name__}, a composite tensor specdens does not "
            "support in batches: use dense tensors, tf.RaggedTensor or tf.SparseTensor")
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

        def merge(a: Any, b: Any, i: int = i) -> Any:
            if a.dtype != b.dtype:
                raise ValueError(f"batch {i} holds a tensor of dtype {b.dtype.name} where "
                                 f"batch 0 holds {a.dtype.name}; every batch must have the "
                                 "same dtypes")
            if isinstance(a, tf.TensorSpec) and isinstance(b, tf.TensorSpec):
                return tf.TensorSpec(a.shape.most_specific_compatible_shape(b.shape),
                                     a.dtype)
            common = a.most_specific_common_supertype([b]) if type(a) is type(b) else None
            if common is None:
                raise ValueError(f"batch {i} holds a {b} where batch 0 holds a {a}; every "
                                 "batch must have the same kinds of tensors")
            return common

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
    of ``inputs`` (a ``tf.RaggedTensor``'s rows, a ``tf.SparseTensor``'s dense leading
    dimension), float64."""
    leaves = [t for t in tf.nest.flatten(inputs)
              if isinstance(t, (tf.Tensor, tf.Variable) + COMPOSITES)]
    if not leaves or leaves[0].shape.rank == 0:
        raise ValueError(
            f"cannot tell how many samples a batch of type {type(batch).__name__} holds; "
            "return (mean_loss, count) from loss_fn, or pass batch_size_fn=lambda batch: ..."
        )
    first = leaves[0]
    if isinstance(first, tf.RaggedTensor):
        return tf.cast(first.nrows(), tf.float64)
    if isinstance(first, tf.SparseTensor):
        return tf.cast(first.dense_shape[0], tf.float64)
    return tf.cast(tf.shape(first)[0], tf.float64)


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
    within the batch -- changes it too), plus their count. A ``tf.RaggedTensor`` or
    ``tf.SparseTensor`` counts by its component tensors (values, and row splits or
    indices: where the values sit). Computed on the device inside the traced function (no
    read-back of its own); the same data in the same order gives the same value bit for
    bit."""
    total = tf.zeros((), tf.float64)
    for t in tf.nest.flatten(batch, expand_composites=True):
        if not isinstance(t, (tf.Tensor, tf.Variable)):
            continue
        if t.dtype.is_floating or t.dtype.is_integer or t.dtype == tf.bool:
            x = tf.reshape(tf.cast(t, tf.float64), [-1])
            size = tf.cast(tf.size(x), tf.float64)
            position = tf.range(1.0, size + 1.0, dtype=tf.float64) / tf.maximum(size, 1.0)
            total += tf.reduce_sum(x * (1.0 + position)) + size
    return total
