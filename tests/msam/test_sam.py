"""SAM / ASAM against hand-written two-pass steps; state dicts, schedulers, AMP, accumulation."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msam import SAM, frozen_batchnorm_stats
from tests.models import classification_data, cnn_bn, image_data, mlp
from tests.msam.test_msam import batches_for


def grads_at(model, values, x, y):
    names = [n for n, _ in model.named_parameters()]
    vals = [v.detach().requires_grad_(True) for v in values]
    loss = F.cross_entropy(torch.func.functional_call(model, dict(zip(names, vals)), (x,)), y)
    return list(torch.autograd.grad(loss, vals))


def reference_sam_step(model, w, v, x, y, *, lr, momentum, rho, adaptive, eta):
    """One SAM step with SGD momentum written out by hand; returns new (w, v)."""
    g = grads_at(model, w, x, y)
    t = [(wi.abs() + eta) if adaptive else torch.ones_like(wi) for wi in w]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    e = [rho * ti * ti * gi / norm for ti, gi in zip(t, g)]
    ge = grads_at(model, [wi + ei for wi, ei in zip(w, e)], x, y)
    v = [gi.clone() if vi is None else momentum * vi + gi for vi, gi in zip(v, ge)]
    return [wi - lr * vi for wi, vi in zip(w, v)], v


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("use_closure", [False, True], ids=["two-steps", "closure"])
def test_matches_hand_written_two_pass_step(adaptive, use_closure):
    model = mlp()
    w = [p.detach().clone() for p in model.parameters()]
    v = [None] * len(w)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.1,
              momentum=0.9)
    for x, y in batches_for() * 2:
        w, v = reference_sam_step(model, w, v, x, y, lr=0.1, momentum=0.9, rho=0.1,
                                  adaptive=adaptive, eta=0.01)
        if use_closure:
            def closure(x=x, y=y):
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            loss = opt.step(closure)
            assert loss.requires_grad
        else:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            assert opt.is_perturbed
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        assert not opt.is_perturbed
        for p, q in zip(model.parameters(), w):
            torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-14)


def test_zero_gradient_gives_no_perturbation():
    model = mlp()
    opt = SAM(model.parameters(), lr=0.1)
    w = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.first_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))


def test_state_dict_has_base_state_and_resumes_in_lockstep():
    batches = batches_for()
    a = mlp()
    oa = SAM(a.parameters(), "sgd", rho=0.05, lr=0.1, momentum=0.9)

    def sam_step(m, o, x, y):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.first_step(zero_grad=True)
        F.cross_entropy(m(x), y).backward()
        o.second_step()

    for x, y in batches[:3]:
        sam_step(a, oa, x, y)
    sd = oa.state_dict()
    assert all("momentum_buffer" in s for s in sd["state"].values())
    assert sd["param_groups"][0]["rho"] == 0.05
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": sd}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    b = mlp(seed=4)
    b.load_state_dict(ckpt["model"])
    ob = SAM(b.parameters(), "sgd", rho=0.5, lr=0.3, momentum=0.9)
    ob.load_state_dict(ckpt["opt"])
    assert ob.param_groups is ob.base_optimizer.param_groups
    assert ob.param_groups[0]["rho"] == 0.05 and ob.param_groups[0]["lr"] == 0.1
    for x, y in batches * 2:
        sam_step(a, oa, x, y)
        sam_step(b, ob, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_state_dict_between_passes_restores_the_original_weights():
    model = mlp()
    opt = SAM(model.parameters(), lr=0.1, rho=0.5)
    w = [p.detach().clone() for p in model.parameters()]
    x, y = classification_data()
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    sd = opt.state_dict()
    other = mlp()
    other.load_state_dict(model.state_dict())
    opt2 = SAM(other.parameters(), lr=0.1, rho=0.5)
    opt2.load_state_dict(sd)
    assert opt2.is_perturbed
    opt2.unperturb()
    assert all(torch.equal(p, q) for p, q in zip(other.parameters(), w))


def test_lr_scheduler_on_sam_object_reaches_base_optimizer():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = classification_data()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step()
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    # and the base optimizer actually uses it: one more step moves by lr * v
    w = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step()
    for p, q in zip(model.parameters(), w):
        v = opt.base_optimizer.state[p]["momentum_buffer"]
        torch.testing.assert_close(p.detach(), q - 0.1 * 0.5**3 * v, rtol=1e-12, atol=1e-15)


def test_gradient_accumulation_recipe_equals_full_batch():
    x, y = classification_data(32)
    a, b = mlp(), mlp()
    oa = SAM(a.parameters(), lr=0.1, momentum=0.9, rho=0.1)
    ob = SAM(b.parameters(), lr=0.1, momentum=0.9, rho=0.1)
    for _ in range(3):
        oa.zero_grad()
        F.cross_entropy(a(x), y).backward()
        oa.first_step(zero_grad=True)
        F.cross_entropy(a(x), y).backward()
        oa.second_step(zero_grad=True)
        # accumulation over 4 micro-batches of equal size: loss / 4 on each pass
        for xs, ys in zip(x.chunk(4), y.chunk(4)):
            (F.cross_entropy(b(xs), ys) / 4).backward()
        ob.first_step(zero_grad=True)
        for xs, ys in zip(x.chunk(4), y.chunk(4)):
            (F.cross_entropy(b(xs), ys) / 4).backward()
        ob.second_step(zero_grad=True)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def _amp_step(model, opt, scaler, x, y, *, poison_second=False):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    opt.first_step(zero_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss2 = F.cross_entropy(model(x), y)
    if poison_second:
        loss2 = loss2 * float("inf")
    scaler.scale(loss2).backward()
    opt.unperturb()
    scaler.step(opt.base_optimizer)
    scaler.update()
    opt.zero_grad()


def test_grad_scaler_recipe_steps_and_skips_on_inf():
    torch.manual_seed(0)
    model = mlp(dtype=torch.float32)
    x, y = classification_data(dtype=torch.float32)
    opt = SAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    w = [p.detach().clone() for p in model.parameters()]
    _amp_step(model, opt, scaler, x, y)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), w))
    assert scaler.get_scale() == 2.0**10
    w = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    _amp_step(model, opt, scaler, x, y, poison_second=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    assert all(torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], b)
               for p, b in zip(model.parameters(), buffers))
    assert scaler.get_scale() == 2.0**9
    assert not opt.is_perturbed


def test_grad_scaler_step_matches_unscaled_sam():
    x, y = classification_data(dtype=torch.float32)
    a, b = mlp(dtype=torch.float32), mlp(dtype=torch.float32)
    oa = SAM(a.parameters(), lr=0.1, rho=0.05)
    ob = SAM(b.parameters(), lr=0.1, rho=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for _ in range(2):
        scaler.scale(F.cross_entropy(a(x), y)).backward()
        oa.first_step(zero_grad=True)
        scaler.scale(F.cross_entropy(a(x), y)).backward()
        oa.unperturb()
        scaler.step(oa.base_optimizer)
        scaler.update()
        oa.zero_grad()
        F.cross_entropy(b(x), y).backward()
        ob.first_step(zero_grad=True)
        F.cross_entropy(b(x), y).backward()
        ob.second_step(zero_grad=True)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_second_pass_with_frozen_batchnorm_keeps_running_stats():
    model = cnn_bn()
    model.train()
    bn = model[1]
    x, y = image_data()
    opt = SAM(model.parameters(), lr=0.1, rho=0.05)
    F.cross_entropy(model(x), y).backward()
    after_first = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    opt.first_step(zero_grad=True)
    with frozen_batchnorm_stats(model):
        F.cross_entropy(model(x), y).backward()
    opt.second_step()
    assert torch.equal(bn.running_mean, after_first[0])
    assert torch.equal(bn.running_var, after_first[1])
    assert torch.equal(bn.num_batches_tracked, after_first[2])
    assert bn.track_running_stats


def test_base_optimizers_by_name_and_class():
    model = mlp()
    expected = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "AdamW": torch.optim.AdamW,
                torch.optim.RMSprop: torch.optim.RMSprop}
    for base, cls in expected.items():
        opt = SAM(model.parameters(), base, lr=1e-3)
        assert type(opt.base_optimizer) is cls, (base, type(opt.base_optimizer))
        assert opt.base_optimizer.param_groups[0]["lr"] == 1e-3
        assert opt.base_optimizer.param_groups is opt.param_groups  # one set of groups


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(base_optimizer="lion"), ValueError, "Unknown base optimizer: 'lion'"),
    (dict(base_optimizer=nn.Linear), ValueError, "Unknown base optimizer"),
    (dict(base_optimizer=SAM), ValueError, "SAM cannot wrap SAM"),
    (dict(rho=float("inf")), ValueError, "rho: inf"),
    (dict(eta=-1.0), ValueError, "eta: -1.0"),
    (dict(lr=-1.0), ValueError, "learning rate"),
])
def test_bad_arguments(kwargs, exc, match):
    kwargs.setdefault("lr", 0.1)
    with pytest.raises(exc, match=match):
        SAM(mlp().parameters(), **kwargs)


def test_misuse_is_a_clear_error():
    model = mlp()
    opt = SAM(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    x, y = classification_data()
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()


def test_first_step_without_any_gradient_is_refused():
    """No gradient at all (no backward, or FSDP2's first pass with gradient sync disabled,
    tests/distributed/test_fsdp_optimizers.py) was a silent zero ascent; nothing moves."""
    model = mlp()
    opt = SAM(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.first_step()
    assert not opt.is_perturbed
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_closure_step_with_model_freezes_batchnorm_on_second_pass():
    model, reference = cnn_bn(), cnn_bn()
    model.train()
    reference.train()
    x, y = image_data()
    opt = SAM(model.parameters(), lr=0.1, rho=0.05)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure, model=model)
    reference(x)  # exactly one training-mode pass at the same (initial) weights
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    assert torch.equal(model[1].running_var, reference[1].running_var)
    assert int(model[1].num_batches_tracked) == 1


def test_step_without_closure_says_it_needs_one():
    """step() before first_step() used to report 'second_step() called without first_step()'."""
    model = mlp()
    opt = SAM(model.parameters(), lr=0.1)
    x, y = classification_data()
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"^SAM\.step\(\) needs a closure.*opt\.step\(closure\)") as info:
        opt.step()
    assert "\n" not in str(info.value) and "second_step() called" not in str(info.value)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    opt.first_step(zero_grad=True)  # the two-pass form still ends with a closure-less step()
    F.cross_entropy(model(x), y).backward()
    assert opt.step() is None and not opt.state_dict()["sam"]["perturbed"]
