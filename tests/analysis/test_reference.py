"""The dense references against closed forms (so the references themselves are checked)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.reference import dense_ggn, dense_hessian
from tests.models import Quadratic, classification_data, mlp, quadratic_loss, random_spd


def test_quadratic_hessian_is_A():
    A = random_spd(7, seed=3)
    model = Quadratic(A, c=torch.randn(7, dtype=torch.float64))
    x = torch.zeros(4, 1, dtype=torch.float64)
    H = dense_hessian(model, quadratic_loss, (x, torch.zeros(4, dtype=torch.float64)))
    torch.testing.assert_close(H, A, rtol=1e-12, atol=1e-12)


def test_least_squares_closed_form():
    x, _ = classification_data(n=30, d=4)
    y = torch.randn(30, 1, dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    H = dense_hessian(model, F.mse_loss, (x, y), batch_size=7)  # uneven batches, exact weights
    torch.testing.assert_close(H, 2 * x.T @ x / 30, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense_ggn(model, F.mse_loss, (x, y)), 2 * x.T @ x / 30)


def test_softmax_regression_closed_form():
    """For a linear softmax classifier H = GGN = (1/N) sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T."""
    x, y = classification_data(n=20, d=3, classes=4)
    model = nn.Linear(3, 4, bias=False).double()
    p = torch.softmax(model(x), dim=1).detach()
    expected = sum(torch.kron(torch.diag(pi) - torch.outer(pi, pi), torch.outer(xi, xi))
                   for pi, xi in zip(p, x)) / 20
    torch.testing.assert_close(dense_hessian(model, "cross_entropy", (x, y)), expected)
    torch.testing.assert_close(dense_ggn(model, "cross_entropy", (x, y)), expected)


def test_ggn_differs_from_hessian_for_a_nonlinear_model():
    model, data = mlp(), classification_data()
    H, G = dense_hessian(model, "cross_entropy", data), dense_ggn(model, "cross_entropy", data)
    assert (H - G).abs().max() > 1e-4
    torch.testing.assert_close(H, H.T)


def test_float32_model_untouched_and_float64_result():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    before = [p.detach().clone() for p in model.parameters()]
    H = dense_hessian(model, "cross_entropy", classification_data(dtype=torch.float32))
    assert H.dtype == torch.float64 and H.shape == (43, 43)
    for a, b in zip(before, model.parameters()):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_too_large():
    model = nn.Linear(200, 200)
    with pytest.raises(ValueError, match="dense reference"):
        dense_hessian(model, "mse", (torch.randn(2, 200), torch.randn(2, 200)))
