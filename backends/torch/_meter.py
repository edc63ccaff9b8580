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

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            key = _key(t)
        except RuntimeError:  # tensors without storage (e.g. functorch wrappers)
            return t
        if key not in self._seen:
            self._seen.add(key)
            self.nbytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def _key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t
