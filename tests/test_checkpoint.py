"""Resumable runs: a run killed at any point resumes from its last checkpoint and gives
bit-identical alpha and beta; checkpoints of other operators or settings are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import specdens
from specdens import CheckpointError
from specdens.algorithms import checkpoint
from specdens.algorithms.lanczos import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from specdens.examples import hessian_like
from specdens.operators import CallableOperator

ROOT = Path(__file__).resolve().parent.parent


class Crash(Exception):
    """Stands for a process dying inside a product."""


def _crashing(base, limit):
    """``base`` as a callable operator whose ``limit + 1``-th block product raises."""
    count = {"n": 0}

    def matmat(V):
        count["n"] += 1
        if limit is not None and count["n"] > limit:
            raise Crash
        return base.matmat(V)

    return CallableOperator(base.matvec, base.shape, base.dtype, matmat=matmat, symmetric=True,
                            xp=base.xp, device=base.device), count


def _failing_after(T, dtype, xp=None):
    """``T @ V`` as a callable operator whose products raise :class:`Crash` once
    ``count["limit"]`` of them have run (never while it is None)."""
    count = {"n": 0, "limit": None}

    def matmat(V):
        count["n"] += 1
        if count["limit"] is not None and count["n"] > count["limit"]:
            raise Crash
        return T @ V

    return CallableOperator(lambda v: T @ v, T.shape, dtype, matmat=matmat, symmetric=True,
                            xp=xp), count


def _crash_then_resume(op, count, m, path, every, **kw):
    """An ``m``-step run checkpointed every ``every`` steps that crashes after 7 products,
    then the same call again (resumed, no crash); returns the resumed run's result."""
    count["n"], count["limit"] = 0, 7
    with pytest.raises(Crash):
        specdens.lanczos(op, m, checkpoint=path, checkpoint_every=every, **kw)
    count["limit"] = None
    return specdens.lanczos(op, m, checkpoint=path, checkpoint_every=every, **kw)


@pytest.mark.parametrize("reorth", ["full", "partial", "local", "none"])
def test_crash_at_every_product_then_resume_is_bit_identical(tmp_path, reorth):
    """A crash inside any one of the run's 12 block products (3 blocks of 4 steps, a
    checkpoint every 3 steps), then a resumed run: alpha, beta, lengths and the number of
    products equal those of an uninterrupted run exactly."""
    base = hessian_like(120)
    kw = dict(num_probes=5, block_size=2, seed=3, reorth=reorth, window=3)
    ref = specdens.lanczos(base, 4, **kw)
    for limit in range(12):
        path = tmp_path / f"{reorth}-{limit}.npz"
        op, _ = _crashing(base, limit)
        with pytest.raises(Crash):
            specdens.lanczos(op, 4, checkpoint=path, checkpoint_every=3, checkpoint_key="A", **kw)
        op, count = _crashing(base, None)
        r = specdens.lanczos(op, 4, checkpoint=path, checkpoint_every=3, checkpoint_key="A", **kw)
        np.testing.assert_array_equal(r.alpha, ref.alpha)
        np.testing.assert_array_equal(r.beta, ref.beta)
        np.testing.assert_array_equal(r.lengths, ref.lengths)
        assert r.matvecs == ref.matvecs
        # the resumed session did exactly the products that were not saved: whole blocks
        # of 4 steps, and 3 steps of the running block once it reached its checkpoint
        blocks, steps = divmod(limit, 4)
        assert count["n"] == 12 - 4 * blocks - (3 if steps >= 3 else 0)
    # a finished run returns its result from the file without new products
    op, count = _crashing(base, None)
    again = specdens.lanczos(op, 4, checkpoint=path, checkpoint_every=3, checkpoint_key="A",
                             **kw)
    assert count["n"] == 0
    np.testing.assert_array_equal(again.alpha, ref.alpha)


