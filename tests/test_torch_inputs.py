"""Inputs of the torch backend that were read wrongly or silently, against exact float64
references (torch.func.hessian, autograd):

* weight norm: torch's second derivative of ``torch._weight_norm`` is wrong, so
  ``hessian`` refuses the parameters that feed it (both methods, the parametrization and
  the legacy hook) and says what to write instead; the hand-written ``g * v / ||v||`` it
  recommends gives the true Hessian; ``ggn`` and ``gradient`` are unaffected;
* a list of bare tensors is one batch (as documented): an error on it says how it was
  read and how to write single-tensor batches, ``[(x1,), (x2,)]``, which are batches;
* with a criterion the model is called as ``model(inputs)``: a ``forward(self, x1, x2)``
  model's TypeError says so and points to ``loss_fn``, which works;
* a batch without samples is refused by every entry point, naming the batch;
* a tied parameter is selected by any of its exact names, but a glob pattern matches
  the names ``named_parameters()`` lists only ("dec.*" does not pull in an ``enc.weight``
  tied to ``dec.weight``);
* a NaN in a later batch raises a FloatingPointError in ``gradient`` and ``evaluate``.

Tolerance: float64 products of these tiny models agree with torch.func.hessian to a few
hundred rounding errors (sums in other orders); ``TOL = 1000 eps`` relative in the
Frobenius norm. Finite differences of the (exact) gradient with step ``h = eps^(1/3)``
err by ``O(h^2) + O(eps / h)``, both ``~eps^(2/3)``: ``FD_TOL = 1000 eps^(2/3)``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import flat_function_hessian
from specdens.backends.torch import ggn, gradient, hessian, tracking
from specdens.backends.torch._data import is_single_batch
from torch.func import functional_call

EPS = torch.finfo(torch.float64).eps
TOL = 1000 * EPS
FD_TOL = 1000 * EPS ** (2 / 3)


def rel(A, B):
    A, B = A.detach(), B.detach()
    return float(torch.linalg.norm(A - B) / torch.linalg.norm(B))


def flat_hessian(names, values, f):
    """torch.func.hessian of ``f(dict of tensors)`` at ``values``, flat in ``names``
    order."""
    return flat_function_hessian(names, values, f)


def data(n=9, seed=1):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return X, y


# -- weight norm ------------------------------------------------------------------
class HandNorm(torch.nn.Module):
    """``Linear(3, 4)`` with weight ``g * v / ||v||`` (rows) written by hand."""

    def __init__(self, b, g, v):    # (in the order the weight-norm Linear lists them)
        super().__init__()
        self.b, self.g, self.v = (torch.nn.Parameter(t.detach().clone()) for t in (b, g, v))

    def forward(self, x):
        return x @ (self.g * self.v / self.v.norm(dim=1, keepdim=True)).T + self.b


def weight_norm_models():
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = torch.nn.Sequential(weight_norm(torch.nn.Linear(3, 4)), torch.nn.Tanh(),
                                torch.nn.Linear(4, 3)).double()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (torch deprecates the hook)
        legacy = torch.nn.Sequential(torch.nn.utils.weight_norm(torch.nn.Linear(3, 4)),
                                     torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    p = model[0].parametrizations.weight
    hand = torch.nn.Sequential(HandNorm(model[0].bias, p.original0, p.original1),
                               torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    hand[2].load_state_dict(model[2].state_dict())
    return model, legacy, hand


def torch_weight_norm_hessian_is_wrong():
    """Independently of specdens: the double backward of torch._weight_norm against the
    hand-written function's, on random float64 data."""
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    g = torch.rand(4, 1, generator=gen, dtype=torch.float64) + 0.5
    f1 = lambda v: (torch._weight_norm(v, g, 0) ** 3).sum()   # noqa: E731
    f2 = lambda v: ((g * v / v.norm(dim=1, keepdim=True)) ** 3).sum()   # noqa: E731
    H1 = torch.autograd.functional.hessian(f1, v)
    H2 = torch.autograd.functional.hessian(f2, v)
    return rel(H1, H2) > TOL


