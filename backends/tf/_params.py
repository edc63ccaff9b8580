"""Which variables span the operator's space, and how a flat vector maps onto them.

A vector of the operator is the concatenation of ``tf.reshape(v, [-1])`` over the selected
variables, in the order of ``model.trainable_variables`` followed by any selected
non-trainable ones in the order of ``model.variables``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf


def variable_name(var: Any) -> str:
    """A variable's name: ``path`` for Keras variables (``"sequential/dense/kernel"``),
    ``name`` without the ``":0"`` suffix for ``tf.Variable``."""
    path = getattr(var, "path", None)
    if isinstance(path, str) and path:
        return path
    name = str(getattr(var, "name", "variable"))
    return name[:-2] if name.endswith(":0") else name


def unique_names(variables: Sequence[Any]) -> list[str]:
    """Names of ``variables``, made unique by a ``#i`` suffix where two collide."""
    names = [variable_name(v) for v in variables]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if names.count(n) > 1:
            seen[n] = seen.get(n, 0) + 1
            out.append(f"{n}#{seen[n] - 1}")
        else:
            out.append(n)
    return out


def select_variables(variables: Sequence[Any], trainable: Sequence[Any], params: Any,
                     owner: str, prefix: str = "") -> list[int]:
    """Indices (into ``variables``) of the selected ones, in vector order.

    Parameters
    ----------
    variables
        Every variable of the model (``model.variables``).
    trainable
        ``model.trainable_variables``: the default selection and the order of the vector.
    params
        ``None``: the trainable variables of a floating dtype (a ``tf.Module``'s integer
        counter, ``tf.Variable(0)``, is trainable by default; it is left out). A string or
        an iterable of strings: variable names or ``fnmatch`` glob patterns
        (``"dense_1/*"``, ``"*/kernel"``), matched against the full name and against the
        name without ``prefix``; each must match at least one variable. An iterable of
        variables: those (by identity), each of which must belong to the model. Names and
        variables may be mixed. A selected variable that is not floating-point raises a
        TypeError.
    owner
        The model's class name, for error messages.
    prefix
        The model's own name (``"sequential/"``), which Keras puts in front of its
        variables' paths.
    """
    if not variables:
        raise ValueError(f"{owner} has no variables: build it first (call it on a batch, or "
                         "model.build(input_shape))")
    names = unique_names(variables)
    by_id = {id(v): i for i, v in enumerate(variables)}
    for i, v in enumerate(variables):  # a Keras variable's backing tf.Variable is the same
        inner = getattr(v, "value", None) if hasattr(v, "path") else None
        if isinstance(inner, tf.Variable):
            by_id.setdefault(id(inner), i)
    order = [by_id[id(v)] for v in trainable if id(v) in by_id]
    order += [i for i in range(len(variables)) if i not in set(order)]
    if params is None:
        chosen = [by_id[id(v)] for v in trainable if id(v) in by_id]
        chosen = [i for i in chosen if _is_floating(variables[i])]
        if not chosen:
            raise ValueError(f"{owner} has no floating-point trainable variables; select "
                             "variables explicitly with params=[names or variables]")
        return chosen
    if isinstance(params, (str, tf.Variable)) or hasattr(params, "path"):
        params = [params]
    if isinstance(params, dict):
        params = list(params.values())
    if not isinstance(params, Iterable):
        raise TypeError(f"params must be None, names, glob patterns or variables; got "
                        f"{type(params).__name__}")
    wanted: set[int] = set()
    for item in params:
        if isinstance(item, str):
            hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, item)
                    or (prefix and n.startswith(prefix)
                        and fnmatch.fnmatchcase(n[len(prefix):], item))]
            if not hits:
                raise ValueError(f"params: {item!r} matches no variable of {owner}; its "
                                 f"variables are {names}")
            wanted.update(hits)
        elif isinstance(item, tf.Variable) or hasattr(item, "path"):
            if id(item) not in by_id:
                raise ValueError(f"params: the variable {variable_name(item)!r} of shape "
                                 f"{tuple(item.shape)} is not a variable of {owner}")
            wanted.add(by_id[id(item)])
        else:
            raise TypeError(f"params entries must be names, glob patterns or variables; got "
                            f"{type(item).__name__}")
    bad = [f"{names[i]!r} ({tf.as_dtype(variables[i].dtype).name})" for i in order
           if i in wanted and not _is_floating(variables[i])]
    if bad:
        raise TypeError(f"params selects variables that are not floating-point: "
                        f"{', '.join(bad)}; a Hessian needs floating-point variables: leave "
                        "these out of params")
    return [i for i in order if i in wanted]


def _is_floating(var: Any) -> bool:
    """A variable of a floating dtype (integer counters and boolean flags have no
    derivatives)."""
    return tf.as_dtype(var.dtype).is_floating


class ParamSpace:
    """The flat vector space of the selected variables.

    Attributes
    ----------
    names, shapes : list
        Selected variable names and shapes, in vector order.
    sizes : list of int
        Number of scalars of each.
    n : int
        Total number of selected scalars.
    dtype : tf.DType
        Their common dtype.
    device : str
        The full name of the device the first one lives on (where vectors live).
    """

    def __init__(self, names: list[str], variables: list[Any]):
        dtypes = {tf.as_dtype(v.dtype) for v in variables}
        if len(dtypes) > 1:
            raise TypeError("the selected variables have different dtypes "
                            f"{sorted(d.name for d in dtypes)}; select variables of one dtype "
                            "(params=...) or build the model in one dtype")
        self.dtype = dtypes.pop()
        if not self.dtype.is_floating:
            raise TypeError(f"the selected variables have dtype {self.dtype.name}; a Hessian "
                            "needs floating-point variables")
        self.names = list(names)
        self.shapes = [tuple(int(s) for s in v.shape) for v in variables]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.n = int(sum(self.sizes))
        with tf.device(_device_of(variables[0])):
            self.device = tf.zeros((0,), dtype=self.dtype).device

    def split(self, v: tf.Tensor) -> list[tf.Tensor]:
        """A flat ``(n,)`` vector as tensors of the variables' shapes."""
        return [tf.reshape(c, s) for c, s in zip(tf.split(v, self.sizes), self.shapes,
                                                  strict=True)]

    def split_block(self, V: tf.Tensor) -> list[tf.Tensor]:
        """A ``(n, k)`` block as ``(k, *shape)`` tensors, one per variable."""
        Vt = tf.transpose(V)
        return [tf.reshape(c, (-1, *s)) for c, s in zip(tf.split(Vt, self.sizes, axis=1),
                                                        self.shapes, strict=True)]

    def flatten(self, tensors: Iterable[Any]) -> tf.Tensor:
        """Concatenate per-variable tensors into a flat ``(n,)`` vector."""
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)

    def flatten_block(self, tensors: Iterable[Any]) -> tf.Tensor:
        """Concatenate ``(k, *shape)`` tensors into a ``(n, k)`` block."""
        tensors = list(tensors)
        k = tf.shape(tensors[0])[0]
        return tf.transpose(tf.concat([tf.reshape(t, (k, -1)) for t in tensors], axis=1))


def _device_of(var: Any) -> str:
    inner = getattr(var, "value", var) if hasattr(var, "path") else var
    dev = getattr(inner, "device", "") or ""
    return dev or "/cpu:0"
