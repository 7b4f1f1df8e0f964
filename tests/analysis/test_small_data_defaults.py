"""Defaults that depend on the data size fit small data (issue 13 item 4).

``sharpness``'s batch size ``m`` defaults to ``min(128, N, n_eval)`` (recorded in the result);
an explicit ``m`` larger than the data still fails with one line naming ``m``.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis import sharpness, sharpness_report


def _setup(n):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


@pytest.mark.parametrize("n, n_eval, expected", [(32, 1024, 32), (300, 1024, 128), (300, 50, 50)])
def test_default_m_fits_the_data(n, n_eval, expected):
    model, x, y = _setup(n)
    res = sharpness(model, "cross_entropy", (x, y), rho=0.05, kind="average", samples=3,
                    n_eval=n_eval, progress=False)
    assert res.m == expected
    assert res.num_batches == min(n, n_eval) // expected
    # the same number as asking for that m explicitly
    ref = sharpness(model, "cross_entropy", (x, y), rho=0.05, kind="average", samples=3,
                    n_eval=n_eval, m=expected, progress=False)
    assert res.value == ref.value


def test_default_m_worst_case_value_on_one_batch():
    """m = N on 32 samples: one batch, the value is the worst-case increase of the full loss,
    at least the increase of the (feasible) normalized-gradient step."""
    model, x, y = _setup(32)
    rho = 0.01
    res = sharpness(model, "cross_entropy", (x, y), rho=rho, adaptive=False, steps=10, progress=False)
    assert res.m == 32 and res.num_batches == 1
    loss = F.cross_entropy(model(x), y)
    l0 = float(loss.detach())
    grads = torch.autograd.grad(loss, list(model.parameters()))
    gn = torch.sqrt(sum((g * g).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.add_(rho * g / gn)
        stepped = float(F.cross_entropy(model(x), y))
        for p, g in zip(model.parameters(), grads):
            p.sub_(rho * g / gn)
    assert res.value >= stepped - l0 - 1e-6


def test_report_defaults_on_small_data():
    model, x, y = _setup(32)
    rep = sharpness_report(model, "cross_entropy", (x, y), ["worst", "average"],
                           options={"worst": {"steps": 2}, "average": {"samples": 2}})
    assert rep.results["worst"].m == 32 and rep.results["average"].m == 32
    assert '"m": 32' in json.dumps(rep.to_dict())  # the choice is recorded in the JSON


def test_explicit_m_too_large_names_m():
    model, x, y = _setup(32)
    with pytest.raises(ValueError, match=r"^m=128 is larger than the number of samples available \(32") as e:
        sharpness(model, "cross_entropy", (x, y), rho=0.05, m=128, progress=False)
    assert "\n" not in str(e.value)


def test_empty_data_one_line():
    model, _, _ = _setup(4)
    with pytest.raises(ValueError, match="empty"):
        sharpness(model, "cross_entropy", [], rho=0.05, progress=False)
