"""The engine on the JAX Hessian operator, and the compiled Lanczos loop.

* the per-batch product compiles once per distinct batch shape, and a 90-step SLQ
  compiles nothing between its second and its second-to-last step;
* the core's eager engine, and the compiled loop, read nothing back from the device
  during the steps, only a few arrays at the end (every host read of a jax array is
  counted: the transfer guard does not fire on the CPU backend);
* ``matmat`` is one pass over the data for a whole block of probes;
* ``specdens.backends.jax.lanczos`` (a ``lax.fori_loop`` inside ``jax.jit``) gives the
  core's coefficients from the same probes. With full reorthogonalisation both runs are
  backward stable, so they differ by rounding: |d alpha|, |d beta| <= c * m * eps * ||T||
  with c of order 1; 1e-12 * ||T|| at m <= 90 leaves a factor ~50 of margin and is far
  below any difference of algorithm (a skipped reorthogonalisation sweep, another probe:
  ~1e-2 and more). Without full reorthogonalisation rounding differences grow once
  Ritz values converge (Paige 1971), so the steps before that are compared, and the
  quadrature's moments, which stay stable (Greenbaum 1989);
* the loop is not unrolled: the traced program has the same size for 5 and 60 steps.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from specdens.backends.jax import (  # noqa: E402
    compiled,  # noqa: E402
    hessian,
    lanczos,
    slq,
)

import specdens  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def problem(h=16, sizes=(10, 10, 3), seed=0):
    """MLP 5-h-3 (n = 147 for h = 16), cross-entropy, batches of the given sizes (jax
    arrays on the device)."""
    rng = np.random.default_rng(seed)
    params = {"w1": jnp.asarray(rng.standard_normal((5, h)) / 2), "b1": jnp.zeros(h) + 0.1,
              "w2": jnp.asarray(rng.standard_normal((h, 3)) / 2), "b2": jnp.zeros(3)}
    N = sum(sizes)
    X, y = rng.standard_normal((N, 5)), rng.integers(0, 3, N)

    def loss(p, batch):
        x, t = batch
        out = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), t[:, None], axis=1))

    batches, s = [], 0
    for k in sizes:
        batches.append((jnp.asarray(X[s:s + k]), jnp.asarray(y[s:s + k])))
        s += k
    return loss, params, batches


@pytest.fixture(scope="module")
def shared():
    """One Hessian operator for the tests that do not count compilations: its products,
    the eager engine's operations (k = 2 probes, 40 steps) and the compiled loop compile
    once for all of them."""
    with jax.enable_x64(True):
        loss, params, batches = problem()
        yield hessian(loss, params, batches)


def spectrum_matrix(n=60, seed=3):
    rng = np.random.default_rng(seed)
    lam = np.concatenate([np.linspace(-1, 1, n - 3), [3.0, 5.0, 9.0]])
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return jnp.asarray((Q * lam) @ Q.T)


class CountingData:
    """A re-iterable over batches that counts its passes."""

    def __init__(self, batches):
        self.batches = batches
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@pytest.fixture
def compile_events():
    events = []

    def listener(name, duration, **kwargs):
        if name == COMPILE_EVENT:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


def test_90_step_slq_compiles_once_per_batch_shape(compile_events):
    loss, params, batches = problem()
    op = hessian(loss, params, batches)
    assert op.shape == (147, 147)
    after_step = []
    density = specdens.slq(op, num_steps=90, num_probes=4,
                           progress=lambda done, total: after_step.append(len(compile_events)))
    assert density.num_steps == 90
    # two batch shapes (10 and 3 samples): two traces of the per-batch product, two entries
    # in its compilation cache
    assert op.num_traces == 2
    assert op._pass._plain._cache_size() == 2
    # nothing at all compiles from step 2 to step 89 (the engine's first step compiles its
    # own operations, the last one a slice of another shape)
    per_step = np.diff(after_step[:90])
    assert per_step[1:88].sum() == 0, per_step
    # a second run compiles no product
    specdens.slq(op, num_steps=90, num_probes=4)
    assert op.num_traces == 2


class HostReads:
    """Count every read of a jax array's values by the host while active.

    ``jax.transfer_guard_device_to_host`` does not fire on the CPU backend (its arrays
    already live in host memory), so the entry points are counted instead: numpy's
    ``asarray``/``array``/``asanyarray`` called on a jax array (the core's
    ``_array.to_numpy``), and the array's own ``_value``, ``__array__``, ``item``,
    ``tolist``, ``__dlpack__``, ``__float__``, ``__int__``, ``__index__`` and ``__bool__``
    (every ``float(x)``, ``bool(x < y)``, ``jax.device_get``...). A read-back per step
    makes the count grow with the number of steps.
    """

    METHODS = ("__array__", "item", "tolist", "__dlpack__", "__float__", "__int__",
               "__index__", "__bool__")

    def __init__(self, monkeypatch):
        from jax._src.array import ArrayImpl

        self.count = 0
        for name in ("asarray", "array", "asanyarray"):
            original = getattr(np, name)
            monkeypatch.setattr(np, name, self._numpy(original))
        for name in self.METHODS:
            monkeypatch.setattr(ArrayImpl, name, self._method(ArrayImpl.__dict__[name]))
        value = ArrayImpl.__dict__["_value"]
        monkeypatch.setattr(ArrayImpl, "_value", property(self._method(value.fget)))

    def _numpy(self, f):
        def counted(x, *args, **kwargs):
            if isinstance(x, jax.Array):
                self.count += 1
            return f(x, *args, **kwargs)
        return counted

    def _method(self, f):
        def counted(*args, **kwargs):
            self.count += 1
            return f(*args, **kwargs)
        return counted


def test_eager_engine_reads_nothing_back_during_the_steps(monkeypatch, shared):
    op = shared
    specdens.lanczos(op, 40, num_probes=2)   # warm-up: compilation
    lanczos(op, 40, num_probes=2)
    reads = HostReads(monkeypatch)
    x = jnp.ones(3)
    float(x[0]), np.asarray(x), bool(x[1] > 0)
    assert reads.count >= 3                 # the counter sees the usual ways of reading
    # alpha, beta, active, asymmetry and norm, once at the end: a handful of reads for 40
    # steps, where one read per step would make at least 40
    for run in (specdens.lanczos, lanczos):
        reads.count = 0
        r = run(op, 40, num_probes=2)
        assert r.num_steps == 40 and np.all(np.isfinite(r.alpha))
        assert reads.count <= 12, (run.__module__, reads.count)


def test_matmat_is_one_pass_per_block(shared):
    data = CountingData(shared.batches._data)
    loss, params = shared.loss.loss_fn, shared.space.combine(*shared.consts)
    op = hessian(loss, params, data)
    V = jnp.asarray(np.random.default_rng(1).standard_normal((op.shape[0], 5)))
    data.passes = 0
    out = op.matmat(V)
    assert data.passes == 1
    cols = jnp.stack([op.matvec(V[:, j]) for j in range(5)], axis=1)
    assert float(jnp.max(jnp.abs(out - cols))) <= 1e-13 * float(jnp.max(jnp.abs(cols)))
    data.passes = 0
    specdens.lanczos(op, 40, num_probes=2)
    assert data.passes == 40                 # one pass per step for both probes


def _tnorm(r):
    return float(np.max(np.abs(r.alpha)) + 2 * np.max(np.abs(r.beta)))


def test_compiled_loop_matches_eager_engine_full(shared):
    op = shared
    for probes in ("rademacher", "gaussian"):
        eager = specdens.lanczos(op, 40, num_probes=2, seed=7, probes=probes)
        comp = lanczos(op, 40, num_probes=2, seed=7, probes=probes)
        tol = 1e-12 * _tnorm(eager)
        assert np.max(np.abs(comp.alpha - eager.alpha)) <= tol
        assert np.max(np.abs(comp.beta - eager.beta)) <= tol
        np.testing.assert_array_equal(comp.probe_scales, eager.probe_scales)
        np.testing.assert_array_equal(comp.lengths, eager.lengths)
        assert (comp.reorth, comp.seed, comp.probe_kind, comp.matvecs, comp.dtype) == (
            eager.reorth, eager.seed, eager.probe_kind, eager.matvecs, eager.dtype)
        assert comp.asymmetry < 1e-12
    # explicit probes, and slq's densities
    V = jnp.asarray(np.random.default_rng(2).standard_normal((op.shape[0], 2)))
    eager = specdens.lanczos(op, 40, probes=V)
    d_eager = specdens.SpectralDensity.from_lanczos(eager)
    d_comp = slq(op, num_steps=40, probes=V)
    assert d_comp.probe_kind == "explicit"
    assert np.max(np.abs(d_comp.nodes - d_eager.nodes)) <= 1e-12 * _tnorm(eager)
    # Gauss weights are squared eigenvector components: perturbed by rounding / gap
    np.testing.assert_allclose(d_comp.weights, d_eager.weights, atol=1e-8)


@pytest.mark.parametrize("reorth", ["local", "none"])
def test_compiled_loop_matches_eager_engine_without_full_basis(reorth):
    A = spectrum_matrix()
    eager = specdens.lanczos(A, 40, num_probes=2, reorth=reorth, window=8)
    comp = lanczos(A, 40, num_probes=2, reorth=reorth, window=8)
    assert comp.reorth == reorth and comp.window == (8 if reorth == "local" else None)
    tol = 1e-12 * _tnorm(eager)
    assert np.max(np.abs(comp.alpha[:, :8] - eager.alpha[:, :8])) <= tol
    assert np.max(np.abs(comp.beta[:, :8] - eager.beta[:, :8])) <= tol
    m_e = specdens.SpectralDensity.from_lanczos(eager).moments([1, 2, 3, 4]).value
    m_c = specdens.SpectralDensity.from_lanczos(comp).moments([1, 2, 3, 4]).value
    np.testing.assert_allclose(m_c, m_e, rtol=1e-10)


def outlier_matrix(n=200, seed=5):
    """A bulk in [-1, 1] and five outliers: Ritz values converge to the outliers early,
    and the loss of orthogonality it drives makes Simon's estimate call for some sweeps."""
    rng = np.random.default_rng(seed)
    lam = np.concatenate([rng.uniform(-1.0, 1.0, n - 5), [20.0, 30.0, 40.0, 50.0, 60.0]])
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return jnp.asarray((Q * lam) @ Q.T), lam


