"""The GGN operator against J^T H_out J built densely (float64).

J by torch.autograd.functional.jacobian of the flattened outputs, H_out by
torch.autograd.functional.hessian of the criterion in the outputs; the tolerance is that of
the Hessian tests (same sums, other orders: ~1e-15 expected, 1e-10 asserted).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from specdens.backends.torch import ModelState, ggn, hessian
from specdens.backends.torch._state import normalisation_modes
from torch.func import functional_call

TOL = 1e-10


def dense_ggn(model, batches, crit, batchnorm="batch"):
    m = copy.deepcopy(model)
    names = [n for n, _ in m.named_parameters()]
    base = {n: p.detach() for n, p in m.named_parameters()}
    theta0 = torch.cat([base[n].reshape(-1) for n in names])
    N = sum(len(x) for x, _ in batches)
    G = 0
    for x, y in batches:
        def outputs(theta, x=x):
            d, o = dict(base), 0
            for n in names:
                k = base[n].numel()
                d[n] = theta[o:o + k].reshape(base[n].shape)
                o += k
            with normalisation_modes(m, batchnorm):
                return functional_call(m, d, (x,)).reshape(-1)
        out0 = outputs(theta0).detach()
        J = torch.autograd.functional.jacobian(outputs, theta0, vectorize=True)
        with torch.no_grad(), normalisation_modes(m, batchnorm):
            shape = functional_call(m, base, (x,)).shape
        H_out = torch.autograd.functional.hessian(lambda o, y=y, s=shape: crit(o.reshape(s), y),
                                                  out0)
        G = G + (len(x) / N) * (J.T @ H_out @ J)
    return G


def rel(A, B):
    return float(torch.linalg.norm(A - B) / torch.linalg.norm(B))


@pytest.mark.parametrize("crit", [torch.nn.CrossEntropyLoss(), torch.nn.MSELoss()],
                         ids=["cross_entropy", "mse"])
@pytest.mark.parametrize("graph_memory", [None, 0])
def test_ggn_mlp_uneven_batches(crit, graph_memory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(19, 4, generator=g, dtype=torch.float64)
    if isinstance(crit, torch.nn.CrossEntropyLoss):
        y = torch.randint(0, 3, (19,), generator=g)
    else:
        y = torch.randn(19, 3, generator=g, dtype=torch.float64)
    batches = [(X[:8], y[:8]), (X[8:16], y[8:16]), (X[16:], y[16:])]
    before = ModelState.capture(model)
    op = ggn(model, crit, batches, graph_memory=graph_memory)
    G = op.to_dense()
    G_ref = dense_ggn(model, [(X, y)], crit)
    assert rel(G, G_ref) <= TOL
    lam = np.linalg.eigvalsh(G.numpy())
    assert lam[0] >= -1e-12 * lam[-1]  # PSD: convex criterion
    # it is not the Hessian (the network's second-order terms are dropped)
    assert rel(hessian(model, crit, batches).to_dense(), G_ref) > 1e-3
    assert before.differences(model) == []


def test_ggn_batchnorm_subset_weight_decay():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5),
                                torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(3)
    X = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (12,), generator=g)
    crit = torch.nn.CrossEntropyLoss()
    batches = [(X[:7], y[:7]), (X[7:], y[7:])]
    for bn in ("batch", "population"):
        G_ref = dense_ggn(model, batches, crit, batchnorm=bn)
        op = ggn(model, crit, batches, batchnorm=bn, weight_decay=0.1)
        n = G_ref.shape[0]
        assert rel(op.to_dense(), G_ref + 0.1 * torch.eye(n, dtype=torch.float64)) <= TOL
        sub = ggn(model, crit, batches, batchnorm=bn, params="3.*")
        assert sub.param_names == ["3.weight", "3.bias"]
        assert rel(sub.to_dense(), G_ref[-12:, -12:]) <= TOL
    with pytest.raises(TypeError, match="needs a criterion"):
        ggn(model, None, batches)


class KLFromLogits(torch.nn.KLDivLoss):
    """KLDivLoss of the model's logits against target probabilities."""

    def forward(self, logits, target):
        return super().forward(torch.nn.functional.log_softmax(logits, 1), target)


def test_ggn_kl_div_batchmean():
    """KLDivLoss(reduction='batchmean') weighs batches by their samples: the GGN of the
    loss of all the data at once."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(19, 4, generator=g, dtype=torch.float64)
    P = torch.softmax(torch.randn(19, 3, generator=g, dtype=torch.float64), 1)
    crit = KLFromLogits(reduction="batchmean")
    batches = [(X[:8], P[:8]), (X[8:16], P[8:16]), (X[16:], P[16:])]
    G_ref = dense_ggn(model, [(X, P)], crit)
    for graph_memory in (None, 0):
        assert rel(ggn(model, crit, batches, graph_memory=graph_memory).to_dense(),
                   G_ref) <= TOL


def test_ggn_of_parameters_the_outputs_do_not_use_is_zero():
    class AuxHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 3)
            self.aux = torch.nn.Linear(4, 2)     # trained by another loss

        def forward(self, x):
            return self.head(x)

    torch.manual_seed(0)
    model = AuxHead().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(11, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=g)
    crit = torch.nn.CrossEntropyLoss()
    batches = [(X[:6], y[:6]), (X[6:], y[6:])]
    G_ref = dense_ggn(model, [(X, y)], crit)[-10:, -10:]     # the aux block: exactly 0
    assert G_ref.shape == (10, 10) and not G_ref.any()
    for graph_memory in (None, 0):
        op = ggn(model, crit, batches, params="aux.*", graph_memory=graph_memory)
        assert torch.equal(op.to_dense(), G_ref)
