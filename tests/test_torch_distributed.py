"""Two gloo processes on CPU, each with its own (uneven) shard, give the single-process
Lanczos coefficients of the Hessian of all data.

The all-reduced products equal the single-process ones up to the order of the float64
sums (relative ~1e-16 per step); Lanczos amplifies such differences by at most the
condition of the recurrence over 20 steps, far below the asserted 1e-10.

Every spawn is joined with a deadline and every group has a collective timeout, so a
rank stuck in a collective fails the test instead of hanging it.
"""

from __future__ import annotations

import copy
import datetime
import os
import tempfile
import time
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from specdens.backends.torch import check_consistent, gradient, hessian
from specdens.backends.torch.tracking import evaluate

import specdens

STEPS, PROBES = 20, 3
DEADLINE = 120          # seconds for a spawned group to finish (each takes a few)


def spawn(fn, args, nprocs):
    """``mp.spawn`` joined with a deadline: processes still running then are killed and
    the test fails (an error in a process is raised by ``join`` as usual)."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    end = time.monotonic() + DEADLINE
    while not ctx.join(timeout=max(end - time.monotonic(), 0.1)):
        if time.monotonic() >= end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"{fn.__name__} did not finish within {DEADLINE} s (hung in a "
                                 "collective?)")


def init_group(rank: int, world: int, init_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world,
                                         timeout=datetime.timedelta(seconds=60))


def problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(37, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (37,), generator=g)
    batches = [(X[:10], y[:10]), (X[10:20], y[10:20]), (X[20:30], y[20:30]),
               (X[30:], y[30:])]
    return model, torch.nn.CrossEntropyLoss(), batches


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    # torch.func (method="forward") imports torch._dynamo, whose import after
    # init_process_group keeps the default group alive past destroy_process_group()
    # (references from C++, which gc cannot free; torch 2.13): its gloo threads were then
    # torn down at exit, aborting the process ("terminate called without an active
    # exception") in 2 of 12 runs. Imported before, it keeps nothing.
    import torch._dynamo  # noqa: F401

    init_group(rank, world, init_file)
    try:
        torch.set_num_threads(1)
        model, crit, batches = problem()
        shard = batches[:3] if rank == 0 else batches[3:]   # 30 and 7 samples
        op = hessian(model, crit, shard)
        assert op.num_samples == 37
        result = specdens.lanczos(op, STEPS, num_probes=PROBES, seed=0)
        check_consistent(result)
        g = gradient(model, crit, shard)
        loss, acc = evaluate(model, crit, shard)       # of all ranks' data
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), alpha=result.alpha,
                 beta=result.beta, grad=g.numpy(), evaluated=np.array([loss, acc]))
        different_vectors(rank, op, out_dir)
        empty_shards(rank, world, out_dir)
        padding_sampler(rank, world, out_dir)
        failing_rank(rank, out_dir)
        different_settings(rank, op, out_dir)
    finally:
        torch.distributed.destroy_process_group()


ESTIMATORS = {     # name -> (run with a seed, a field check_consistent compares)
    "lanczos": (lambda op, seed: specdens.lanczos(op, STEPS, num_probes=PROBES, seed=seed),
                "alpha"),
    "eigsh": (lambda op, seed: specdens.eigsh(op, k=2, seed=seed), "residuals"),
    "trace": (lambda op, seed: specdens.trace(op, num_matvecs=12, seed=seed), "value"),
    "diagonal": (lambda op, seed: specdens.diagonal(op, num_matvecs=12, seed=seed), "value"),
}


def estimate_values(result):
    """What the tests compare of each estimator's result, as a float64 array."""
    for field in ("alpha", "eigenvalues", "value"):
        if hasattr(result, field):
            v = getattr(result, field)
            return np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
    raise TypeError(type(result).__name__)


def next_up(x):
    """One ulp up: a float, a numpy array or a tensor."""
    if isinstance(x, torch.Tensor):
        return torch.nextafter(x, torch.full_like(x, float("inf")))
    return np.nextafter(x, np.inf)