@pytest.mark.parametrize("basis_dtype", ["float64", "float32"])
def test_compiled_partial_reorth_matches_eager_engine(monkeypatch, basis_dtype):
    """``reorth="partial"``: Simon's estimates advance on the device and choose the same
    steps to reorthogonalise as the eager engine (both counted), so the two runs are one
    algorithm and differ by rounding: 1e-12 ||T|| with a float64 basis, as for full
    reorthogonalisation; with a float32 basis the corrections carry float32 rounding,
    m * eps32 * ||T||. The kept basis is semi-orthogonal (Simon: |q_i^T q_j| <=
    sqrt(eps)), and the outliers come out as the exact eigenvalues."""
    from specdens.algorithms import lanczos as core
    A, lam = outlier_matrix()
    m = 80
    counted = {}
    result, run_block = compiled._result, core._run_block

    def spy_result(host, outs, *a, **kw):
        counted["compiled"] = [int(o["sweeps"]) for o in outs]
        return result(host, outs, *a, **kw)

    def spy_block(*a, **kw):
        out = run_block(*a, **kw)
        counted.setdefault("eager", []).append(out["reorth_steps"])
        return out

    monkeypatch.setattr(compiled, "_result", spy_result)
    monkeypatch.setattr(core, "_run_block", spy_block)
    eager = specdens.lanczos(A, m, num_probes=3, reorth="partial", basis_dtype=basis_dtype)
    comp = lanczos(A, m, num_probes=3, reorth="partial", basis_dtype=basis_dtype,
                   return_basis=True)
    assert (comp.reorth, comp.basis_dtype) == ("partial", basis_dtype)
    assert counted["compiled"] == counted["eager"]
    assert 0 < counted["compiled"][0] < m  # partial: sweeps at some steps, not all
    eps = np.finfo(basis_dtype).eps
    tol = (1e-12 if basis_dtype == "float64" else m * eps) * _tnorm(eager)
    assert np.max(np.abs(comp.alpha - eager.alpha)) <= tol
    assert np.max(np.abs(comp.beta - eager.beta)) <= tol
    assert comp.asymmetry < np.sqrt(eps)
    for i in range(3):
        B = np.asarray(comp.basis[i], dtype=np.float64)
        assert np.max(np.abs(B @ B.T - np.eye(m))) <= np.sqrt(eps)
    top = np.sort(lam)[-5:]
    nodes = specdens.SpectralDensity.from_lanczos(comp).nodes
    for i in range(3):
        ritz = np.sort(nodes[i])[-5:]
        np.testing.assert_allclose(ritz, top, rtol=0, atol=m * eps * np.abs(lam).max())