_CHILD = textwrap.dedent("""
    import sys, time
    import specdens
    from specdens.examples import hessian_like
    from specdens.operators import CallableOperator

    base = hessian_like(400)

    def matmat(V):
        time.sleep(0.03)
        return base.matmat(V)

    op = CallableOperator(base.matvec, base.shape, "float64", matmat=matmat, symmetric=True)
    specdens.lanczos(op, 40, num_probes=4, block_size=2, seed=3, basis_dtype="float32",
                     checkpoint=sys.argv[1], checkpoint_every=4)
""")


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    """A child process is killed with SIGKILL while it runs (after its checkpoint file
    has appeared, at two different moments); this process resumes from the file; the
    result equals that of an uninterrupted run bit for bit."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    base = hessian_like(400)
    kw = dict(num_probes=4, block_size=2, seed=3, basis_dtype="float32")
    ref = specdens.lanczos(base, 40, **kw)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for extra_wait in (0.0, 0.7):
        ck = tmp_path / f"ck-{extra_wait}.npz"
        child = subprocess.Popen([sys.executable, str(script), str(ck)], env=env, cwd=ROOT)
        deadline = time.monotonic() + 60
        while not ck.exists():
            assert child.poll() is None, "the child ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(extra_wait)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        with np.load(ck, allow_pickle=False) as z:  # the file is whole, and mid-run
            progress = json.loads(str(z["header"]))["progress"]
        assert not progress["complete"]
        r = specdens.lanczos(base, 40, checkpoint=ck, checkpoint_every=4, **kw)
        np.testing.assert_array_equal(r.alpha, ref.alpha)
        np.testing.assert_array_equal(r.beta, ref.beta)
        # products: those of the recurrence over both sessions, plus this session's
        # fingerprint product
        assert r.matvecs == ref.matvecs + 1


def test_torch_crash_and_resume_is_bit_identical(tmp_path):
    torch = pytest.importorskip("torch")
    base = hessian_like(150)
    T = torch.tensor(np.asarray(base.to_dense()))
    op, count = _failing_after(T, torch.float64)
    kw = dict(num_probes=3, block_size=2, seed=1, basis_dtype="float32", return_basis=True)
    count["limit"] = None
    ref = specdens.lanczos(op, 6, **kw)
    r = _crash_then_resume(op, count, 6, tmp_path / "t.npz", 2, **kw)
    np.testing.assert_array_equal(r.alpha, ref.alpha)
    np.testing.assert_array_equal(r.beta, ref.beta)
    assert isinstance(r.basis, torch.Tensor) and r.basis.dtype == torch.float32
    assert torch.equal(r.basis, ref.basis) and torch.equal(r.last_vector, ref.last_vector)


def test_other_operator_settings_or_files_are_refused(tmp_path):
    A = hessian_like(100)
    path = tmp_path / "c.npz"
    specdens.lanczos(A, 5, num_probes=2, checkpoint=path)
    with pytest.raises(CheckpointError, match="another operator: the fingerprint"):
        specdens.lanczos(hessian_like(100, seed=1), 5, num_probes=2, checkpoint=path)
    with pytest.raises(CheckpointError, match="another operator: shape"):
        specdens.lanczos(hessian_like(90), 5, num_probes=2, checkpoint=path)
    with pytest.raises(CheckpointError, match="num_steps=5 there, 6 now"):
        specdens.lanczos(A, 6, num_probes=2, checkpoint=path)
    with pytest.raises(CheckpointError, match="seed=0 there, 1 now"):
        specdens.lanczos(A, 5, num_probes=2, seed=1, checkpoint=path)
    with pytest.raises(CheckpointError, match="probe_kind"):
        specdens.lanczos(A, 5, num_probes=2, probes="gaussian", checkpoint=path)
    keyed = tmp_path / "k.npz"
    specdens.lanczos(A, 5, checkpoint=keyed, checkpoint_key="model-v1")
    with pytest.raises(CheckpointError, match="checkpoint_key 'model-v1' there, 'model-v2'"):
        specdens.lanczos(A, 5, checkpoint=keyed, checkpoint_key="model-v2")
    foreign = tmp_path / "density.npz"
    specdens.slq(A, num_steps=5).save(foreign)
    with pytest.raises(CheckpointError, match="not a specdens checkpoint"):
        specdens.lanczos(A, 5, checkpoint=foreign)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable"):
        specdens.lanczos(A, 5, checkpoint=junk)


def test_writes_are_atomic_and_pickle_free(tmp_path, monkeypatch):
    """A failure between writing the temporary file and renaming it leaves the previous
    checkpoint intact and no temporary file behind; the file is plain npz + JSON."""
    base = hessian_like(100)
    path = tmp_path / "c.npz"
    op, _ = _crashing(base, 4)
    with pytest.raises(Crash):
        specdens.lanczos(op, 8, checkpoint=path, checkpoint_every=2, checkpoint_key="k")
    before = path.read_bytes()
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    op, _ = _crashing(base, None)
    with pytest.raises(OSError, match="disk full"):
        specdens.lanczos(op, 8, checkpoint=path, checkpoint_every=2, checkpoint_key="k")
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(str(z["header"]))
        assert header["format"] == "specdens.LanczosCheckpoint" and header["version"] == 1
        assert header["progress"]["step"] == 4 and header["settings"]["num_steps"] == 8
        assert all(z[k].dtype != object for k in z.files)
    r = specdens.lanczos(base, 8, checkpoint=path, checkpoint_every=2, checkpoint_key="k")
    np.testing.assert_array_equal(r.alpha, specdens.lanczos(base, 8).alpha)


def test_slq_checkpoint_with_deflation_saves_the_eigenpairs(tmp_path):
    base = hessian_like(200)
    path = tmp_path / "s.npz"
    ref = specdens.slq(base, num_steps=10, num_probes=3, deflate=4)
    op, count = _crashing(base, None)
    specdens.slq(op, num_steps=10, num_probes=3, deflate=4, checkpoint=tmp_path / "t.npz")
    total = count["n"]  # block products of a whole run: fingerprints, eigsh, 10 steps
    op, count = _crashing(base, total - 4)  # crash at Lanczos step 7 of 10
    with pytest.raises(Crash):
        specdens.slq(op, num_steps=10, num_probes=3, deflate=4, checkpoint=path,
                     checkpoint_every=2)
    assert (tmp_path / "s.npz.eigsh.npz").exists()  # eigsh finished before the crash
    op, count = _crashing(base, None)
    d = specdens.slq(op, num_steps=10, num_probes=3, deflate=4, checkpoint=path,
                     checkpoint_every=2)
    # no eigsh products this time: two fingerprints, one block product checking the saved
    # eigenpairs against the operator, then Lanczos steps 7 to 10
    assert count["n"] == 2 + 1 + 4
    np.testing.assert_array_equal(d.deflated_eigenvalues, ref.deflated_eigenvalues)
    np.testing.assert_allclose(d.nodes, ref.nodes, atol=1e-12)
    with pytest.raises(CheckpointError, match="k=4 there, 5 now"):
        specdens.slq(base, num_steps=10, num_probes=3, deflate=5, checkpoint=path)


def test_checkpoint_argument_errors(tmp_path):
    A = np.eye(10)
    with pytest.raises(ValueError, match="need checkpoint"):
        specdens.lanczos(A, 3, checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_every must be at least 1"):
        specdens.lanczos(A, 3, checkpoint=tmp_path / "x.npz", checkpoint_every=0)
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        specdens.lanczos(A, 3, checkpoint=3)
    with pytest.raises(TypeError, match="checkpoint_key"):
        specdens.lanczos(A, 3, checkpoint=tmp_path / "x.npz", checkpoint_key=5)


def test_fingerprint_tolerance_follows_the_products_dtype():
    """A float64 sum with a float32 part has float64 dtype but float32 products, whose
    sums a GPU may round differently from run to run (~eps32 ||y||): the resume check
    allows min(1e-2, 1e3 eps32) ||y|| for it, as for a float32 operator, where eps64 would
    refuse a difference of 1e-8 ||y||. Another operator is still refused."""
    import copy

    from specdens.algorithms.checkpoint import check_fingerprint, operator_fingerprint

    rng = np.random.default_rng(0)
    B = rng.standard_normal((40, 40))
    A32 = ((B + B.T) / 2).astype(np.float32)
    op = specdens.aslinearoperator(A32) + specdens.aslinearoperator(np.zeros((40, 40)))
    assert np.dtype(op.dtype) == np.float64
    fp = operator_fingerprint(op)
    assert fp["product_dtype"] == "float32"
    jittered = copy.deepcopy(fp)
    jittered["sketch"] = [v + 1e-8 * fp["sketch"][0] for v in fp["sketch"]]
    check_fingerprint(jittered, fp, "ck.npz")       # accepted: within float32 rounding
    other = operator_fingerprint(specdens.aslinearoperator(A32.astype(np.float64) * 1.001))
    with pytest.raises(CheckpointError, match="fingerprint product"):
        check_fingerprint(other, fp, "ck.npz")
    pure = operator_fingerprint(specdens.aslinearoperator(A32.astype(np.float64)))
    jittered = copy.deepcopy(pure)
    jittered["sketch"] = [v + 1e-8 * pure["sketch"][0] for v in pure["sketch"]]
    with pytest.raises(CheckpointError, match="fingerprint product"):
        check_fingerprint(jittered, pure, "ck.npz")  # float64 products: 1e-8 is too much


def test_a_perturbed_operator_is_refused_whatever_direction_it_moves():
    """The five sketch numbers (||y||, z^T y, three entries) see a difference d = A'x - Ax
    only along their few directions: a float32 operator perturbed at random by 1e-2 of
    its norm moved them by ~1e-2 / sqrt(n) ||y|| and was accepted (tolerance 1e3 eps32
    ||y||). The count sketch keeps ||d|| to ~10 %: refused now; a GPU-like rounding
    difference (1e-6 per entry) is still accepted, and a file without the count sketch
    (written before it) is checked on the five numbers as before."""
    import scipy.sparse as sp

    from specdens.algorithms.checkpoint import check_fingerprint, count_sketch, operator_fingerprint

    n = 100_000
    rng = np.random.default_rng(1)
    d = rng.uniform(0.5, 1.0, n).astype(np.float32)

    def fingerprint(diag):
        return operator_fingerprint(specdens.aslinearoperator(sp.diags(diag)))

    fp = fingerprint(d)
    assert len(fp["count_sketch"]) == checkpoint.FINGERPRINT_BUCKETS
    perturbed = fingerprint(d * (1 + 1e-2 * rng.choice([-1.0, 1.0], n)).astype(np.float32))
    old = {k: v for k, v in fp.items() if k != "count_sketch"}
    check_fingerprint(old, perturbed, "ck.npz")  # the five numbers alone let it pass
    with pytest.raises(CheckpointError, match="count sketch"):
        check_fingerprint(fp, perturbed, "ck.npz")
    rounded = fingerprint(d * (1 + 1e-6 * rng.standard_normal(n)).astype(np.float32))
    check_fingerprint(fp, rounded, "ck.npz")
    # the sketch's norm follows the difference's: 256 buckets, spread ~ sqrt(2 / 256)
    for _ in range(5):
        v = rng.standard_normal(n)
        ratio = np.linalg.norm(count_sketch(v)) / np.linalg.norm(v)
        assert 0.6 < ratio < 1.4


def test_checkpoints_without_the_count_sketch_resume_and_a_bad_one_is_refused(tmp_path):
    A = hessian_like(60)
    ref = specdens.lanczos(A, 20, num_probes=3, block_size=2)
    path = tmp_path / "run.npz"
    kw = _stopped_at(A, path, 12)
    _edit(path, lambda h, a: h["fingerprint"].pop("count_sketch"))
    r = specdens.lanczos(A, 20, checkpoint=path, **kw)
    np.testing.assert_array_equal(r.alpha, ref.alpha)
    path = tmp_path / "bad.npz"
    kw = _stopped_at(A, path, 12)
    _edit(path, lambda h, a: h["fingerprint"]["count_sketch"].pop())
    with pytest.raises(CheckpointError, match="fingerprint.count_sketch"):
        specdens.lanczos(A, 20, checkpoint=path, **kw)


def test_jax_crash_and_resume_is_bit_identical_to_an_uninterrupted_checkpointed_run(tmp_path):
    """Where reading values back is not free (JAX here), a checkpointed run does both
    Gram-Schmidt sweeps at every step (the run without checkpoint defers the test for the
    second): a resumed run equals an uninterrupted checkpointed one bit for bit, and the
    run without checkpoint to rounding: CGS2 against one sweep differ by ~ eps ||T|| per
    step, so 100 m eps ||T|| bounds them."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    with jax.enable_x64(True):
        T = jnp.asarray(np.asarray(hessian_like(150).to_dense()))
        op, count = _failing_after(T, jnp.float64, xp=jnp)
        kw = dict(num_probes=3, block_size=2, seed=1)
        plain = specdens.lanczos(op, 12, **kw)
        whole = specdens.lanczos(op, 12, checkpoint=tmp_path / "whole.npz",
                                 checkpoint_every=3, **kw)
        r = _crash_then_resume(op, count, 12, tmp_path / "t.npz", 3, **kw)
    np.testing.assert_array_equal(r.alpha, whole.alpha)
    np.testing.assert_array_equal(r.beta, whole.beta)
    scale = np.abs(plain.alpha).max() + 2 * np.abs(plain.beta).max()
    bound = 100 * 12 * np.finfo(np.float64).eps * scale
    assert np.abs(r.alpha - plain.alpha).max() <= bound
    assert np.abs(r.beta - plain.beta).max() <= bound


