"""Reliability of the msam optimizers against malformed state, failing closures, edited
hyperparameters and wrongly typed arguments (issue 15, items 2, 3, 6 and 14).

Every test checks that the refusal comes BEFORE anything changed: the weights (bit for bit)
and the optimizer's own state are compared with copies taken before the call.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from msam import MSAM, NAG, SAM, AdamWMSAM
from tests.models import classification_data, mlp


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def train(model, opt, steps=3, seed=0):
    for t in range(steps):
        x, y = classification_data(16, 6, 3, seed=seed + t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def sam_train(model, opt, steps=3):
    for t in range(steps):
        x, y = classification_data(16, 6, 3, seed=t)
        opt.step(lambda: F.cross_entropy(model(x), y).backward(), model=model)  # noqa: B023


PERTURBED = {
    "MSAM": (lambda ps: MSAM(ps, lr=0.1, rho=0.5), "momentum_buffer"),
    "AdamWMSAM": (lambda ps: AdamWMSAM(ps, lr=0.01, rho=0.5), "exp_avg"),
    "NAG": (lambda ps: NAG(ps, lr=0.1, momentum=0.9), "momentum_buffer"),
}


# -- item 2: state of another model -----------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(PERTURBED))
def test_state_of_another_model_is_refused_before_anything_changes(kind):
    make, key = PERTURBED[kind]
    big = mlp(hidden=5)
    opt_big = make(big.parameters())
    train(big, opt_big)
    small = mlp(hidden=4, seed=1)
    opt = make(small.parameters())
    train(small, opt, steps=2, seed=7)
    before_w = weights(small)
    before_buf = [opt.state[p][key].clone() for p in small.parameters()]
    with pytest.raises(ValueError, match=rf"'{key}' of parameter 0 of group 0 has shape "
                                         r"\(5, 6\) but the parameter has shape \(4, 6\)"):
        opt.load_state_dict(opt_big.state_dict())
    assert same(weights(small), before_w)
    assert same([opt.state[p][key] for p in small.parameters()], before_buf)
    opt.eval()
    opt.train()  # still a working optimizer on its own state
    assert all(torch.isfinite(p).all() for p in small.parameters())


def test_second_moment_of_another_shape_is_refused():
    model = mlp()
    opt = AdamWMSAM(model.parameters(), rho=0.5)
    train(model, opt)
    sd = opt.state_dict()
    sd["state"][2] = dict(sd["state"][2], exp_avg_sq=torch.zeros(7))
    with pytest.raises(ValueError, match=r"'exp_avg_sq' of parameter 2 of group 0 has shape "
                                         r"\(7,\) but the parameter has shape \(3, 5\)"):
        opt.load_state_dict(sd)


def test_state_dtype_is_cast_like_torch_optim():
    m32, m64 = mlp(dtype=torch.float32), mlp(dtype=torch.float64)
    opt32 = MSAM(m32.parameters(), rho=0.5)
    train_x = classification_data(16, 6, 3, dtype=torch.float32)
    F.cross_entropy(m32(train_x[0]), train_x[1]).backward()
    opt32.step()
    opt64 = MSAM(m64.parameters(), rho=0.5)
    ref = torch.optim.SGD(mlp().parameters(), lr=0.1, momentum=0.9)
    ref.load_state_dict(opt32.state_dict())
    opt64.load_state_dict(opt32.state_dict())
    for p in m64.parameters():
        assert opt64.state[p]["momentum_buffer"].dtype == torch.float64
    for a, b in zip(ref.state.values(), opt64.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_sam_base_state_of_another_model_is_refused():
    big, small = mlp(hidden=5), mlp(hidden=4, seed=1)
    opt_big = SAM(big.parameters(), lr=0.1, momentum=0.9)
    sam_train(big, opt_big)
    opt = SAM(small.parameters(), lr=0.1, momentum=0.9)
    sam_train(small, opt)
    before_w = weights(small)
    before = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in small.parameters()]
    with pytest.raises(ValueError, match=r"'momentum_buffer' of parameter 0 of group 0 has "
                                         r"shape \(5, 6\) but the parameter has shape \(4, 6\)"):
        opt.load_state_dict(opt_big.state_dict())
    assert same(weights(small), before_w)
    assert same([opt.base_optimizer.state[p]["momentum_buffer"] for p in small.parameters()],
                before)


BASES = [(torch.optim.SGD, dict(momentum=0.9)), (torch.optim.Adam, dict(amsgrad=True)),
         (torch.optim.AdamW, {}), (torch.optim.Adamax, {}), (torch.optim.Adadelta, {}),
         (torch.optim.Adagrad, {}), (torch.optim.ASGD, {}), (torch.optim.NAdam, {}),
         (torch.optim.RAdam, {}), (torch.optim.RMSprop, dict(momentum=0.9, centered=True)),
         (torch.optim.Rprop, {})]


@pytest.mark.parametrize("base, kw", BASES, ids=[b.__name__ for b, _ in BASES])
def test_sam_refuses_every_torch_base_state_of_another_model(base, kw):
    big, small = mlp(hidden=5), mlp(hidden=4, seed=1)
    opt_big = SAM(big.parameters(), base, lr=0.01, **kw)
    sam_train(big, opt_big, steps=1)
    opt = SAM(small.parameters(), base, lr=0.01, **kw)
    sam_train(small, opt, steps=1)
    before = [{k: v.clone() for k, v in opt.base_optimizer.state[p].items()}
              for p in small.parameters()]
    with pytest.raises(ValueError, match=r"of parameter 0 of group 0 has shape \(5, 6\)"):
        opt.load_state_dict(opt_big.state_dict())
    for p, b in zip(small.parameters(), before):
        assert all(torch.equal(opt.base_optimizer.state[p][k], v) for k, v in b.items())
    opt.load_state_dict(opt.state_dict())  # its own state still loads


def test_sam_state_that_is_not_parameter_shaped_still_loads():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.Adafactor, lr=0.01)  # row/column factors
    sam_train(model, opt, steps=2)
    sd = opt.state_dict()
    fresh = SAM(mlp(seed=2).parameters(), torch.optim.Adafactor, lr=0.01)
    fresh.load_state_dict(sd)
    sam_train(model, opt, steps=1)  # the optimizer now holds row_var/col_var of its own
    sd = opt.state_dict()
    sd["state"][0] = dict(sd["state"][0], row_var=torch.zeros(7, 1))
    with pytest.raises(ValueError, match=r"'row_var' of parameter 0 of group 0 has shape "
                                         r"\(7, 1\) but the optimizer's own entry has shape "
                                         r"\(5, 1\)"):
        opt.load_state_dict(sd)


def test_sam_saved_weights_of_another_model_are_refused():
    big, small = mlp(hidden=5), mlp(hidden=4, seed=1)
    opt_big = SAM(big.parameters(), lr=0.1)
    x, y = classification_data(16, 6, 3)
    F.cross_entropy(big(x), y).backward()
    opt_big.first_step()
    sd = opt_big.state_dict()  # saved between the two passes: carries old_p
    opt = SAM(small.parameters(), lr=0.1)
    before_w = weights(small)
    sd_plain = dict(sd)
    sd_plain["state"] = {}  # SGD without momentum has no per-parameter buffers
    with pytest.raises(ValueError, match=r"'old_p' of parameter 0 of group 0 has shape "
                                         r"\(5, 6\) but the parameter has shape \(4, 6\)"):
        opt.load_state_dict(sd_plain)
    assert not opt.is_perturbed
    opt.unperturb()
    assert same(weights(small), before_w)
    sd_plain["sam"] = {"perturbed": True, "old_p": {99: torch.zeros(4, 6)}}
    with pytest.raises(ValueError, match="index 99 is not one of the optimizer's 4"):
        opt.load_state_dict(sd_plain)


# -- item 3: non-finite move-back data --------------------------------------------------------

@pytest.mark.parametrize("bad", [math.inf, math.nan, torch.tensor(math.inf), "abc"])
@pytest.mark.parametrize("kind", ["MSAM", "AdamWMSAM"])
def test_non_finite_perturbation_scale_is_refused(kind, bad):
    make, _ = PERTURBED[kind]
    model = mlp()
    opt = make(model.parameters())
    train(model, opt)
    sd = opt.state_dict()
    sd["param_groups"][0]["perturbation_scale"] = bad
    fresh = mlp(seed=3)
    opt2 = make(fresh.parameters())
    before = weights(fresh)
    with pytest.raises(ValueError, match="perturbation_scale"):
        opt2.load_state_dict(sd)
    opt2.eval()
    opt2.train()
    assert same(weights(fresh), before)


@pytest.mark.parametrize("kind", sorted(PERTURBED))
def test_non_finite_direction_buffer_is_refused(kind):
    make, key = PERTURBED[kind]
    model = mlp()
    opt = make(model.parameters())
    train(model, opt)
    for perturbed in (True, False):
        sd = opt.state_dict()
        sd["perturbed"] = perturbed
        sd["state"][1] = dict(sd["state"][1])  # torch shares the per-parameter dicts
        sd["state"][1][key] = sd["state"][1][key].clone()
        sd["state"][1][key][0] = math.nan
        fresh = mlp(seed=3)
        opt2 = make(fresh.parameters())
        before = weights(fresh)
        with pytest.raises(ValueError, match=rf"'{key}' of parameter 1 of group 0 has inf or "
                                             "NaN"):
            opt2.load_state_dict(sd)
        opt2.eval()
        opt2.train()
        assert same(weights(fresh), before)


def test_non_finite_group_hyperparameter_in_a_state_is_refused():
    model = mlp()
    opt = MSAM(model.parameters(), rho=0.5)
    train(model, opt)
    sd = opt.state_dict()
    sd["param_groups"][0]["rho"] = math.nan
    opt2 = MSAM(mlp(seed=3).parameters(), rho=0.5)
    with pytest.raises(ValueError, match="parameter group 0: Invalid rho: nan"):
        opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["rho"] == 0.5


def test_sam_non_finite_saved_weights_are_refused():
    model = mlp()
    opt = SAM(model.parameters(), lr=0.1)
    x, y = classification_data(16, 6, 3)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    sd = opt.state_dict()
    sd["sam"]["old_p"][0] = torch.full((5, 6), math.inf, dtype=torch.float64)
    fresh = mlp(seed=3)
    opt2 = SAM(fresh.parameters(), lr=0.1)
    before = weights(fresh)
    with pytest.raises(ValueError, match="'old_p' of parameter 0 of group 0 has inf or NaN"):
        opt2.load_state_dict(sd)
    opt2.unperturb()
    assert same(weights(fresh), before)


def test_malformed_perturbed_flag_is_refused():
    model = mlp()
    opt = MSAM(model.parameters(), rho=0.5)
    sd = opt.state_dict()
    sd["perturbed"] = torch.ones(3)
    with pytest.raises(ValueError, match="'perturbed' must be True or False"):
        opt.load_state_dict(sd)


# -- item 6: failures while perturbed ---------------------------------------------------------

@pytest.mark.parametrize("with_model", [False, True])
def test_sam_second_closure_raising_restores_the_weights(with_model):
    model = mlp()
    opt = SAM(model.parameters(), lr=0.1, momentum=0.9)
    sam_train(model, opt, steps=2)
    w = weights(model)
    calls = []
    x, y = classification_data(16, 6, 3, seed=5)

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("second pass failed")
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="second pass failed"):
        opt.step(closure, model=model if with_model else None)
    assert same(weights(model), w)
    assert not opt.is_perturbed
    sam_train(model, opt, steps=1)  # usable afterwards


def test_sam_parameter_without_gradient_is_not_reverted_to_an_old_step():
    # b gets a gradient in step 1 (SAM saves its weights), none in step 2: step 2 must leave
    # b alone (it was put back to its value from before step 1)
    a = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = SAM([a, b], lr=0.1)
    opt.step(lambda: (a.sum() + b.sum()).backward())
    b_after_step_1 = b.detach().clone()
    assert not torch.equal(b_after_step_1, torch.ones(3, dtype=torch.float64))
    opt.step(lambda: a.square().sum().backward())
    assert torch.equal(b, b_after_step_1)
    opt.zero_grad()
    a.square().sum().backward()
    opt.first_step()
    assert list(opt.state_dict()["sam"]["old_p"]) == [0]  # only what this first_step moved


@pytest.mark.parametrize("how", ["clear", "replace", "deepcopy"])
def test_sam_clearing_the_state_between_the_passes_does_not_strand_the_ascent(how):
    model = mlp()
    opt = SAM(model.parameters(), lr=0.1, momentum=0.9)
    sam_train(model, opt, steps=2)
    w = weights(model)
    x, y = classification_data(16, 6, 3, seed=5)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert not same(weights(model), w)
    if how == "clear":
        opt.state.clear()
    elif how == "replace":
        opt.state = defaultdict(dict)
    else:
        model, opt = copy.deepcopy((model, opt))
    sd = opt.state_dict()
    assert sorted(sd["sam"]["old_p"]) == [0, 1, 2, 3]
    opt.unperturb()
    assert same(weights(model), w)


def trained_with_w(kind):
    """(factory, model at w~, optimizer, the unperturbed weights w)."""
    make, _ = PERTURBED[kind]
    model = mlp()
    opt = make(model.parameters())
    train(model, opt)
    with opt.unperturbed():
        w = weights(model)
    return make, model, opt, w


@pytest.mark.parametrize("how", ["clear", "replace"])
@pytest.mark.parametrize("kind", sorted(PERTURBED))
def test_clearing_the_state_while_perturbed_does_not_strand_the_perturbation(kind, how):
    make, model, opt, w = trained_with_w(kind)
    assert not same(weights(model), w)  # the test needs a real perturbation
    if how == "clear":
        opt.state.clear()
    else:
        opt.state = defaultdict(dict)
    with pytest.raises(RuntimeError, match="state was cleared|no longer holds"):
        opt.state_dict()
    opt.eval()
    assert same(weights(model), w)
    opt.train()
    assert same(weights(model), w)  # no buffers any more: w~ = w
    opt.state_dict()


@pytest.mark.parametrize("route", ["load_state_dict", "deepcopy"])
@pytest.mark.parametrize("kind", sorted(PERTURBED))
def test_clearing_the_state_right_after_loading_does_not_strand_the_perturbation(kind, route):
    make, model, opt, w = trained_with_w(kind)
    if route == "load_state_dict":
        clone = mlp(seed=4)
        clone.load_state_dict(model.state_dict())
        opt2 = make(clone.parameters())
        opt2.load_state_dict(opt.state_dict())
    else:
        clone, opt2 = copy.deepcopy((model, opt))
    opt2.state.clear()
    opt2.eval()
    assert same(weights(clone), w)


def test_step_after_clearing_the_state_starts_from_the_unperturbed_weights():
    model = mlp()
    opt = MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.5)
    train(model, opt)
    with opt.unperturbed():
        w = weights(model)
    x, y = classification_data(16, 6, 3, seed=9)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = [p.grad.clone() for p in model.parameters()]
    opt.state.clear()
    opt.step()
    opt.eval()
    # fresh momentum v = g: w_new = w - lr * g (SGD's first step), independent of the old v
    for p, w0, g0 in zip(model.parameters(), w, g):
        torch.testing.assert_close(p, w0 - 0.1 * g0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind, key, bad, match", [
    ("MSAM", "rho", math.nan, "rho: nan"), ("MSAM", "lr", -0.1, "learning rate: -0.1"),
    ("MSAM", "momentum", math.nan, "momentum: nan"),
    ("MSAM", "weight_decay", -1.0, "weight_decay: -1.0"),
    ("MSAM", "normalize", "no", "normalize: 'no'"),
    ("AdamWMSAM", "rho", math.inf, "rho: inf"), ("AdamWMSAM", "lr", math.nan, "rate: nan"),
    ("AdamWMSAM", "weight_decay", -1.0, "weight_decay value: -1.0"),
    ("AdamWMSAM", "betas", (0.9, 1.5), "index 1: 1.5"),
    ("NAG", "momentum", math.nan, "momentum: nan"), ("NAG", "lr", -1.0, "rate: -1.0"),
    ("NAG", "rho", math.nan, "rho: nan"),
])
def test_bad_hyperparameter_set_after_construction_is_refused_at_step(kind, key, bad, match):
    make, _ = PERTURBED[kind]
    model = mlp()
    opt = make(model.parameters())
    train(model, opt)
    opt.param_groups[0][key] = bad
    before = weights(model)
    x, y = classification_data(16, 6, 3, seed=4)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step()
    assert same(weights(model), before)
    opt.eval()
    before = weights(model)
    with pytest.raises((ValueError, TypeError)):
        opt.train()
    assert same(weights(model), before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("key, bad, match", [
    ("eta", -1.0, "eta: -1.0"), ("rho", math.nan, "rho: nan"),
    ("lr", math.nan, "learning rate: nan"), ("momentum", -0.5, "momentum: -0.5"),
    ("weight_decay", math.inf, "weight_decay: inf"), ("adaptive", "yes", "adaptive: 'yes'"),
])
def test_sam_bad_hyperparameter_set_after_construction_is_refused_at_first_step(key, bad, match):
    model = mlp()
    opt = SAM(model.parameters(), lr=0.1, momentum=0.9, adaptive=True)
    opt.param_groups[0][key] = bad
    before = weights(model)
    x, y = classification_data(16, 6, 3)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises((ValueError, TypeError), match=match):
        opt.first_step()
    assert same(weights(model), before)
    assert not opt.is_perturbed


# -- item 14: wrongly typed arguments ---------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda ps: MSAM(ps, normalize="no"), "normalize: 'no'"),
    (lambda ps: MSAM(ps, scale_by_lr=1), "scale_by_lr: 1"),
    (lambda ps: MSAM(ps, foreach="yes"), "foreach: 'yes'"),
    (lambda ps: MSAM(ps, lr="0.1"), "learning rate: '0.1'"),
    (lambda ps: MSAM(ps, rho=None), "rho: None"),
    (lambda ps: MSAM(ps, momentum=torch.ones(2)), "momentum: tensor"),
    (lambda ps: NAG(ps, foreach=1), "foreach: 1"),
    (lambda ps: NAG(ps, momentum="0.9"), "momentum: '0.9'"),
    (lambda ps: AdamWMSAM(ps, betas=0.9), "betas: 0.9"),
    (lambda ps: AdamWMSAM(ps, foreach="no"), "foreach: 'no'"),
    (lambda ps: AdamWMSAM(ps, eps="1e-8"), "epsilon value: '1e-8'"),
    (lambda ps: SAM(ps, adaptive="no", lr=0.1), "adaptive: 'no'"),
    (lambda ps: SAM(ps, base_optimizer=3, lr=0.1), "Unknown base optimizer: 3"),
    (lambda ps: SAM(ps, rho="0.05", lr=0.1), "rho: '0.05'"),
    (lambda ps: SAM(ps, lr="0.1"), "learning rate: '0.1'"),
    (lambda ps: SAM(ps, lr=0.1, momentum=None), "momentum: None"),
    (lambda ps: SAM(ps, "adam", lr=0.1, weight_decay=True), "weight_decay: True"),
])
def test_wrongly_typed_arguments_are_type_errors(make, match):
    with pytest.raises(TypeError, match=match) as info:
        make(mlp().parameters())
    assert isinstance(info.value, ValueError)  # and still caught by `except ValueError`


def test_sam_nan_learning_rate_is_refused_although_torch_accepts_it():
    torch.optim.SGD(mlp().parameters(), lr=math.nan)  # torch's own check is `lr < 0`
    with pytest.raises(ValueError, match="learning rate: nan"):
        SAM(mlp().parameters(), lr=math.nan)


def test_wrongly_typed_group_argument_is_a_type_error_and_not_added():
    model = mlp()
    opt = MSAM([model[0].weight], rho=0.5)
    with pytest.raises(TypeError, match="normalize: 'false'"):
        opt.add_param_group(dict(params=[model[0].bias], normalize="false"))
    assert len(opt.param_groups) == 1