def test_weight_norm_hessian_is_refused_and_the_hand_written_one_is_exact():
    model, legacy, hand = weight_norm_models()
    X, y = data()
    crit = torch.nn.CrossEntropyLoss()
    # the recommended reparametrisation: the same function (same gradient) ...
    g_wn = gradient(model, crit, (X, y))
    g_hand = gradient(hand, crit, (X, y))
    assert rel(g_wn, g_hand) <= TOL
    # ... whose Hessian specdens takes exactly (vs torch.func.hessian of the functional
    # version written with Tensor.norm, both methods) ...
    names = [n for n, _ in hand.named_parameters()]
    values = {n: p.detach() for n, p in hand.named_parameters()}
    H_ref = flat_hessian(names, values,
                         lambda d: crit(functional_call(hand, d, (X,)), y))
    for method in ("graph", "forward"):
        op = hessian(hand, crit, (X, y), method=method)
        assert op.param_names == names
        assert rel(op.to_dense(), H_ref) <= TOL
    # ... and which is the true Hessian of the weight-norm model: finite differences of
    # its (correct) gradient, in the same parameter order (bias, g, v, ...)
    wn_names = ["0.bias", "0.parametrizations.weight.original0",
                "0.parametrizations.weight.original1", "2.weight", "2.bias"]
    assert [n for n, _ in model.named_parameters()] == wn_names
    assert [n.split(".")[-1] for n in names] == ["b", "g", "v", "weight", "bias"]
    params = dict(model.named_parameters())
    theta0 = torch.cat([params[n].detach().reshape(-1) for n in wn_names])
    sizes = [params[n].numel() for n in wn_names]
    h = EPS ** (1 / 3)

    def grad_at(theta):
        d = {n: t.reshape(params[n].shape) for n, t in zip(wn_names, theta.split(sizes),
                                                             strict=True)}
        with torch.enable_grad():
            th = {n: t.detach().requires_grad_(True) for n, t in d.items()}
            loss = crit(functional_call(model, th, (X,)), y)
            gs = torch.autograd.grad(loss, [th[n] for n in wn_names])
        return torch.cat([t.reshape(-1) for t in gs])

    E = torch.eye(len(theta0), dtype=torch.float64)
    H_fd = torch.stack([(grad_at(theta0 + h * e) - grad_at(theta0 - h * e)) / (2 * h)
                        for e in E], 1)
    assert rel(H_fd, H_ref) <= FD_TOL
    # torch's own second derivative of weight norm is wrong: hessian refuses the
    # parameters that feed it, for both methods and both APIs, saying why and what to do
    assert torch_weight_norm_hessian_is_wrong()
    for m in (model, legacy):
        for method in ("graph", "forward"):
            with pytest.raises(ValueError, match=r"weight norm .*second derivative.* is "
                                                 r"wrong.*g \* v / v\.norm"):
                hessian(m, crit, (X, y), method=method)
    # parameters that do not feed it are fine (the weight norm is then a constant)
    op = hessian(model, crit, (X, y), params=["2.*"])
    H_ref2 = flat_hessian(["2.weight", "2.bias"], {n: params[n].detach()
                                                   for n in ("2.weight", "2.bias")},
                          lambda d: crit(functional_call(model, d, (X,)), y))
    assert rel(op.to_dense(), H_ref2) <= TOL
    # the GGN (first derivatives of the model only) is that of the hand-written model
    assert rel(ggn(model, crit, (X, y)).to_dense(), ggn(hand, crit, (X, y)).to_dense()) <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rel(gradient(legacy, crit, (X, y)), g_hand) <= TOL


# -- what a batch is ---------------------------------------------------------------
def test_a_list_of_bare_tensors_is_one_batch_and_an_error_says_how_to_write_batches():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1).double()
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    x2 = torch.randn(3, 2, generator=gen, dtype=torch.float64)

    def loss_fn(m, x):
        return m(x).pow(2).mean()

    assert is_single_batch([x1, x2])             # as documented: [inputs, targets]
    for f in (hessian, gradient):
        with pytest.raises(TypeError, match=r"as ONE batch.*\[\(x1,\), \(x2,\)"):
            f(model, data=[x1, x2], loss_fn=loss_fn)
    with pytest.raises(TypeError, match="as ONE batch"):
        tracking.evaluate(model, data=[x1, x2], loss_fn=loss_fn)
    # the form the note recommends: two batches, weighted by their sizes
    batches = [(x1,), (x2,)]
    assert not is_single_batch(batches)
    op = hessian(model, data=batches, loss_fn=lambda m, b: loss_fn(m, b[0]))
    assert op.num_batches == 2 and op.num_samples == 7
    X = torch.cat([x1, x2])
    values = {n: p.detach() for n, p in model.named_parameters()}
    H_ref = flat_hessian(list(values), values,
                         lambda d: loss_fn(lambda x: functional_call(model, d, (x,)), X))
    assert rel(op.to_dense(), H_ref) <= TOL
    # an error that has nothing to do with the reading gets no note
    with pytest.raises(TypeError) as info:
        hessian(model, data=batches, loss_fn=lambda m, b: m(b))
    assert "ONE batch" not in "".join(getattr(info.value, "__notes__", []))