def different_vectors(rank, op, out_dir):
    """check_consistent takes every estimator's result (it refused EigshResult,
    TraceEstimate and DiagonalEstimate with a TypeError) and finds one ulp of difference.
    An estimator run with another seed on each rank multiplied different vectors: every
    rank got wrong numbers, with only misleading warnings. The run's start names the seed
    (different_settings); the vectors can also differ where no setting shows it (explicit
    probes, ``v0``), which the start check (switched off here) cannot see: the product's
    all-reduce carries a checksum of its input, and every rank raises in the first product:
    at once on the CPU; as on a GPU (no value read back), through NaN products the engine
    reports. The
    checksum reads nothing back: the reads do not grow with the steps (as in
    test_torch_host_reads, here with a process group)."""
    import dataclasses

    from specdens.backends.torch._operator import DataOperator
    from test_torch_host_reads import HostReads

    from specdens.algorithms import lanczos as lanczos_module

    found, outcomes = {}, []
    for name, (run, field) in ESTIMATORS.items():
        result = run(op, 0)
        check_consistent(result)                      # the same bits on every rank
        found[name] = estimate_values(result)
        if rank == 1:
            result = dataclasses.replace(result, **{field: next_up(getattr(result, field))})
        try:
            check_consistent(result)
            outcomes.append(f"{name} check: finished")
        except RuntimeError as exc:
            outcomes.append(f"{name} check: {exc}")
        for where in ("cpu", "device"):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(DataOperator, "agree_on_run", lambda self, what, settings: None)
                if where == "device":
                    mp.setattr(DataOperator, "_host_checks", lambda self: False)
                try:
                    run(op, rank)
                    outcomes.append(f"{name} seeds {where}: finished")
                except (RuntimeError, FloatingPointError) as exc:
                    outcomes.append(f"{name} seeds {where}: {type(exc).__name__}: {exc}")
    counts = []
    for steps in (10, 40):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lanczos_module, "_reads_are_free", lambda op: False)
            mp.setattr(DataOperator, "_host_checks", lambda self: False)
            specdens.lanczos(op, steps, num_probes=2)          # warm-up
            reads = HostReads(mp)
            specdens.lanczos(op, steps, num_probes=2)
            counts.append(reads.count)
    outcomes.append(f"host reads: {counts}")
    np.savez(os.path.join(out_dir, f"estimates{rank}.npz"), **found)
    with open(os.path.join(out_dir, f"vectors{rank}"), "w") as fh:
        fh.write("\n".join(o.replace("\n", " ") for o in outcomes))


def check_different_vectors(model, crit, batches, estimates, vectors):
    """The estimates of every rank are the single process's, and every rank raised."""
    single = hessian(model, crit, batches)
    for name, (run, _) in ESTIMATORS.items():
        ref = estimate_values(run(single, 0))
        for r in estimates:
            assert np.abs(r[name] - ref).max() <= 1e-10 * np.abs(ref).max(), name
    for outcomes in vectors:
        outcomes = dict(o.split(": ", 1) for o in outcomes)
        reads = outcomes.pop("host reads")
        assert reads.startswith("[") and len(set(reads[1:-1].split(", "))) == 1, reads
        for name, (_, field) in ESTIMATORS.items():
            check = outcomes[f"{name} check"]
            assert check.startswith("the ranks disagree on the result ("), check
            assert field in check and "rank 1: max |difference|" in check, check
            cpu, device = outcomes[f"{name} seeds cpu"], outcomes[f"{name} seeds device"]
            assert cpu.startswith("RuntimeError: the ranks multiplied different vectors"), cpu
            assert device.startswith("FloatingPointError: the operator returned NaN"), device


def empty_shards(rank: int, world: int, out_dir: str) -> None:
    """Rank 1's shard is empty (an uneven split: ``Subset(ds, range(rank, N, world))`` with
    fewer samples than ranks is the same case): it adds nothing, and every rank holds the
    operators of all the data. Then every rank's shard is empty: every rank raises."""
    from specdens.backends.torch import ggn

    model, crit, batches = problem()
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ds = torch.utils.data.TensorDataset(X, y)
    mine = range(len(ds)) if rank == 0 else range(len(ds), len(ds))
    shard = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, mine), batch_size=10)
    op = hessian(model, crit, shard)
    assert (op.num_samples, op.num_batches) == (37, 4 if rank == 0 else 0)
    np.savez(os.path.join(out_dir, f"empty{rank}.npz"), hessian=op.to_dense().numpy(),
             ggn=ggn(model, crit, shard).to_dense().numpy(),
             forward=hessian(model, crit, shard, method="forward",
                             graph_memory=0).matvec(torch.ones(op.shape[0],
                                                               dtype=torch.float64)).numpy(),
             grad=gradient(model, crit, shard).numpy(),
             evaluated=np.array(evaluate(model, crit, shard)))
    outcomes = []
    for build in (lambda: hessian(model, crit, []), lambda: ggn(model, crit, []),
                  lambda: gradient(model, crit, []), lambda: evaluate(model, crit, [])):
        try:
            build()
            outcomes.append("finished")
        except ValueError as exc:
            outcomes.append(str(exc))
    with open(os.path.join(out_dir, f"allempty{rank}"), "w") as fh:
        fh.write("\n".join(outcomes))


