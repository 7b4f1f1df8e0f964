"""Finite-difference Hessian-vector products (``method="finite-difference"`` and
:func:`analysis.operators.finite_difference.finite_difference_product`).

References: a closed-form function (``L(w) = sum_i a_i sin(w_i)``: gradient, Hessian and third
derivative by hand), dense float64 Hessians (:func:`analysis.reference.dense_hessian`) of an MLP
and a tiny causal LM, and the error model of the module docstring (truncation ``h^2 / 6
phi'''``, rounding ``~ u ||g|| / h``).
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
from tests.lm_models import lm_model, padded_batches, token_sequences
from tests.models import classification_data, mlp


def _sine_problem(n=50, dtype=torch.float64):
    """``L(w) = sum a_i sin(w_i)``: ``g = a cos w``, ``H v = -a sin(w) v``,
    ``phi'''(0) = d^3/dt^3 g(w + t v) = a sin(w) v^3``."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    w = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    a = a.to(dtype)
    calls = []

    def gradient():
        calls.append(1)
        return a * torch.cos(w)

    exact = (-a * torch.sin(w) * v).double()
    third = (a * torch.sin(w) * v ** 3).double()
    return w, v, gradient, exact, third, calls


def test_truncation_error_is_h_squared_over_six_times_the_third_derivative():
    w, v, gradient, exact, third, _ = _sine_problem()
    u = torch.finfo(torch.float64).eps / 2
    for h in (1e-2, 1e-3):
        fd = finite_difference_product(gradient, [w], v, step=h)
        predicted = h * h / 6 * third
        # the next term is h^4 / 120 * phi^(5) (relative h^2 / 20); the rounding, ~u |g| / h, is
        # the absolute tolerance (it wins where sin(w_i) is near zero)
        torch.testing.assert_close(fd - exact, predicted, rtol=1e-4,
                                   atol=10 * u * float(gradient().abs().max()) / h)


def test_rounding_error_grows_as_one_over_h_and_the_default_step_balances_the_two():
    w, v, gradient, exact, third, _ = _sine_problem()
    u = torch.finfo(torch.float64).eps / 2

    def err(h):
        return float((finite_difference_product(gradient, [w], v, step=h) - exact).norm())

    tiny, small = err(1e-12), err(1e-10)
    assert tiny > 10 * small  # rounding regime: ~100x for 100x smaller h
    h0 = finite_difference_step(float(v.norm()), torch.float64)
    assert h0 == pytest.approx(u ** (1 / 3) / float(v.norm()))
    e0 = err(h0)
    grid = [err(h) for h in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)]
    assert e0 <= 3 * min(grid)  # near the best step of the grid
    g_norm = float(gradient().norm())
    bound = h0 * h0 / 6 * float(third.norm()) + 10 * u * g_norm / h0
    assert e0 <= bound  # the documented error model bounds it
    assert e0 / float(exact.norm()) < 1e-9


def test_the_parameters_are_restored_bitwise_also_when_the_gradient_raises():
    w, v, gradient, _, _, calls = _sine_problem(dtype=torch.float32)
    w0 = w.clone()
    finite_difference_product(gradient, [w], v, shift=0.9)
    assert torch.equal(w, w0)  # w + h v - h v is not w in float32: restored from a copy
    assert len(calls) == 2

    def failing():
        if len(calls) == 3:
            raise RuntimeError("the engine failed")
        return gradient()

    with pytest.raises(RuntimeError, match="the engine failed"):
        finite_difference_product(failing, [w], v)
    assert torch.equal(w, w0)
    with pytest.raises(ValueError, match=r"v must have shape \(50,\)"):
        finite_difference_product(gradient, [w], v[:3])
    with pytest.raises(ValueError, match="step must be a positive finite number or None, got -1"):
        finite_difference_product(gradient, [w], v, step=-1.0)
    with pytest.raises(ValueError, match="shift must be a number in \\(0, 1\\)"):
        finite_difference_product(gradient, [w], v, shift=2.0)
    with pytest.raises(ValueError, match="not finite"):
        finite_difference_product(gradient, [w], v * float("nan"))
    assert len(calls) == 3 and torch.equal(w, w0)  # no gradient for bad input
    assert torch.equal(finite_difference_product(gradient, [w], torch.zeros_like(v)),
                       torch.zeros_like(v))


def test_default_shift():
    assert default_shift(torch.float64) == pytest.approx(4.806e-6, rel=1e-3)
    assert default_shift(torch.float32) == pytest.approx(3.906e-3, rel=1e-3)
    with pytest.raises(TypeError, match="floating-point"):
        default_shift(torch.int64)


def test_the_shift_does_not_grow_with_the_parameter_norm():
    """Regression: the step was r max(1, ||w||) / ||v||, so a large parameter vector (here
    ||w|| = 100) shifted the loss far into its nonlinear regime along a sharp direction: a
    shift of 0.39 along a coordinate of sum(a sin w) in float32, an error of about 0.39^2 / 6 =
    2.5% of |a|; with a shift of r = u^(1/3) it is r^2 / 6 plus the rounding u |g| / r."""
    n = 10_000
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(n, generator=gen)
    w *= 100 / w.norm()
    a = torch.rand(n, generator=gen) + 0.5

    def gradient():
        return a * torch.cos(w)

    worst = 0.0
    for i in range(20):
        v = torch.zeros(n)
        v[i] = 1.0
        fd = finite_difference_product(gradient, [w], v)
        exact = -a[i] * torch.sin(w[i])
        worst = max(worst, abs(float(fd[i] - exact)) / float(a[i]))
    r, u = default_shift(torch.float32), torch.finfo(torch.float32).eps / 2
    bound = r * r / 6 + 10 * u * (1.5 + 1.5 * float(w.abs().max())) / r  # the error model
    assert worst < bound < 5e-3, (worst, bound)  # the old shift: ~0.39^2 / 6 |sin w_i|


def lm_problem():
    """A tiny causal LM on padded batches (float64): model, loss, data, batch size."""
    model = lm_model()
    return model, "lm", padded_batches(token_sequences()), None


def mlp_problem():
    """A tanh MLP in batches of 7 (float64): model, loss, data, batch size."""
    return mlp(), "cross_entropy", classification_data(), 7


def dense_setup(problem):
    """``problem()``'s parts, a seeded vector ``v``, the dense float64 ``H v`` and the weights."""
    model, loss, data, bs = problem()
    A = dense_hessian(model, loss, data, batch_size=bs)
    v = torch.randn(A.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]
    return model, loss, data, bs, v, A @ v, before


def shift_error(problem, method: str):
    """``problem()``'s dense set-up and ``r -> ||H_r v - H v|| / ||H v||``, the relative error of
    ``method``'s product with ``fd_shift=r``."""
    model, loss, data, bs, v, exact, before = dense_setup(problem)

    def err(r):
        H = HessianOperator(model, loss, data, batch_size=bs, method=method, fd_shift=r)
        return float((H @ v - exact).norm() / exact.norm())

    return (model, loss, data, bs, v, exact, before), err


@pytest.mark.parametrize("problem", [mlp_problem, lm_problem], ids=["mlp", "causal-lm"])
def test_operator_matches_the_dense_hessian_and_the_error_falls_as_h_squared(problem):
    (model, loss, data, bs, v, exact, before), err = shift_error(problem, "finite-difference")
    e2, e3 = err(1e-2), err(1e-3)
    assert 30 < e2 / e3 < 300  # truncation regime: 100x for 10x smaller h
    H = HessianOperator(model, loss, data, batch_size=bs, method="finite-difference")
    hv = H @ v
    torch.testing.assert_close(hv, exact, rtol=1e-7, atol=1e-9)
    assert H.fd_step == pytest.approx(default_shift(torch.float64) / float(v.norm()))
    V = torch.stack([v, 2 * v, -v], 1)
    torch.testing.assert_close(H @ V, torch.stack([hv, 2 * hv, -hv], 1), rtol=1e-6, atol=1e-9)
    assert torch.equal(H @ torch.zeros_like(v), torch.zeros_like(v))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_operator_in_float32_against_the_float64_dense_hessian():
    model = mlp(dtype=torch.float32)
    x, y = classification_data(dtype=torch.float32)
    A = dense_hessian(model, "cross_entropy", (x, y))  # float64 copy of the same weights
    v = torch.randn(A.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = A @ v
    H = HessianOperator(model, "cross_entropy", (x, y), method="finite-difference")
    fd = H @ v.float()
    exact32 = HessianOperator(model, "cross_entropy", (x, y), method="double-backward") @ v.float()
    rel = float((fd.double() - exact).norm() / exact.norm())
    rel_exact32 = float((exact32.double() - exact).norm() / exact.norm())
    assert rel < 1e-3  # ~u^(2/3) = 1.5e-5 times the problem's constants
    assert rel_exact32 < rel  # the exact float32 product is better, as expected


def test_top_eigenpairs_by_finite_differences_and_the_model_is_never_modified():
    model, loss, data, bs = mlp_problem()
    A = dense_hessian(model, loss, data, batch_size=bs)
    res = top_eigenpairs(model, loss, data, k=2, tol=1e-6, batch_size=bs,
                         method="finite-difference")
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:2],
                               rtol=1e-6, atol=1e-9)
    before = [p.detach().clone() for p in model.parameters()]
    armed = []

    def flaky(out, y):
        if armed:
            raise RuntimeError("loss failed")
        return torch.nn.functional.cross_entropy(out, y)

    H = HessianOperator(model, flaky, data, method="finite-difference")
    armed.append(1)
    with pytest.raises(RuntimeError, match="loss failed"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="shift must be a number in \\(0, 1\\).*0"):
        HessianOperator(model, loss, data, method="finite-difference", fd_shift=0)
