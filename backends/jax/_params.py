"""Which leaves of a parameter pytree span the operator's space, and how a flat vector maps
onto them.

A vector of the operator is the concatenation of ``leaf.reshape(-1)`` over the selected
leaves in :func:`jax.tree_util.tree_leaves` order (dict keys sorted, as JAX flattens
them) -- the layout of :func:`jax.flatten_util.ravel_pytree` restricted to the selection.
Leaves are named by their key paths joined with dots (``"params.Dense_0.kernel"``,
``"layers.0.weight"``), the names that ``mask`` patterns match.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_x64(dtype: Any, what: str) -> None:
    """A TypeError when ``dtype`` is float64 and ``jax_enable_x64`` is off (``what``: the
    start of the message): JAX would silently compute in float32."""
    if np.dtype(dtype) == np.float64 and not jax.config.read("jax_enable_x64"):
        raise TypeError(
            f"{what} but jax_enable_x64 is off, so JAX would silently compute in float32: "
            "enable it (jax.config.update('jax_enable_x64', True) at start-up, or build and "
            "use the operator inside `with jax.enable_x64(True):`), or cast params to float32")


def leaf_name(path: Any) -> str:
    """Dotted name of a key path (``DictKey``, ``SequenceKey``, ``GetAttrKey``...)."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def is_float_array(leaf: Any) -> bool:
    """A numpy or jax array of a floating dtype (what the default selection takes)."""
    if not isinstance(leaf, (jax.Array, np.ndarray)):
        return False
    return bool(jnp.issubdtype(leaf.dtype, jnp.floating))


def _mask_from_tree(mask: Any, params: Any) -> list[bool]:
    """Broadcast a boolean pytree ``mask`` (``params``' structure or a prefix of it)."""
    try:
        full = jax.tree_util.tree_map(
            lambda m, sub: jax.tree_util.tree_map(lambda _: m, sub), mask, params)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"mask must be a pytree of booleans with the structure of params (or a prefix "
            f"of it); {exc}") from None
    flags = jax.tree_util.tree_leaves(full)
    for f in flags:
        if not isinstance(f, (bool, np.bool_)):
            raise TypeError(f"mask leaves must be True or False; got {type(f).__name__}")
    return [bool(f) for f in flags]


