"""What counts as a batch and how batches weigh, for the torch backend, against
torch.func.hessian of the loss of all the data at once (float64).

* ``CrossEntropyLoss``/``NLLLoss`` with ``ignore_index`` or class weights average over the
  counted targets, not the samples: batches weigh by that denominator, so the operator is
  the Hessian of ``criterion(model(X_all), y_all)`` whatever the batching (a weighting by
  batch length is wrong by ~1e-1 here);
* mappings other than ``dict`` (``UserDict``, a tokenizer's ``BatchEncoding``) are batches
  too: counted, fingerprinted and moved like dicts;
* ``((x1, x2), y)`` is one batch of a two-input model;
* an empty parameter selection, a non-finite ``weight_decay`` and an accuracy callable
  without a criterion are refused with errors that say so.

Tolerance: the same float64 sums in other orders, ~1e-15 relative (see
test_torch_hessian.py); 1e-10 is far below any weighting error.
"""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import flat_function_hessian
from specdens.backends.torch import gradient, hessian, tracking
from torch.func import functional_call

TOL = 1e-10


def model_and_data(seed=0, n=20):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, X, y


def dense_hessian(model, loss_of_params):
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach() for n, p in model.named_parameters()}
    return flat_function_hessian(names, base, loss_of_params, with_gradient=True)


def rel(A, B):
    return float(torch.linalg.norm(A - B) / torch.linalg.norm(B))


@pytest.mark.parametrize("criterion", [
    torch.nn.CrossEntropyLoss(),                      # ignore_index=-100 in the targets
    torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64)),
    torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64),
                              ignore_index=1, label_smoothing=0.1),
    torch.nn.CrossEntropyLoss(reduction="sum", weight=torch.tensor([2.0, 1.0, 0.5],
                                                                   dtype=torch.float64)),
], ids=["ignore_index", "class-weights", "weights+ignore+smoothing", "sum+weights"])
def test_class_index_losses_weigh_batches_by_their_counted_targets(criterion):
    model, X, y = model_and_data()
    y = y.clone()
    y[:7] = -100 if criterion.ignore_index == -100 else y[:7]   # a batch mostly ignored
    batches = [(X[:10], y[:10]), (X[10:17], y[10:17]), (X[17:], y[17:])]
    N = len(X)
    # the loss of all the data at once, as a mean (a "sum" criterion divided by its count)
    keep = (y != criterion.ignore_index)
    w = torch.ones(3, dtype=torch.float64) if criterion.weight is None else criterion.weight
    denom = float((w[torch.where(keep, y, 0)] * keep).sum())
    scale = 1.0 / denom if criterion.reduction == "sum" else 1.0
    H_ref, g_ref = dense_hessian(
        model, lambda p: scale * criterion(functional_call(model, p, (X,)), y))
    op = hessian(model, criterion, batches)
    assert rel(op.to_dense(), H_ref) <= TOL
    assert op.num_samples == pytest.approx(denom, rel=1e-15)
    assert rel(gradient(model, criterion, batches), g_ref) <= TOL
    # the weighting by batch length that this replaces is visibly wrong here
    lengths = sum((len(xb) / N) * dense_hessian(
        model, lambda p, xb=xb, yb=yb: criterion(functional_call(model, p, (xb,)), yb)
        / (float((w[torch.where(yb != criterion.ignore_index, yb, 0)]
                  * (yb != criterion.ignore_index)).sum())
           if criterion.reduction == "sum" else 1.0))[0] for xb, yb in batches)
    assert rel(lengths, H_ref) > 1e-3


class KLFromLogits(torch.nn.KLDivLoss):
    """KLDivLoss of the model's logits against target probabilities."""

    def forward(self, logits, target):
        return super().forward(torch.nn.functional.log_softmax(logits, 1), target)


