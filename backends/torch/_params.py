"""Which parameters span the operator's space, and how a flat vector maps onto them.

A vector of the operator is the concatenation of ``p.reshape(-1)`` over the selected
parameters, in the order of ``model.named_parameters()`` (shared parameters counted once).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch


def select_parameters(model: torch.nn.Module, params: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """The selected ``(name, parameter)`` pairs, in ``named_parameters()`` order.

    Parameters
    ----------
    model
        The user's module.
    params
        ``None``: every parameter with ``requires_grad=True``. A string or an iterable of
        strings: parameter names or ``fnmatch`` glob patterns (``"0.*"``, ``"*.weight"``);
        each must match at least one parameter. A string that is the exact name of a
        parameter selects that parameter only, and is not read as a pattern (a
        ``ModuleDict`` key may hold ``[``, ``]``, ``*`` or ``?``). A tied (shared)
        parameter is listed once, under its first name; its exact names, the aliases
        included, select it, but a pattern matches first names only (with ``dec.weight``
        tied to ``enc.weight``, ``"dec.weight"`` selects ``enc.weight`` while ``"dec.*"``
        does not). An iterable of
        tensors: those parameters (by identity); each must belong to ``model``. Strings
        and tensors may be mixed.
    """
    named = list(model.named_parameters())
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters")
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("every parameter of the model has requires_grad=False; select "
                             "parameters explicitly with params=[names or tensors]")
        return chosen
    if isinstance(params, (str, torch.Tensor)):
        params = [params]
    if isinstance(params, dict):
        params = list(params.values())
    if not isinstance(params, Iterable):
        raise TypeError(f"params must be None, names, glob patterns or tensors; got "
                        f"{type(params).__name__}")
    wanted: set[str] = set()
    names = [n for n, _ in named]
    by_id = {id(p): n for n, p in named}
    # every name of every parameter, a tied (shared) one's aliases included, and the
    # name under which named_parameters() lists it (its first)
    canonical = {n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    aliases = {n: c for n, c in canonical.items() if n != c}
    for item in params:
        if isinstance(item, str):
            # an exact name (an alias of a tied parameter included) selects that
            # parameter; a pattern matches the names named_parameters() lists only, so
            # "lm_head.*" does not pull in an embedding tied to lm_head.weight
            hits = ([item] if item in canonical else
                    [n for n in names if fnmatch.fnmatchcase(n, item)])
            if not hits:
                tied = (f" (tied parameters, listed once, also answer to the exact names "
                        f"{', '.join(f'{a} = {c}' for a, c in aliases.items())}; patterns "
                        f"match the listed names only)" if aliases else "")
                raise ValueError(f"params: {item!r} matches no parameter of "
                                 f"{type(model).__name__}; its parameters are {names}{tied}")
            wanted.update(canonical[n] for n in hits)
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ValueError(f"params: a tensor of shape {tuple(item.shape)} is not a "
                                 f"parameter of {type(model).__name__}")
            wanted.add(by_id[id(item)])
        else:
            raise TypeError(f"params entries must be names, glob patterns or tensors; got "
                            f"{type(item).__name__}")
    if not wanted:
        raise ValueError("params selected no parameter (an empty selection); pass names, glob "
                         "patterns or tensors of the model, or None for every trainable one")
    return [(n, p) for n, p in named if n in wanted]


class ParamSpace:
    """The flat vector space of the selected parameters.

    Attributes
    ----------
    names, shapes : list
        Selected parameter names and shapes, in vector order.
    n : int
        Total number of selected scalars.
    dtype, device
        The common dtype and device of the selected parameters.
    """

    def __init__(self, selected: list[tuple[str, torch.Tensor]]):
        dtypes = {p.dtype for _, p in selected}
        devices = {p.device for _, p in selected}
        if len(dtypes) > 1:
            raise TypeError("the selected parameters have different dtypes "
                            f"{sorted(str(d) for d in dtypes)}; select parameters of one dtype "
                            "(params=...) or cast the model (model.to(torch.float64))")
        if len(devices) > 1:
            raise ValueError("the selected parameters live on different devices "
                             f"{sorted(str(d) for d in devices)}; move the model to one device")
        self.dtype = dtypes.pop()
        self.device = devices.pop()
        if not self.dtype.is_floating_point:
            raise TypeError(f"the selected parameters have dtype {self.dtype}; a Hessian needs "
                            "floating-point parameters")
        self.names = [n for n, _ in selected]
        self.shapes = [tuple(p.shape) for _, p in selected]
        self.numels = [p.numel() for _, p in selected]
        self.n = int(sum(self.numels))

    def split(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat ``(n,)`` vector, one per parameter, in parameter shapes."""
        return [c.reshape(s) for c, s in zip(torch.split(v, self.numels), self.shapes,
                                                  strict=True)]

    def split_block(self, V: torch.Tensor) -> list[torch.Tensor]:
        """A ``(n, k)`` block as ``(k, *shape)`` tensors, one per parameter."""
        k = V.shape[1]
        Vt = V.T
        return [c.reshape((k, *s)) for c, s in zip(torch.split(Vt, self.numels, dim=1),
                                                     self.shapes, strict=True)]

    def flatten(self, tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
        """Concatenate per-parameter tensors (``None`` meaning zero) into a flat vector."""
        parts = []
        for t, k in zip(tensors, self.numels, strict=True):
            if t is None:
                parts.append(torch.zeros(k, dtype=self.dtype, device=self.device))
            else:
                parts.append(t.reshape(-1))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype,
                                                          device=self.device)

    def flatten_block(self, tensors: Iterable[torch.Tensor | None], k: int) -> torch.Tensor:
        """Concatenate ``(k, *shape)`` tensors into a ``(n, k)`` block."""
        parts = []
        for t, n in zip(tensors, self.numels, strict=True):
            if t is None:
                parts.append(torch.zeros(k, n, dtype=self.dtype, device=self.device))
            else:
                parts.append(t.reshape(k, n))
        return torch.cat(parts, dim=1).T


def stack_columns(cols: list[torch.Tensor]) -> torch.Tensor:
    """``(n,)`` columns as an ``(n, k)`` block stored column by column (the transpose of a
    contiguous ``(k, n)``): the engine works on rows, and reading a row-major ``(n, k)``
    block row-wise is a strided gather (6x slower per vector operation at k = 2)."""
    return torch.stack(cols, dim=0).T

