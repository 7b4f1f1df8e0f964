"""MSAM and NAG against hand-written references (float64)."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msam import MSAM, NAG
from tests.models import TiedFrozen, classification_data, mlp, random_spd
from tests.msam.reference import model_grad_fn, msam_reference, nesterov_sutskever

STEPS = 12


def batches_for(d=6, n_batches=4, seed=0):
    return [classification_data(16, d, 3, seed=seed + i) for i in range(n_batches)]


def run(model, opt, batches, steps=STEPS, loss_fn=F.cross_entropy, params=None):
    """Train with ``opt``; record (live, unperturbed) parameter values after each step."""
    params = list(model.parameters()) if params is None else params
    history = []
    for t in range(steps):
        x, y = batches[t % len(batches)]
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        live = [p.detach().clone() for p in params]
        with opt.unperturbed():
            w = [p.detach().clone() for p in params]
        history.append((live, w))
    return history


def assert_history(got, ref, rtol=1e-10, atol=1e-12):
    assert len(got) == len(ref)
    for t, ((live, w), (rlive, rw)) in enumerate(zip(got, ref)):
        for a, b in zip(live, rlive):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"live params, step {t}")
        for a, b in zip(w, rw):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"eval params, step {t}")


def hyper_const(n, **h):
    base = dict(lr=0.1, momentum=0.9, rho=0.5, weight_decay=0.0, normalize=True,
                scale_by_lr=False)
    base.update(h)
    return lambda t: [base] * n


LADDER = [
    pytest.param(dict(rho=0.5), id="msam"),
    pytest.param(dict(rho=-0.3), id="msam-negative-rho"),
    pytest.param(dict(rho=0.4, weight_decay=1e-2), id="msam-wd"),
    pytest.param(dict(rho=0.2, normalize=False), id="unnormalized"),
    pytest.param(dict(rho=3.0, scale_by_lr=True), id="normalized-lr-scaled"),
    pytest.param(dict(rho=0.7, normalize=False, scale_by_lr=True), id="unnormalized-lr-scaled"),
    pytest.param(dict(rho=0.5, momentum=0.0), id="no-momentum"),
]


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("h", LADDER)
def test_algorithm1_small_network(h, foreach):
    model = mlp()
    w0 = [p.detach().clone() for p in model.parameters()]
    batches = batches_for()
    hyper = hyper_const(len(w0), **h)
    ref = msam_reference(w0, model_grad_fn(model, batches, F.cross_entropy, list(model.parameters())),
                         STEPS, hyper)
    kw = {k: v for k, v in hyper(0)[0].items()}
    opt = MSAM(model.parameters(), foreach=foreach, **kw)
    assert_history(run(model, opt, batches), ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_algorithm1_random_quadratic(seed):
    n = 7
    A = random_spd(n, seed=seed)
    c = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    w = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    ref = msam_reference([w.detach().clone()], lambda t, live: [A @ (live[0] - c)], STEPS,
                         hyper_const(1, lr=0.05, rho=0.3, weight_decay=1e-3))
    opt = MSAM([w], lr=0.05, momentum=0.9, rho=0.3, weight_decay=1e-3)
    hist = []
    for _ in range(STEPS):
        opt.zero_grad()
        (0.5 * (w - c) @ A @ (w - c)).backward()
        opt.step()
        live = [w.detach().clone()]
        opt.eval()
        hist.append((live, [w.detach().clone()]))
        opt.train()
    assert_history(hist, ref)


def test_first_step_unperturbed_and_live_point():
    model = mlp()
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = MSAM(model.parameters(), rho=1.0)
    assert opt.is_perturbed  # v_0 = 0: w~ = w
    opt.eval()
    opt.train()
    for p, q in zip(model.parameters(), w0):
        assert torch.equal(p, q)
    x, y = classification_data()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    # after one step the live point is w1 - rho v/||v|| with ||perturbation|| = rho exactly
    live = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt.eval()
    w = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.linalg.vector_norm(w - live).item() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rho_zero_is_sgd_bit_for_bit(foreach, wd, momentum):
    a, b = mlp(), mlp()
    opt_a = MSAM(a.parameters(), lr=0.1, momentum=momentum, rho=0.0, weight_decay=wd,
                 foreach=foreach)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=momentum, weight_decay=wd,
                            foreach=foreach)
    for x, y in batches_for() * 3:
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    if momentum:
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(opt_a.state[p]["momentum_buffer"], opt_b.state[q]["momentum_buffer"])


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_nag_is_sutskever_nesterov(foreach):
    model = mlp()
    w0 = [p.detach().clone() for p in model.parameters()]
    batches = batches_for()
    ref = nesterov_sutskever(w0, model_grad_fn(model, batches, F.cross_entropy,
                                               list(model.parameters())), STEPS, 0.1, 0.9)
    opt = NAG(model.parameters(), lr=0.1, momentum=0.9, foreach=foreach)
    assert_history(run(model, opt, batches), ref)
    # the same as the explicit ladder rung
    model2 = mlp()
    opt2 = MSAM(model2.parameters(), lr=0.1, momentum=0.9, rho=0.9, normalize=False,
                scale_by_lr=True, foreach=foreach)
    assert_history(run(model2, opt2, batches), ref)


def test_nag_tracks_momentum_changes():
    model = mlp()
    opt = NAG(model.parameters(), lr=0.1, momentum=0.9)
    x, y = classification_data()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.param_groups[0]["momentum"] = 0.5
    opt.eval()
    w = [p.detach().clone() for p in model.parameters()]
    opt.train()
    for p, q in zip(model.parameters(), w):
        v = opt.state[p]["momentum_buffer"]
        torch.testing.assert_close(p, q - 0.1 * 0.5 * v, rtol=0, atol=1e-15)


def test_sign_loss_higher_at_perturbed_point_after_overshoot():
    # 0.5 a w^2 with lr * a = 1.5: every step overshoots the minimum
    a = 2.0
    w = nn.Parameter(torch.tensor([1.0, -0.5], dtype=torch.float64))
    opt = MSAM([w], lr=0.75, momentum=0.0, rho=0.05)
    for _ in range(3):
        opt.zero_grad()
        (0.5 * a * (w * w).sum()).backward()
        opt.step()
        live = (0.5 * a * (w * w).sum()).item()
        with opt.unperturbed():
            base = (0.5 * a * (w * w).sum()).item()
            v = opt.state[w]["momentum_buffer"]
            wrong = (0.5 * a * ((w + 0.05 * v / v.norm()) ** 2).sum()).item()
        assert live > base > wrong  # -v/||v|| goes uphill, the +v sign of the ports downhill


def test_groups_frozen_and_missing_grads_match_reference():
    model = TiedFrozen()
    extra = nn.Parameter(torch.randn(3, dtype=torch.float64))  # gets a gradient on even steps
    params = [model.shared.weight, model.shared.bias, model.frozen.weight, model.head.weight,
              model.head.bias, extra]
    groups = [
        dict(params=[model.shared.weight, model.head.weight], weight_decay=1e-2, rho=0.6),
        dict(params=[model.shared.bias, model.head.bias, model.frozen.weight], rho=0.2),
        dict(params=[extra], lr=0.05),
    ]
    opt = MSAM(groups, lr=0.1, momentum=0.9, rho=0.4, weight_decay=0.0)
    batches = batches_for(d=5)

    def loss_at(t, out, y, e):
        loss = F.cross_entropy(out, y)
        return loss + (e * e).sum() if t % 2 == 0 else loss

    names = {id(p): n for n, p in model.named_parameters()}
    names[id(extra)] = "extra"

    def grad_fn(t, values):
        x, y = batches[t % len(batches)]
        vals = [v.detach().requires_grad_(p.requires_grad) for v, p in zip(values, params)]
        out = torch.func.functional_call(model, {names[id(p)]: v for p, v in zip(params[:-1], vals)},
                                         (x,))
        loss = loss_at(t, out, y, vals[-1])
        wanted = [v for v in vals if v.requires_grad]
        gs = torch.autograd.grad(loss, wanted, allow_unused=True)
        gs = iter(gs)
        return [next(gs) if v.requires_grad else None for v in vals]

    per = {id(model.shared.weight): dict(weight_decay=1e-2, rho=0.6, lr=0.1),
           id(model.head.weight): dict(weight_decay=1e-2, rho=0.6, lr=0.1),
           id(model.shared.bias): dict(weight_decay=0.0, rho=0.2, lr=0.1),
           id(model.head.bias): dict(weight_decay=0.0, rho=0.2, lr=0.1),
           id(model.frozen.weight): dict(weight_decay=0.0, rho=0.2, lr=0.1),
           id(extra): dict(weight_decay=0.0, rho=0.4, lr=0.05)}
    hyp = [dict(momentum=0.9, normalize=True, scale_by_lr=False, **per[id(p)]) for p in params]
    ref = msam_reference([p.detach().clone() for p in params], grad_fn, STEPS, lambda t: hyp)

    hist = []
    frozen0 = model.frozen.weight.detach().clone()
    for t in range(STEPS):
        x, y = batches[t % len(batches)]
        opt.zero_grad()
        loss_at(t, model(x), y, extra).backward()
        opt.step()
        live = [p.detach().clone() for p in params]
        with opt.unperturbed():
            hist.append((live, [p.detach().clone() for p in params]))
    assert_history(hist, ref)
    assert torch.equal(model.frozen.weight, frozen0)
    assert "momentum_buffer" not in opt.state[model.frozen.weight]


def test_rho_and_lr_change_leave_no_residual():
    model = mlp()
    opt = MSAM(model.parameters(), lr=0.1, rho=1.0, scale_by_lr=True)
    for x, y in batches_for()[:3]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with opt.unperturbed():
        w = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["rho"] = 5.0
    opt.param_groups[0]["lr"] = 0.01
    opt.eval()
    for p, q in zip(model.parameters(), w):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15)


def test_schedules_match_reference():
    model = mlp()
    w0 = [p.detach().clone() for p in model.parameters()]
    batches = batches_for()
    sched = lambda t: dict(lr=0.1 / (1 + t), momentum=0.9, rho=0.2 * (t + 1), weight_decay=1e-3,  # noqa: E731
                           normalize=True, scale_by_lr=False)
    ref = msam_reference(w0, model_grad_fn(model, batches, F.cross_entropy,
                                           list(model.parameters())), STEPS,
                         lambda t: [sched(t)] * len(w0))
    opt = MSAM(model.parameters(), lr=0.1, rho=0.2, weight_decay=1e-3)
    hist = []
    for t in range(STEPS):
        x, y = batches[t % len(batches)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        # the new hyperparameters take effect at the next perturbation: re-perturb with them
        opt.eval()
        w = [p.detach().clone() for p in model.parameters()]
        opt.param_groups[0].update(lr=sched(t + 1)["lr"], rho=sched(t + 1)["rho"])
        opt.train()
        hist.append(([p.detach().clone() for p in model.parameters()], w))
    assert_history(hist, ref)


def test_foreach_and_loop_parity_float64():
    models = [mlp(hidden=9), mlp(hidden=9)]
    opts = [MSAM(models[0].parameters(), rho=0.7, weight_decay=1e-2, foreach=False),
            MSAM(models[1].parameters(), rho=0.7, weight_decay=1e-2, foreach=True)]
    hs = [run(m, o, batches_for()) for m, o in zip(models, opts)]
    assert_history(hs[0], hs[1], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("perturbed", [True, False], ids=["saved-at-w~", "saved-at-w"])
def test_state_dict_round_trip_lockstep(perturbed):
    batches = batches_for()
    a = mlp()
    opt_a = MSAM(a.parameters(), rho=0.5, weight_decay=1e-3)
    for x, y in batches[:3]:
        opt_a.zero_grad()
        F.cross_entropy(a(x), y).backward()
        opt_a.step()
    if not perturbed:
        opt_a.eval()
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["opt"]["perturbed"] is perturbed
    b = mlp(seed=5)
    b.load_state_dict(ckpt["model"])
    opt_b = MSAM(b.parameters(), rho=0.1)
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.is_perturbed is perturbed
    assert opt_b.param_groups[0]["rho"] == 0.5
    opt_a.train()
    opt_b.train()
    for x, y in batches * 2:
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_load_plain_sgd_state_dict_is_unperturbed():
    a = mlp()
    sgd = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    x, y = classification_data()
    F.cross_entropy(a(x), y).backward()
    sgd.step()
    opt = MSAM(a.parameters(), rho=0.5)
    opt.load_state_dict(sgd.state_dict())
    assert not opt.is_perturbed
    w = [p.detach().clone() for p in a.parameters()]
    opt.train()
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), w))


def test_eval_train_idempotent_and_context_manager():
    model = mlp()
    opt = MSAM(model.parameters(), rho=0.5)
    for x, y in batches_for()[:2]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    live = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    w = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    assert not opt.is_perturbed
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    opt.train()
    opt.train()
    assert opt.is_perturbed
    for p, q in zip(model.parameters(), live):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15)
    with pytest.raises(KeyError):
        with opt.unperturbed():
            for p, q in zip(model.parameters(), w):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-15)
            raise KeyError("boom")
    assert opt.is_perturbed
    for p, q in zip(model.parameters(), live):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15)
    opt.eval()
    with opt.unperturbed():
        pass
    assert not opt.is_perturbed


def test_step_while_unperturbed_uses_gradient_at_w_and_ends_perturbed():
    model = mlp()
    ref = mlp()
    opt = MSAM(model.parameters(), rho=0.5, momentum=0.9)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    x, y = classification_data()
    for m, o in ((model, opt), (ref, sgd)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    opt.eval()
    for m, o in ((model, opt), (ref, sgd)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    assert opt.is_perturbed
    with opt.unperturbed():
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_gradient_accumulation_equals_full_batch():
    x, y = classification_data(32)
    a, b = mlp(), mlp()
    oa, ob = MSAM(a.parameters(), rho=0.5), MSAM(b.parameters(), rho=0.5)
    for _ in range(4):
        oa.zero_grad()
        F.cross_entropy(a(x), y).backward()
        oa.step()
        ob.zero_grad()
        for xs, ys in zip(x.chunk(4), y.chunk(4)):
            (F.cross_entropy(b(xs), ys) / 4).backward()
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_pickle_keeps_perturbed_flag():
    model = mlp()
    opt = MSAM(model.parameters(), rho=0.5)
    opt.eval()
    clone = pickle.loads(pickle.dumps(opt))
    assert not clone.is_perturbed


def test_loss_goes_down():
    torch.manual_seed(0)
    model = mlp(hidden=16)
    x, y = classification_data(64)
    opt = MSAM(model.parameters(), lr=0.1, rho=0.1)
    with opt.unperturbed():
        first = F.cross_entropy(model(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with opt.unperturbed():
        last = F.cross_entropy(model(x), y).item()
    assert last < 0.7 * first


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), "learning rate: -0.1"),
    (dict(momentum=1.0), "momentum: 1.0"),
    (dict(momentum=-0.1), "momentum: -0.1"),
    (dict(rho=math.inf), "rho: inf"),
    (dict(rho=math.nan), "rho: nan"),
    (dict(weight_decay=-1.0), "weight_decay: -1.0"),
    (dict(foreach="yes"), "foreach: 'yes'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MSAM(mlp().parameters(), **kwargs)


def test_bad_group_argument():
    model = mlp()
    opt = MSAM([model[0].weight], rho=0.5)
    with pytest.raises(ValueError, match="rho: inf"):
        opt.add_param_group(dict(params=[model[0].bias], rho=math.inf))
    assert len(opt.param_groups) == 1


def test_sparse_gradient_is_a_clear_error():
    emb = nn.Embedding(10, 3, sparse=True).double()
    opt = MSAM(emb.parameters(), rho=0.5)
    emb(torch.tensor([1, 2])).sum().backward()
    w = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, w)


def test_closure_and_float32():
    model = mlp(dtype=torch.float32)
    x, y = classification_data(dtype=torch.float32)
    opt = MSAM(model.parameters(), rho=0.5, foreach=True)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.dtype == torch.float32
    scale = opt.param_groups[0]["perturbation_scale"]
    assert isinstance(scale, torch.Tensor) and scale.ndim == 0


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_mixed_dtypes_global_norm(foreach):
    a = nn.Parameter(torch.randn(4, dtype=torch.float64))
    b = nn.Parameter(torch.randn(3, dtype=torch.float32))
    opt = MSAM([{"params": [a]}, {"params": [b], "rho": 2.0}], rho=1.0, foreach=foreach)
    opt.step()  # no gradients at all: nothing happens
    assert opt.is_perturbed and "momentum_buffer" not in opt.state[a]
    for _ in range(3):
        opt.zero_grad()
        ((a * a).sum() + (b.double() ** 3).sum()).backward()
        opt.step()
    live = [a.detach().clone(), b.detach().clone()]
    opt.eval()
    va, vb = opt.state[a]["momentum_buffer"], opt.state[b]["momentum_buffer"].double()
    norm = torch.cat([va, vb]).norm()
    torch.testing.assert_close(a.detach() - live[0], 1.0 * va / norm, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close((b.detach() - live[1]).double(), 2.0 * vb / norm, rtol=1e-5,
                               atol=1e-6)