def test_a_model_with_several_arguments_is_told_to_use_loss_fn():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)

        def forward(self, x1, x2):
            return torch.tanh(self.a(x1) + self.b(x2))

    torch.manual_seed(0)
    model = Two().double()
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    x2 = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (5,), generator=gen)
    crit = torch.nn.CrossEntropyLoss()
    for f in (hessian, ggn, gradient, tracking.evaluate):
        with pytest.raises(TypeError, match=r"model\(inputs\) with ONE argument.*loss_fn="):
            f(model, crit, ((x1, x2), y))
    # what the note says to do
    op = hessian(model, data=((x1, x2), y), loss_fn=lambda m, b: crit(m(*b[0]), b[1]))
    values = {n: p.detach() for n, p in model.named_parameters()}
    H_ref = flat_hessian(list(values), values,
                         lambda d: crit(functional_call(model, d, (x1, x2)), y))
    assert rel(op.to_dense(), H_ref) <= TOL


def test_a_batch_without_samples_is_refused_everywhere_naming_it():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 3).double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    mse, ce = torch.nn.MSELoss(), torch.nn.CrossEntropyLoss(ignore_index=-1)
    Y = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    empty = [(X, Y), (X[:0], Y[:0])]
    for f in (hessian, ggn, gradient, tracking.evaluate):
        with pytest.raises(ValueError, match="batch 1 of the data: it holds no samples"):
            f(model, mse, empty)
        # a count of 0 from batch_size_fn, and no target that the criterion counts
        with pytest.raises(ValueError, match="batch 1 of the data: batch_size_fn returned "
                                             "a sample count of 0"):
            f(model, mse, empty, batch_size_fn=lambda b: len(b[0]))
        with pytest.raises(ValueError, match="batch 1 of the data: a batch of"):
            f(model, ce, [(X, y), (X, torch.full_like(y, -1))])
    for f in (hessian, gradient, tracking.evaluate):
        with pytest.raises(ValueError, match="batch 2 of the data: loss_fn returned a "
                                             "sample count of 0"):
            f(model, data=[(X, Y), (X, Y), (X[:3], Y[:3])],
              loss_fn=lambda m, b: (mse(m(b[0]), b[1]), len(b[0]) % 3))
    # the data without the empty batch: the loss of all of it
    loss, _ = tracking.evaluate(model, mse, empty[:1])
    with torch.no_grad():
        assert loss == pytest.approx(float(mse(model(X), Y)), rel=TOL)


def test_a_batch_without_samples_is_refused_with_the_loss_fn_default_count():
    """(The loss_fn path counts by the batch's first tensor; the loss of [x[:0]] is NaN.)"""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1).double()
    X = torch.randn(4, 2, dtype=torch.float64)
    for f in (gradient, tracking.evaluate):
        with pytest.raises(ValueError, match="batch 1 of the data: it holds no samples"):
            f(model, data=[(X,), (X[:0],)], loss_fn=lambda m, b: m(b[0]).pow(2).mean())


# -- tied parameters -----------------------------------------------------------------
def test_a_tied_parameter_is_selected_by_any_of_its_exact_names():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mid = torch.nn.Linear(3, 4)
            self.out = torch.nn.Linear(4, 3, bias=False)
            self.out2 = torch.nn.Linear(4, 3, bias=False)
            self.out2.weight = self.out.weight

        def forward(self, x):
            h = torch.tanh(self.mid(x))
            return self.out(h) + 0.3 * self.out2(h) ** 2

    torch.manual_seed(0)
    model = Tied().double()
    X, y = data()
    crit = torch.nn.CrossEntropyLoss()
    W = model.out.weight.detach()
    H_ref = flat_hessian(["out.weight"], {"out.weight": W},
                         lambda d: crit(functional_call(model, d, (X,)), y))
    for sel in (["out2.weight"], "out2.weight", ["out.weight", "out2.weight"], "out.*"):
        op = hessian(model, crit, (X, y), params=sel)
        assert op.param_names == ["out.weight"]
        assert rel(op.to_dense(), H_ref) <= TOL
    g = gradient(model, crit, (X, y), params=["out2.weight"])
    with torch.enable_grad():
        w = W.clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(crit(functional_call(model, {"out.weight": w}, (X,)),
                                            y), w)
    assert rel(g, g_ref.reshape(-1)) <= TOL
    with pytest.raises(ValueError, match=r"matches no parameter.*out2\.weight = out\.weight"):
        hessian(model, crit, (X, y), params=["out3.weight"])
    # out2's only name is an alias: a pattern does not reach it
    with pytest.raises(ValueError, match=r"'out2\.\*' matches no parameter.*patterns match "
                                         r"the listed names only"):
        hessian(model, crit, (X, y), params="out2.*")