def padding_sampler(rank: int, world: int, out_dir: str) -> None:
    """A DistributedSampler that pads (drop_last=False, 37 samples over 2 replicas) warns,
    as does one that drops (drop_last=True); one over a multiple of the replicas does
    not."""
    from torch.utils.data.distributed import DistributedSampler

    model, crit, batches = problem()
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    found = []
    for size, drop_last in ((37, False), (36, False), (37, True)):
        ds = torch.utils.data.TensorDataset(X[:size], y[:size])
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False,
                                     drop_last=drop_last)
        loader = torch.utils.data.DataLoader(ds, batch_size=10, sampler=sampler)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hessian(model, crit, loader)
        found.append(" | ".join(str(w.message) for w in caught
                                if "DistributedSampler" in str(w.message)))
    with open(os.path.join(out_dir, f"padding{rank}"), "w") as fh:
        fh.write("\n".join(found))


def outcomes_of(cases) -> list[str]:
    """``"expected || outcome"`` for each ``(call, expected)``: "finished", or the error's
    type and message on one line."""
    outcomes = []
    for call, expected in cases:
        try:
            call()
            outcome = "finished"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        outcomes.append(f"{expected} || {outcome}")
    return outcomes


def failing_rank(rank: int, out_dir: str) -> None:
    """Rank 1 raises while building: in its pass over its shard (a batch the model cannot
    take), or before it, checking its arguments (a generator for data, a pattern that
    matches no parameter, a NaN weight decay...). Rank 1 raises its own error and rank 0
    an error naming rank 1, at once, for every operator, the gradient and evaluate.
    (Without the shared failure flag, rank 0 waited in the collective until gloo's
    timeout; errors raised before the pass did not join it.)"""
    from specdens.backends.torch import ggn

    model, crit, batches = problem()
    shard = batches[:2] if rank == 0 else batches[2:]
    bad = [batches[2], (batches[3][0][:, :2], batches[3][1])]

    def mine(everywhere, on_rank_1):
        return on_rank_1 if rank == 1 else everywhere

    def ce_fn(m, batch):
        return crit(m(batch[0]), batch[1])

    def mse_fn(m, batch):   # torch.func cannot take its forward-over-reverse
        return torch.nn.functional.mse_loss(m(batch[0]), torch.nn.functional.one_hot(
            batch[1], 3).double())

    builds = [   # (build, what rank 1 raises)
        (lambda: hessian(model, crit, mine(shard, bad)), "mat1 and mat2 shapes"),
        (lambda: ggn(model, crit, mine(shard, bad)), "mat1 and mat2 shapes"),
        (lambda: gradient(model, crit, mine(shard, bad)), "mat1 and mat2 shapes"),
        (lambda: evaluate(model, crit, mine(shard, bad)), "mat1 and mat2 shapes"),
        (lambda: hessian(model, crit, mine(shard, iter(shard))), "one-shot iterator"),
        (lambda: ggn(model, crit, mine(shard, iter(shard))), "one-shot iterator"),
        (lambda: hessian(model, crit, mine(shard, None)), "hessian needs data"),
        (lambda: ggn(model, mine(crit, None), shard), "ggn needs a criterion"),
        (lambda: hessian(model, crit, shard, params=mine(None, "nope.*")),
         "'nope.*' matches no parameter"),
        (lambda: hessian(model, crit, shard, batchnorm=mine("batch", "nope")),
         "batchnorm='nope'"),
        (lambda: hessian(model, crit, shard, method=mine("graph", "nope")), "method='nope'"),
        (lambda: hessian(model, crit, shard, weight_decay=mine(0.0, float("nan"))),
         "weight_decay must be a finite number"),
        (lambda: hessian(model, crit, shard, graph_memory=mine(None, -1)),
         "graph_memory must be"),
        (lambda: hessian(model, crit, shard, regularizer=mine(None, lambda p: p["0.bias"])),
         "regularizer must return a scalar"),
        (lambda: hessian(model, data=shard, loss_fn=mine(ce_fn, mse_fn), method="forward"),
         "method='forward' cannot differentiate"),
        (lambda: gradient(model, crit, mine(shard, iter(shard))), "one-shot iterator"),
        (lambda: gradient(model, crit, shard, params=mine(None, "nope.*")),
         "'nope.*' matches no parameter"),
        (lambda: gradient(model, crit, shard, weight_decay=mine(0.0, float("nan"))),
         "weight_decay must be a finite number"),
        (lambda: evaluate(model, crit, mine(shard, iter(shard))), "one-shot iterator"),
        (lambda: evaluate(model, crit, shard, accuracy=mine(None, "yes")),
         "accuracy must be None"),
        (lambda: evaluate(model, crit, shard, batchnorm=mine("batch", "nope")),
         "batchnorm='nope'"),
    ]
    outcomes = outcomes_of(builds)
    with open(os.path.join(out_dir, f"failing{rank}"), "w") as fh:
        fh.write("\n".join(outcomes))