def test_compiled_partial_reorth_warns_on_an_asymmetric_operator():
    """Partial reorthogonalisation reads asymmetry locally (q_{j-1}^T A q_j against
    beta_{j-1}): a non-symmetric matrix is reported as in the eager engine."""
    A, _ = outlier_matrix(n=60)
    B = A + 1e-3 * jnp.asarray(np.random.default_rng(0).standard_normal((60, 60)))
    with pytest.warns(specdens.LanczosWarning, match="not symmetric"):
        lanczos(B, 30, reorth="partial")


def test_auto_follows_the_cores_rule():
    """``reorth="auto"``: a full basis if it fits the budget, else a full float32 basis,
    else a window, else none (the rule of :func:`specdens.lanczos`)."""
    A = spectrum_matrix()
    # one probe, 10 steps, n = 60: a float64 basis is 4800 bytes, a float32 one 2400,
    # one float64 vector 480
    for budget, want in ((3000, ("full", "float32", None)), (1000, ("local", "float64", 2)),
                         (100, ("none", "float64", None))):
        r = lanczos(A, 10, reorth="auto", max_basis_bytes=budget)
        assert (r.reorth, r.basis_dtype, r.window) == want
        assert np.all(np.isfinite(r.alpha))


def _count_eqns(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count_eqns(inner)
    return n


@pytest.mark.parametrize("mode", ["full", "partial"])
def test_compiled_loop_is_not_unrolled(mode):
    A = jnp.asarray(np.diag(np.linspace(-1.0, 2.0, 80)))
    V0 = jnp.ones((2, 80)) / np.sqrt(80)
    tol = jnp.asarray(1e-8)
    sizes = []
    for m in (5, 60):
        traced = compiled._run.trace(compiled._dense_apply, A, V0, tol, m=m,
                                           mode=mode, win=20, wdt="float64", bdt="float64",
                                           odt="float64", keep=False)
        sizes.append(_count_eqns(traced.jaxpr.jaxpr))
    assert sizes[0] == sizes[1] > 20


def test_compiled_loop_on_arrays_callables_and_operators():
    A = spectrum_matrix()
    # the core engine on the same matrix in numpy: the same probes, no eager jax operations
    # to compile
    ref = specdens.lanczos(np.asarray(A), 25, num_probes=3, seed=3)
    tol = 1e-12 * _tnorm(ref)
    for op, kw in ((A, {"block_size": 2}), (lambda v: A @ v, {"n": 60}),
                   (specdens.aslinearoperator(lambda v: A @ v, shape=(60, 60),
                                              dtype="float64", xp="jax"), {}),
                   (specdens.aslinearoperator(A), {})):
        r = lanczos(op, 25, num_probes=3, seed=3, **kw)
        assert np.max(np.abs(r.alpha - ref.alpha)) <= tol
        assert np.max(np.abs(r.beta - ref.beta)) <= tol
    with pytest.raises(TypeError, match="needs n="):
        lanczos(lambda v: A @ v, 5)
    with pytest.raises(ValueError, match="num_probes=3 but probes holds 2"):
        lanczos(A, 5, probes=jnp.ones((60, 2)), num_probes=3)
    with pytest.raises(TypeError, match="jax arrays"):
        lanczos(specdens.aslinearoperator(np.eye(3)), 2)


def test_compiled_loop_on_combined_operators():
    """Sums, scalings and shifts of operators (their products traced inside the compiled
    loop, where the vectors are tracers with no device) give the eager engine's
    coefficients, and those of the dense reference as a numpy matrix: the same probes,
    products equal up to rounding (1e-12 * ||T||)."""
    loss, params, batches = problem(h=4)
    H = hessian(loss, params, batches)
    Hd = np.asarray(H.to_dense())
    A = spectrum_matrix(n=H.shape[0])
    An = specdens.aslinearoperator(A)
    cases = {"2 A": (An * 2.0, 2 * np.asarray(A)),
             "H + I": (H.shift(1.0), Hd + np.eye(Hd.shape[0])),
             "H - A / 2": (H - An / 2, Hd - np.asarray(A) / 2)}
    for name, (op, dense) in cases.items():
        eager = specdens.lanczos(op, 12, num_probes=2, seed=5)
        ref = specdens.lanczos(dense, 12, num_probes=2, seed=5)
        comp = lanczos(op, 12, num_probes=2, seed=5)
        tol = 1e-12 * _tnorm(ref)
        for r in (eager, comp):
            assert np.max(np.abs(r.alpha - ref.alpha)) <= tol, name
            assert np.max(np.abs(r.beta - ref.beta)) <= tol, name
    d = slq(H * 2.0, num_steps=12, num_probes=2, seed=5)
    d_ref = specdens.SpectralDensity.from_lanczos(specdens.lanczos(2 * Hd, 12, num_probes=2,
                                                                   seed=5))
    assert np.max(np.abs(d.nodes - d_ref.nodes)) <= 1e-12 * 2 * np.abs(Hd).sum(1).max()


def test_basis_breakdown_and_nan():
    lam = np.repeat([1.0, 2.0, 4.0], 10)        # three distinct eigenvalues: breakdown at 3
    A = jnp.asarray(np.diag(lam))
    r = lanczos(A, 10, num_probes=2, return_basis=True)
    eager = specdens.lanczos(np.diag(lam), 10, num_probes=2)   # the core engine (numpy)
    np.testing.assert_array_equal(r.lengths, [3, 3])
    np.testing.assert_array_equal(r.lengths, eager.lengths)
    assert r.breakdown.all()
    np.testing.assert_allclose(np.sort(specdens.SpectralDensity.from_lanczos(r).nodes[0, :3]),
                               [1.0, 2.0, 4.0], atol=1e-12)
    B = np.asarray(r.basis[0, :3])
    np.testing.assert_allclose(B @ B.T, np.eye(3), atol=1e-14)
    assert isinstance(r.basis, jax.Array)
    bad = A.at[3, 3].set(jnp.nan)
    with pytest.raises(FloatingPointError, match="step 1 for probe 0"):
        lanczos(bad, 5)


def test_float32_without_x64():
    with jax.enable_x64(False):
        A = jnp.asarray(np.diag(np.linspace(0.0, 1.0, 40)), dtype=jnp.float32)
        r = lanczos(A, 10, num_probes=2)
        assert r.dtype == "float32"
        with pytest.raises(TypeError, match="jax_enable_x64"):
            lanczos(A, 10, dtype="float64")
        # eigsh picks float32 arithmetic too (it asked for float64, which JAX truncated
        # with a warning per operation while the result claimed float64)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            e = specdens.eigsh(A, k=2)
        assert e.dtype == "float32"
        np.testing.assert_allclose(e.eigenvalues, np.linspace(0.0, 1.0, 40)[-2:],
                                   atol=e.tol * 1.0 + 10 * 40 * 1.2e-7)
        with pytest.raises(TypeError, match="jax_enable_x64"):
            specdens.eigsh(A, k=2, dtype="float64")
        # every entry point refuses float64 arithmetic it cannot have (trace, diagonal
        # and kpm with given bounds ran it in float32, and kpm then refused its own
        # rounding of mu_0 against a float64 tolerance)
        for run in (lambda: specdens.trace(A, num_matvecs=20, dtype="float64"),
                    lambda: specdens.diagonal(A, num_matvecs=20, dtype="float64"),
                    lambda: specdens.kpm(A, 10, 2, bounds=(-0.1, 1.1), dtype="float64")):
            with pytest.raises(TypeError, match="jax_enable_x64"):
                run()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            t = specdens.trace(A, num_matvecs=40)   # n products: the exact trace
            d = specdens.kpm(A, 10, 2, bounds=(-0.1, 1.1))
        assert abs(float(t.value) - 20.0) <= 40 * 40 * 1.2e-7   # tr = 20, float32 sums
        assert abs(float(d.moments([1]).value[0]) - 0.5) < 0.1   # 2 probes of mean 0.5
    ref = specdens.lanczos(np.diag(np.linspace(0.0, 1.0, 40)), 10, num_probes=2)
    # float32 CGS2 Lanczos: rounding ~ m * eps32 * ||A||
    np.testing.assert_allclose(r.alpha, ref.alpha, atol=10 * 10 * 1.2e-7)


@pytest.mark.parametrize("size", [7, 16, 25, 40])
def test_blocked_gram_schmidt_matches_dense(size):
    """The full mode's blocked projection against rows 0..j of the basis (later rows
    zero) equals the dense h = Q w, corr = Q^T h for every j, including a last block
    moved back to end at ``size`` (no row counted twice). Tolerance: float64 sums of at
    most n * size terms, below 1e-13 of the largest possible sum."""
    rng = np.random.default_rng(size)
    k, n = 2, 30
    Qfull = rng.standard_normal((k, size, n))
    w = jnp.asarray(rng.standard_normal((k, n)))
    gram_schmidt = jax.jit(compiled._gram_schmidt)   # as in the loop: j traced, one compile
    for j in range(size):
        Q = np.where(np.arange(size)[None, :, None] <= j, Qfull, 0.0)
        h, corr = gram_schmidt(jnp.asarray(Q), w, jnp.asarray(j))
        h_ref = np.einsum("kin,kn->ki", Q, np.asarray(w))
        corr_ref = np.einsum("ki,kin->kn", h_ref, Q)
        scale = np.abs(Q).max() ** 2 * n * size
        np.testing.assert_allclose(np.asarray(h), h_ref, rtol=0, atol=1e-13 * scale)
        np.testing.assert_allclose(np.asarray(corr), corr_ref, rtol=0,
                                   atol=1e-13 * scale * np.abs(Q).max())


@pytest.mark.parametrize("reorth", ["partial", "full"])
@pytest.mark.parametrize("kw", [dict(num_probes=1, basis_dtype="float32"),
                                dict(num_probes=2, basis_dtype="float32", breakdown_tol=0.0)])
def test_compiled_loop_keeps_probes_past_the_rounding_of_beta_orthogonal(reorth, kw):
    """The compiled loop's partial reorthogonalisation had the core's flaw: a probe whose
    beta is below the rounding Simon's recurrence resolves (eps32 ||T|| with a float32
    basis) but above breakdown_tol stays active, its estimates were reset and no sweep
    ran, so its next vector (mostly rounding) was taken as orthogonal. On three clusters
    of width 1e-11 (as in test_lanczos) the compiled loop gave Ritz values outside the
    spectrum; with breakdown_tol=0 on two eigenvalues, a third Gram-Schmidt sweep is
    needed past the breakdowns. The Ritz values must lie in the spectrum up to m eps ||A||
    (eps the basis's), with no asymmetry warning."""
    import warnings

    from test_lanczos import _clustered, _two_eigenvalues

    from specdens.algorithms.quadrature import quadrature_rules

    two = "breakdown_tol" in kw
    A = _two_eigenvalues() if two else _clustered()
    m = 60 if two else 40
    lam = np.linalg.eigvalsh(A)
    norm = float(np.max(np.abs(lam)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", specdens.LanczosWarning)
        r = lanczos(jnp.asarray(A), m, reorth=reorth, **kw)
    eps = np.finfo(np.float32).eps
    nodes, _, _ = quadrature_rules(r)
    for i in range(r.num_probes):
        L = int(r.lengths[i])
        assert L > 2
        assert np.all(nodes[i, :L] >= lam[0] - m * eps * norm)
        assert np.all(nodes[i, :L] <= lam[-1] + m * eps * norm)