@pytest.mark.filterwarnings("ignore:reduction:UserWarning")   # KLDivLoss's about 'mean'
@pytest.mark.parametrize("method", ["graph", "forward"])
def test_kl_div_batchmean_is_the_mean_over_samples(method):
    """reduction='batchmean' (the sum over a sample's classes, averaged over the samples)
    is a per-sample mean: uneven batches give the Hessian and the gradient of
    KLDivLoss(reduction='batchmean') of all the data at once."""
    model, X, _ = model_and_data()
    g = torch.Generator().manual_seed(3)
    P = torch.softmax(torch.randn(len(X), 3, generator=g, dtype=torch.float64), 1)
    crit = KLFromLogits(reduction="batchmean")
    batches = [(X[:10], P[:10]), (X[10:17], P[10:17]), (X[17:], P[17:])]
    H_ref, g_ref = dense_hessian(model, lambda p: crit(functional_call(model, p, (X,)), P))
    op = hessian(model, crit, batches, method=method)
    assert op.num_samples == len(X)
    assert rel(op.to_dense(), H_ref) <= TOL
    assert rel(gradient(model, crit, batches), g_ref) <= TOL
    loss, _ = tracking.evaluate(model, crit, batches)
    with torch.no_grad():
        assert loss == pytest.approx(float(crit(model(X), P)), rel=1e-13)
    # 'mean' is another loss: the mean over every entry, 1/3 of this one
    mean = hessian(model, KLFromLogits(reduction="mean"), batches, method=method)
    assert rel(3 * mean.to_dense(), H_ref) <= TOL


def test_a_batch_with_no_counted_target_is_refused():
    model, X, y = model_and_data()
    y = y.clone()
    y[:5] = -100
    with pytest.raises(ValueError, match="none that counts"):
        hessian(model, torch.nn.CrossEntropyLoss(), [(X[:5], y[:5]), (X[5:], y[5:])])


def test_ggn_and_evaluate_use_the_same_weights():
    """The GGN of a convex loss of a linear model is its Hessian; evaluate's loss is the
    whole data's, its accuracy counts the targets that are not ignored."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    _, X, y = model_and_data()
    y = y.clone()
    y[:6] = -100
    crit = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5],
                                                         dtype=torch.float64))
    batches = [(X[:8], y[:8]), (X[8:], y[8:])]
    from specdens.backends.torch import ggn
    H_ref, _ = dense_hessian(model, lambda p: crit(functional_call(model, p, (X,)), y))
    assert rel(ggn(model, crit, batches).to_dense(), H_ref) <= TOL
    loss, acc = tracking.evaluate(model, crit, batches)
    with torch.no_grad():
        out = model(X)
        assert loss == pytest.approx(float(crit(out, y)), rel=1e-13)
        keep = y != -100
        want = float((out.argmax(1) == y)[keep].double().mean())
    assert acc == pytest.approx(want, rel=1e-15)


class Encoding(collections.UserDict):
    """A mapping that is not a dict (as transformers' BatchEncoding)."""


@pytest.mark.parametrize("kind", [dict, collections.UserDict, Encoding])
def test_mapping_batches(kind):
    model, X, y = model_and_data()

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b["x"]), b["y"])

    H_ref, _ = dense_hessian(
        model, lambda p: torch.nn.functional.cross_entropy(functional_call(model, p, (X,)), y))
    single = hessian(model, data=kind({"x": X, "y": y}), loss_fn=loss_fn)
    assert single.num_samples == len(X)
    assert rel(single.to_dense(), H_ref) <= TOL
    batches = [kind({"x": X[:12], "y": y[:12]}), kind({"x": X[12:], "y": y[12:]})]
    op = hessian(model, data=batches, loss_fn=loss_fn)
    assert op.num_samples == len(X)
    assert rel(op.to_dense(), H_ref) <= TOL

    class Changing:          # yields other data on its second pass
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            shift = 0.0 if self.passes == 1 else 1.0
            return iter([kind({"x": X[:12] + shift, "y": y[:12]}),
                         kind({"x": X[12:], "y": y[12:]})])

    op = hessian(model, data=Changing(), loss_fn=loss_fn, graph_memory=0)
    v = torch.ones(op.shape[0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="different batches"):
        for _ in range(2):   # (passes over the data: building, then each product)
            op @ v


def test_two_input_model_single_batch():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 3)
            self.b = torch.nn.Linear(2, 3)

        def forward(self, inputs):
            x1, x2 = inputs
            return torch.tanh(self.a(x1) + self.b(x2))

    torch.manual_seed(0)
    model = TwoInputs().double()
    _, X, y = model_and_data()
    X2 = torch.randn(len(X), 2, dtype=torch.float64)
    crit = torch.nn.CrossEntropyLoss()
    H_ref, _ = dense_hessian(model, lambda p: crit(functional_call(model, p, ((X, X2),)), y))
    op = hessian(model, crit, ((X, X2), y))
    assert op.num_samples == len(X)
    assert rel(op.to_dense(), H_ref) <= TOL
    # a list of such batches is a list of batches
    batches = [((X[:9], X2[:9]), y[:9]), ((X[9:], X2[9:]), y[9:])]
    op = hessian(model, crit, batches)
    assert rel(op.to_dense(), H_ref) <= TOL
    # counted by the length of the first input, for any criterion and for evaluate
    mse = torch.nn.MSELoss()
    onehot = torch.nn.functional.one_hot(y, 3).double()
    mse_batches = [((X[:9], X2[:9]), onehot[:9]), ((X[9:], X2[9:]), onehot[9:])]
    H_mse, _ = dense_hessian(model, lambda p: mse(functional_call(model, p, ((X, X2),)), onehot))
    assert rel(hessian(model, mse, mse_batches).to_dense(), H_mse) <= TOL
    loss, acc = tracking.evaluate(model, crit, batches,
                                  accuracy=lambda out, t: (out.argmax(1) == t).double().mean())
    with torch.no_grad():
        out = model((X, X2))
        assert loss == pytest.approx(float(crit(out, y)), rel=1e-13)
        assert acc == pytest.approx(float((out.argmax(1) == y).double().mean()), rel=1e-15)


