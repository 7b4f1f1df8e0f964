"""msam.unperturbed_parameters against the optimizers' own eval(), a hand-written formula and
the saved state's errors (SavedStateError names the entry for a checkpoint loader)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msam import MSAM, NAG, AdamWMSAM, SavedStateError, unperturbed_parameters
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


def _coefficient(kind, group, norm):
    """c_g written out from the makers' hyperparameters (Algorithm 1 / the ladder / NAG)."""
    lr, rho = group["lr"], group["rho"]
    if kind == "NAG":
        return lr * group["momentum"]
    if kind == "MSAM-unnormalized-lr":
        return rho * lr
    return rho / norm


@pytest.mark.parametrize("drop_scale", [False, True])
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_matches_the_formula_with_and_without_the_stored_scale(kind, drop_scale):
    """w = w~ + c_g d, c_g from the hyperparameters (float64, by hand), whether the state
    records perturbation_scale or (an older / foreign state) only rho, lr and the flags."""
    model, opt = trained(kind)
    sd = opt.state_dict()
    if drop_scale:
        for g in sd["param_groups"]:
            del g["perturbation_scale"]
    key = "exp_avg" if kind == "AdamWMSAM" else "momentum_buffer"
    bufs = [opt.state[p][key] for p in model.parameters()]
    norm = torch.sqrt(sum((b * b).sum() for b in bufs))
    live = [p.detach().clone() for p in model.parameters()]
    index = {id(p): i for i, p in enumerate(model.parameters())}
    want = [live[index[id(p)]] + _coefficient(kind, g, norm) * opt.state[p][key]
            for g in opt.param_groups for p in g["params"]]
    got = unperturbed_parameters(sd, live)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-13)


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


@pytest.mark.parametrize("edit, reason, key, group", [
    (lambda g: g.update(perturbation_scale=math.inf), "not_finite", "perturbation_scale", 1),
    (lambda g: g.update(perturbation_scale="abc"), "not_a_number", "perturbation_scale", 1),
    (lambda g: (g.pop("perturbation_scale"), g.update(rho=math.nan)), "not_finite", "rho", 1),
    (lambda g: (g.pop("perturbation_scale"), g.pop("rho")), "no_coefficient", "rho", 1),
    (lambda g: (g.pop("perturbation_scale"), g.update(scale_by_lr="yes")), "not_a_flag",
     "scale_by_lr", 1),
    (lambda g: (g.pop("perturbation_scale"), g.update(normalize=torch.ones(2))), "not_a_flag",
     "normalize", 1),
    (lambda g: (g.pop("perturbation_scale"), g.update(scale_by_lr=True, lr=math.inf)),
     "not_finite", "lr", 1),
], ids=["scale-inf", "scale-str", "rho-nan", "no-rho", "flag-str", "flag-tensor", "lr-inf"])
def test_errors_name_the_entry(edit, reason, key, group):
    model, opt = trained("MSAM")
    live = [p.detach().clone() for p in model.parameters()]
    sd = opt.state_dict()
    sd["param_groups"] = [dict(g) for g in sd["param_groups"]]
    edit(sd["param_groups"][group])
    with pytest.raises(SavedStateError) as info:
        unperturbed_parameters(sd, live)
    assert (info.value.reason, info.value.key, info.value.group) == (reason, key, group)
    assert isinstance(info.value, ValueError)


def test_buffer_errors_name_the_parameter():
    model, opt = trained("AdamWMSAM")
    live = [p.detach().clone() for p in model.parameters()]
    sd = opt.state_dict()
    sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
    sd["state"][2]["exp_avg"] = torch.full_like(sd["state"][2]["exp_avg"], math.nan)
    with pytest.raises(SavedStateError, match="parameter 2 of group 0 has inf or NaN") as info:
        unperturbed_parameters(sd, live)
    e = info.value
    assert (e.reason, e.key, e.group, e.index, e.position) == ("buffer_not_finite", "exp_avg",
                                                               0, 2, 2)
    with pytest.raises(SavedStateError) as info:
        unperturbed_parameters(opt.state_dict(), live[:1] + [live[2], live[1]] + live[3:])
    e = info.value
    assert (e.reason, e.key, e.group, e.index, e.position) == ("shape", "exp_avg", 0, 1, 1)
    assert e.value.shape == live[1].shape


def test_flags_saved_as_numbers_or_tensors_are_read():
    """0/1, 0.0/1.0 and one-element tensors are booleans (as JSON or other tools save them)."""
    model, opt = trained("MSAM-unnormalized-lr")
    live = [p.detach().clone() for p in model.parameters()]
    sd = opt.state_dict()
    ref = unperturbed_parameters(sd, live)
    for g in sd["param_groups"]:
        del g["perturbation_scale"]
        g.update(normalize=torch.tensor(0), scale_by_lr=1.0)
    for a, b in zip(unperturbed_parameters(sd, live), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_a_weight_that_would_overflow_is_refused():
    model, opt = trained("MSAM")
    live = [p.detach().float() for p in model.parameters()]
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g["perturbation_scale"] = 1e300
    with pytest.raises(SavedStateError, match="overflows torch.float32") as info:
        unperturbed_parameters(sd, live)
    assert (info.value.reason, info.value.position, info.value.value) == ("overflow", 0, 1e300)
