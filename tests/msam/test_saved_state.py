"""msam.unperturbed_parameters against the optimizers' own eval(), a hand-written formula and
landscape.checkpoints' private decoder it is meant to replace."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

from landscape.checkpoints import _unperturb
from msam import MSAM, NAG, AdamWMSAM, unperturbed_parameters
from tests.models import classification_data, mlp

MAKERS = {
    "MSAM": lambda m: MSAM([{"params": m[0].parameters()},
                            {"params": m[2].parameters(), "rho": 0.2}], lr=0.1, rho=0.7),
    "MSAM-unnormalized-lr": lambda m: MSAM(m.parameters(), lr=0.1, rho=0.5, normalize=False,
                                           scale_by_lr=True),
    "NAG": lambda m: NAG(m.parameters(), lr=0.1, momentum=0.9),
    "AdamWMSAM": lambda m: AdamWMSAM(m.parameters(), lr=0.01, rho=0.3),
}


def trained(kind, steps=3):
    model = mlp()
    opt = MAKERS[kind](model)
    for t in range(steps):
        x, y = classification_data(16, 6, 3, seed=t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_matches_eval(kind):
    model, opt = trained(kind)
    sd = opt.state_dict()
    live = [p.detach().clone() for p in model.parameters()]
    got = unperturbed_parameters(sd, live)
    opt.eval()
    assert any(not torch.equal(a, b) for a, b in zip(live, got))  # there was something to undo
    for p, w in zip(model.parameters(), got):
        torch.testing.assert_close(w, p.detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("drop_scale", [False, True])
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_bit_identical_to_landscape_checkpoints(kind, drop_scale):
    model, opt = trained(kind)
    sd = opt.state_dict()
    if drop_scale:  # an older / foreign state: the coefficient from rho (and lr, normalize)
        for g in sd["param_groups"]:
            del g["perturbation_scale"]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = _unperturb(state, sd, model, pathlib.Path("x.pt"))
    got = unperturbed_parameters(sd, [state[n] for n, _ in model.named_parameters()])
    for (name, _), w in zip(model.named_parameters(), got):
        assert torch.equal(w, ref[name])


def test_fallback_is_the_papers_formula():
    model, opt = trained("MSAM")
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["perturbation_scale"]
    live = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    norm = torch.sqrt(sum((b * b).sum() for b in bufs))
    rhos = [0.7, 0.7, 0.2, 0.2]  # group 0: layer 0 (weight, bias); group 1: layer 2
    want = [w + rho / norm * b for w, rho, b in zip(live, rhos, bufs)]
    for w, g in zip(want, unperturbed_parameters(sd, live)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-13)


def test_unperturbed_state_returns_the_inputs():
    model, opt = trained("MSAM")
    opt.eval()
    live = list(model.parameters())
    got = unperturbed_parameters(opt.state_dict(), live)
    assert all(a is b for a, b in zip(got, live))
    assert all(a is b for a, b in zip(unperturbed_parameters({}, live), live))
    moved = unperturbed_parameters(opt.state_dict(), live, assume_perturbed=True)
    assert all(a is b for a, b in zip(moved, live))  # group scales are None after eval()


def test_bad_states_are_refused():
    model, opt = trained("MSAM")
    live = [p.detach().clone() for p in model.parameters()]
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="4 parameters, 3 were given"):
        unperturbed_parameters(sd, live[:3])
    with pytest.raises(ValueError, match=r"parameter 0 of group 1 has shape \(3, 5\) but the "
                                         r"weight has shape \(3,\)"):
        unperturbed_parameters(sd, live[:2] + live[3:] + live[2:3])
    bad = dict(sd, param_groups=[dict(g) for g in sd["param_groups"]])
    bad["param_groups"][1]["perturbation_scale"] = math.inf
    with pytest.raises(ValueError, match="group 1: Invalid perturbation_scale: inf"):
        unperturbed_parameters(bad, live)
    bad["param_groups"][1]["perturbation_scale"] = "abc"
    with pytest.raises(ValueError, match=r"'abc' \(expected a real number\)"):
        unperturbed_parameters(bad, live)
    del bad["param_groups"][1]["perturbation_scale"]
    del bad["param_groups"][1]["rho"]
    with pytest.raises(ValueError, match="neither 'perturbation_scale' nor 'rho'"):
        unperturbed_parameters(bad, live)
    nan = dict(sd, state={k: dict(v) for k, v in sd["state"].items()})
    nan["state"][3]["momentum_buffer"] = torch.full((3,), math.nan, dtype=torch.float64)
    with pytest.raises(ValueError, match="parameter 1 of group 1 has inf or NaN"):
        unperturbed_parameters(nan, live)
    with pytest.raises(TypeError, match="got list"):
        unperturbed_parameters([], live)
    with pytest.raises(ValueError, match="'perturbed' must be True or False"):
        unperturbed_parameters(dict(sd, perturbed="yes"), live)