def test_a_pattern_does_not_match_the_alias_of_a_tied_parameter():
    from specdens.backends.torch._params import select_parameters

    class Tied(torch.nn.Module):     # an autoencoder with tied weights, GPT-2's lm_head
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(4, 4)
            self.dec = torch.nn.Linear(4, 4)
            self.dec.weight = self.enc.weight
            self.wte = torch.nn.Embedding(4, 4)
            self.lm_head = torch.nn.Linear(4, 4, bias=False)
            self.lm_head.weight = self.wte.weight

        def forward(self, x):
            return self.lm_head(self.dec(torch.tanh(self.enc(x))))

    model = Tied().double()
    names = [n for n, _ in model.named_parameters()]
    assert names == ["enc.weight", "enc.bias", "dec.bias", "wte.weight"]

    def sel(p):
        return [n for n, _ in select_parameters(model, p)]

    assert sel("dec.*") == ["dec.bias"]
    assert sel("*.weight") == ["enc.weight", "wte.weight"]
    assert sel("dec.weight") == ["enc.weight"]           # the exact alias still selects
    assert sel(["dec.*", "dec.weight"]) == ["enc.weight", "dec.bias"]
    with pytest.raises(ValueError, match=r"'lm_head\.\*' matches no parameter"):
        sel("lm_head.*")
    assert sel("lm_head.weight") == ["wte.weight"]
    X = torch.randn(5, 4, dtype=torch.float64)
    op = hessian(model, data=[(X,)], loss_fn=lambda m, b: m(b[0]).pow(2).mean(),
                 params="dec.*")
    assert op.param_names == ["dec.bias"] and op.shape == (4, 4)


# -- non-finite losses ------------------------------------------------------------------
def test_a_nan_in_a_later_batch_raises():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 3)).double()
    X, y = data(n=11)
    X[9, 0] = float("nan")
    batches = [(X[:4], y[:4]), (X[4:8], y[4:8]), (X[8:], y[8:])]
    crit = torch.nn.CrossEntropyLoss()
    with pytest.raises(FloatingPointError, match="gradient has NaN or Inf in 31 of its 31"):
        gradient(model, crit, batches)
    with pytest.raises(FloatingPointError, match=r"mean loss over the data is nan.*batch 2"):
        tracking.evaluate(model, crit, batches)
    # finite data: unchanged
    loss, _ = tracking.evaluate(model, crit, batches[:2])
    with torch.no_grad():
        assert loss == pytest.approx(float(crit(model(X[:8]), y[:8])), rel=TOL)


# -- review findings: inference mode, in-place changes, partial criteria, RNG, tuples --
def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 3)).double()


def _reference(model, batches, crit):
    """torch.func.hessian of sum_b (n_b / N) crit(model(x_b), y_b), flat in parameter
    order."""
    names = [n for n, _ in model.named_parameters()]
    values = {n: p.detach() for n, p in model.named_parameters()}
    N = sum(len(x) for x, _ in batches)

    def f(d):
        return sum(len(x) / N * crit(functional_call(model, d, (x,)), y) for x, y in batches)

    return flat_hessian(names, values, f)


def test_inference_mode_is_refused_where_the_loss_is_differentiated():
    """Under torch.inference_mode() (Lightning's validation and test) the loss records no
    graph and torch.enable_grad() cannot switch that off: hessian() and gradient() gave
    all-zero results without an error. They raise now; products of an operator built
    outside run on its stored graphs (correct), and raise where they evaluate the loss."""
    model, crit = _mlp(), torch.nn.CrossEntropyLoss()
    X, y = data()
    batches = [(X[:5], y[:5]), (X[5:], y[5:])]
    with torch.inference_mode():
        for make in (lambda: hessian(model, crit, batches), lambda: ggn(model, crit, batches),
                     lambda: gradient(model, crit, batches)):
            with pytest.raises(RuntimeError, match="torch.inference_mode.. is on"):
                make()
    stored = hessian(model, crit, batches)
    fresh = hessian(model, crit, batches, graph_memory=0)
    eye = torch.eye(stored.shape[0], dtype=torch.float64)
    ref = _reference(model, batches, crit)
    with torch.inference_mode():
        assert rel(stored.matmat(eye), ref) <= TOL
        with pytest.raises(RuntimeError, match="torch.inference_mode.. is on"):
            fresh.matmat(eye)
    assert rel(fresh.matmat(eye), ref) <= TOL


