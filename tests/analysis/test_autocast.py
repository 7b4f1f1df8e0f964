"""Analyses called inside torch.autocast run their products and forwards outside it (issue 27,
item 2): the top eigenvalues, the trace, the density and the sharpness of a float32 model equal
those computed without autocast, and the Lanczos error bounds cover the true error against a
dense float64 Hessian (inside bfloat16 autocast they claimed 1e-6 at a true error of 8e-4)."""

from __future__ import annotations

import pytest
import torch

from analysis import (
    CurvatureTracker,
    HessianOperator,
    hessian_trace,
    sharpness,
    spectral_density,
    top_eigenpairs,
)
from analysis.precision import autocast_disabled
from analysis.reference import dense_hessian
from tests.models import classification_data, mlp


def _setup():
    x, y = classification_data(n=64, d=10, dtype=torch.float32)
    return mlp(d=10, hidden=16, dtype=torch.float32), (x, y)


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_top_eigenpairs_in_autocast_bounds_cover_the_float64_error():
    model, data = _setup()
    true = torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", data)).flip(0)[:2]
    with _bf16():
        res = top_eigenpairs(model, "cross_entropy", data, k=2, tol=1e-3)
    plain = top_eigenpairs(model, "cross_entropy", data, k=2, tol=1e-3)
    err = (res.eigenvalues.double() - true).abs()
    assert res.converged
    assert bool((err <= res.error_bounds + 1e-6 * true.abs()).all()), (err, res.error_bounds)
    assert bool((err <= 1e-3 * true.abs()).all()), err
    torch.testing.assert_close(res.eigenvalues, plain.eigenvalues, rtol=1e-5, atol=0)


def test_operator_products_in_autocast_equal_float32_products():
    model, data = _setup()
    op = HessianOperator(model, "cross_entropy", data)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1))
    plain = op @ v
    with _bf16():
        inside = op @ v
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=1e-5, atol=1e-7)


def test_trace_density_sharpness_in_autocast_equal_the_plain_calls():
    model, data = _setup()
    with _bf16():
        t = hessian_trace(model, "cross_entropy", data, num_matvecs=6, seed=0).estimate
        d = spectral_density(model, "cross_entropy", data, num_runs=2, num_iter=8, seed=0)
        s = sharpness(model, "cross_entropy", data, kind="average", rho=0.05, samples=4,
                      seed=0).value
    assert t == pytest.approx(hessian_trace(model, "cross_entropy", data, num_matvecs=6,
                                            seed=0).estimate, rel=1e-5)
    d0 = spectral_density(model, "cross_entropy", data, num_runs=2, num_iter=8, seed=0)
    torch.testing.assert_close(torch.as_tensor(d.nodes), torch.as_tensor(d0.nodes), rtol=1e-5,
                               atol=1e-7)
    assert s == pytest.approx(sharpness(model, "cross_entropy", data, kind="average", rho=0.05,
                                        samples=4, seed=0).value, rel=1e-4)


def test_tracker_in_autocast_equals_the_plain_tracker():
    model, data = _setup()
    with _bf16():
        inside = CurvatureTracker(model, "cross_entropy", data, tol=1e-6).measure(1).lambda_max
    plain = CurvatureTracker(model, "cross_entropy", data, tol=1e-6).measure(1).lambda_max
    assert inside == pytest.approx(plain, rel=1e-5)


def test_autocast_disabled_restores_autocast():
    with _bf16():
        with autocast_disabled():
            assert not torch.is_autocast_enabled("cpu")
            assert torch.matmul(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
