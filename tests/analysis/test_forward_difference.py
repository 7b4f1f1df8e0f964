"""Forward-difference Hessian-vector products (``method="forward-difference"`` and
``finite_difference_product(..., base=g(w))``): one gradient per product, ``g(w)`` kept.

References: a closed-form function (``L(w) = sum_i a_i sin(w_i)``: gradient, Hessian and third
derivative by hand; the forward difference's truncation error is ``(h / 2) phi''(0)`` to first
order, ``phi''(0) = D^3 g[v, v] = -a cos(w) v^2`` here) and dense float64 Hessians
(:func:`analysis.reference.dense_hessian`) of an MLP and a tiny causal LM with padding.
"""

from __future__ import annotations

import pytest
import torch

from analysis import HessianOperator, top_eigenpairs
from analysis.operators.finite_difference import (
    default_shift,
    finite_difference_product,
    finite_difference_step,
)
from analysis.reference import dense_hessian
from tests.analysis.test_finite_difference import (
    lm_problem,
    mlp_problem,
    shift_error,
)
from tests.models import classification_data, mlp


def _sine(n=50):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    w = torch.randn(n, generator=gen, dtype=torch.float64)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    calls = []

    def gradient():
        calls.append(1)
        return a * torch.cos(w)

    return a, w, v, gradient, calls


def test_forward_truncation_error_is_h_over_two_times_the_second_derivative_of_g():
    a, w, v, gradient, calls = _sine()
    base = gradient()
    exact = -a * torch.sin(w) * v
    for h in (1e-3, 1e-4):
        calls.clear()
        fd = finite_difference_product(gradient, [w], v, step=h, base=base)
        assert len(calls) == 1  # one gradient per product
        predicted = h / 2 * (-a * torch.cos(w) * v ** 2)  # (h / 2) phi''(0)
        # next term h^2 / 6 phi''' (relative ~h); rounding ~u |g| / h
        torch.testing.assert_close(fd - exact, predicted, rtol=5e-3, atol=1e-10 / h)
    w0 = w.clone()
    assert torch.equal(w, w0)
    with pytest.raises(ValueError, match=r"base must be the flat gradient g\(w\), a tensor of shape \(50,\)"):
        finite_difference_product(gradient, [w], v, base=base[:3])


def test_default_forward_step_is_sqrt_u_and_balances_the_two_errors():
    assert default_shift(torch.float64, "forward") == pytest.approx(1.054e-8, rel=1e-3)
    assert default_shift(torch.float32, "forward") == pytest.approx(2.441e-4, rel=1e-3)
    with pytest.raises(ValueError, match="scheme must be one of .*'backward'"):
        default_shift(torch.float32, "backward")
    a, w, v, gradient, _ = _sine()
    base, exact = gradient(), -a * torch.sin(w) * v

    def err(h):
        return float((finite_difference_product(gradient, [w], v, step=h, base=base) - exact).norm())

    h0 = finite_difference_step(float(v.norm()), torch.float64, scheme="forward")
    assert h0 == pytest.approx(default_shift(torch.float64, "forward") / float(v.norm()))
    grid = [err(h) for h in (1e-3, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12)]
    e0 = err(h0)
    assert e0 <= 10 * min(grid)  # near the best step of the grid (the constants differ)
    u = torch.finfo(torch.float64).eps / 2
    bound = h0 / 2 * float((a * torch.cos(w) * v ** 2).norm()) + 10 * u * float(base.norm()) / h0
    assert e0 <= bound  # the documented error model bounds it
    assert e0 / float(exact.norm()) < 1e-6


@pytest.mark.parametrize("problem", [mlp_problem, lm_problem], ids=["mlp", "causal-lm"])
def test_operator_matches_the_dense_hessian_and_the_error_falls_as_h(problem):
    (model, loss, data, bs, v, exact, before), err = shift_error(problem, "forward-difference")
    e2, e3 = err(1e-2), err(1e-3)
    assert 4 < e2 / e3 < 25  # first order: 10x for 10x smaller h
    H = HessianOperator(model, loss, data, batch_size=bs, method="forward-difference")
    g = HessianOperator(model, loss, data, batch_size=bs, method="double-backward").gradient()
    torch.testing.assert_close(H.gradient(), g, rtol=1e-12, atol=1e-14)  # the kept g(w)
    hv = H @ v
    assert float((hv - exact).norm() / exact.norm()) < 1e-6  # ~sqrt(u) = 1e-8 x constants
    assert H.fd_step == pytest.approx(default_shift(torch.float64, "forward") / float(v.norm()))
    HV = H @ torch.stack([v, -v], 1)  # a column at a time; not odd in v (the error is even)
    torch.testing.assert_close(HV[:, 0], hv, rtol=1e-12, atol=1e-14)
    assert float((HV[:, 1] + exact).norm() / exact.norm()) < 1e-6
    assert torch.equal(H @ torch.zeros_like(v), torch.zeros_like(v))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_one_gradient_per_product_and_g_recomputed_when_the_weights_change():
    model, loss, data, bs = mlp_problem()
    calls = []

    def counted(out, y):
        calls.append(1)
        return torch.nn.functional.cross_entropy(out, y)

    H = HessianOperator(model, counted, data, batch_size=bs, method="forward-difference")
    batches = H.num_batches()
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    calls.clear()
    H.gradient()
    H @ v
    H @ v
    assert len(calls) == 3 * batches  # g(w) once, then one gradient per product
    with torch.no_grad():
        model[0].weight.mul_(1.1)
    A = dense_hessian(model, loss, data, batch_size=bs)
    calls.clear()
    hv = H @ v
    assert len(calls) == 2 * batches  # the changed weights: g(w) again
    H.clear_cache()  # frees the kept g(w): the next product computes it again
    calls.clear()
    H @ v
    assert len(calls) == 2 * batches
    assert float((hv - A @ v).norm() / (A @ v).norm()) < 1e-6


def test_float32_and_top_eigenpairs_against_the_float64_dense_hessian():
    model = mlp(dtype=torch.float32)
    x, y = classification_data(dtype=torch.float32)
    A = dense_hessian(model, "cross_entropy", (x, y))
    v = torch.randn(A.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    H = HessianOperator(model, "cross_entropy", (x, y), method="forward-difference")
    rel = float(((H @ v.float()).double() - A @ v).norm() / (A @ v).norm())
    assert rel < 1e-2  # ~sqrt(u) = 2.4e-4 times the problem's constants
    model64, loss, data, bs = mlp_problem()
    A64 = dense_hessian(model64, loss, data, batch_size=bs)
    res = top_eigenpairs(model64, loss, data, k=2, tol=1e-6, batch_size=bs,
                         method="forward-difference")
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(A64).flip(0)[:2],
                               rtol=1e-5, atol=1e-8)