def test_stored_graphs_keep_autograds_check_of_in_place_changes():
    """The saved-tensor hooks that measure the stored graphs bypassed autograd's version
    check: data changed in place after the operator was built, or a forward that changes
    a saved activation in place, gave a wrong Hessian (off by O(1)) without an error,
    where plain autograd and graph_memory=0 raise."""
    model, crit = _mlp(), torch.nn.CrossEntropyLoss()
    X, y = data()
    op = hessian(model, crit, [(X, y)])
    v = torch.ones(op.shape[0], dtype=torch.float64)
    op.matvec(v)
    X.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        op.matvec(v)

    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 4).double(), torch.nn.Linear(4, 3).double()

        def forward(self, x):
            h = torch.tanh(self.a(x))
            h += 1          # tanh saved its output for backward
            return self.b(h)

    torch.manual_seed(0)
    X, y = data()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        hessian(InPlace(), crit, [(X, y)])


def test_a_partial_loss_function_keeps_its_reduction():
    """partial(F.mse_loss, reduction="sum") was read as a mean (getattr(..., "reduction",
    "mean")): every batch's sum weighted by its size, 4.9 times the documented Hessian
    (the sum over all samples / N) here, and not even a multiple of it over uneven
    batches."""
    import functools

    import torch.nn.functional as F

    model = _mlp()
    X, _ = data()
    T = torch.randn(len(X), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    batches = [(X[:6], T[:6]), (X[6:], T[6:])]
    # sum_b (n_b / N) * sum_b / n_b = (sum over all samples) / N
    ref = _reference(model, batches,
                     lambda out, t: F.mse_loss(out, t, reduction="sum") / len(out))
    for crit in (functools.partial(F.mse_loss, reduction="sum"),
                 torch.nn.MSELoss(reduction="sum")):
        assert rel(hessian(model, crit, batches).to_dense(), ref) <= TOL
    # a partial without the keyword takes the function's default, "mean"
    mean = hessian(model, functools.partial(F.mse_loss), batches).to_dense()
    assert rel(mean, _reference(model, batches, torch.nn.MSELoss())) <= TOL
    with pytest.raises(ValueError, match="reduction='none'"):
        hessian(model, functools.partial(F.mse_loss, reduction="none"), batches)


def test_passes_over_a_data_loader_leave_torchs_random_stream_alone():
    """Every pass over a DataLoader draws its base seed from torch's global generator:
    hessian(), gradient() and every product moved the user's random stream on, so that
    recording the spectrum changed a seeded training run's later dropout and shuffles."""
    from torch.utils.data import DataLoader, TensorDataset

    model, crit = _mlp(), torch.nn.CrossEntropyLoss()
    X, y = data(n=20)
    loader = DataLoader(TensorDataset(X, y), batch_size=6, shuffle=False)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    op = hessian(model, crit, loader, graph_memory=0)
    op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    gradient(model, crit, loader)
    tracking.evaluate(model, crit, loader)
    assert torch.equal(torch.rand(3), expected)
    # and the operator is still the Hessian of the whole data
    batches = [(X[i:i + 6], y[i:i + 6]) for i in range(0, 20, 6)]
    assert rel(op.to_dense(), _reference(model, batches, crit)) <= TOL


def test_a_tuple_of_two_collections_is_two_batches_and_an_error_says_so():
    """((x1, x2), (y1, y2)) reads as two batches (as a list of batches); the loss's
    unpacking error said nothing about it."""
    class TwoInTwoOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3).double()

        def forward(self, x1, x2):
            return self.a(x1) + self.a(x2)

    X, y = data()
    one = ((X, X.flip(0)), (y, y.flip(0)))

    def loss_fn(model, batch):
        (x1, x2), (y1, _) = batch
        return torch.nn.functional.cross_entropy(model(x1, x2), y1)

    with pytest.raises(ValueError) as info:
        hessian(TwoInTwoOut(), loss_fn=loss_fn, data=one)
    assert "pass it in a list: data=[((x1, x2), (y1, y2))]" in "".join(info.value.__notes__)
    assert hessian(TwoInTwoOut(), loss_fn=loss_fn, data=[one]).shape == (12, 12)
