"""Sharpness metrics against closed forms, dense Hessians, invariances and exact state restoration."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm as normal
from torch import nn

from analysis import (
    ParameterSpace,
    directional_sharpness,
    epsilon_sharpness,
    pac_bayes_flatness,
    sharpness,
    sharpness_report,
)
from analysis.sharpness import apgd_checkpoints, preserved_state
from tests.models import (
    Quadratic,
    classification_data,
    cnn_bn,
    mlp,
    quadratic_loss,
    random_spd,
    relu_mlp,
)

DT = torch.float64


class LinearLoss(nn.Module):
    """L(w) = a . w + offset for every sample (a model whose loss is linear in its parameter)."""

    def __init__(self, a: torch.Tensor, w0: torch.Tensor, offset: float = 0.0):
        super().__init__()
        self.register_buffer("a", a)
        self.offset = offset
        self.w = nn.Parameter(w0.clone())

    def forward(self, x):
        return (self.w @ self.a + self.offset).expand(x.shape[0], 1)


def dummy(n: int = 16):
    return torch.zeros(n, 1, dtype=DT), torch.zeros(n, dtype=DT)


def snapshot(model: nn.Module):
    return (
        [p.detach().clone() for p in model.parameters()],
        [b.detach().clone() for b in model.buffers()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [id(p.grad) for p in model.parameters()],
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def assert_same_state(model: nn.Module, snap) -> None:
    params, buffers, grads, grad_ids, rgs, modes = snap
    for p, v in zip(model.parameters(), params):
        assert torch.equal(p, v)
    for b, v in zip(model.buffers(), buffers):
        assert torch.equal(b, v)
    for p, g, gid in zip(model.parameters(), grads, grad_ids):
        assert (p.grad is None) == (g is None)
        if g is not None:
            assert torch.equal(p.grad, g) and id(p.grad) == gid
    assert [p.requires_grad for p in model.parameters()] == rgs
    assert [m.training for m in model.modules()] == modes


# ------------------------------------------------------------------------------------------------
# APGD schedule and closed forms
# ------------------------------------------------------------------------------------------------
def test_apgd_checkpoints_match_croce_hein_schedule():
    assert apgd_checkpoints(20) == [5, 9, 12, 14, 16, 18, 19, 20]
    cps = apgd_checkpoints(100)
    assert cps[0] == 22 and cps[-1] >= 100 and cps == sorted(set(cps))


@pytest.mark.parametrize("init", ["zero", "random"])
@pytest.mark.parametrize("norm,adaptive", list(itertools.product(["l2", "linf"], [False, True])))
def test_worst_case_on_linear_loss_is_the_dual_norm(norm, adaptive, init):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(7, generator=g, dtype=DT)
    w0 = torch.randn(7, generator=g, dtype=DT)
    model = LinearLoss(a, w0)
    rho = 0.3
    c = w0.abs() if adaptive else torch.ones(7, dtype=DT)
    # max_{||u||_p <= rho} a . (c u) = rho ||c a||_q (q the dual exponent)
    expected = rho * float((c * a).norm() if norm == "l2" else (c * a).abs().sum())
    res = sharpness(model, quadratic_loss, dummy(), rho=rho, norm=norm, adaptive=adaptive,
                    m=8, steps=20, init=init, progress=False)
    assert res.num_batches == 2 and res.num_samples == 16
    assert res.value <= expected * (1 + 1e-12)
    assert res.value == pytest.approx(expected, rel=1e-12 if init == "zero" else 1e-5)
    assert res.stderr == pytest.approx(0.0, abs=1e-5 * expected)
    assert res.loss == pytest.approx(float(a @ w0), rel=1e-12)


def test_worst_case_l2_of_quadratic_at_minimum_is_half_rho2_lambda_max():
    A = random_spd(8, seed=1, eigenvalues=[0.2, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0])
    model = Quadratic(A)
    rho = 0.2
    res = sharpness(model, quadratic_loss, dummy(), rho=rho, adaptive=False, m=16, steps=20,
                    progress=False)
    expected = 0.5 * rho**2 * 5.0
    assert res.value <= expected * (1 + 1e-12)  # every iterate is feasible: a lower bound
    assert res.value == pytest.approx(expected, rel=1e-3)


def test_adaptive_worst_case_of_quadratic_at_minimum():
    # minimum at c0 != 0, so c = |w| = |c0|: max_{||u|| <= rho} 0.5 (C u)^T A (C u)
    A = random_spd(6, seed=2)
    c0 = torch.tensor([0.5, -1.0, 2.0, 0.8, -0.3, 1.5], dtype=DT)
    model = Quadratic(A, c=c0, w0=c0)
    rho = 0.1
    C = torch.diag(c0.abs())
    expected = 0.5 * rho**2 * float(torch.linalg.eigvalsh(C @ A @ C)[-1])
    res = sharpness(model, quadratic_loss, dummy(), rho=rho, adaptive=True, m=16, steps=40,
                    progress=False)
    assert res.value == pytest.approx(expected, rel=1e-3)


def test_worst_case_linf_quadratic_is_bounded_by_the_best_vertex():
    A = random_spd(5, seed=4)
    w0 = torch.tensor([0.3, -0.2, 0.1, 0.4, -0.5], dtype=DT)
    model = Quadratic(A, w0=w0)
    rho = 0.05
    # a convex function attains its maximum over a box at a vertex: brute force all 32
    best = max(
        0.5 * float((w0 + rho * torch.tensor(s, dtype=DT)) @ A @ (w0 + rho * torch.tensor(s, dtype=DT)))
        for s in itertools.product([-1.0, 1.0], repeat=5)
    ) - 0.5 * float(w0 @ A @ w0)
    res = sharpness(model, quadratic_loss, dummy(), rho=rho, norm="linf", adaptive=False, m=16,
                    progress=False)
    assert res.value <= best + 1e-12
    assert res.value >= 0.95 * best


def test_average_sharpness_of_quadratic_is_half_rho2_trace():
    A = random_spd(6, seed=5)
    model = Quadratic(A)  # at the minimum the average is exactly 0.5 rho^2 tr(A)
    rho, samples = 0.3, 4000
    res = sharpness(model, quadratic_loss, dummy(8), kind="average", rho=rho, adaptive=False,
                    m=8, samples=samples, seed=1, progress=False)
    exact = 0.5 * rho**2 * float(torch.trace(A))
    sd = math.sqrt(0.5 * rho**4 * float(torch.trace(A @ A)) / samples)  # Var(0.5 d^T A d)
    assert abs(res.value - exact) < 4 * sd
    assert res.samples == samples and res.steps is None


def test_average_sharpness_matches_dense_hessian_trace_to_second_order():
    # MSE against the model's own outputs: L(w) = 0 and grad L(w) = 0, so the average
    # sharpness is 0.5 rho^2 tr(H) + O(rho^4) with a variance of order rho^4 only
    model = mlp(d=4, hidden=4, classes=3, seed=1)
    x, _ = classification_data(n=20, d=4, classes=3, seed=2)
    y = model(x).detach()
    space = ParameterSpace(model)
    H = torch.autograd.functional.hessian(
        lambda w: nn.functional.mse_loss(torch.func.functional_call(model, space.as_dict(w), (x,)), y),
        space.vector())
    rho, samples = 0.01, 1000
    res = sharpness(model, "mse", (x, y), kind="average", rho=rho, adaptive=False,
                    m=20, samples=samples, seed=3, progress=False)
    expected = 0.5 * rho**2 * float(torch.trace(H))
    sd = math.sqrt(0.5 * rho**4 * float(torch.trace(H @ H)) / samples)  # Var(0.5 d^T H d)
    assert abs(res.value - expected) < 4 * sd + 0.01 * expected
    # adaptive: the noise is rho * |w| * z, so the trace is that of diag(|w|) H diag(|w|)
    res = sharpness(model, "mse", (x, y), kind="average", rho=rho, adaptive=True,
                    m=20, samples=samples, seed=3, progress=False)
    C = torch.diag(space.vector().abs())
    expected = 0.5 * rho**2 * float(torch.trace(C @ H @ C))
    sd = math.sqrt(0.5 * rho**4 * float(torch.trace(C @ H @ C @ C @ H @ C)) / samples)
    assert abs(res.value - expected) < 4 * sd + 0.01 * expected


# ------------------------------------------------------------------------------------------------
# invariance, batching, counts
# ------------------------------------------------------------------------------------------------
def rescaled(model: nn.Sequential, a: float) -> nn.Sequential:
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(a)
        other[0].bias.mul_(a)
        other[2].weight.div_(a)
    return other


@pytest.mark.parametrize("kind,norm", [("worst", "l2"), ("worst", "linf"), ("average", "l2")])
def test_adaptive_sharpness_is_invariant_to_relu_rescaling(kind, norm):
    model = relu_mlp(seed=0)
    x, y = classification_data(n=32, seed=1)
    other = rescaled(model, 5.0)
    assert torch.allclose(model(x), other(x), atol=1e-12)
    kw = dict(kind=kind, rho=0.05, norm=norm, m=16, steps=10, samples=20, progress=False)
    a = sharpness(model, "cross_entropy", (x, y), adaptive=True, **kw)
    b = sharpness(other, "cross_entropy", (x, y), adaptive=True, **kw)
    assert a.value != 0
    assert b.value == pytest.approx(a.value, rel=1e-6)
    pa = sharpness(model, "cross_entropy", (x, y), adaptive=False, **kw)
    pb = sharpness(other, "cross_entropy", (x, y), adaptive=False, **kw)
    assert abs(pb.value - pa.value) > 0.1 * abs(pa.value)


def test_each_batch_of_m_is_maximized_on_its_own():
    model = mlp(seed=2)
    x, y = classification_data(n=40, seed=3)
    kw = dict(rho=0.1, m=16, steps=8, init="zero", progress=False)
    res = sharpness(model, "cross_entropy", (x, y), **kw)
    assert res.num_batches == 2 and res.num_samples == 32  # the last 8 samples are dropped
    for i in range(2):
        sl = slice(16 * i, 16 * (i + 1))
        alone = sharpness(model, "cross_entropy", (x[sl], y[sl]), **kw)
        assert alone.value == pytest.approx(res.batch_values[i], rel=1e-10)
    assert res.value == pytest.approx(sum(res.batch_values) / 2, rel=1e-12)
    sd = float(np.std(res.batch_values, ddof=1)) / math.sqrt(2)
    assert res.stderr == pytest.approx(sd, rel=1e-9)
    # the data may arrive in batches of another size: they are re-batched into m
    batches = [(x[i:i + 5], y[i:i + 5]) for i in range(0, 40, 5)]
    res2 = sharpness(model, "cross_entropy", batches, **kw)
    assert res2.batch_values == pytest.approx(res.batch_values, rel=1e-10)
    # n_eval caps the samples
    res3 = sharpness(model, "cross_entropy", (x, y), n_eval=16, **kw)
    assert res3.num_batches == 1 and math.isnan(res3.stderr)
    assert "one batch of m=16 samples" in res3.stderr_reason and res.stderr_reason is None


def test_pass_counts():
    model = mlp(seed=0)
    data = classification_data(n=32)
    r = sharpness(model, "cross_entropy", data, rho=0.1, m=16, steps=5, progress=False)
    assert (r.forward_passes, r.backward_passes) == (2 * 7, 2 * 5)
    assert r.forward_samples == 16 * 14 and r.backward_samples == 16 * 10
    r = sharpness(model, "cross_entropy", data, rho=0.1, m=16, steps=5, init="zero", progress=False)
    assert (r.forward_passes, r.backward_passes) == (2 * 6, 2 * 5)
    r = sharpness(model, "cross_entropy", data, kind="average", rho=0.1, m=16, samples=7,
                  progress=False)
    assert (r.forward_passes, r.backward_passes) == (2 * 8, 0)
    d = directional_sharpness(model, "cross_entropy", data, torch.ones(ParameterSpace(model).numel,
                              dtype=DT), [0.1, 0.2, 0.3], data_stderr=False)
    assert (d.forward_passes, d.backward_passes) == (4, 0)
    # its data-sampling SE evaluates the one batch in 16 groups: more calls, the same samples
    d = directional_sharpness(model, "cross_entropy", data, torch.ones(ParameterSpace(model).numel,
                              dtype=DT), [0.1, 0.2, 0.3])
    assert (d.forward_passes, d.backward_passes, d.forward_samples) == (4 * 16, 0, 4 * 32)


# ------------------------------------------------------------------------------------------------
# epsilon-sharpness, PAC-Bayes, directional
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lbfgsb", "apgd"])
def test_epsilon_sharpness_on_linear_loss(method):
    g = torch.Generator().manual_seed(7)
    a, w0 = torch.randn(6, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT)
    model = LinearLoss(a, w0, offset=3.0)
    eps = 1e-3
    L = float(a @ w0) + 3.0
    expected = 100 * eps * float((a.abs() * (w0.abs() + 1)).sum()) / (1 + L)
    res = epsilon_sharpness(model, quadratic_loss, dummy(), epsilon=eps, method=method)
    assert res.value == pytest.approx(expected, rel=1e-6)
    assert res.loss == pytest.approx(L, rel=1e-12)


@pytest.mark.parametrize("method", ["lbfgsb", "apgd"])
def test_epsilon_sharpness_on_quadratic_against_vertices(method):
    A = random_spd(4, seed=8)
    w0 = torch.tensor([0.5, -1.0, 0.2, 0.7], dtype=DT)
    model = Quadratic(A, w0=w0)
    eps = 0.05

    def f(w):
        return 0.5 * float(w @ A @ w)

    L = f(w0)
    box = eps * (w0.abs() + 1)
    best = max(f(w0 + torch.tensor(s, dtype=DT) * box) for s in itertools.product([-1.0, 1.0], repeat=4))
    expected = 100 * (best - L) / (1 + L)
    res = epsilon_sharpness(model, quadratic_loss, dummy(), epsilon=eps, method=method, steps=20)
    assert expected * 0.98 <= res.value <= expected + 1e-9


def two_class_problem(n=400, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    w_true = torch.randn(d, generator=g, dtype=DT)
    y = (x @ w_true + 0.3 * torch.randn(n, generator=g, dtype=DT) > 0).long()
    model = nn.Linear(d, 2, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.stack([-0.5 * w_true, 0.5 * w_true]))
    return model, x, y


@pytest.mark.parametrize("magnitude_aware", [False, True])
def test_pac_bayes_sigma_matches_closed_form_for_a_linear_classifier(magnitude_aware):
    model, x, y = two_class_problem()
    W = model.weight.detach()
    sign = (2 * y - 1).double()
    margin = sign * (x @ (W[1] - W[0]))
    acc0 = float((margin > 0).double().mean())
    target = 0.1

    def drop(sigma):
        # score difference noise: sum_j (u_1j - u_0j) x_j, independent Gaussians
        if magnitude_aware:
            var = ((sigma**2 * (W[0] ** 2 + W[1] ** 2) + 2e-6) * x**2).sum(1)
        else:
            var = 2 * sigma**2 * (x**2).sum(1)
        p = normal.cdf((margin / var.sqrt()).numpy())
        return acc0 - float(p.mean()) - target

    sigma_true = brentq(drop, 1e-4, 50.0)
    res = pac_bayes_flatness(model, "cross_entropy", (x, y), magnitude_aware=magnitude_aware,
                             target=target, draws=40, tolerance=0.005, seed=0)
    assert res.accuracy == pytest.approx(acc0)
    assert abs(res.deviation - target) <= 0.005 or res.evaluations == 40
    assert res.sigma == pytest.approx(sigma_true, rel=0.15)
    assert res.flatness == pytest.approx(1 / res.sigma**2)
    # one pass per draw and sigma, plus one; the SE: the one batch in 16 groups, draws + 1 passes
    assert res.forward_passes == 1 + 40 * res.evaluations + 16 * 41
    assert res.data_sampling.forward_passes == 41


def test_directional_sharpness_of_quadratic():
    A = random_spd(5, seed=9)
    w0 = torch.linspace(-1, 1, 5, dtype=DT)
    model = Quadratic(A, w0=w0)
    d = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5], dtype=DT)
    u = d / d.norm()
    radii = [-0.5, -0.1, 0.0, 0.2, 1.0]
    res = directional_sharpness(model, quadratic_loss, dummy(), d, radii)
    g = A @ w0
    for r, v in zip(radii, res.values):
        assert v == pytest.approx(r * float(g @ u) + 0.5 * r * r * float(u @ A @ u), abs=1e-12)
    assert res.direction_norm == pytest.approx(float(d.norm()))
    # a list of tensors or a name->tensor dict give the same
    res_dict = directional_sharpness(model, quadratic_loss, dummy(), {"w": d}, radii)
    res_list = directional_sharpness(model, quadratic_loss, dummy(), [d], radii)
    assert res_dict.values == res.values == res_list.values


def test_report_matches_the_individual_metrics_and_is_json():
    model = mlp(seed=4)
    data = classification_data(n=32, seed=4)
    rep = sharpness_report(model, "cross_entropy", data, metrics=("worst", "average", "epsilon"),
                           options={"worst": {"m": 16, "steps": 5}, "average": {"m": 16, "samples": 5}})
    w = sharpness(model, "cross_entropy", data, rho=0.1, m=16, steps=5, progress=False)
    a = sharpness(model, "cross_entropy", data, kind="average", rho=0.05, m=16, samples=5, progress=False)
    e = epsilon_sharpness(model, "cross_entropy", data)
    assert rep["worst"] == w.value and rep["average"] == a.value and rep["epsilon"] == e.value
    d = json.loads(json.dumps(rep.to_dict()))
    assert set(d["values"]) == {"worst", "average", "epsilon"}
    assert d["results"]["worst"]["forward_passes"] == w.forward_passes
    with pytest.raises(ValueError, match="unknown metric"):
        sharpness_report(model, "cross_entropy", data, metrics=("sharpest",))


def test_report_spectral_metrics_against_dense_hessian():
    pytest.importorskip("analysis.lanczos")
    pytest.importorskip("analysis.trace")
    model = mlp(d=4, hidden=3, seed=5)
    x, y = classification_data(n=24, d=4, seed=5)
    space = ParameterSpace(model)
    H = torch.autograd.functional.hessian(
        lambda w: nn.functional.cross_entropy(torch.func.functional_call(model, space.as_dict(w), (x,)), y),
        space.vector())
    rep = sharpness_report(model, "cross_entropy", (x, y), metrics=("lambda_max", "trace"),
                           options={"lambda_max": {"tol": 1e-8}, "trace": {"num_matvecs": 3 * len(H)}})
    assert rep["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)
    # Hutch++ with 3n matvecs spans the whole space: the trace is exact
    assert rep["trace"] == pytest.approx(float(torch.trace(H)), rel=1e-8)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["results"]["lambda_max"]["num_matvecs"] > 0


# ------------------------------------------------------------------------------------------------
# the model is left exactly as it was; the global RNG is untouched
# ------------------------------------------------------------------------------------------------
def prepared_cnn():
    model = cnn_bn(seed=1)
    x, y = torch.randn(32, 2, 5, 5, dtype=DT), torch.randint(0, 3, (32,))
    model.train()
    model[1].eval()  # mixed per-module flags must survive
    nn.functional.cross_entropy(model(x), y).backward()  # populated .grad
    model[5].bias.requires_grad_(False)
    model[5].bias.grad = None
    return model, (x, y)


@pytest.mark.parametrize("metric", ["worst", "average", "epsilon", "pac_bayes", "directional", "report"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_state_restored_bit_for_bit(metric, mode):
    model, data = prepared_cnn()
    snap = snapshot(model)
    rng = torch.get_rng_state()
    kw = dict(mode=mode)
    if metric in ("worst", "average"):
        sharpness(model, "cross_entropy", data, kind=metric, rho=0.1, m=16, steps=3, samples=3,
                  progress=False, **kw)
    elif metric == "epsilon":
        epsilon_sharpness(model, "cross_entropy", data, steps=3, **kw)
    elif metric == "pac_bayes":
        try:  # in train mode BatchNorm may hide the noise; the error path must restore too
            pac_bayes_flatness(model, "cross_entropy", data, draws=2, target=0.05, tolerance=0.1,
                               max_evaluations=4, sigma_max=10.0, **kw)
        except ValueError as err:
            assert mode == "train" and "never dropped" in str(err)
    elif metric == "directional":
        d = torch.randn(ParameterSpace(model).numel, dtype=DT, generator=torch.Generator().manual_seed(0))
        directional_sharpness(model, "cross_entropy", data, d, [0.5, 1.0], **kw)
    else:
        sharpness_report(model, "cross_entropy", data, metrics=("worst", "average"), mode=mode,
                         options={"worst": {"m": 16, "steps": 2}, "average": {"m": 16, "samples": 2}})
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_state(model, snap)


def test_state_restored_when_the_loss_fails_midway():
    model, data = prepared_cnn()
    snap = snapshot(model)
    calls = {"n": 0}

    def flaky(out, y):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        sharpness(model, flaky, data, rho=0.1, m=16, steps=5, mode="train", progress=False)
    assert calls["n"] == 4
    assert_same_state(model, snap)


def test_preserved_state_restores_after_arbitrary_damage():
    model, _ = prepared_cnn()
    snap = snapshot(model)
    with pytest.raises(KeyError), preserved_state(model):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
                p.grad = torch.zeros_like(p)
            model[1].running_mean.fill_(7.0)
        model.eval()
        raise KeyError("x")
    assert_same_state(model, snap)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0, -0.1, float("nan"), float("inf")])
def test_bad_rho(rho):
    with pytest.raises(ValueError, match="rho"):
        sharpness(mlp(), "cross_entropy", classification_data(), rho=rho, progress=False)


def test_bad_inputs():
    model, data = mlp(), classification_data(n=48)
    with pytest.raises(ValueError, match="m=64 is larger than the number of samples available"):
        sharpness(model, "cross_entropy", data, rho=0.1, m=64, progress=False)
    with pytest.raises(ValueError, match="larger than n_eval"):
        sharpness(model, "cross_entropy", data, rho=0.1, m=32, n_eval=16, progress=False)
    with pytest.raises(ValueError, match="kind"):
        sharpness(model, "cross_entropy", data, rho=0.1, kind="max", progress=False)
    with pytest.raises(ValueError, match="norm"):
        sharpness(model, "cross_entropy", data, rho=0.1, norm="l1", progress=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sharpness(nn.Sequential(nn.ReLU()), "cross_entropy", data, rho=0.1, m=8, progress=False)
    with pytest.raises(ValueError, match="epsilon"):
        epsilon_sharpness(model, "cross_entropy", data, epsilon=0)
    n = ParameterSpace(model).numel
    with pytest.raises(ValueError, match=f"expected \\({n},\\)"):
        directional_sharpness(model, "cross_entropy", data, torch.ones(n + 1, dtype=DT), [1.0])
    with pytest.raises(ValueError, match="zero norm"):
        directional_sharpness(model, "cross_entropy", data, torch.zeros(n, dtype=DT), [1.0])
    with pytest.raises(ValueError, match="keys"):
        directional_sharpness(model, "cross_entropy", data, {"nope": torch.ones(3)}, [1.0])
    with pytest.raises(ValueError, match="radii"):
        directional_sharpness(model, "cross_entropy", data, torch.ones(n, dtype=DT), [])
    with pytest.raises(ValueError, match="class-index"):
        pac_bayes_flatness(model, "mse", (data[0], torch.randn(48, 3, dtype=DT)))
    with pytest.raises(ValueError, match="cannot drop"):
        pac_bayes_flatness(model, "cross_entropy", data, target=1.0)


def test_nan_loss_is_reported_with_its_location():
    model, data = mlp(), classification_data(n=32)
    snap = snapshot(model)

    def nan_loss(out, y):
        return out.sum() * float("nan")

    with pytest.raises(FloatingPointError, match="nan at the unperturbed weights on batch 0"):
        sharpness(model, nan_loss, data, rho=0.1, m=16, progress=False)
    with pytest.raises(FloatingPointError, match="nan"):
        sharpness(model, nan_loss, data, kind="average", rho=0.1, m=16, progress=False)
    with pytest.raises(FloatingPointError, match="nan"):
        epsilon_sharpness(model, nan_loss, data)
    with pytest.raises(FloatingPointError, match="nan"):
        directional_sharpness(model, nan_loss, data, torch.ones(ParameterSpace(model).numel, dtype=DT), [1.0])
    assert_same_state(model, snap)

    # finite at w, NaN once perturbed: the APGD step is named
    def nan_when_far(out, y):
        loss = nn.functional.cross_entropy(out, y)
        return loss if float(model[0].weight.detach().abs().max()) < 10 else loss * float("nan")

    with pytest.raises(FloatingPointError, match="APGD"):
        sharpness(model, nan_when_far, data, rho=100.0, adaptive=False, m=16, progress=False)


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp(seed=6)

    def forward(self, a, b):
        return self.net(a + b)


def test_dict_inputs_and_dataloader_are_rebatched():
    x, y = classification_data(n=40, seed=6)
    half = 0.5 * x
    model = DictModel()
    kw = dict(rho=0.1, m=16, steps=4, init="zero", progress=False)
    ref = sharpness(model.net, "cross_entropy", (x, y), **kw)
    as_dict = sharpness(model, "cross_entropy", ({"a": half, "b": x - half}, y), **kw)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    as_loader = sharpness(model.net, "cross_entropy", loader, **kw)
    assert as_dict.batch_values == pytest.approx(ref.batch_values, rel=1e-9)
    assert as_loader.batch_values == pytest.approx(ref.batch_values, rel=1e-12)


def test_shuffling_loader_warns_that_values_are_not_reproducible():
    from torch.utils.data import DataLoader, TensorDataset

    model = mlp()
    x, y = classification_data(n=64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    with pytest.warns(UserWarning, match="shuffle=False"):
        sharpness(model, "cross_entropy", loader, rho=0.1, m=32, steps=2, progress=False)


# ------------------------------------------------------------------------------------------------
# L-inf worst case: a lower bound; random restarts (issue 15, "Also")
# ------------------------------------------------------------------------------------------------
def _linf_vertex_max(A: torch.Tensor, rho: float) -> float:
    """Brute force: max of 0.5 d^T A d over the box |d_i| <= rho; for PSD A (convex) the
    maximum is attained at a vertex, so enumerating the 2^n vertices is exact."""
    n = A.shape[0]
    verts = rho * torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=DT)
    return float((0.5 * ((verts @ A) * verts).sum(1)).max())


def test_linf_worst_case_is_a_lower_bound_and_restarts_reach_the_vertex_maximum():
    n, rho = 10, 0.1
    gaps = []
    for seed in (1, 5, 9):  # problems where one ascent from the critical point stalls early
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(n, n, generator=g, dtype=DT)
        A = a @ a.T / n
        true = _linf_vertex_max(A, rho)
        model = Quadratic(A)  # w = c = 0: an exact critical point
        kw = dict(rho=rho, norm="linf", adaptive=False, m=4, n_eval=None, steps=20,
                  progress=False)
        one = sharpness(model, quadratic_loss, dummy(4), **kw)
        many = sharpness(model, quadratic_loss, dummy(4), restarts=20, **kw)
        assert one.lower_bound and many.lower_bound and many.restarts == 20
        assert one.value <= true * (1 + 1e-12) and many.value <= true * (1 + 1e-12)
        assert many.value >= one.value  # the first ascent is the same; restarts only add
        assert many.value == pytest.approx(true, rel=1e-9)
        gaps.append(1 - one.value / true)
        # the cost: every restart is one more APGD run of steps + 1 forward passes
        assert many.forward_passes == one.forward_passes + 20 * (kw["steps"] + 1)
    assert max(gaps) > 0.05  # without restarts the ascent stops clearly below the maximum


def test_lower_bound_flag_and_restart_validation():
    model, data = mlp(), classification_data(n=32)
    avg = sharpness(model, "cross_entropy", data, rho=0.05, kind="average", m=16, samples=2,
                    progress=False)
    assert avg.lower_bound is False and avg.restarts == 0
    worst = sharpness(model, "cross_entropy", data, rho=0.05, m=16, steps=2, progress=False)
    assert worst.to_dict()["lower_bound"] is True
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="restarts"):
            sharpness(model, "cross_entropy", data, rho=0.05, m=16, restarts=bad, progress=False)


# ------------------------------------------------------------------------------------------------
# nondeterministic forwards are refused (issue 15, item 15)
# ------------------------------------------------------------------------------------------------
class FunctionalDropout(nn.Module):
    """Randomness no module scan sees: F.dropout(training=True) inside forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 8).double()
        self.b = nn.Linear(8, 3).double()

    def forward(self, x):
        return self.b(nn.functional.dropout(torch.tanh(self.a(x)), 0.5, training=True))


