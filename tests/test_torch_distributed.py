"""Two gloo processes on CPU, each with its own (uneven) shard, give the single-process
Lanczos coefficients of the Hessian of all data.

The all-reduced products equal the single-process ones up to the order of the float64
sums (relative ~1e-16 per step); Lanczos amplifies such differences by at most the
condition of the recurrence over 20 steps, far below the asserted 1e-10.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
import torch.multiprocessing as mp
from specdens.backends.torch import check_consistent, gradient, hessian
from specdens.backends.torch.tracking import evaluate

import specdens

STEPS, PROBES = 20, 3


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
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}",
                                         rank=rank, world_size=world)
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
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_match_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(worker, args=(2, init_file, tmp), nprocs=2, join=True)
        ranks = [np.load(os.path.join(tmp, f"rank{r}.npz")) for r in range(2)]
        caught = [os.path.exists(os.path.join(tmp, f"caught{r}")) for r in range(2)]
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


def lifetime_worker(rank: int, init_file: str, out_dir: str) -> None:
    import gc
    import weakref

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}",
                                         rank=0, world_size=1)
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
        mp.spawn(lifetime_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=1, join=True)
        freed = os.path.exists(os.path.join(tmp, "freed"))
        error = open(os.path.join(tmp, "error")).read() if os.path.exists(
            os.path.join(tmp, "error")) else None
    assert freed
    assert error is not None and "process group" in error.lower(), error


def changing_data_worker(rank: int, init_file: str, out_dir: str) -> None:
    import datetime

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2, timeout=datetime.timedelta(seconds=60))
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
    finally:
        torch.distributed.destroy_process_group()


def test_data_that_changes_on_one_rank_raises_on_every_rank():
    """A rank whose data changes between passes must not raise alone: the others would
    wait in the all-reduce until the timeout. The product is made NaN on that rank, the
    reduction carries it to every rank, and each one's Lanczos run raises, naming the
    cause."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(changing_data_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2,
                 join=True)
        outcomes = {(case, r): open(os.path.join(tmp, f"{case}{r}")).read()
                    for case in ("count", "values") for r in range(2)}
    for key, outcome in outcomes.items():
        assert outcome.startswith("FloatingPointError"), (key, outcome)
        assert "data that changed between passes" in outcome, (key, outcome)