def test_clear_errors():
    model, X, y = model_and_data()
    crit = torch.nn.CrossEntropyLoss()
    for f in (hessian, gradient):
        with pytest.raises(ValueError, match="selected no parameter"):
            f(model, crit, (X, y), params=[])
        with pytest.raises(TypeError, match="weight_decay must be a finite number"):
            f(model, crit, (X, y), weight_decay=float("nan"))
    with pytest.raises(TypeError, match="needs a criterion"):
        tracking.evaluate(model, data=(X, y), loss_fn=lambda m, b: crit(m(b[0]), b[1]),
                          accuracy=lambda out, t: (out.argmax(1) == t).double().mean())


def test_loaders_that_leave_out_or_repeat_samples_warn():
    """A DataLoader that drops (``drop_last=True``, or a ``DistributedSampler`` with
    ``drop_last=True``) or pads (a ``DistributedSampler`` with ``drop_last=False``) changes
    the Hessian without an error: each gets one warning with the number of samples; a
    loader that yields every sample once gets none. (The sampler takes ``num_replicas`` and
    ``rank`` explicitly, so no process group is needed.)"""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    model, X, y = model_and_data(n=20)
    crit = torch.nn.CrossEntropyLoss()
    ds = TensorDataset(X, y)

    def caught(loader):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            op = hessian(model, crit, loader)
        return [str(x.message) for x in w], op

    found, op = caught(DataLoader(ds, batch_size=6, drop_last=True))
    assert len(found) == 1 and "last 2 sample(s) are left out" in found[0], found
    assert op.num_samples == 18  # what the loader yields: the operator is honest about it
    found, _ = caught(DataLoader(ds, batch_size=6, sampler=DistributedSampler(
        ds, num_replicas=3, rank=0, shuffle=False, drop_last=True)))
    assert len(found) == 1 and "leaves 2 sample(s) out" in found[0], found
    found, _ = caught(DataLoader(ds, batch_size=6, sampler=DistributedSampler(
        ds, num_replicas=3, rank=0, shuffle=False)))
    assert len(found) == 1 and "repeating 1 sample(s)" in found[0], found
    for fine in (DataLoader(ds, batch_size=6), DataLoader(ds, batch_size=5, drop_last=True),
                 DataLoader(ds, batch_size=6, sampler=DistributedSampler(
                     ds, num_replicas=4, rank=0, shuffle=False, drop_last=True))):
        assert caught(fine)[0] == []