class _Stop(Exception):
    pass


def _stopped_at(A, path, at, **kw):
    """A checkpointed run of 20 steps (3 probes in blocks of 2, saves every 5 steps)
    stopped when progress reaches ``at``; returns the settings."""
    kw = {"num_probes": 3, "block_size": 2, "checkpoint_every": 5, **kw}

    def stop(done, total):
        if done == at:
            raise _Stop

    with pytest.raises(_Stop):
        specdens.lanczos(A, 20, checkpoint=path, progress=stop, **kw)
    return kw


def _edit(path, change):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: np.array(z[k]) for k in z.files}
    header = json.loads(str(arrays.pop("header")))
    change(header, arrays)
    np.savez(path, header=np.array(json.dumps(header)), **arrays)


def test_a_numpy_scalar_breakdown_tol_is_saved_as_the_float_it_is(tmp_path):
    """breakdown_tol=np.float32(...) crashed the first save (not JSON serialisable)."""
    A = hessian_like(60)
    ref = specdens.lanczos(A, 20, num_probes=3, block_size=2)
    path = tmp_path / "c.npz"
    kw = _stopped_at(A, path, 12, breakdown_tol=np.float32(1e-10))
    header = json.loads(str(np.load(path)["header"]))
    assert header["settings"]["breakdown_tol"] == float(np.float32(1e-10))
    r = specdens.lanczos(A, 20, checkpoint=path, **{**kw, "breakdown_tol": float(
        np.float32(1e-10))})
    np.testing.assert_array_equal(r.alpha, ref.alpha)


