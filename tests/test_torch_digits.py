"""SLQ on the Hessian of a real network against the dense eigenvalues.

An MLP 64-32-10 (2410 parameters, float64) trained briefly on scikit-learn's digits, so
its Hessian has outliers (Ghorbani et al. 2019). With 90 full-reorthogonalisation Lanczos
steps and 10 probes, the Wasserstein-1 error of SLQ is about (spectral range) / m from the
quadrature plus the probe variance ~ 1/sqrt(n * probes) (Chen, Trogdon & Ubaru 2021);
the bound 2e-3 of the range is the issue's target, measured ~3e-4 to 1.4e-3 on this model.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from specdens.backends.torch import ModelState, hessian

import specdens
from specdens.testing import compare


def trained_digits_mlp():
    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float64)
    y = torch.tensor(d.target, dtype=torch.int64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 10)).double()
    crit = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        crit(model(X), y).backward()
        opt.step()
    return model, crit, X, y


def test_slq_matches_dense_eigenvalues_on_digits_mlp():
    model, crit, X, y = trained_digits_mlp()
    with torch.no_grad():
        assert float(crit(model(X), y)) < 0.5  # it did learn
    before = ModelState.capture(model)
    batches = [(X[i:i + 512], y[i:i + 512]) for i in range(0, len(X), 512)]  # last: 261
    op = hessian(model, crit, batches)
    assert op.shape == (2410, 2410) and op.num_samples == 1797
    lam = np.linalg.eigvalsh(specdens.testing.dense_matrix(op))
    # outliers: a few eigenvalues far above the bulk
    assert lam[-1] > 10 * np.quantile(np.abs(lam), 0.9)
    density = specdens.slq(op, num_steps=90, num_probes=10, seed=0)
    cmp = compare(density, lam)
    assert cmp.wasserstein_relative <= 2e-3, cmp
    assert before.differences(model) == []
