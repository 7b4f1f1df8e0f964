"""spectral_density (SLQ): normalization, mass at known eigenvalues, quadrature identities."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analysis import HessianOperator, spectral_density
from analysis.reference import dense_hessian
from tests.models import classification_data, mlp, random_spd


def _two_cluster(n=100):
    ev = torch.cat([torch.zeros(80), torch.full((20,), 5.0)]).double()
    return random_spd(n, seed=5, eigenvalues=ev)


def test_integrates_to_one_and_weights_are_probabilities():
    d = spectral_density(_two_cluster(), num_iter=20, num_runs=6)
    assert d.integral() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(d.weights.sum(axis=1), 1.0, rtol=1e-10)
    assert (d.weights >= 0).all()
    assert d.grid.shape == d.density.shape and d.nodes.shape == d.weights.shape
    assert (d.density >= 0).all()
    json.dumps(d.to_dict())


def test_mass_sits_at_the_right_eigenvalues():
    d = spectral_density(_two_cluster(), num_iter=20, num_runs=10, sigma=0.05)
    g = d.grid
    near5 = (g > 4.5) & (g < 5.5)
    near0 = (g > -0.5) & (g < 0.5)
    mass5 = np.trapezoid(d.density[near5], g[near5])
    mass0 = np.trapezoid(d.density[near0], g[near0])
    assert mass5 == pytest.approx(0.2, abs=0.05)
    assert mass0 == pytest.approx(0.8, abs=0.05)
    assert mass0 + mass5 == pytest.approx(1.0, abs=1e-3)  # nothing elsewhere
    # the peaks are where the eigenvalues are
    assert abs(g[np.argmax(d.density)]) < 0.05
    assert abs(g[near5][np.argmax(d.density[near5])] - 5.0) < 0.05


def test_moments_match_the_trace():
    """sum_j tau_j theta_j^p estimates tr(A^p)/n for p <= 2 m - 1 (Gauss quadrature)."""
    ev = torch.linspace(-1.0, 3.0, 60).double()
    A = random_spd(60, seed=6, eigenvalues=ev)
    d = spectral_density(A, num_iter=10, num_runs=200, seed=1)
    for p in (1, 2, 3):
        per_run = (d.weights * d.nodes ** p).sum(axis=1)
        true = float((ev ** p).mean())
        se = per_run.std(ddof=1) / np.sqrt(len(per_run))
        assert abs(per_run.mean() - true) < 4 * se + 1e-12, p


def test_full_lanczos_recovers_the_eigenvalues():
    ev = torch.tensor([-2.0, 0.5, 1.0, 1.7, 3.0, 4.0]).double()
    d = spectral_density(random_spd(6, seed=7, eigenvalues=ev), num_iter=10, num_runs=2)
    for row, w in zip(d.nodes, d.weights):
        used = row[w > 1e-12]
        np.testing.assert_allclose(np.sort(used), ev.numpy(), atol=1e-8)


def test_model_hessian_density_support():
    model, data = mlp(), classification_data()
    ev = torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", data))
    H = HessianOperator(model, "cross_entropy", data)
    d = spectral_density(H, num_iter=15, num_runs=3)
    assert d.num_matvecs == 45
    assert d.nodes.min() >= ev.min().item() - 1e-8 and d.nodes.max() <= ev.max().item() + 1e-8
    assert d.integral() == pytest.approx(1.0, abs=1e-6)


def test_custom_grid_and_bad_inputs():
    A = _two_cluster()
    d = spectral_density(A, num_iter=10, num_runs=2, grid=torch.linspace(-1, 6, 50), sigma=0.3)
    assert d.grid.shape == (50,) and d.sigma == 0.3
    np.testing.assert_allclose(d.evaluate(d.grid), d.density)
    with pytest.raises(ValueError, match="num_iter"):
        spectral_density(A, num_iter=0)
    with pytest.raises(ValueError, match="sigma"):
        spectral_density(A, sigma=-1.0)
    with pytest.raises(ValueError, match="grid"):
        spectral_density(A, num_iter=5, num_runs=1, grid=[3.0, 1.0])


def test_slq_blocks_of_runs_equal_one_run_at_a_time():
    # lockstep runs with batched products give the same quadrature as sequential runs
    H = HessianOperator(mlp(), "cross_entropy", classification_data())
    a = spectral_density(H, num_iter=12, num_runs=5)
    before = H.num_matvecs
    b = spectral_density(H, num_iter=12, num_runs=5, block_size=3)
    assert H.num_matvecs - before == b.num_matvecs == a.num_matvecs
    np.testing.assert_allclose(b.nodes, a.nodes, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(b.weights, a.weights, rtol=1e-8, atol=1e-11)
    with pytest.raises(ValueError, match="block_size"):
        spectral_density(H, block_size=0)


def test_slq_block_with_an_early_breakdown():
    # a rank-2 matrix: every run breaks down after 2-3 steps, runs in one block drop out
    A = torch.diag(torch.cat([torch.zeros(28), torch.tensor([2.0, 5.0])]).double())
    d = spectral_density(A, num_iter=10, num_runs=4, block_size=4)
    assert abs(d.integral() - 1) < 1e-3
    assert d.nodes.max() == pytest.approx(5.0, rel=1e-10)