def select(params: Any, mask: Any) -> list[bool]:
    """Which leaves of ``params`` are selected, in ``tree_leaves`` order.

    Parameters
    ----------
    params
        Any pytree (dicts, lists, flax ``FrozenDict``, equinox modules...).
    mask
        ``None``: every floating-point array leaf (numpy or jax); other leaves (integers,
        Python scalars, functions of an equinox module) are constants. A pytree of
        booleans with the structure of ``params`` or a prefix of it
        (``{"params": True, "batch_stats": False}``). A callable ``mask(name, leaf) ->
        bool``. A string or a sequence of strings: leaf names or ``fnmatch`` glob patterns
        (``"layers.1.*"``), each of which must match a leaf.
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(params)
    if not with_path:
        raise ValueError("params has no leaves: there is nothing to differentiate")
    names = [leaf_name(p) for p, _ in with_path]
    leaves = [leaf for _, leaf in with_path]
    if mask is None:
        flags = [is_float_array(leaf) for leaf in leaves]
        if not any(flags):
            raise ValueError("params has no floating-point array leaves; leaf types: "
                             f"{sorted({type(x).__name__ for x in leaves})}")
        return flags
    if isinstance(mask, str) or (isinstance(mask, Sequence) and mask
                                 and all(isinstance(m, str) for m in mask)):
        patterns = [mask] if isinstance(mask, str) else list(mask)
        flags = [False] * len(names)
        for pat in patterns:
            hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ValueError(f"mask: {pat!r} matches no leaf of params; its leaves are "
                                 f"{names}")
            for i in hits:
                flags[i] = True
    elif callable(mask) and not isinstance(mask, (dict, list, tuple)):
        flags = [bool(mask(n, leaf)) for n, leaf in zip(names, leaves, strict=True)]
    else:
        flags = _mask_from_tree(mask, params)
    bad = [n for n, leaf, f in zip(names, leaves, flags, strict=True)
           if f and not is_float_array(leaf)]
    if bad:
        raise TypeError(f"mask selects leaves that are not floating-point arrays: {bad}; a "
                        "Hessian needs floating-point parameters")
    if not any(flags):
        raise ValueError("mask selects no leaf of params")
    return flags


class ParamSpace:
    """The flat vector space of the selected leaves of a parameter pytree.

    Attributes
    ----------
    names, shapes : list
        Selected leaf names and shapes, in vector order.
    n : int
        Number of selected scalars.
    dtype
        The common dtype of the selected leaves (the operator's dtype).
    x0
        The selected values as one flat vector, placed by :meth:`place`.
    """

    def __init__(self, params: Any, mask: Any = None):
        flags = select(params, mask)
        with_path, self.treedef = jax.tree_util.tree_flatten_with_path(params)
        self.flags = flags
        leaves = [leaf for _, leaf in with_path]
        all_names = [leaf_name(p) for p, _ in with_path]
        chosen = [leaf for leaf, f in zip(leaves, flags, strict=True) if f]
        self.names = [n for n, f in zip(all_names, flags, strict=True) if f]
        self.shapes = [tuple(leaf.shape) for leaf in chosen]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.n = int(sum(self.sizes))
        dtypes = {np.dtype(leaf.dtype) for leaf in chosen}
        if len(dtypes) > 1:
            raise TypeError(
                f"the selected leaves have different dtypes {sorted(d.name for d in dtypes)}; "
                "select leaves of one dtype (mask=...) or cast params, e.g. "
                "jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)")
        dtype = dtypes.pop()
        check_x64(dtype, "params are float64")
        self.dtype = jnp.dtype(dtype)
        devices = set()
        for leaf in chosen:
            if isinstance(leaf, jax.Array):
                devices.add(frozenset(leaf.devices()))
        if len(devices) > 1:
            raise ValueError(
                "the selected leaves live on different devices "
                f"{sorted(str(sorted(map(str, d))) for d in devices)}; put params on one device "
                "(jax.device_put(params, device)) or pass mesh=... to shard the data")
        self.leaf_devices = devices.pop() if devices else None
        self._leaves = leaves
        # each leaf's role in :meth:`combine`: selected ("x"), another array ("frozen", an
        # argument of the compiled products) or a static value (part of their trace)
        self._roles = tuple("x" if f else ("frozen" if _is_array(leaf) else "static")
                            for leaf, f in zip(leaves, flags, strict=True))
        self._static = tuple(leaf for leaf, r in zip(leaves, self._roles, strict=True)
                             if r == "static")

    def structure(self) -> ParamSpace:
        """This space without its arrays: what a traced product needs (:meth:`split`,
        :meth:`combine`, :meth:`flatten`, :meth:`unflatten`), not :meth:`place`."""
        out = object.__new__(ParamSpace)
        out.__dict__.update(self.__dict__)
        out._leaves = None
        out.leaf_devices = None
        return out

    def trace_key(self) -> tuple:
        """What a traced product depends on besides array values: tree structure,
        selection, shapes, dtype and the static leaves (which may be unhashable: the
        caller checks)."""
        # (static leaves with their types: 1, 1.0 and True are equal but trace apart)
        static = tuple((type(leaf), leaf) for leaf in self._static)
        return (self.treedef, self._roles, tuple(self.shapes), self.dtype.name, static)

    # -- placement ----------------------------------------------------------------------
    def place(self, sharding: Any) -> tuple[Any, list[Any]]:
        """``(x0, frozen)``: the selected values as a flat vector and the other array leaves,
        put on ``sharding`` (a device or a replicated ``NamedSharding``)."""
        chosen = [leaf for leaf, f in zip(self._leaves, self.flags, strict=True) if f]
        x0 = jnp.concatenate([jnp.ravel(jnp.asarray(leaf)) for leaf in chosen])
        x0 = jax.device_put(x0.astype(self.dtype), sharding)
        frozen = [jax.device_put(leaf, sharding)
                  for leaf, f in zip(self._leaves, self.flags, strict=True)
                  if not f and _is_array(leaf)]
        return x0, frozen

    # -- vectors <-> pytrees (traceable) ----------------------------------------------------
    def split(self, x: Any) -> list[Any]:
        """Parameter-shaped pieces of a flat ``(n,)`` vector, in vector order."""
        out, o = [], 0
        for s, k in zip(self.shapes, self.sizes, strict=True):
            out.append(jnp.reshape(x[o:o + k], s))
            o += k
        return out

    def combine(self, x: Any, frozen: Sequence[Any]) -> Any:
        """The params pytree with the selected leaves taken from the flat vector ``x`` and
        the other array leaves from ``frozen`` (non-array leaves as given)."""
        sources = {"x": iter(self.split(x)), "frozen": iter(frozen),
                   "static": iter(self._static)}
        leaves = [next(sources[role]) for role in self._roles]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def flatten(self, tree: Any) -> Any:
        """A pytree with ``params``' structure (e.g. a gradient) as a flat vector of its
        selected leaves."""
        leaves = self.treedef.flatten_up_to(tree)
        parts = [jnp.ravel(leaf) for leaf, f in zip(leaves, self.flags, strict=True) if f]
        return jnp.concatenate(parts)

    def unflatten(self, v: Any) -> dict[str, Any]:
        """A flat vector as a dict of parameter-shaped arrays, by leaf name."""
        return dict(zip(self.names, self.split(v), strict=True))


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


Selector = None | str | Sequence[str] | Callable[[str, Any], bool] | Any
