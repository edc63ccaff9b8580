"""The PyTorch side of ``specdens investigate`` (:mod:`specdens.investigate`): the MLP,
one SGD step of each of the three runs, and a record of the spectrum with
:func:`specdens.backends.torch.tracking.track`.

Importing this module imports torch; :mod:`specdens.investigate` imports it only when an
investigation runs on ``--backend torch``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from specdens.backends.torch import gradient
from specdens.backends.torch.tracking import evaluate, track

from .investigate import hessian_batches

NAME = "torch"
BATCHNORM_TEXT = "`torch.nn.BatchNorm1d`: eps 1e-5, momentum 0.1"
INIT_TEXT = "PyTorch's default initialisation (`torch.manual_seed(seed)`)"
ORDER_TEXT = "`torch.randperm` with a generator seeded by the seed"


def versions() -> dict:
    """The framework's version, for ``summary.json``."""
    return {"torch": torch.__version__}


@contextlib.contextmanager
def session(config: Any) -> Iterator[dict]:
    """torch's intra-op threads set to ``config.threads`` for the investigation and
    restored afterwards; yields the settings for the report."""
    before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        yield {"threads": config.threads, "threads_note": "torch intra-op threads"}
    finally:
        torch.set_num_threads(before)


def mlp(width: int, depth: int, batchnorm: bool, classes: int, dtype: Any) -> torch.nn.Module:
    """Linear(-BatchNorm1d)-ReLU blocks and a linear output layer, with PyTorch's default
    initialisation (drawn from torch's global generator)."""
    layers: list = []
    fan_in = 64
    for _ in range(depth):
        layers.append(torch.nn.Linear(fan_in, width))
        if batchnorm:
            layers.append(torch.nn.BatchNorm1d(width))
        layers.append(torch.nn.ReLU())
        fan_in = width
    layers.append(torch.nn.Linear(fan_in, classes))
    return torch.nn.Sequential(*layers).to(dtype)


class Run:
    """One of the three trainings on torch (see :mod:`specdens.investigate`).

    Parameters
    ----------
    name
        ``"no-bn"``, ``"bn-batch"`` or ``"bn-population"``.
    config
        The :class:`~specdens.investigate.InvestigationConfig`.
    data
        The digits (:func:`specdens.investigate._digits`).
    weights
        ``[(W, b), ...]`` per linear layer in PyTorch's layout (``W`` of shape
        ``(out, in)``), or None for PyTorch's default initialisation under
        ``torch.manual_seed(config.seed)``.
    """

    def __init__(self, name: str, config: Any, data: dict, weights: list | None = None):
        self.name = name
        self.config = config
        dtype = getattr(torch, config.dtype)
        batchnorm = name != "no-bn"
        self.Xtr = torch.as_tensor(data["x_train"], dtype=dtype)
        self.ytr = torch.as_tensor(data["y_train"])
        self.Xte = torch.as_tensor(data["x_test"], dtype=dtype)
        self.yte = torch.as_tensor(data["y_test"])
        self.n_train = int(self.Xtr.shape[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = mlp(config.width, config.depth, batchnorm, data["classes"], dtype)
        if weights is not None:
            linears = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
            with torch.no_grad():
                for m, (W, b) in zip(linears, weights, strict=True):
                    m.weight.copy_(torch.as_tensor(np.asarray(W)))
                    m.bias.copy_(torch.as_tensor(np.asarray(b)))
        self.crit = torch.nn.CrossEntropyLoss()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=config.lr,
                                   momentum=config.momentum,
                                   weight_decay=config.weight_decay)
        bs = config.batch_size
        if name == "bn-batch":
            # Batch statistics depend on the batching: the Hessian's batches are fixed ones
            # of the training batch size, the same on every backend (hessian_batches).
            self.hess_data = [(self.Xtr[a:b], self.ytr[a:b])
                              for a, b in hessian_batches(self.n_train, bs)]
            self.bn_mode = "batch"
        else:
            self.hess_data = [(self.Xtr, self.ytr)]  # one batch: the same mean loss
            self.bn_mode = "population" if name == "bn-population" else "batch"
        self.batchnorm = self.bn_mode if batchnorm else None
        self.bn_layers = [m for m in self.model.modules()
                          if isinstance(m, torch.nn.BatchNorm1d)]
        self.parameters = int(sum(p.numel() for p in self.model.parameters()))
        self.hessian_batches = len(self.hess_data)
        self._gen = torch.Generator().manual_seed(config.seed)

    def permutation(self) -> Any:
        """The next epoch's order of the training samples."""
        return torch.randperm(self.n_train, generator=self._gen)

    def train_step(self, idx: Any) -> float:
        """One SGD step on the samples ``idx``; returns the mini-batch loss before it (a
        non-finite loss is returned without stepping)."""
        xb, yb = self.Xtr[idx], self.ytr[idx]
        model = self.model
        model.train()
        if self.name == "bn-population":
            with torch.no_grad():
                model(xb)  # update the running (population) statistics from this batch
            for m in self.bn_layers:
                m.eval()  # ... and normalise by them, as constants
        self.opt.zero_grad(set_to_none=True)
        loss = self.crit(model(xb), yb)
        value = float(loss.detach())
        if np.isfinite(value):
            loss.backward()
            self.opt.step()
        return value

    def finite(self) -> bool:
        """Whether the parameters, the BatchNorm statistics and the loss on the Hessian's
        data (as :meth:`record` evaluates it) are all finite; False: the run has diverged
        and cannot be recorded. The model is not changed."""
        with torch.no_grad():
            for t in (*self.model.parameters(), *self.model.buffers()):
                if not bool(torch.isfinite(t).all()):
                    return False
        try:
            loss, _ = evaluate(self.model, self.crit, self.hess_data, batchnorm=self.bn_mode,
                               accuracy=False)
        except FloatingPointError:  # (evaluate refuses a non-finite loss)
            return False
        return bool(np.isfinite(loss))

    def record(self, tracker: Any, step: int, extra: dict) -> None:
        """Record the spectrum at ``step`` (with the gradient's data and weight-decay
        parts, the parameter norm and the test accuracy in ``extra``)."""
        g_data = gradient(self.model, self.crit, self.hess_data, batchnorm=self.bn_mode)
        with torch.no_grad():
            pnorm = float(torch.sqrt(sum((p.double() ** 2).sum()
                                         for p in self.model.parameters())))
        track(tracker, self.model, self.crit, self.hess_data, step=step,
              batchnorm=self.bn_mode, weight_decay=self.config.weight_decay,
              extra={"test_accuracy": self._test_accuracy(), **extra,
                     "data_gradient_norm": float(torch.linalg.vector_norm(g_data)),
                     "weight_decay_gradient_norm": self.config.weight_decay * pnorm,
                     "param_norm": pnorm})

    def _test_accuracy(self) -> float:
        """Accuracy on the test split in evaluation mode (BatchNorm on running statistics);
        the model's modes are restored."""
        model = self.model
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                return float((model(self.Xte).argmax(dim=1) == self.yte)
                             .to(torch.float64).mean())
        finally:
            for m, t in modes.items():
                m.training = t
