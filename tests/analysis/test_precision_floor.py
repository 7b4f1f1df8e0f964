"""Half-precision operators (issue 27, item 3): a warning naming the dtype and its floor, a stop at
the precision floor (converged=False with the reason, not a run to the 300-product cap), bounds
that still cover the true error against a dense float64 Hessian."""

from __future__ import annotations

import warnings

import pytest
import torch

from analysis import top_eigenpairs
from analysis.precision import precision_floor, warn_half_precision
from analysis.reference import dense_hessian
from tests.models import Diagonal, classification_data, mlp


def _model():
    x, y = classification_data(n=128, d=20, dtype=torch.float32)
    return mlp(d=20, hidden=32, dtype=torch.float32), (x, y)


@pytest.mark.parametrize("k", [1, 2])
def test_bfloat16_model_stops_at_the_floor_with_bounds_that_cover_the_error(k):
    model, data = _model()
    true = torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", data)).flip(0)[:k]
    model = model.to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"bfloat16.*0\.031"):
        res = top_eigenpairs(model, "cross_entropy", data, k=k, tol=1e-3)
    assert not res.converged
    assert res.stop_reason.startswith("precision floor"), res.stop_reason
    assert "bfloat16" in res.stop_reason
    assert res.num_matvecs <= 40  # was the 300-product cap
    err = (res.eigenvalues.double() - true).abs()
    assert bool((err <= res.error_bounds).all()), (err, res.error_bounds)


def test_float16_operator_stops_at_the_floor():
    g = torch.Generator().manual_seed(1)
    d = torch.rand(5000, generator=g, dtype=torch.float64)
    d[:3] = torch.tensor([10.0, 9.0, 8.0], dtype=torch.float64)
    with pytest.warns(UserWarning, match="float16"):
        res = top_eigenpairs(Diagonal(d.half()), k=3, tol=1e-4)
    assert not res.converged and res.stop_reason.startswith("precision floor")
    assert res.num_matvecs < 60
    err = (res.eigenvalues.double() - d[:3]).abs()
    assert bool((err <= res.error_bounds).all())


def test_float32_tol_below_its_floor_stops_there_and_a_reachable_tol_converges():
    g = torch.Generator().manual_seed(2)
    d = torch.rand(4000, generator=g, dtype=torch.float64)
    d[:2] = torch.tensor([10.0, 9.0], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no half-precision warning for float32
        res = top_eigenpairs(Diagonal(d.float()), k=2, tol=1e-9)
        ok = top_eigenpairs(Diagonal(d.float()), k=2, tol=1e-4)
    assert not res.converged and res.stop_reason.startswith("precision floor")
    assert res.num_matvecs < 100
    assert bool(((res.eigenvalues.double() - d[:2]).abs() <= res.error_bounds).all())
    assert ok.converged and ok.stop_reason == "converged"


def test_stop_reasons_of_the_cap():
    d = torch.linspace(0, 1, 400, dtype=torch.float64)
    res = top_eigenpairs(Diagonal(d), k=2, tol=1e-12, max_iter=5)
    assert not res.converged and res.stop_reason == "max_iter"
    assert res.to_dict()["stop_reason"] == "max_iter"


def test_precision_floor_values_and_warning_only_for_half():
    assert precision_floor(torch.bfloat16) == pytest.approx(4 * 2.0 ** -7)
    assert precision_floor(torch.float16) == pytest.approx(4 * 2.0 ** -10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_half_precision(torch.float32, 1e-3, "x") is False
    with pytest.warns(UserWarning, match="tol=0.001 is below it"):
        assert warn_half_precision(torch.bfloat16, 1e-3, "x") is True
