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
        # a rank that ran something else is caught, on every rank
        bad = specdens.lanczos(op, STEPS, num_probes=PROBES, seed=rank)
        try:
            check_consistent(bad)
        except RuntimeError as exc:
            assert "disagree" in str(exc)
            open(os.path.join(out_dir, f"caught{rank}"), "w").close()
        empty_shards(rank, world, out_dir)
        padding_sampler(rank, world, out_dir)
        failing_rank(rank, out_dir)
    finally:
        torch.distributed.destroy_process_group()


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


def failing_rank(rank: int, out_dir: str) -> None:
    """Rank 1's shard holds a batch the model cannot take: rank 1 raises the model's own
    error and rank 0 an error naming rank 1, at once (without the shared failure flag, rank
    0 waited in the collective until gloo's timeout), for every operator and evaluate."""
    from specdens.backends.torch import ggn

    model, crit, batches = problem()
    shard = batches[:2] if rank == 0 else [batches[2], (batches[3][0][:, :2], batches[3][1])]
    outcomes = []
    for build in (lambda: hessian(model, crit, shard), lambda: ggn(model, crit, shard),
                  lambda: gradient(model, crit, shard), lambda: evaluate(model, crit, shard)):
        try:
            build()
            outcomes.append("finished")
        except RuntimeError as exc:
            outcomes.append(str(exc).replace("\n", " "))
    with open(os.path.join(out_dir, f"failing{rank}"), "w") as fh:
        fh.write("\n".join(outcomes))


def test_two_gloo_ranks_match_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        spawn(worker, (2, init_file, tmp), 2)
        ranks = [np.load(os.path.join(tmp, f"rank{r}.npz")) for r in range(2)]
        caught = [os.path.exists(os.path.join(tmp, f"caught{r}")) for r in range(2)]
        empty = [dict(np.load(os.path.join(tmp, f"empty{r}.npz"))) for r in range(2)]
        all_empty = [open(os.path.join(tmp, f"allempty{r}")).read().split("\n")
                     for r in range(2)]
        padding = [open(os.path.join(tmp, f"padding{r}")).read().split("\n")
                   for r in range(2)]
        failing = [open(os.path.join(tmp, f"failing{r}")).read().split("\n")
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
    assert caught == [True, True]
    check_empty_shards(model, crit, batches, empty, all_empty)
    for found in padding:   # one warning each, naming the fix; none for an even split
        assert "pads the shards" in found[0] and "Subset(dataset, range(rank" in found[0]
        assert found[1] == "", found
        assert "leaves 1 sample(s) out" in found[2] and " | " not in found[2], found
    assert len(failing[0]) == len(failing[1]) == 4, failing
    for mine, theirs in zip(*failing, strict=True):   # rank 1's own error; rank 0 names it
        assert mine.startswith("rank 1 raised an error during the pass over its data"), mine
        assert "mat1 and mat2 shapes cannot be multiplied" in theirs, theirs


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


def changing_data_worker(rank: int, init_file: str, out_dir: str) -> None:
    init_group(rank, 2, init_file)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 3)).double()
        X = torch.randn(20, 5, dtype=torch.float64)
        y = torch.randint(0, 3, (20,))
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
}


def different_operators(rank, model, X, y, out_dir):
    """Rank 1 builds another operator (other parameters, dtype, weight decay): gloo
    aborted the processes in the first product ("Received data size doesn't match
    expected size"); the construction raises a RuntimeError on every rank instead."""
    crit = torch.nn.CrossEntropyLoss()
    shard = [(X[rank::2], y[rank::2])]
    other = rank == 1
    builds = {
        "params": lambda: hessian(model, crit, shard, params="0.weight" if other else None),
        "dtype": lambda: hessian(copy.deepcopy(model).float() if other else model, crit,
                                 [(X[rank::2].float(), y[rank::2])] if other else shard),
        "weight_decay": lambda: hessian(model, crit, shard, weight_decay=1e-3 * other),
        "gradient": lambda: gradient(model, crit, shard, params="0.weight" if other else None),
    }
    for case, build in builds.items():
        try:
            specdens.lanczos(build(), 3, seed=0)
            outcome = "finished"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        with open(os.path.join(out_dir, f"{case}{rank}"), "w") as fh:
            fh.write(outcome)


def test_data_that_changes_on_one_rank_raises_on_every_rank():
    """A rank whose data changes between passes must not raise alone: the others would
    wait in the all-reduce until the timeout. The product is made NaN on that rank, the
    reduction carries it to every rank, and each one's Lanczos run raises, naming the
    cause."""
    with tempfile.TemporaryDirectory() as tmp:
        spawn(changing_data_worker, (os.path.join(tmp, "init"), tmp), 2)
        outcomes = {(case, r): open(os.path.join(tmp, f"{case}{r}")).read()
                    for case in ("count", "values", *DIFFERENT) for r in range(2)}
    for key, outcome in outcomes.items():
        if key[0] in DIFFERENT:     # ranks that built different operators: all raise
            assert outcome.startswith("RuntimeError: the ranks built different operators"), \
                (key, outcome)
            for part in DIFFERENT[key[0]]:
                assert part in outcome, (key, outcome)
            continue
        assert outcome.startswith("FloatingPointError"), (key, outcome)
        assert "data that changed between passes" in outcome, (key, outcome)
