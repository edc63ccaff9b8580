"""How many bytes an autograd graph holds, measured while it is built."""

from __future__ import annotations

from typing import Any

import torch


class SavedBytes:
    """Count the distinct storages that autograd saves for backward inside the block.

    Uses :func:`torch.autograd.graph.saved_tensors_hooks`; storages of the tensors given in
    ``exclude`` (parameters, which exist anyway) are not counted. The count is an estimate
    of the memory a retained graph keeps alive: it includes the forward activations and
    the tensors saved by a ``create_graph=True`` backward.
    """

    def __init__(self, exclude: Any = ()):
        self._seen = {_key(t) for t in exclude}
        self.nbytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        # (with the tensor's version: a tensor packed by a hook skips autograd's own check
        # that it was not changed in place before backward uses it, see _unpack)
        try:
            version = t._version
        except RuntimeError:  # (tensors without a version counter)
            version = None
        try:
            key = _key(t)
        except RuntimeError:  # tensors without storage (e.g. functorch wrappers)
            return t, version
        if key not in self._seen:
            self._seen.add(key)
            self.nbytes += t.untyped_storage().nbytes()
        return t, version

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def _key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def _unpack(packed: tuple[torch.Tensor, int | None]) -> torch.Tensor:
    """The saved tensor, after autograd's check that it was not changed in place since it
    was saved, which saved-tensor hooks bypass: a stored graph of the operator would
    otherwise use the changed values (data modified after the operator was built, or a
    forward that modifies a saved activation in place) without an error."""
    t, version = packed
    if version is not None and t._version != version:
        raise RuntimeError(
            f"one of the tensors the operator's stored graphs keep (shape "
            f"{tuple(t.shape)}, {t.dtype}) has been modified by an inplace operation: it is "
            f"at version {t._version}; expected version {version}. The data (or a tensor "
            "the model's forward saves) was changed in place after the operator was built, "
            "or the forward changes a tensor autograd needs; build the operator again on "
            "the new data, or avoid the in-place operation (plain autograd raises on it too)")
    return t