def different_settings(rank: int, op, out_dir: str) -> None:
    """Ranks that start an estimator with settings that change how many products it makes,
    or their block sizes, raise at the start, on every rank, naming the setting and each
    rank's value. (They waited in a product until the group's timeout: rank 0 done after
    10 Lanczos steps, rank 1 waiting for its 11th product.) Composite operators pass the
    check to their parts. After all of them, the ranks still run together."""
    def mine(value_0, value_1):
        return value_1 if rank == 1 else value_0

    cases = [   # (run, what the error must name)
        (lambda: specdens.lanczos(op, mine(10, 12), num_probes=2),
         "started lanczos() with different settings: num_steps: 10 on rank 0, 12 on rank 1"),
        (lambda: specdens.slq(op, num_steps=8, num_probes=mine(2, 3)),
         "num_probes: 2 on rank 0, 3 on rank 1"),
        (lambda: specdens.slq(op, num_steps=8, num_probes=4, block_size=mine(4, 2)),
         "block_size: 4 on rank 0, 2 on rank 1"),
        (lambda: specdens.slq(op, num_steps=8, seed=mine(0, 1)), "seed: 0 on rank 0, 1 on rank 1"),
        (lambda: specdens.lanczos(op, 8, reorth=mine("full", "local")),
         "reorth: 'full' on rank 0, 'local' on rank 1"),
        (lambda: specdens.eigsh(op, k=mine(2, 3)), "started eigsh() with different settings: "
         "k: 2 on rank 0, 3 on rank 1"),
        (lambda: specdens.trace(op, num_matvecs=mine(12, 16)),
         "started trace() with different settings: num_matvecs: 12 on rank 0, 16 on rank 1"),
        (lambda: specdens.diagonal(op, num_matvecs=12, block_size=mine(64, 4)),
         "started diagonal() with different settings: block_size: 64 on rank 0, 4 on rank 1"),
        (lambda: specdens.kpm(op, num_moments=mine(20, 30), bounds=(-5, 5)),
         "started kpm() with different settings: num_moments: 20 on rank 0, 30 on rank 1"),
        (lambda: (specdens.trace if rank == 0 else specdens.diagonal)(op, num_matvecs=12),
         "the ranks started different computations"),
        (lambda: specdens.lanczos((2.0 * op).shift(1.0), mine(6, 7)),
         "num_steps: 6 on rank 0, 7 on rank 1"),
    ]
    outcomes = outcomes_of(cases)
    after = specdens.lanczos(op, 6, num_probes=2)
    check_consistent(after)
    outcomes.append(f"after || {after.alpha.tolist()}")
    with open(os.path.join(out_dir, f"settings{rank}"), "w") as fh:
        fh.write("\n".join(outcomes))