def test_settings_are_stored_resolved(tmp_path):
    """A default passed explicitly on resume (basis_dtype, breakdown_tol) was refused as
    another setting; files that stored a default as null still resume."""
    A = hessian_like(60)
    ref = specdens.lanczos(A, 20, num_probes=3, block_size=2)
    for explicit in ({"basis_dtype": "float64"}, {"breakdown_tol": 100 * np.finfo(float).eps},
                     {"basis_dtype": "float64", "breakdown_tol": 100 * np.finfo(float).eps}):
        path = tmp_path / f"d{len(explicit)}{sorted(explicit)[0]}.npz"
        kw = _stopped_at(A, path, 12)
        r = specdens.lanczos(A, 20, checkpoint=path, **kw, **explicit)
        np.testing.assert_array_equal(r.alpha, ref.alpha)
        np.testing.assert_array_equal(r.beta, ref.beta)
    header = json.loads(str(np.load(path)["header"]))
    assert header["settings"]["basis_dtype"] == "float64"
    assert header["settings"]["breakdown_tol"] == 100 * np.finfo(float).eps
    # the format before: defaults stored as null
    path = tmp_path / "old.npz"
    kw = _stopped_at(A, path, 12)
    _edit(path, lambda h, a: h["settings"].update(basis_dtype=None, breakdown_tol=None))
    r = specdens.lanczos(A, 20, checkpoint=path, **kw)
    np.testing.assert_array_equal(r.alpha, ref.alpha)
    # a real difference is still refused, with the values that ran
    path = tmp_path / "f32.npz"
    kw = _stopped_at(A, path, 12)
    with pytest.raises(CheckpointError, match="basis_dtype='float64' there, 'float32' now"):
        specdens.lanczos(A, 20, checkpoint=path, basis_dtype="float32", **kw)


