"""The JAX backend on batches with no samples, on data read as one batch, and the compiled
loop's default basis dtype.

* Padded samples (a count from ``loss_fn`` or ``batch_size_fn``) are weighted out: the
  Hessian, the gradient and the GGN match ``jax.hessian`` / ``jax.grad`` of the mean loss
  over the real samples (float64). A batch whose count is 0 (all padding: its masked mean
  loss is 0/0) is refused with a ValueError naming it, as in the torch backend. A NaN from
  a batch with samples still comes through; counts that are negative or NaN raise a
  ValueError.
* A list of arrays is one batch (``(inputs, targets)``); when the loss fails on it, the
  error says so and how to pass a list of one-array batches. A tuple whose inputs are a
  dict, ``({"a": Xa, "b": Xb}, y)``, is one batch too; a list or tuple of dicts is a
  sequence of dict batches.
* ``specdens.backends.jax.lanczos`` picks the core's default basis dtype (float32 for a
  float32 operator, even with float64 arithmetic) and then agrees with the core.

Tolerance (float64): the operator and the reference add the same few dozen terms in
another order (batch by batch against all data at once); each entry is off by a few ulps
of its largest terms, so ``|A - B| <= 64 * eps64 * max|B|`` (eps64 = 2.2e-16) leaves a
factor ~10 of margin over the rounding, while a batch that is counted wrongly (or a NaN)
is off by O(1).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from specdens.backends.jax import ggn, gradient, hessian, lanczos  # noqa: E402

import specdens  # noqa: E402

EPS64 = float(np.finfo(np.float64).eps)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def close(A, B):
    A, B = np.asarray(A), np.asarray(B)
    return np.abs(A - B).max() <= 64 * EPS64 * np.abs(B).max()


def masked_problem():
    """A softplus regression on 24 samples with a mask; the last batch is all padding."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((24, 3))
    M = np.ones(24)
    M[16:] = 0.0
    M[[1, 9]] = 0.0
    params = {"w": jnp.asarray(rng.standard_normal(3))}
    batches = [(X[:8], M[:8]), (X[8:16], M[8:16]), (X[16:], M[16:])]
    keep = M > 0
    return X, M, keep, params, batches


def masked_loss(p, b):
    x, m = b
    per = jnp.log1p(jnp.exp(x @ p["w"]))
    return jnp.sum(per * m) / jnp.sum(m), jnp.sum(m)


def real_loss(w, x):
    """The mean loss over the real samples ``x`` (the reference)."""
    return jnp.mean(jnp.log1p(jnp.exp(x @ w)))


# the references, each compiled as one program (eager, jax.hessian's operations compile
# one by one)
real_hessian = jax.jit(jax.hessian(real_loss))
real_grad = jax.jit(jax.grad(real_loss))


def test_padding_is_weighted_out_and_a_batch_with_no_samples_is_refused():
    X, M, keep, params, batches = masked_problem()
    w = params["w"]
    H_ref = real_hessian(w, X[keep])
    g_ref = real_grad(w, X[keep])
    data = batches[:2]              # padded samples (count from loss_fn), no empty batch
    op = hessian(masked_loss, params, data)
    assert op.num_samples == keep.sum()
    assert close(op.to_dense(), H_ref)
    # the compiled loop's pure pass: its products are the same
    r = lanczos(op, 3, num_probes=1, seed=0)
    ref = specdens.lanczos(specdens.aslinearoperator(np.asarray(H_ref)), 3, seed=0)
    assert np.isfinite(r.alpha).all()
    tol = 64 * EPS64 * (np.abs(ref.alpha).max() + 2 * np.abs(ref.beta).max())
    assert np.abs(r.alpha - ref.alpha).max() <= tol
    assert close(gradient(masked_loss, params, data), g_ref)
    # the count from batch_size_fn (on the host here)
    size = lambda b: jnp.sum(b[1])                                      # noqa: E731
    op2 = hessian(lambda p, b: masked_loss(p, b)[0], params, data, batch_size_fn=size)
    assert op2.num_samples == keep.sum()
    assert close(op2.to_dense(), H_ref)
    # the GGN of a linear model is the Hessian
    model = lambda p, x: x @ p["w"]                                     # noqa: E731
    crit = lambda out, t: jnp.sum(jnp.log1p(jnp.exp(out)) * t) / jnp.sum(t)  # noqa: E731
    G = ggn(model, crit, params, data, batch_size_fn=size)
    assert close(G.to_dense(), H_ref)
    # the all-padding batch (index 2) is refused everywhere, as in the torch backend
    match = "batch 2 of the data: it holds no samples"
    with pytest.raises(ValueError, match=match + r" \(loss_fn returned a count of 0\)"):
        hessian(masked_loss, params, batches)
    with pytest.raises(ValueError, match=match):
        gradient(masked_loss, params, batches)
    with pytest.raises(ValueError, match=match + r" \(batch_size_fn returned 0\)"):
        hessian(lambda p, b: masked_loss(p, b)[0], params, batches, batch_size_fn=size)
    with pytest.raises(ValueError, match=match):
        ggn(model, crit, params, batches, batch_size_fn=size)


