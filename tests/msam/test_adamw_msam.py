"""AdamWMSAM against a hand-written reference and torch.optim.AdamW (float64)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msam import AdamWMSAM
from tests.models import TiedFrozen, classification_data, mlp
from tests.msam.reference import adamw_msam_reference, model_grad_fn
from tests.msam.test_msam import STEPS, assert_history, batches_for, run


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("rho, wd", [(0.05, 1e-2), (-0.02, 0.0), (0.1, 0.1)])
def test_matches_reference(rho, wd, foreach):
    model = mlp()
    w0 = [p.detach().clone() for p in model.parameters()]
    batches = batches_for()
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd, rho=rho)
    ref = adamw_msam_reference(w0, model_grad_fn(model, batches, F.cross_entropy,
                                                 list(model.parameters())), STEPS, **kw)
    opt = AdamWMSAM(model.parameters(), foreach=foreach, **kw)
    assert_history(run(model, opt, batches), ref)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_rho_zero_is_adamw_bit_for_bit(foreach, wd):
    a, b = mlp(), mlp()
    oa = AdamWMSAM(a.parameters(), lr=1e-2, weight_decay=wd, rho=0.0, foreach=foreach)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=wd, foreach=foreach)
    for x, y in batches_for() * 3:
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa.state[p][key], ob.state[q][key])
    # the state dicts are interchangeable
    ob.load_state_dict({k: v for k, v in oa.state_dict().items() if k != "perturbed"})


def test_perturbation_is_along_minus_first_moment():
    model = mlp()
    opt = AdamWMSAM(model.parameters(), rho=0.3)
    for x, y in batches_for()[:3]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    live = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    m = torch.cat([opt.state[p]["exp_avg"].flatten() for p in model.parameters()])
    diff = torch.cat([(q - p.detach()).flatten() for p, q in zip(model.parameters(), live)])
    torch.testing.assert_close(diff, -0.3 * m / m.norm(), rtol=1e-10, atol=1e-14)


def test_frozen_and_parity():
    hs = []
    for foreach in (False, True):
        model = TiedFrozen()
        opt = AdamWMSAM(model.parameters(), lr=1e-2, rho=0.1, foreach=foreach)
        frozen = model.frozen.weight.detach().clone()
        hs.append(run(model, opt, batches_for(d=5)))
        assert torch.equal(model.frozen.weight, frozen)
    assert_history(hs[0], hs[1], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("perturbed", [True, False])
def test_state_dict_round_trip_lockstep(perturbed):
    batches = batches_for()
    a = mlp()
    oa = AdamWMSAM(a.parameters(), lr=1e-2, rho=0.1)
    for x, y in batches[:3]:
        oa.zero_grad()
        F.cross_entropy(a(x), y).backward()
        oa.step()
    if not perturbed:
        oa.eval()
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    b = mlp(seed=3)
    b.load_state_dict(ckpt["model"])
    ob = AdamWMSAM(b.parameters())
    ob.load_state_dict(ckpt["opt"])
    assert ob.is_perturbed is perturbed
    oa.train()
    ob.train()
    for x, y in batches * 2:
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "learning rate: -1.0"),
    (dict(betas=(1.0, 0.9)), "index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), "index 1: -0.1"),
    (dict(betas=0.9), "betas: 0.9"),
    (dict(eps=-1e-8), "epsilon value: -1e-08"),
    (dict(rho=float("nan")), "rho: nan"),
    (dict(weight_decay=-0.1), "weight_decay value: -0.1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamWMSAM(mlp().parameters(), **kwargs)


def test_sparse_gradient_is_a_clear_error():
    emb = nn.Embedding(10, 3, sparse=True).double()
    opt = AdamWMSAM(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_loss_goes_down():
    model = mlp(hidden=16)
    x, y = classification_data(64)
    opt = AdamWMSAM(model.parameters(), lr=1e-2, rho=0.05)
    with opt.unperturbed():
        first = F.cross_entropy(model(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with opt.unperturbed():
        assert F.cross_entropy(model(x), y).item() < 0.7 * first


def test_matches_reference_on_random_quadratic():
    from tests.models import random_spd

    n = 6
    A = random_spd(n, seed=2)
    c = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    kw = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, rho=0.2)
    ref = adamw_msam_reference([w.detach().clone()], lambda t, live: [A @ (live[0] - c)], STEPS,
                               **kw)
    opt = AdamWMSAM([w], **kw)
    hist = []
    for _ in range(STEPS):
        opt.zero_grad()
        (0.5 * (w - c) @ A @ (w - c)).backward()
        opt.step()
        live = [w.detach().clone()]
        with opt.unperturbed():
            hist.append((live, [w.detach().clone()]))
    assert_history(hist, ref)