def _random_models():
    torch.manual_seed(0)
    drop = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    return [(FunctionalDropout(), "eval", "forward is random"),
            (drop.train(), None, r"active dropout under mode=None in '2' \(Dropout\(p=0.3\)\)"),
            (copy.deepcopy(drop), "train", "active dropout")]


@pytest.mark.parametrize("case", range(3))
def test_every_metric_refuses_a_random_forward_before_changing_anything(case):
    model, mode, match = _random_models()[case]
    data = classification_data(n=32)
    n = ParameterSpace(model).numel
    calls = [
        lambda **k: sharpness(model, "cross_entropy", data, rho=0.1, m=16, steps=2, mode=mode,
                              progress=False, **k),
        lambda **k: sharpness(model, "cross_entropy", data, rho=0.1, kind="average", m=16,
                              samples=2, mode=mode, progress=False, **k),
        lambda **k: epsilon_sharpness(model, "cross_entropy", data, steps=2, mode=mode, **k),
        lambda **k: directional_sharpness(model, "cross_entropy", data, torch.ones(n, dtype=DT),
                                          [0.1], mode=mode, **k),
        lambda **k: pac_bayes_flatness(model, "cross_entropy", data, mode=mode, draws=1,
                                       max_evaluations=2, target=0.01, **k),
    ]
    snap = snapshot(model)
    rng = torch.get_rng_state()
    for call in calls:
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value) and "check_deterministic=False" in str(err.value)
        assert_same_state(model, snap)
        assert torch.equal(torch.get_rng_state(), rng)  # the check forked the global RNG
    # the opt-out runs (the numbers are then noisy, which is the user's call)
    r = sharpness(model, "cross_entropy", data, rho=0.1, m=16, steps=2, mode=mode,
                  progress=False, check_deterministic=False)
    assert math.isfinite(r.value)