def test_settings_that_run_the_same_resume(tmp_path):
    """Settings were compared as passed: a window that does not run (full
    reorthogonalisation) or runs clipped to num_steps, and reorth="auto" against the mode
    it chose, refused identical runs. Real differences are still refused."""
    A = hessian_like(60)
    for saved, now, ref_kw in (
            ({"reorth": "full"}, {"reorth": "full", "window": 30}, {}),
            ({"reorth": "local", "window": 25}, {"reorth": "local", "window": 40},
             {"reorth": "local", "window": 20}),
            ({"reorth": "full"}, {"reorth": "auto", "max_basis_bytes": 1 << 30}, {}),
            ({"reorth": "auto", "max_basis_bytes": 1 << 30}, {"reorth": "full"}, {}),
            ({"reorth": "auto", "max_basis_bytes": 0}, {"reorth": "none", "window": 7},
             {"reorth": "none"})):
        ref = specdens.lanczos(A, 20, num_probes=3, block_size=2, **ref_kw)
        path = tmp_path / "run.npz"
        path.unlink(missing_ok=True)
        kw = _stopped_at(A, path, 12, **saved)
        kw = {k: v for k, v in kw.items() if k not in saved}
        r = specdens.lanczos(A, 20, checkpoint=path, **kw, **now)
        np.testing.assert_array_equal(r.alpha, ref.alpha)
        np.testing.assert_array_equal(r.beta, ref.beta)
        assert r.reorth == ref.reorth
    for saved, now, match in (
            ({"reorth": "local", "window": 3}, {"reorth": "local", "window": 4},
             "window=3 there, 4 now"),
            ({"reorth": "full"}, {"reorth": "partial"}, "reorth='full' there, 'partial' now"),
            # a window that "auto" chose to fit its budget is not an explicit one
            ({"reorth": "auto", "max_basis_bytes": 2 * 2 * 60 * 8}, {"reorth": "local"},
             "reorth='auto' there, 'local' now")):
        path = tmp_path / "other.npz"
        path.unlink(missing_ok=True)
        kw = _stopped_at(A, path, 12, **saved)
        kw = {k: v for k, v in kw.items() if k not in saved}
        with pytest.raises(CheckpointError, match=match):
            specdens.lanczos(A, 20, checkpoint=path, **kw, **now)


def test_a_symlinked_checkpoint_stays_a_link(tmp_path):
    """os.replace on the link replaced the link with a regular file, leaving the file it
    pointed to (e.g. on a larger disk) stale; now the file it points to is written."""
    A = hessian_like(60)
    ref = specdens.lanczos(A, 20, num_probes=3, block_size=2)
    (tmp_path / "disk").mkdir()
    target = tmp_path / "disk" / "run.npz"
    link = tmp_path / "run.npz"
    link.symlink_to(target)
    kw = _stopped_at(A, link, 12)
    assert link.is_symlink() and target.is_file()
    assert json.loads(str(np.load(target)["header"]))["progress"]["step"] == 10
    r = specdens.lanczos(A, 20, checkpoint=link, **kw)
    np.testing.assert_array_equal(r.alpha, ref.alpha)
    np.testing.assert_array_equal(r.beta, ref.beta)
    assert link.is_symlink()
    assert json.loads(str(np.load(target)["header"]))["progress"]["complete"] is True
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["disk", "run.npz", "run.npz"]


def _set(section, key, value):
    return lambda h, a: h[section].__setitem__(key, value)


def _array_edit(key, f):
    return lambda h, a: a.__setitem__(key, f(a[key]))


@pytest.mark.parametrize("at, change, field", [
    (12, _set("progress", "step", 25), "progress.step"),  # beyond num_steps: was accepted
    (12, _set("progress", "step", 0), "progress.step"),
    (12, _set("progress", "step", "x"), "progress.step"),
    (12, _set("progress", "blocks_done", 5), "progress.blocks_done"),
    (12, lambda h, a: h.pop("progress"), "progress is missing"),
    (12, lambda h, a: h.pop("fingerprint"), "fingerprint is missing"),
    (12, lambda h, a: h.pop("settings"), "settings is missing"),
    (12, _set("resolved", "basis_dtype", "int8"), "resolved.basis_dtype"),
    (12, _set("resolved", "reorth", "bogus"), "resolved.reorth"),
    (12, _array_edit("cur_Q", lambda x: x[:, :, :5]), "cur_Q has shape"),
    (12, _array_edit("cur_q", lambda x: x[:1]), "cur_q has shape"),
    (12, _array_edit("cur_al", lambda x: x[:, :3]), "cur_al has shape"),
    (12, _array_edit("cur_q", lambda x: np.array(["a"])), "cur_q has shape"),
    (12, _array_edit("cur_q", lambda x: x * np.nan), "cur_q has NaN or Inf"),
    (32, _array_edit("done0_alpha", lambda x: x[:, :3]), "done0_alpha has shape"),
    (32, _array_edit("done0_active", lambda x: x.astype(float)), "done0_active has"),
])
def test_corrupt_checkpoints_are_refused_naming_the_field(tmp_path, at, change, field):
    """Hand-edited or foreign but well-formed files: a step beyond num_steps returned a
    wrong result; others escaped as KeyError, a broadcast ValueError or KeyError 'int8';
    a NaN state vector was reported as the operator changing its input."""
    A = hessian_like(60)
    path = tmp_path / "c.npz"
    kw = _stopped_at(A, path, at)
    _edit(path, change)
    with pytest.raises(CheckpointError, match=rf"{path}.*{field}"):
        specdens.lanczos(A, 20, checkpoint=path, **kw)


