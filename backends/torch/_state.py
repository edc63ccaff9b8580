"""Snapshot and comparison of a model's state, and temporary normalisation modes.

specdens never changes the user's model: the operators work on clones of its parameters
and buffers (through :func:`torch.func.functional_call`), never touch ``.grad`` (products
go through :func:`torch.autograd.grad`) and only set train/eval modes inside
:func:`normalisation_modes` (every module back in the mode it had when the operator was
built, BatchNorm in the requested one), which restores them. :class:`ModelState` lets
callers and tests check this bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn.modules.batchnorm import _BatchNorm

BATCHNORM_MODES = ("batch", "population")


@dataclass
class ModelState:
    """Copies of everything specdens promises not to change.

    Attributes
    ----------
    parameters, buffers : dict[str, torch.Tensor]
        Clones of the values.
    grads : dict[str, torch.Tensor | None]
        Clones of the ``.grad`` fields (``None`` kept as ``None``).
    requires_grad : dict[str, bool]
    training : dict[str, bool]
        ``module.training`` for every submodule (by qualified name; ``""`` is the model).
    """

    parameters: dict
    buffers: dict
    grads: dict
    requires_grad: dict
    training: dict

    @classmethod
    def capture(cls, model: torch.nn.Module) -> ModelState:
        """Snapshot ``model`` (clones, so later in-place changes do not reach it)."""
        params = dict(model.named_parameters(remove_duplicate=False))
        return cls(
            parameters={n: p.detach().clone() for n, p in params.items()},
            buffers={n: b.detach().clone() for n, b in model.named_buffers()},
            grads={n: None if p.grad is None else p.grad.detach().clone()
                   for n, p in params.items()},
            requires_grad={n: p.requires_grad for n, p in params.items()},
            training={n: m.training for n, m in model.named_modules()},
        )

    def differences(self, model: torch.nn.Module) -> list[str]:
        """What differs, bit for bit, between this snapshot and ``model`` now (empty: none)."""
        now = ModelState.capture(model)
        out = []
        for field in ("parameters", "buffers", "grads"):
            a, b = getattr(self, field), getattr(now, field)
            if a.keys() != b.keys():
                out.append(f"{field}: names changed")
                continue
            for name in a:
                x, y = a[name], b[name]
                if (x is None) != (y is None):
                    out.append(f"{field}[{name}]: None changed")
                elif x is not None and not _bitwise_equal(x, y):
                    out.append(f"{field}[{name}]: values changed")
        for field in ("requires_grad", "training"):
            if getattr(self, field) != getattr(now, field):
                out.append(f"{field} changed")
        return out

    def restore(self, model: torch.nn.Module) -> None:
        """Write the snapshot back into ``model`` in place."""
        with torch.no_grad():
            for n, p in model.named_parameters(remove_duplicate=False):
                p.copy_(self.parameters[n])
                p.requires_grad_(self.requires_grad[n])
                g = self.grads[n]
                p.grad = None if g is None else g.clone()
            for n, b in model.named_buffers():
                b.copy_(self.buffers[n])
        for n, m in model.named_modules():
            m.training = self.training[n]


def _bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal bit for bit (so NaNs compare equal to themselves and -0.0 differs from 0.0)."""
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
        return False
    return bool(torch.equal(x.detach().reshape(-1).contiguous().view(torch.uint8),
                            y.detach().reshape(-1).contiguous().view(torch.uint8)))


def check_batchnorm(model: torch.nn.Module, batchnorm: str) -> None:
    """Validate ``batchnorm`` for this model (population statistics need running stats)."""
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm={batchnorm!r}; choose 'batch' (batch statistics, as in "
                         "Ghorbani et al. 2019) or 'population' (running statistics)")
    if batchnorm == "population":
        for name, m in model.named_modules():
            if isinstance(m, _BatchNorm) and (m.running_mean is None or m.running_var is None):
                raise ValueError(f"batchnorm='population' but {name or 'the model'} "
                                 f"({type(m).__name__}) keeps no running statistics "
                                 "(track_running_stats=False); use batchnorm='batch'")


def training_modes(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """``(module, module.training)`` for every submodule of ``model`` (itself included):
    the modes an operator evaluates the loss in, recorded when it is built."""
    return [(m, m.training) for m in model.modules()]


@contextlib.contextmanager
def normalisation_modes(model: torch.nn.Module, batchnorm: str,
                        modes: list[tuple[torch.nn.Module, bool]] | None = None
                        ) -> Iterator[None]:
    """The recorded train/eval modes, and BatchNorm layers on batch or population
    statistics, for the duration of the block.

    ``modes``: ``(module, training)`` pairs (:func:`training_modes` when the operator was
    built) set first, so that the operator stays the function it was built for even if
    the model is switched to ``train()`` or ``eval()`` afterwards (dropout, or any module
    whose forward reads ``self.training``); None: the modules keep their current modes.
    Then BatchNorm: ``"batch"``: ``training=True`` and ``track_running_stats=False``, so
    that the layer normalises by the batch statistics and updates no running statistics
    (momentum-free); ``"population"``: ``training=False`` (the running statistics). Every
    flag is restored on exit, also after an exception.

    ``torch.nn.functional.scaled_dot_product_attention`` runs on its math kernel in the
    block: the fused kernels (flash, memory-efficient) have no second derivative, so a
    Hessian-vector product through them would raise.
    """
    # the modules whose current mode is not the recorded one: set, and restored on exit
    changed = [(m, m.training, recorded) for m, recorded in modes or ()
               if m.training != recorded]
    try:
        for m, _, recorded in changed:
            m.training = recorded
        with _math_attention():
            yield from _batchnorm_modes(model, batchnorm)
    finally:
        for m, current, _ in changed:
            m.training = current


def _math_attention() -> contextlib.AbstractContextManager:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 picks kernels by global flags only
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _batchnorm_modes(model: torch.nn.Module, batchnorm: str) -> Iterator[None]:
    saved = []
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            saved.append((m, m.training, m.track_running_stats))
            if batchnorm == "batch":
                m.training = True
                m.track_running_stats = False
            else:
                m.training = False
    try:
        yield
    finally:
        for m, training, track in saved:
            m.training = training
            m.track_running_stats = track