def test_train_mode_batchnorm_is_a_fixed_function_and_is_accepted():
    # on a fixed batch, train-mode BatchNorm (batch statistics) is deterministic: two calls agree
    model = cnn_bn()
    from tests.models import image_data

    data = image_data(n=16)
    a = sharpness(model, "cross_entropy", data, rho=0.05, m=8, steps=3, mode="train", progress=False)
    b = sharpness(model, "cross_entropy", data, rho=0.05, m=8, steps=3, mode="train", progress=False)
    assert a.value == b.value


class _ExpNet(nn.Module):
    """``lin2(exp(lin1(x)))`` in float32: the noise overflows ``exp`` near sigma = 8."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.lin2 = nn.Linear(8, 16).to(dtype), nn.Linear(16, 4).to(dtype)

    def forward(self, x):
        return self.lin2(torch.exp(self.lin1(x)))


def _chance_data(dtype=torch.float32):
    # labels independent of the inputs and balanced: every predictor, noisy or not, is right on
    # 1/4 of them, so no noise lowers the accuracy by 0.1
    g = torch.Generator().manual_seed(0)
    return torch.randn(400, 8, generator=g, dtype=dtype), torch.arange(400) % 4


def test_pac_bayes_at_chance_accuracy_names_the_unreachable_target():
    # regression: FloatingPointError "the loss is nan at sigma=8, draw 0" once the noise overflowed
    x, y = _chance_data()
    acc0 = float((_ExpNet()(x).argmax(1) == y).float().mean())
    with pytest.raises(ValueError) as err:
        pac_bayes_flatness(_ExpNet(), "cross_entropy", (x, y), draws=3)
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value.__cause__, FloatingPointError)
    assert msg.startswith(f"pac_bayes_flatness(): the accuracy {acc0:.4f} at w never dropped by "
                          "target=0.1 (a drop of "), msg
    assert re.search(r"at sigma=(\d+), the largest sigma evaluated; the loss is not finite at "
                     r"sigma=(\d+)\)", msg), msg
    lo, hi = map(int, re.search(r"sigma=(\d+), the largest.*sigma=(\d+)\)", msg).groups())
    assert hi == 2 * lo and "near chance accuracy; lower the target" in msg


def test_pac_bayes_without_the_drop_in_max_evaluations_or_overflow_at_sigma_max():
    x, y = _chance_data(DT)
    model = nn.Sequential(nn.Linear(8, 4)).double()
    with pytest.raises(ValueError, match=r"the accuracy 0\.\d{4} at w never dropped by target=0\.1 "
                                         r"\(a drop of -?0\.\d{4} at sigma=4, the largest sigma "
                                         r"evaluated; max_evaluations=3 reached\).*raise sigma_max "
                                         r"or max_evaluations$"):
        pac_bayes_flatness(model, "cross_entropy", (x, y), draws=2, max_evaluations=3)
    x, y = _chance_data()
    with pytest.raises(ValueError, match=r"the loss is not finite at sigma=sigma_max=1000, the "
                                         r"first sigma tried .*lower sigma_max$"):
        pac_bayes_flatness(_ExpNet(), "cross_entropy", (x, y), draws=2, sigma_max=1000.0)