def test_two_gloo_ranks_match_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        spawn(worker, (2, init_file, tmp), 2)
        ranks = [np.load(os.path.join(tmp, f"rank{r}.npz")) for r in range(2)]
        estimates = [dict(np.load(os.path.join(tmp, f"estimates{r}.npz"))) for r in range(2)]
        vectors = [open(os.path.join(tmp, f"vectors{r}")).read().split("\n") for r in range(2)]
        empty = [dict(np.load(os.path.join(tmp, f"empty{r}.npz"))) for r in range(2)]
        all_empty = [open(os.path.join(tmp, f"allempty{r}")).read().split("\n")
                     for r in range(2)]
        padding = [open(os.path.join(tmp, f"padding{r}")).read().split("\n")
                   for r in range(2)]
        failing = [open(os.path.join(tmp, f"failing{r}")).read().split("\n")
                   for r in range(2)]
        settings = [open(os.path.join(tmp, f"settings{r}")).read().split("\n")
                    for r in range(2)]
    model, crit, batches = problem()
    single = specdens.lanczos(hessian(model, crit, batches), STEPS, num_probes=PROBES,
                              seed=0)
    g = gradient(model, crit, batches).numpy()
    evaluated = np.array(evaluate(model, crit, batches))
    for r in ranks:
        # loss and accuracy of all the data on every rank (float64 sums in another order)
        np.testing.assert_allclose(r["evaluated"], evaluated, rtol=1e-14)
        np.testing.assert_array_equal(r["alpha"], ranks[0]["alpha"])  # ranks agree exactly
        scale = np.abs(single.alpha).max()
        assert np.abs(r["alpha"] - single.alpha).max() <= 1e-10 * scale
        assert np.abs(r["beta"] - single.beta).max() <= 1e-10 * scale
        assert np.abs(r["grad"] - g).max() <= 1e-12 * np.abs(g).max()
    check_different_vectors(model, crit, batches, estimates, vectors)
    check_empty_shards(model, crit, batches, empty, all_empty)
    for found in padding:   # one warning each, naming the fix; none for an even split
        assert "pads the shards" in found[0] and "Subset(dataset, range(rank" in found[0]
        assert found[1] == "", found
        assert "leaves 1 sample(s) out" in found[2] and " | " not in found[2], found
    assert len(failing[0]) == len(failing[1]) == 21, failing
    for mine, theirs in zip(*failing, strict=True):   # rank 1's own error; rank 0 names it
        mine, (expected, theirs) = mine.split(" || ")[1], theirs.split(" || ")
        assert mine.startswith("RuntimeError: rank 1 raised an error while building"), mine
        assert expected in theirs, (expected, theirs)
    assert settings[0][-1] == settings[1][-1], settings    # then the ranks run together
    for outcomes in settings:   # every rank raises at the start, naming what differs
        assert len(outcomes) == 12, outcomes
        for line in outcomes[:-1]:
            expected, outcome = line.split(" || ")
            assert outcome.startswith("RuntimeError: the ranks started "), outcome
            assert expected in outcome, (expected, outcome)


def check_empty_shards(model, crit, batches, empty, all_empty):
    """Rank 1's empty shard: both ranks hold the single-process operators of all the
    data. Rank 0 has the single process's batches in its order and rank 1 adds zeros, so
    the sums are the same float64 sums (1e-12 relative leaves room for a reordering, ~1e-16
    per product)."""
    from specdens.backends.torch import ggn

    ones = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    single = {"hessian": hessian(model, crit, batches).to_dense().numpy(),
              "ggn": ggn(model, crit, batches).to_dense().numpy(),
              "forward": hessian(model, crit, batches, method="forward").matvec(ones).numpy(),
              "grad": gradient(model, crit, batches).numpy(),
              "evaluated": np.array(evaluate(model, crit, batches))}
    for r in empty:
        for key, ref in single.items():
            assert np.abs(r[key] - ref).max() <= 1e-12 * np.abs(ref).max(), key
    for outcomes in all_empty:   # every rank raises, hessian, ggn, gradient and evaluate
        assert len(outcomes) == 4
        for outcome in outcomes:
            assert outcome.startswith("data yielded no batches on any of the 2 ranks"), outcome


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16,
                                   torch.bfloat16])
