"""No host round trip per Lanczos step with the torch Hessian operator on a device.

CI has no GPU, so the engine and the operator are run on the CPU as they run on CUDA:
with the engine's ``_reads_are_free`` and the operator's ``_host_checks`` false (neither
then reads a value back to decide anything during the steps), and every way a torch
tensor's values reach the host is counted: ``item``, ``tolist``, ``numpy``, ``cpu``,
``__array__``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``, and every way
host data becomes a tensor (``torch.tensor``, ``as_tensor``, ``asarray`` and
``from_numpy`` of anything but a tensor): a host-to-device copy, which from pageable
memory synchronises too (``torch.cuda.set_sync_debug_mode`` flags it; it found the one
that ``test_reads_do_not_grow_with_steps`` once missed, on an H100). On CUDA each of
them waits for the device. A transfer per step makes the count grow with the number of
steps; the count must not.
"""

from __future__ import annotations

import pytest
import torch
from specdens.backends.torch import hessian
from specdens.backends.torch._operator import DataOperator

import specdens
from specdens.algorithms import lanczos as lanczos_module

METHODS = ("item", "tolist", "numpy", "cpu", "__array__", "__bool__", "__float__",
           "__int__", "__index__")
CREATORS = ("tensor", "as_tensor", "asarray", "from_numpy")


class HostReads:
    def __init__(self, monkeypatch):
        self.count = 0
        for name in METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))
        for name in CREATORS:
            monkeypatch.setattr(torch, name, self._counted_from_host(getattr(torch, name)))

    def _counted(self, f):
        def counted(*args, **kwargs):
            self.count += 1
            return f(*args, **kwargs)
        return counted

    def _counted_from_host(self, f):
        def counted(data, *args, **kwargs):
            if not isinstance(data, torch.Tensor):
                self.count += 1
            return f(data, *args, **kwargs)
        return counted


def as_on_a_device(monkeypatch):
    monkeypatch.setattr(lanczos_module, "_reads_are_free", lambda op: False)
    monkeypatch.setattr(DataOperator, "_host_checks", lambda self: False)


def model_and_data(num_batches):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(10, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (10,), generator=g)) for _ in range(num_batches)]
    return model, data


@pytest.mark.parametrize("reorth,graph_memory,method", [
    ("full", None, "graph"), ("local", None, "graph"), ("none", None, "graph"),
    ("full", 0, "graph"), ("local", 0, "graph"), ("none", 0, "graph"),
    ("full", None, "forward"), ("full", 0, "forward")])
def test_reads_do_not_grow_with_steps(monkeypatch, reorth, graph_memory, method):
    """(Cross-entropy's count of a batch is a device read: counted once, in the first
    pass, and never again in the products, whichever the method.)"""
    as_on_a_device(monkeypatch)
    model, data = model_and_data(3)
    kwargs = {} if graph_memory is None else {"graph_memory": graph_memory}
    op = hessian(model, torch.nn.CrossEntropyLoss(), data, method=method, **kwargs)
    counts = {}
    for steps in (10, 40):
        specdens.lanczos(op, steps, num_probes=2, reorth=reorth)  # warm-up
        reads = HostReads(monkeypatch)
        torch.ones(2)[0].item(), bool(torch.ones(1) > 0), torch.tensor(1.0)
        torch.as_tensor(torch.ones(1))  # a tensor already: no transfer
        assert reads.count == 3  # the counter sees the usual ways of reading and writing
        reads.count = 0
        r = specdens.lanczos(op, steps, num_probes=2, reorth=reorth)
        assert r.num_steps == steps
        counts[steps] = reads.count
        monkeypatch.undo()
        as_on_a_device(monkeypatch)
    assert counts[40] == counts[10], counts


@pytest.mark.parametrize("change", [lambda x: x + 1.0, lambda x: x.flip(0)],
                         ids=["shifted", "permuted"])
def test_data_that_changes_between_passes_is_still_caught_on_a_device(monkeypatch, change):
    """Off the CPU the fingerprint check is not read back per product: a changed batch
    (also one whose samples only change places) makes the product NaN, which the engine
    reports at the end, naming the cause."""
    as_on_a_device(monkeypatch)
    model, data = model_and_data(2)
    passes = {"n": 0}

    class Changing:
        def __iter__(self):
            passes["n"] += 1
            for i, (x, y) in enumerate(data):
                yield (change(x) if passes["n"] == 4 and i == 1 else x), y

    op = hessian(model, torch.nn.CrossEntropyLoss(), Changing(), graph_memory=0)
    with pytest.raises(FloatingPointError, match="data that changed between passes"):
        specdens.lanczos(op, 8)