def test_nan_of_a_batch_with_samples_still_comes_through():
    X, M, keep, params, batches = masked_problem()
    X = X.copy()
    X[3, 0] = np.nan                                  # a real sample of batch 0
    batches = [(X[:8], M[:8]), (X[8:16], M[8:16])]
    op = hessian(masked_loss, params, batches)
    assert np.isnan(np.asarray(op @ jnp.ones(3))).all()
    with pytest.raises(FloatingPointError, match="NaN or Inf entries"):
        gradient(masked_loss, params, batches)


@pytest.mark.parametrize("count", [0.0, -1.0, np.nan])
def test_counts_all_zero_negative_or_nan_raise(count):
    X, M, keep, params, batches = masked_problem()

    def loss(p, b):
        value, c = masked_loss(p, b)
        return value, jnp.where(jnp.sum(b[1]) > 0, c, count)    # the empty batch's count

    if count == 0.0:            # no samples at all
        batches = batches[2:]
        match = "holds no samples"
    else:
        match = "finite and non-negative"
    with pytest.raises(ValueError, match=match):
        hessian(loss, params, batches)
    with pytest.raises(ValueError, match=match):
        gradient(loss, params, batches)
    with pytest.raises(ValueError, match=match):
        hessian(lambda p, b: masked_loss(p, b)[0], params, batches,
                batch_size_fn=lambda b: jnp.where(jnp.sum(b[1]) > 0, jnp.sum(b[1]), count))


def test_a_list_of_arrays_is_one_batch_and_a_failure_says_so():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 3))
    params = {"w": jnp.asarray(rng.standard_normal(3))}

    def loss(p, x):                                   # a batch is one array
        return jnp.mean(jnp.log1p(jnp.exp(x @ p["w"])))

    for data in ([X[:20], X[20:]], (jnp.asarray(X[:20]), jnp.asarray(X[20:]))):
        for build in (hessian, gradient):
            with pytest.raises(TypeError, match=r"(?s)loss_fn raised TypeError.*read as ONE "
                               r"batch.*\[\(x,\) for x in batches\]") as info:
                build(loss, params, data)
            assert isinstance(info.value.__cause__, TypeError)
    # wrapped as advised: two batches, the exact Hessian
    op = hessian(lambda p, b: loss(p, b[0]), params, [(X[:20],), (X[20:],)])
    assert op.num_batches == 2
    assert close(op.to_dense(), real_hessian(params["w"], X))
    # one batch (inputs, targets) and a loss that works on it: no hint, no error
    op = hessian(lambda p, b: loss(p, b[0]) + 0 * jnp.sum(b[1]), params, [X[:20], X[20:]])
    assert op.num_batches == 1
    # a loss that fails on other data, (inputs, targets) of other shapes included: its own
    # error, unchanged
    with pytest.raises(ZeroDivisionError):
        hessian(lambda p, b: 1 / 0, params, X)
    with pytest.raises(ZeroDivisionError):
        hessian(lambda p, b: 1 / 0, params, (X, X[:, 0]))
    # the hint keeps the type of a ValueError (the loss's own checks)
    with pytest.raises(ValueError, match=r"(?s)got shape \(20,\).*read as ONE batch"):
        hessian(lambda p, b: b[0] @ p["w"], params, [X[:20], X[20:]])
    # the GGN: a list of 3 arrays is not (inputs, targets)
    with pytest.raises(ValueError, match="ggn needs every batch to be"):
        ggn(lambda p, x: x @ p["w"], lambda o, t: jnp.mean(o), params, [X[:10], X[10:20],
                                                                       X[20:]])