def test_input_checksum_is_exact_and_finds_any_difference(dtype):
    """The checksum products all-reduce with their block (no process group needed here):
    summed over any number of ranks in the operator's dtype, in any order, the same
    block gives exactly world_size times each rank's numbers (no false alarm); a block
    that differs in one bit of one entry (the last bit of the significand, the sign, the
    exponent), or whose entries or columns change places, is found, by both of 2 ranks.
    """
    from specdens.backends.torch.distributed import InputChecksum

    n, k = 37, 3
    g = torch.Generator().manual_seed(5)
    V = torch.randn(k, n, generator=g, dtype=torch.float64).to(dtype).T   # column-stored
    for world in (2, 3, 7, 100):
        cs = InputChecksum(world, n, dtype, torch.device("cpu"))
        assert cs.size >= 1
        local = cs(V)
        assert local.dtype == dtype and local.shape == (cs.size,)
        copies = [local.clone() for _ in range(world)]
        for order in (copies, copies[::-1]):
            reduced = torch.zeros_like(local)
            for c in order:
                reduced += c
            assert not bool(cs.differs(reduced, local)), (world, order is copies)
        tree = copies                                    # pairwise, as a ring or tree would
        while len(tree) > 1:
            tree = [a + b for a, b in zip(tree[::2], tree[1::2], strict=False)] + (
                [tree[-1]] if len(tree) % 2 else [])
        assert not bool(cs.differs(tree[0], local))
    if dtype == torch.bfloat16:     # 8 significand bits hold no chunk summed over 256 ranks
        assert InputChecksum(256, n, dtype, torch.device("cpu")).size == 0
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[dtype.itemsize]
    sign = -(2 ** (8 * dtype.itemsize - 1))

    def flipped(mask, i=5, j=1):
        W = V.T.clone()
        W.view(ints)[j, i] ^= mask
        return W.T

    def swapped(rows=(3, 30), cols=(0, 0)):
        W = V.T.clone()
        W[cols[0], rows[0]], W[cols[1], rows[1]] = V.T[cols[1], rows[1]], V.T[cols[0], rows[0]]
        return W.T

    others = {"last bit": flipped(1), "sign": flipped(sign), "exponent": V * 2,
              "entries swapped": swapped(), "columns swapped": V[:, [1, 0, 2]],
              "across columns": swapped(rows=(3, 3), cols=(0, 2)),
              "another block": torch.randn(k, n, generator=g).to(dtype).T}
    cs = InputChecksum(2, n, dtype, torch.device("cpu"))
    for what, W in others.items():
        assert not torch.equal(W, V), what
        a, b = cs(V), cs(W)
        assert bool(cs.differs(a + b, a)) and bool(cs.differs(a + b, b)), what


def test_loss_descriptions_are_the_same_in_every_process():
    """What the ranks compare of their losses: no memory address (a process's own), the
    settings and tensors that change the loss, not the attributes of a bound method's
    object (a trainer's rank or device)."""
    import functools

    from specdens.backends.torch.distributed import describe

    class Trainer:
        def __init__(self, rank):
            self.rank = rank

        def loss(self, model, batch):
            return model(batch[0]).sum()

    w = torch.tensor([1.0, 2.0, 0.5])
    for fn in (lambda m, b: m(b).sum(), torch.nn.functional.mse_loss, Trainer(0).loss,
               functools.partial(torch.nn.functional.cross_entropy, weight=w),
               torch.nn.CrossEntropyLoss(weight=w), torch.nn.BCEWithLogitsLoss(pos_weight=w)):
        assert "0x" not in describe(fn), describe(fn)
    assert describe(Trainer(0).loss) == describe(Trainer(1).loss)
    assert describe(torch.nn.CrossEntropyLoss(weight=w)) == describe(
        torch.nn.CrossEntropyLoss(weight=w.clone()))
    for a, b in ((torch.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(label_smoothing=0.1)),
                 (torch.nn.CrossEntropyLoss(weight=w), torch.nn.CrossEntropyLoss(weight=w * 2)),
                 (torch.nn.HuberLoss(delta=1.0), torch.nn.HuberLoss(delta=2.0)),
                 (torch.nn.MSELoss(), torch.nn.L1Loss()),
                 (functools.partial(torch.nn.functional.cross_entropy, label_smoothing=0.1),
                  functools.partial(torch.nn.functional.cross_entropy, label_smoothing=0.2))):
        assert describe(a) != describe(b), (describe(a), describe(b))


