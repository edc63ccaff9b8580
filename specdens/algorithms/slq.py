"""Stochastic Lanczos quadrature, optionally deflated and with an adaptive probe count.

Ghorbani, Krishnan & Xiao (ICML 2019); Ubaru, Chen & Saad (2017).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from .. import _array, _checks
from ..density import SpectralDensity
from .adaptive import check_adaptive_options, run_adaptive
from .deflation import make_deflation
from .lanczos import _lanczos
from .probes import check_seed


def _refuse_unhashed_deflation(checkpoint: Any) -> None:
    """Refuse, with its reason, a deflated checkpoint written before the eigenpairs were
    hashed into it (its ``probe_map`` has ``deflate`` but no ``sha256``): the deflation it
    ran with cannot be verified, so it cannot be resumed. Anything else about the file is
    left to the Lanczos reader, which names it."""
    from . import checkpoint as checkpoint_mod
    from .lanczos import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

    if not os.path.exists(checkpoint):
        return
    try:
        header, _ = checkpoint_mod.read_npz(checkpoint, CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                                            header_only=True)
        saved = header["settings"]["probe_map"]
    except (checkpoint_mod.CheckpointError, OSError, KeyError, TypeError, ValueError):
        return
    if isinstance(saved, dict) and "deflate" in saved and "sha256" not in saved:
        raise checkpoint_mod.CheckpointError(
            f"{checkpoint} predates the hashing of the deflation's eigenpairs into "
            f"checkpoints (its probe_map is {saved!r}, without sha256): the deflation it ran "
            "with cannot be verified, so it cannot be resumed. Delete it to start the run "
            "again (the eigenpairs' .eigsh.npz file, checked when reused, may stay).")


def slq(
    op: Any,
    *,
    num_steps: int = 90,
    num_probes: int | str = 1,
    seed: int = 0,
    probes: Any = None,
    reorth: str = "full",
    deflate: Any = None,
    deflate_which: str | None = None,
    eigsh_options: dict | None = None,
    max_probes: int | None = None,
    probe_block: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    confidence: float | None = None,
    target: Any = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    checkpoint_key: str | None = None,
    **kwargs: Any,
) -> SpectralDensity:
    """Estimate the eigenvalue density of a symmetric operator.

    Runs :func:`specdens.lanczos` from ``num_probes`` random probes and turns each
    tridiagonal into a Gauss quadrature rule (solved in float64 on the host).

    Parameters
    ----------
    op
        A symmetric operator (anything :func:`specdens.aslinearoperator` accepts).
    num_steps
        Lanczos steps per probe. The paper uses 80 to 90; the Wasserstein-1 error
        decreases like ``1 / num_steps`` (Chen, Trogdon & Ubaru, 2021).
    num_probes
        Random probes; the estimate's variance decreases like ``1 / (n num_probes)``.
        ``"auto"``: add ``probe_block`` probes at a time until the watched functional
        (``target``) is known to ``rtol``/``atol`` at the ``confidence`` level, at most
        ``max_probes`` (see :mod:`specdens.algorithms.adaptive`); the result's
        ``convergence`` says whether it converged and how many probes it used, and a
        :class:`~specdens.algorithms.adaptive.ProbeCountWarning` is issued when not.
    seed, probes, reorth, **kwargs
        Passed to :func:`specdens.lanczos` (``dtype``, ``block_size``, ``first_probe``...).
        ``seed`` is a non-negative integer; ``seed=None`` draws fresh random probes (not
        reproducible, hence refused with ``checkpoint`` and, unless ``eigsh_options``
        gives eigsh a seed, with ``deflate=k``).
    deflate
        ``k`` (an int): compute the ``k`` eigenpairs chosen by ``deflate_which`` with
        :func:`specdens.eigsh`, run SLQ on ``(I - V V^T) A (I - V V^T)`` from projected
        probes, and add the ``k`` eigenvalues as exact atoms of mass ``1/n`` each (see
        :mod:`specdens.algorithms.deflation`; the estimator stays unbiased). An
        :class:`~specdens.EigshResult` reuses eigenpairs computed before; one block
        product of its ``k`` eigenvectors checks that they belong to this operator (their
        residuals must match the result's), and an unconverged one draws an
        :class:`~specdens.EigshWarning` (the estimate is then biased). The result's
        ``matvecs`` include eigsh's products (when computed here), and
        ``extra["deflation"]`` describes the eigsh run.
    deflate_which
        ``"LA"`` (default): the largest algebraic eigenvalues (a Hessian's outliers);
        ``"LM"``: largest magnitude (also large negative ones); ``"SA"``, ``"BE"``. With
        an ``EigshResult`` it is the result's ``which`` (another value is refused).
    eigsh_options
        More keyword arguments for :func:`specdens.eigsh` (``tol``, ``ncv``, ``maxiter``);
        only with ``deflate=k`` (refused with an ``EigshResult``).
    max_probes, probe_block, rtol, atol, confidence
        Settings of ``num_probes="auto"`` (defaults 100, 10, 1e-2, 0, 0.95): stop once
        ``t * stderr <= max(atol, rtol * |value|)`` for every component of the target,
        ``t`` the Student-t quantile of ``confidence``.
    target
        What ``num_probes="auto"`` watches: ``"moments"`` (default: ``tr(A)/n`` and
        ``tr(A^2)/n``), ``"trace"`` (``tr(A)/n``), a sequence of moment powers, a function
        ``f`` (``tr f(A)/n``), or ``"density"`` (the smoothed density on the first
        round's default grid and kernel width, tolerance relative to its maximum).
    checkpoint, checkpoint_every, checkpoint_key
        Make the run resumable (see :func:`specdens.lanczos`); with ``deflate=k`` the
        eigenpairs are saved to ``checkpoint + ".eigsh.npz"``. Not available with
        ``num_probes="auto"``.

    Returns
    -------
    SpectralDensity
    """
    op, n = _checks.operator_of(op)
    random_probes = probes is None or isinstance(probes, str)
    seed = check_seed(seed, reproducible_for=("checkpoint=" if checkpoint is not None
                                              and random_probes else None))
    if (seed is None and isinstance(deflate, (int, np.integer))
            and not isinstance(deflate, bool) and deflate != 0
            and "seed" not in (eigsh_options or {})):
        raise ValueError(
            "deflate=k computes the eigenpairs with specdens.eigsh, whose start vector needs "
            "a reproducible integer seed, but seed=None gives none; pass an integer seed "
            "(or eigsh_options={'seed': ...})"
        )
    adaptive = isinstance(num_probes, str)
    if adaptive and num_probes != "auto":
        raise ValueError(f"num_probes={num_probes!r}; give an integer or 'auto'")
    options = {"max_probes": max_probes, "probe_block": probe_block, "rtol": rtol,
               "atol": atol, "confidence": confidence, "target": target}
    if not adaptive:
        given = [k for k, v in options.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with num_probes='auto'")
    else:
        if checkpoint is not None:
            raise ValueError("checkpoint= is not available with num_probes='auto'; fix the "
                             "number of probes for a resumable run")
        if probes is not None and not isinstance(probes, str):
            raise ValueError("num_probes='auto' draws random probes; explicit probe vectors "
                             "fix their number")
        if "first_probe" in kwargs:
            raise ValueError("first_probe is chosen by num_probes='auto'")
        max_probes, probe_block, rtol, atol, confidence = check_adaptive_options(
            max_probes, probe_block, rtol, atol, confidence)
        target = "moments" if target is None else target

    deflation = None
    run_op = op
    probe_map = None
    tag = None
    key = checkpoint_key
    if deflate is not None and not (isinstance(deflate, (int, np.integer))
                                    and not isinstance(deflate, bool) and deflate == 0):
        has64 = _array.supports_float64(op.xp, op.device)
        work = _checks.float_dtype_name(kwargs.get("dtype"), "dtype",
                                        default="float64" if has64 else "float32")
        deflation = make_deflation(op, deflate, which=deflate_which, seed=seed, dtype=work,
                                   eigsh_options=eigsh_options, checkpoint=checkpoint,
                                   checkpoint_key=checkpoint_key)
        run_op = deflation.operator
        kind = probes if isinstance(probes, str) else ("rademacher" if probes is None
                                                       else "explicit")
        probe_map = deflation.probe_map(kind)
        tag = {"deflate": deflation.k, "which": deflation.which}
        if checkpoint is not None:
            # (the eigenpairs themselves: a checkpoint written with another deflation of
            # the same k and which is refused, not resumed)
            digest = deflation.digest()
            tag["sha256"] = digest
            _refuse_unhashed_deflation(checkpoint)
            if checkpoint_key is not None:
                key = f"{checkpoint_key}|deflated:{deflation.k}:{deflation.which}:{digest}"
    elif eigsh_options is not None:
        raise ValueError("eigsh_options only apply with deflate=k")
    elif deflate_which is not None:
        raise ValueError(f"deflate_which={deflate_which!r} only applies with deflate=k (or an "
                         "EigshResult); without it nothing is deflated")

    def run(first: int, count: int) -> SpectralDensity:
        result = _lanczos(run_op, num_steps, num_probes=count, probes=probes, seed=seed,
                          reorth=reorth, checkpoint=checkpoint,
                          checkpoint_every=checkpoint_every, checkpoint_key=key,
                          probe_map=probe_map, probe_map_tag=tag,
                          **({"first_probe": first} if adaptive else {}), **kwargs)
        d = SpectralDensity.from_lanczos(result)
        if deflation is None:
            return d
        eig = deflation.eig
        return dataclasses.replace(
            d, deflated_eigenvalues=np.asarray(eig.eigenvalues, dtype=np.float64).copy(),
            deflated_residuals=np.asarray(eig.residuals, dtype=np.float64).copy(),
            extra={**d.extra, "deflation": deflation.info()})

    # (the eigensolver's products, and those checking a given EigshResult on this operator)
    fixed = (deflation.eigsh_matvecs + deflation.check_matvecs) if deflation is not None else 0
    if adaptive:
        d = run_adaptive(run, target=target, max_probes=max_probes, probe_block=probe_block,
                         rtol=rtol, atol=atol, confidence=confidence, fixed_matvecs=fixed)
    else:
        d = run(0, num_probes)
        if fixed:
            d = dataclasses.replace(d, matvecs=d.matvecs + fixed)
    if deflation is not None and deflation.eigsh_matvecs:
        d = dataclasses.replace(d, wall_time=d.wall_time + deflation.eig.wall_time)
    return d