def test_a_tuple_of_dict_inputs_and_targets_is_one_batch():
    """``({"a": Xa, "b": Xb}, y)`` is one batch (as in the TensorFlow backend), the same
    as ``[({"a": Xa, "b": Xb}, y)]``: the Hessian and gradient of the loss on it (and
    ``evaluate`` its value). A list of dicts, or a tuple of dicts only, stays a sequence
    of dict batches."""
    from jax.flatten_util import ravel_pytree
    from specdens.backends.jax.tracking import evaluate

    rng = np.random.default_rng(1)
    Xa, Xb, y = rng.standard_normal((12, 3)), rng.standard_normal((12, 2)), rng.integers(
        0, 2, 12)
    params = {"wa": jnp.asarray(rng.standard_normal((3, 2))),
              "wb": jnp.asarray(rng.standard_normal((2, 2)))}

    def loss(p, batch):
        inputs, t = batch
        logits = jnp.tanh(inputs["a"] @ p["wa"] + inputs["b"] @ p["wb"])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, None], 1))

    one = ({"a": Xa, "b": Xb}, y)
    flat, unravel = ravel_pytree(params)
    H_ref, g_ref = jax.jit(lambda w: (jax.hessian(lambda w: loss(unravel(w), one))(w),
                                      jax.grad(lambda w: loss(unravel(w), one))(w)))(flat)
    for data in (one, [one]):
        op = hessian(loss, params, data)
        assert (op.num_batches, op.num_samples) == (1, 12)
        assert close(op.to_dense(), H_ref)
        assert close(gradient(loss, params, data), g_ref)
        assert evaluate(loss, params, data)[0] == pytest.approx(float(loss(params, one)),
                                                                 rel=1e-12, abs=0)
    # dict batches, in a list or a tuple: two batches of the mean loss over all 12
    def dict_loss(p, batch):
        return loss(p, ({"a": batch["a"], "b": batch["b"]}, batch["t"]))

    halves = [{"a": Xa[:5], "b": Xb[:5], "t": y[:5]}, {"a": Xa[5:], "b": Xb[5:], "t": y[5:]}]
    for data in (halves, tuple(halves)):
        op = hessian(dict_loss, params, data)
        assert (op.num_batches, op.num_samples) == (2, 12)
        assert close(op.to_dense(), H_ref)


def test_compiled_loop_has_the_cores_default_basis_dtype():
    """A float32 operator with float64 arithmetic: both runs keep a float32 basis (the
    products' float32 rounding bounds the orthogonality anyway) and so agree to float32
    rounding, m * eps32 * ||T|| (the products are the same, the sums in another order);
    explicit basis dtypes and float64 operators keep theirs."""
    lam = np.linspace(0.0, 1.0, 40) ** 2
    Q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((40, 40)))
    A32 = jnp.asarray((Q * lam) @ Q.T, jnp.float32)
    m = 12
    eager = specdens.lanczos(A32, m, num_probes=2, seed=1)
    comp = lanczos(A32, m, num_probes=2, seed=1, return_basis=True)
    assert (eager.dtype, eager.basis_dtype) == ("float64", "float32")
    assert (comp.dtype, comp.basis_dtype) == (eager.dtype, eager.basis_dtype)
    assert comp.basis.dtype == jnp.float32
    tol = m * float(np.finfo(np.float32).eps) * (np.abs(eager.alpha).max()
                                                 + 2 * np.abs(eager.beta).max())
    assert np.abs(comp.alpha - eager.alpha).max() <= tol
    assert np.abs(comp.beta - eager.beta).max() <= tol
    # with the shapes and options of the runs above (float32 reuses their compiled programs)
    for basis_dtype in ("float64", "float32"):
        c = lanczos(A32, m, num_probes=2, seed=1, basis_dtype=basis_dtype, return_basis=True)
        e = specdens.lanczos(A32, m, num_probes=2, seed=1, basis_dtype=basis_dtype)
        assert c.basis_dtype == e.basis_dtype == basis_dtype
    A64 = A32.astype(jnp.float64)
    assert (lanczos(A64, m, num_probes=2, seed=1, return_basis=True).basis_dtype
            == specdens.lanczos(A64, m, num_probes=2, seed=1).basis_dtype == "float64")
    # a float32 Hessian operator (its compiled product) with x64 on (of A32's size: the
    # eager engine's operations besides the product are those compiled above)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 40)).astype(np.float32)
    op = hessian(lambda p, x: jnp.mean(jnp.log1p(jnp.exp(x @ p["w"]))),
                 {"w": jnp.asarray(rng.standard_normal(40), jnp.float32)}, X)
    assert op.shape == A32.shape
    assert (lanczos(op, m, num_probes=2, seed=1).basis_dtype
            == specdens.lanczos(op, m, num_probes=2, seed=1).basis_dtype == "float32")