def lifetime_worker(rank: int, init_file: str, out_dir: str) -> None:
    import gc
    import weakref

    init_group(0, 1, init_file)
    default = weakref.ref(torch.distributed.group.WORLD)
    model, crit, batches = problem()
    op = hessian(model, crit, batches)
    specdens.lanczos(op, 5)
    torch.distributed.destroy_process_group()
    gc.collect()
    if default() is None:
        open(os.path.join(out_dir, "freed"), "w").close()
    try:
        op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    except (RuntimeError, ValueError) as exc:
        with open(os.path.join(out_dir, "error"), "w") as fh:
            fh.write(str(exc))


def test_operator_does_not_keep_the_default_group_alive():
    """An operator that held the default ProcessGroup kept it alive after
    destroy_process_group(), and its gloo threads were torn down at interpreter exit:
    "terminate called without an active exception" in 4 of 12 two-rank torchrun runs.
    The group must be freed while the operator lives; using the operator afterwards
    raises torch's own error."""
    with tempfile.TemporaryDirectory() as tmp:
        spawn(lifetime_worker, (os.path.join(tmp, "init"), tmp), 1)
        freed = os.path.exists(os.path.join(tmp, "freed"))
        error = open(os.path.join(tmp, "error")).read() if os.path.exists(
            os.path.join(tmp, "error")) else None
    assert freed
    assert error is not None and "process group" in error.lower(), error


def small_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3)).double()
    X = torch.randn(20, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    return model, X, y


def changing_data_worker(rank: int, init_file: str, out_dir: str) -> None:
    init_group(rank, 2, init_file)
    try:
        torch.set_num_threads(1)
        model, X, y = small_problem()
        for case in ("count", "values"):
            passes = {"n": 0}

            class Data:
                def __iter__(self, case=case, passes=passes):
                    passes["n"] += 1
                    later = rank == 0 and passes["n"] > 1   # rank 0's data changes
                    x = X[:9] if later and case == "count" else X[:10]
                    yield (x + 1.0 if later and case == "values" else x), y[:len(x)]

            op = hessian(model, torch.nn.CrossEntropyLoss(), Data(), graph_memory=0)
            try:
                specdens.lanczos(op, 5, seed=0)
                outcome = "finished"
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            with open(os.path.join(out_dir, f"{case}{rank}"), "w") as fh:
                fh.write(outcome)
        different_operators(rank, model, X, y, out_dir)
    finally:
        torch.distributed.destroy_process_group()


DIFFERENT = {   # rank 1's deviation -> what the error must name
    "params": ("the number of selected parameter scalars n: 18 on rank 0, 15 on rank 1",
               "the selected parameters (names and shapes"),
    "dtype": ("the dtype (the model's): torch.float64 on rank 0, torch.float32 on rank 1",),
    "weight_decay": ("weight_decay: 0.0 on rank 0, 0.001 on rank 1",),
    "gradient": ("the number of selected parameter scalars n: 18 on rank 0, 15 on rank 1",),
    "kind": ("the function: hessian() on rank 0, ggn() on rank 1",),
    "criterion": ("the loss (criterion with its settings, or loss_fn, and batch_size_fn; "
                  "hash; this rank's: torch.nn.modules.loss.CrossEntropyLoss(ignore_index="
                  "-100, label_smoothing=",),
    "class_weight": ("the loss (criterion", "weight=tensor(torch.float64, (3,), "),
    "loss_fn": ("the loss (criterion",),
    "batch_size_fn": ("the loss (criterion", "batch_size_fn="),
    "batchnorm": ("batchnorm: 'batch' on rank 0, 'population' on rank 1",),
    "regularizer": ("the regularizer (hash): none on rank 0, ",),
    "evaluate": ("the function: gradient() on rank 0, evaluate() on rank 1",),
}


def l2(params):
    return 0.5 * sum((t ** 2).sum() for t in params.values())


def bn_model():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4),
                                torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 1.5)
    return model


SAME = {"criterion": torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5],
                                                                   dtype=torch.float64),
                                               label_smoothing=0.1),
        "batchnorm": "population", "weight_decay": 1e-3}


def same_everywhere(model, shard):
    """Every option that the ranks must agree on, the same on every rank: the products,
    the gradient and the loss of all the data."""
    from specdens.backends.torch import ggn

    ones = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    return {"hessian": hessian(model, data=shard, regularizer=l2, **SAME).matvec(ones).numpy(),
            "ggn": ggn(model, data=shard, **SAME).matvec(ones).numpy(),
            "grad": gradient(model, data=shard, regularizer=l2, **SAME).numpy(),
            "evaluated": np.array(evaluate(model, SAME["criterion"], shard,
                                           batchnorm="population"))}