def test_a_missing_checkpoint_folder_is_refused_before_any_product(tmp_path):
    op, count = _crashing(hessian_like(60), None)
    path = tmp_path / "missing" / "c.npz"
    with pytest.raises(FileNotFoundError, match=r"folder .*missing.* does not exist"):
        specdens.lanczos(op, 20, checkpoint=path)
    assert count["n"] == 0


# -- deflation checkpoints (PATH.eigsh.npz, and the deflation in the Lanczos checkpoint) --


def _outliers(n, seed=2):
    rng = np.random.default_rng(seed)
    ev = np.concatenate([rng.standard_normal(n - 5) * 0.3, [10.0, 9, 8, 7, 6]])
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * ev) @ Q.T


def test_checkpoint_with_another_deflation_is_refused(tmp_path):
    """A run with deflate=EigshResult and checkpoint_key, resumed with another
    EigshResult of the same k and which, was resumed: its nodes differed from an
    uninterrupted run by 1.0. The key and the settings now hold a hash of the eigenpairs."""
    A = _outliers(200)
    op, count = _failing_after(A, np.float64)
    with pytest.warns(specdens.EigshWarning):
        r_bad = specdens.eigsh(A, 3, maxiter=0, ncv=5)  # unconverged, other vectors
    r_good = specdens.eigsh(A, 3)
    path = tmp_path / "c.npz"
    kw = {"num_steps": 10, "num_probes": 4, "block_size": 2, "checkpoint": path,
          "checkpoint_every": 2}
    for key in ("model-v1", None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", specdens.EigshWarning)  # (r_bad: unconverged)
            count["n"], count["limit"] = 0, 12
            with pytest.raises(Crash):
                specdens.slq(op, deflate=r_bad, checkpoint_key=key, **kw)
            count["limit"] = None
            with pytest.raises(CheckpointError, match=str(path)):
                specdens.slq(op, deflate=r_good, checkpoint_key=key, **kw)
            # the same deflation resumes, bit-identical to an uninterrupted run
            d = specdens.slq(op, deflate=r_bad, checkpoint_key=key, **kw)
            ref = specdens.slq(A, deflate=r_bad, num_steps=10, num_probes=4, block_size=2)
        np.testing.assert_array_equal(d.nodes, ref.nodes)
        os.remove(path)


def test_deflated_checkpoint_without_the_eigenpairs_hash_is_refused_with_its_reason(
        tmp_path):
    """A deflated checkpoint of an older specdens (its probe_map without the eigenpairs'
    sha256) was refused as "written with other settings (probe_map=... there, {...,
    'sha256': ...} now)" (or, with checkpoint_key, as another operator's): it is refused
    saying that it predates the hashing and must be started again, which then works."""
    A = _outliers(200)
    path = tmp_path / "c.npz"
    for key in (None, "model-v1"):
        kw = {"num_steps": 10, "num_probes": 2, "deflate": 3, "checkpoint": path,
              "checkpoint_key": key}
        ref = specdens.slq(A, **kw)

        def unhash(header, arrays, key=key):
            header["settings"]["probe_map"].pop("sha256")
            if key is not None:  # the key as an older specdens made it
                header["fingerprint"]["key"] = f"{key}|deflated:3:LA"
        _edit(path, unhash)
        before = path.read_bytes()
        with pytest.raises(CheckpointError, match=r"predates the hashing of the deflation's "
                           r"eigenpairs.*without sha256.*cannot be verified.*Delete it to "
                           r"start the run again"):
            specdens.slq(A, **kw)
        assert path.read_bytes() == before
        os.remove(path)
        d = specdens.slq(A, **kw)
        np.testing.assert_array_equal(d.nodes, ref.nodes)
        os.remove(path)
        os.remove(f"{path}.eigsh.npz")


def _eigsh_edit(key, f):
    return lambda h, a: a.__setitem__(key, f(a[key]))


@pytest.mark.parametrize("change, field", [
    (_eigsh_edit("eigenvalues", lambda x: np.r_[x, 1.0]), "eigenvalues has shape"),
    (_eigsh_edit("eigenvalues", lambda x: x[:, None]), "eigenvalues has shape"),
    (_eigsh_edit("eigenvalues", lambda x: x * np.nan), "eigenvalues is not finite"),
    (_eigsh_edit("residuals", lambda x: x[:1]), "residuals has shape"),
    (_eigsh_edit("eigenvectors", lambda x: x[:, :2]), "eigenvectors has shape"),
    (_eigsh_edit("eigenvectors", lambda x: np.c_[x, x[:, :1]]), "eigenvectors has shape"),
    (_eigsh_edit("eigenvectors", lambda x: x * np.nan), "eigenvectors is not finite"),
    (_eigsh_edit("eigenvectors", lambda x: x.astype(np.int64)), "eigenvectors has dtype"),
    (lambda h, a: a.pop("residual_estimates"), "residual_estimates is missing"),
    (lambda h, a: h.pop("fingerprint"), "fingerprint is missing"),
    (lambda h, a: h.pop("settings"), "settings is missing"),
    (lambda h, a: h.__setitem__("fingerprint", [1, 2]), "fingerprint is not an object"),
    (lambda h, a: h.__setitem__("result", "x"), "result is not an object"),
    (lambda h, a: h["result"].__setitem__("matvecs", "x"), "result.matvecs"),
    # well-formed but not this operator's eigenpairs: the residual check refuses them
    (_eigsh_edit("eigenvalues", lambda x: x + 100), "not this operator's"),
    (_eigsh_edit("eigenvectors", lambda x: np.random.default_rng(0).standard_normal(x.shape)),
     "not this operator's"),
])
def test_corrupt_eigsh_checkpoints_are_refused_naming_the_field(tmp_path, change, field):
    """Hand-edited PATH.eigsh.npz files: 4 eigenpairs for k=3, residuals of length 1 and
    2-D eigenvalues were accepted; others escaped as KeyError, AttributeError or
    LinAlgError without naming the file."""
    A = _outliers(120)
    base = tmp_path / "base.npz"
    specdens.slq(A, num_steps=10, num_probes=2, deflate=3, checkpoint=base)
    src = Path(f"{base}.eigsh.npz")
    path = tmp_path / "c.npz"
    target = Path(f"{path}.eigsh.npz")
    target.write_bytes(src.read_bytes())
    _edit(target, change)
    with pytest.raises(CheckpointError, match=rf"{target}.*{field}"):
        specdens.slq(A, num_steps=10, num_probes=2, deflate=3, checkpoint=path)


@pytest.mark.parametrize("options", [
    {"maxiter": 1000}, {"tol": None}, {"ncv": 20}, {"seed": 0},
    {"tol": float(np.sqrt(np.finfo(float).eps))}, {"tol": None, "ncv": None, "maxiter": None},
])
def test_eigsh_checkpoint_settings_are_compared_resolved(tmp_path, options):
    """eigsh_options equal to eigsh's defaults were refused on resume ('a default passed
    explicitly is the default'); a real difference is still refused. Files written before
    (options stored as given) still resume."""
    A = _outliers(120)
    path = tmp_path / "c.npz"
    ref = specdens.slq(A, num_steps=10, num_probes=2, deflate=3, checkpoint=path)
    op, count = _crashing(specdens.aslinearoperator(A), None)
    d = specdens.slq(op, num_steps=10, num_probes=2, deflate=3, checkpoint=path,
                     eigsh_options=options)
    # resumed: two fingerprints and the check of the saved eigenpairs; no eigsh, no Lanczos
    assert count["n"] == 3
    np.testing.assert_array_equal(d.deflated_eigenvalues, ref.deflated_eigenvalues)
    with pytest.raises(CheckpointError, match="eigsh_options"):
        specdens.slq(A, num_steps=10, num_probes=2, deflate=3, checkpoint=path,
                     eigsh_options={**options, "tol": 1e-6})
    # the format before: the options as given
    _edit(Path(f"{path}.eigsh.npz"), lambda h, a: h["settings"].__setitem__(
        "eigsh_options", {"seed": 0}))
    d = specdens.slq(A, num_steps=10, num_probes=2, deflate=3, checkpoint=path,
                     eigsh_options=options)
    np.testing.assert_array_equal(d.deflated_eigenvalues, ref.deflated_eigenvalues)


@pytest.mark.parametrize("reorth", ["full", "partial"])
@pytest.mark.parametrize("n, seed", [(30, 2), (40, 0), (40, 1)])
def test_checkpointed_device_run_past_a_breakdown_stays_in_the_spectrum(reorth, n, seed,
                                                                        tmp_path, monkeypatch):
    """On a device (no free reads) a checkpointed run cannot run a block again, so it
    never learnt that its second Gram-Schmidt sweep had cancelled for a vector that stays
    active (two eigenvalues, a float32 basis, breakdown_tol=0: every step past the second
    is rounding): Ritz values of -3e16 and 4e16 for a spectrum {-1, 2}, and a false
    asymmetry warning. It now runs three sweeps at every step. As in test_lanczos: the
    Ritz values lie in the spectrum up to m eps ||A||, the basis is orthogonal to 10 m eps
    (full) or sqrt(eps) (partial), eps the basis's."""
    from test_lanczos import _two_eigenvalues

    from specdens.algorithms import lanczos as engine
    from specdens.algorithms.lanczos import LanczosWarning
    from specdens.algorithms.quadrature import quadrature_rules

    A = _two_eigenvalues(n, seed)
    monkeypatch.setattr(engine, "_reads_are_free", lambda op: False)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("error", LanczosWarning)
        r = specdens.lanczos(A, n, num_probes=3, reorth=reorth, basis_dtype="float32",
                             breakdown_tol=0.0, return_basis=True,
                             checkpoint=str(tmp_path / "run.npz"), checkpoint_every=5)
    eps = float(np.finfo(np.float32).eps)
    m = n
    nodes, _, _ = quadrature_rules(r)
    orth_tol = 10 * m * eps if reorth == "full" else np.sqrt(eps)
    for i in range(r.num_probes):
        L = int(r.lengths[i])
        assert L > 2
        assert np.all(nodes[i, :L] >= -1.0 - m * eps * 2.0), nodes[i, :L]
        assert np.all(nodes[i, :L] <= 2.0 + m * eps * 2.0), nodes[i, :L]
        B = np.asarray(r.basis[i][:L], dtype=np.float64)
        assert np.max(np.abs(B @ B.T - np.eye(L))) <= orth_tol


def _flaky(M, nan_at):
    """An operator whose ``nan_at``-th block product has one NaN (a transient fault)."""
    calls = {"n": 0, "nan_at": nan_at}

    def mm(V):
        calls["n"] += 1
        Y = M @ V
        if calls["n"] == calls["nan_at"]:
            Y = Y.copy()
            Y[0, 0] = np.nan
        return Y

    return CallableOperator(lambda v: M @ v, M.shape, "float64", matmat=mm,
                            symmetric=True), calls


def test_a_nan_is_never_saved_and_a_repaired_operator_resumes(tmp_path):
    """With check_every=0 (the default on a device) a NaN was read only at the end: the run
    saved it at every later save, and every resume raised the same FloatingPointError from
    the file however the operator did now. The save raises instead and the file keeps the
    last finite state: the resumed run equals an uninterrupted one bit for bit (numpy)."""
    M = np.asarray(hessian_like(60, seed=1).to_dense())
    kw = dict(num_probes=2, block_size=1, seed=0, check_every=0, checkpoint_every=5)
    path = tmp_path / "run.npz"
    op, calls = _flaky(M, nan_at=8)       # fingerprint product, then steps: after a save
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        specdens.lanczos(op, 20, checkpoint=str(path), **kw)
    header, arrays = checkpoint.read_npz(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    assert header["progress"]["step"] == 5
    assert np.all(np.isfinite(arrays["cur_al"])) and np.all(np.isfinite(arrays["cur_be"]))
    calls["nan_at"] = -1                  # the fault is gone
    resumed = specdens.lanczos(op, 20, checkpoint=str(path), **kw)
    clean = specdens.lanczos(M, 20, **{k: v for k, v in kw.items() if k != "checkpoint_every"})
    np.testing.assert_array_equal(resumed.alpha, clean.alpha)
    np.testing.assert_array_equal(resumed.beta, clean.beta)


def test_a_file_that_holds_a_nan_names_itself(tmp_path):
    """A file written before the coefficients were checked at each save, with a NaN in a
    finished block: resuming raises a CheckpointError that names the file and says to
    delete it (it raised the operator's FloatingPointError, whatever the operator did)."""
    M = np.asarray(hessian_like(60, seed=1).to_dense())
    path = tmp_path / "run.npz"
    kw = dict(num_probes=2, block_size=1, seed=0, checkpoint_every=5)
    specdens.lanczos(M, 20, checkpoint=str(path), **kw)
    header, arrays = checkpoint.read_npz(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    arrays["done1_alpha"][0, 3] = np.nan
    checkpoint.atomic_savez(path, header, arrays)
    with pytest.raises(CheckpointError, match="run.npz holds the NaN or Inf.*Delete the file"):
        specdens.lanczos(M, 20, checkpoint=str(path), **kw)


def test_a_folder_as_checkpoint_path_is_refused_as_a_folder(tmp_path):
    """checkpoint= naming an existing folder was read as a damaged file ("Is a directory
    ... delete it to start afresh"); it is refused before any product, saying that
    checkpoint= names a file."""
    calls = []
    op = CallableOperator(lambda v: calls.append(1) or 2.0 * v, (10, 10), "float64",
                          symmetric=True)
    with pytest.raises(IsADirectoryError, match="is a folder: checkpoint= names the file"):
        specdens.lanczos(op, 4, num_probes=1, seed=0, checkpoint=str(tmp_path))
    assert calls == []


def test_slq_checks_a_deflated_checkpoint_on_its_header_alone(tmp_path, monkeypatch):
    """slq(deflate=k) looks at a checkpoint's header before the Lanczos reader reads the
    whole file: it read every array (the basis included) too, so a resume read the file
    twice. It reads the header alone now, and the resumed run reads the arrays once."""
    M = np.asarray(hessian_like(80, seed=2).to_dense())
    path = tmp_path / "run.npz"
    kw = dict(num_steps=12, num_probes=2, seed=0, deflate=2, checkpoint=str(path),
              checkpoint_every=4)
    first = specdens.slq(M, **kw)
    reads = []
    read_npz = checkpoint.read_npz

    def counted(*a, **k):
        header, arrays = read_npz(*a, **k)
        reads.append(sorted(arrays))
        return header, arrays

    monkeypatch.setattr(checkpoint, "read_npz", counted)
    again = specdens.slq(M, **kw)
    np.testing.assert_array_equal(again.nodes, first.nodes)
    assert sum(1 for names in reads if any(n.startswith("done") for n in names)) == 1, reads
    header, arrays = read_npz(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, header_only=True)
    assert arrays == {} and header["progress"]["complete"]