def different_operators(rank, model, X, y, out_dir):
    """Rank 1 builds another operator (other parameters, dtype, weight decay): gloo
    aborted the processes in the first product ("Received data size doesn't match
    expected size"); the construction raises a RuntimeError on every rank instead. So
    do other functions (hessian and ggn, gradient and evaluate), criteria (their
    settings and class weights), loss_fn, batch_size_fn, BatchNorm modes and
    regularizers, which the ranks mixed into a wrong operator without an error."""
    from specdens.backends.torch import ggn

    crit = torch.nn.CrossEntropyLoss()
    shard = [(X[rank::2], y[rank::2])]
    other = rank == 1

    def loss_fn(m, batch):
        return crit(m(batch[0]), batch[1])

    builds = {
        "params": lambda: hessian(model, crit, shard, params="0.weight" if other else None),
        "dtype": lambda: hessian(copy.deepcopy(model).float() if other else model, crit,
                                 [(X[rank::2].float(), y[rank::2])] if other else shard),
        "weight_decay": lambda: hessian(model, crit, shard, weight_decay=1e-3 * other),
        "gradient": lambda: gradient(model, crit, shard, params="0.weight" if other else None),
        "kind": lambda: (ggn if other else hessian)(model, crit, shard),
        "criterion": lambda: hessian(model, torch.nn.CrossEntropyLoss(
            label_smoothing=0.5 * other), shard),
        "class_weight": lambda: hessian(model, torch.nn.CrossEntropyLoss(weight=torch.tensor(
            [1.0, 1.0, 1.0 + other], dtype=torch.float64)), shard),
        "loss_fn": lambda: hessian(model, data=shard, **(
            {"loss_fn": loss_fn} if other else {"criterion": crit})),
        "batch_size_fn": lambda: hessian(model, crit, shard, batch_size_fn=(
            (lambda batch: 2 * len(batch[0])) if other else None)),
        "batchnorm": lambda: hessian(bn_model(), crit, shard,
                                     batchnorm="population" if other else "batch"),
        "regularizer": lambda: hessian(model, crit, shard, regularizer=l2 if other else None),
        "evaluate": lambda: (evaluate if other else gradient)(model, crit, shard),
    }
    for case, build in builds.items():
        try:
            specdens.lanczos(build(), 3, seed=0)
            outcome = "finished"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        with open(os.path.join(out_dir, f"{case}{rank}"), "w") as fh:
            fh.write(outcome)
    np.savez(os.path.join(out_dir, f"same{rank}.npz"), **same_everywhere(bn_model(), shard))


def test_data_that_changes_on_one_rank_raises_on_every_rank():
    """A rank whose data changes between passes must not raise alone: the others would
    wait in the all-reduce until the timeout. The product is made NaN on that rank, the
    reduction carries it to every rank, and each one's Lanczos run raises, naming the
    cause. Ranks that build different operators raise at construction, naming the
    difference (:func:`different_operators`); the same options everywhere give the
    single process's results."""
    with tempfile.TemporaryDirectory() as tmp:
        spawn(changing_data_worker, (os.path.join(tmp, "init"), tmp), 2)
        outcomes = {(case, r): open(os.path.join(tmp, f"{case}{r}")).read()
                    for case in ("count", "values", *DIFFERENT) for r in range(2)}
        same = [dict(np.load(os.path.join(tmp, f"same{r}.npz"))) for r in range(2)]
    # the same options on every rank: the single process's operators, gradient and loss
    _, X, y = small_problem()
    single = same_everywhere(bn_model(), [(X[0::2], y[0::2]), (X[1::2], y[1::2])])
    for r in same:
        for key, ref in single.items():
            assert np.abs(r[key] - ref).max() <= 1e-12 * np.abs(ref).max(), key
    for key, outcome in outcomes.items():
        if key[0] in DIFFERENT:     # ranks that built different operators: all raise
            assert outcome.startswith("RuntimeError: the ranks built different operators"), \
                (key, outcome)
            for part in DIFFERENT[key[0]]:
                assert part in outcome, (key, outcome)
            continue
        assert outcome.startswith("FloatingPointError"), (key, outcome)
        assert "data that changed between passes" in outcome, (key, outcome)
