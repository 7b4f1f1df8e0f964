"""MSAM mechanism probes: independent re-computation, the sign finding on real data, and a
training trajectory that is bit-for-bit the same with and without probes."""

from __future__ import annotations

import copy
import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import brentq
from torch import nn

from analysis import MechanismProbe, ParameterSpace, feature_rank
from analysis.probes import rank_for_variance
from landscape.datasets import load_digits
from landscape.models import digits_mlp
from msam import MSAM, SAM, AdamWMSAM
from tests.models import Quadratic, classification_data, mlp, quadratic_loss, random_spd

DT = torch.float64


def grad_at(model, loss_fn, x, y, w):
    """Independent reference: gradient and loss of a deep copy set to the flat weights w."""
    m = copy.deepcopy(model)
    space = ParameterSpace(m)
    space.copy_(w)
    for p in m.parameters():
        p.grad = None
    loss = loss_fn(m(x), y)
    loss.backward()
    return float(loss.detach()), space.grad_vector()


def trained_sgd(steps=3, momentum=0.9):
    model = mlp(seed=0)
    x, y = classification_data(n=32, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    for i in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x[8 * i: 8 * i + 8]), y[8 * i: 8 * i + 8]).backward()
        opt.step()
    return model, opt, (x[24:], y[24:])


# ------------------------------------------------------------------------------------------------
# each probe against an independent computation
# ------------------------------------------------------------------------------------------------
def test_cosine_and_msam_loss_at_the_unperturbed_weights_of_msam():
    model = mlp(seed=1)
    x, y = classification_data(n=40, seed=1)
    opt = MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.5)
    for i in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x[8 * i: 8 * i + 8]), y[8 * i: 8 * i + 8]).backward()
        opt.step()
    assert opt.is_perturbed
    space = ParameterSpace(model)
    v = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    w = space.vector() + 0.5 * v / v.norm()  # w = w~ + rho v / ||v||
    batch = (x[32:], y[32:])
    l0, g = grad_at(model, F.cross_entropy, *batch, w)
    probe = MechanismProbe(model, "cross_entropy", opt)
    assert probe.rho == 0.5  # read from the optimizer
    row = probe.cosine(batch)
    assert row["cos_v_g"] == pytest.approx(float(v @ g / (v.norm() * g.norm())), rel=1e-8)
    assert row["loss"] == pytest.approx(l0, rel=1e-10)
    assert row["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-8)
    row = probe.msam_loss(batch)
    l1, _ = grad_at(model, F.cross_entropy, *batch, w - 0.5 * v / v.norm())
    assert row["loss"] == pytest.approx(l0, rel=1e-10)
    assert row["loss_msam"] == pytest.approx(l1, rel=1e-8)


@pytest.mark.parametrize("opt_name", ["adamw", "adamw_msam"])
def test_momentum_is_read_from_adam_first_moment(opt_name):
    model = mlp(seed=2)
    x, y = classification_data(n=24, seed=2)
    cls = torch.optim.AdamW if opt_name == "adamw" else AdamWMSAM
    opt = cls(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x[:16]), y[:16]).backward()
        opt.step()
    space = ParameterSpace(model)
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    w = space.vector()
    if opt_name == "adamw_msam":
        with opt.unperturbed():
            w = space.vector()
    _, g = grad_at(model, F.cross_entropy, x[16:], y[16:], w)
    row = MechanismProbe(model, "cross_entropy", opt, rho=1.0).cosine((x[16:], y[16:]))
    assert row["cos_v_g"] == pytest.approx(float(m @ g / (m.norm() * g.norm())), rel=1e-7)


def angle_closed_form(A, w, v, rho_sam, r):
    g = A @ w
    g_sam = A @ (w + rho_sam * g / g.norm())
    g_m = A @ (w - r * v / v.norm())
    e1 = g_sam / g_sam.norm()
    e2 = g - (g @ e1) * e1
    e2 = e2 / e2.norm()
    return math.degrees(math.atan2(float(g_m @ e2), float(g_m @ e1)))


def test_angles_and_rho_zero_on_a_quadratic():
    A = random_spd(6, seed=3, eigenvalues=[0.1, 0.3, 1.0, 2.0, 4.0, 8.0])
    model = Quadratic(A, w0=torch.linspace(-1.0, 1.0, 6, dtype=DT))
    x, y = torch.zeros(4, 1, dtype=DT), torch.zeros(4, dtype=DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for _ in range(4):
        opt.zero_grad()
        quadratic_loss(model(x), y).backward()
        opt.step()
    w = model.w.detach().clone()
    v = opt.state[model.w]["momentum_buffer"].clone()
    probe = MechanismProbe(model, quadratic_loss, opt, rho_sam=0.3)
    rhos = [0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0]
    out = probe.angles((x, y), rhos=rhos, refine=30)
    expected = [angle_closed_form(A, w, v, 0.3, r) for r in rhos]
    assert out["angles_deg"] == pytest.approx(expected, abs=1e-8)
    assert out["angle_sgd_sam_deg"] == pytest.approx(expected[0], abs=1e-6)
    assert out["in_plane"][0] == pytest.approx(1.0)
    signs = np.sign(expected)
    crossing = [i for i in range(len(rhos) - 1) if signs[i] > 0 >= signs[i + 1]]
    if crossing:
        i = crossing[0]
        root = brentq(lambda r: angle_closed_form(A, w, v, 0.3, r), rhos[i], rhos[i + 1], xtol=1e-12)
        assert out["rho_zero"] == pytest.approx(root, abs=1e-6)
    else:
        assert out["rho_zero"] is None


def test_curvature_against_the_dense_hessian():
    model, opt, (x, y) = trained_sgd()
    space = ParameterSpace(model)
    H = torch.autograd.functional.hessian(
        lambda w: F.cross_entropy(torch.func.functional_call(model, space.as_dict(w), (x,)), y),
        space.vector())
    _, g = grad_at(model, F.cross_entropy, x, y, space.vector())
    v = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    from analysis import random_direction

    r = random_direction(model, seed=7)
    probe = MechanismProbe(model, "cross_entropy", opt, seed=7)
    out = probe.curvature((x, y))
    for name, d in (("momentum", v), ("gradient", g), ("random", r)):
        assert out[f"curv_{name}"] == pytest.approx(float(d @ H @ d / (d @ d)), rel=1e-7)


def test_profiles_against_direct_losses():
    model, opt, (x, y) = trained_sgd()
    space = ParameterSpace(model)
    w = space.vector()
    v = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    radii = [-0.5, 0.0, 0.25]
    out = MechanismProbe(model, "cross_entropy", opt).profiles((x, y), radii=radii,
                                                                directions=("momentum",))
    l0, _ = grad_at(model, F.cross_entropy, x, y, w)
    for r, val in zip(radii, out["profile_momentum"]):
        lr_, _ = grad_at(model, F.cross_entropy, x, y, w + r * v / v.norm())
        assert val == pytest.approx(lr_ - l0, abs=1e-12)
    assert out["radii"] == radii


def test_rank_for_variance_on_low_rank_features():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 4, generator=g, dtype=DT)
    b = torch.randn(4, 30, generator=g, dtype=DT)
    f = z @ b + 5.0  # an offset must not count (features are centered)
    assert rank_for_variance(f, 0.99) <= 4
    assert rank_for_variance(f, 0.999999) == 4
    assert rank_for_variance(f + 1e-3 * torch.randn(200, 30, generator=g, dtype=DT), 0.999) == 4
    assert rank_for_variance(torch.ones(10, 3)) == 0
    # isotropic features need (almost) all directions
    iso = torch.randn(5000, 10, generator=g, dtype=DT)
    assert rank_for_variance(iso, 0.99) == 10
    with pytest.raises(ValueError, match="threshold"):
        rank_for_variance(f, 1.5)


def test_feature_rank_of_a_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 20), nn.Tanh()).to(DT)  # rank <= 3 before tanh
    x, y = classification_data(n=64, seed=0)
    res = feature_rank(model, (x, y), "1", threshold=0.999999)
    assert res.rank == 3 and res.num_features == 20 and res.num_samples == 64
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert MechanismProbe(model, "cross_entropy", opt).feature_rank((x, y), layer=model[1],
                                                                   threshold=0.999999) == {"feature_rank": 3}
    with pytest.raises(ValueError, match="unknown layer"):
        feature_rank(model, (x, y), "nope")


# ------------------------------------------------------------------------------------------------
# the paper's sign finding on real data (Fig. 2C and App. A.10)
# ------------------------------------------------------------------------------------------------
def test_sign_finding_on_digits_with_sgd_momentum():
    d = load_digits()
    torch.manual_seed(0)
    model = digits_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    probe = MechanismProbe(model, "cross_entropy", opt, rho=0.5)
    g = torch.Generator().manual_seed(1)
    for step in range(120):
        idx = torch.randint(0, len(d.y_train), (64,), generator=g)
        x, y = d.x_train[idx], d.y_train[idx]
        if step >= 20:
            probe.log(step, (x, y), probes=("cosine", "msam_loss"))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    cos = np.array([r["cos_v_g"] for r in probe.history])
    diff = np.array([r["loss_msam_diff"] for r in probe.history])
    assert len(cos) == 100
    assert (cos < 0).mean() > 0.6 and cos.mean() < 0  # cos(v_{t-1}, g_t) mostly negative
    assert (diff > 0).mean() > 0.8  # moving along -v goes uphill on the new batch


# ------------------------------------------------------------------------------------------------
# probes do not change the training run
# ------------------------------------------------------------------------------------------------
class Net(nn.Module):
    """Conv + BatchNorm + Dropout: probes must keep BN statistics and the dropout RNG stream."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3))
        self.head = nn.Linear(4 * 16, 10)

    def forward(self, x):
        return self.head(self.body(x))


def make_optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    if name == "msam":
        return MSAM(params, lr=0.05, momentum=0.9, rho=0.3)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "adamw_msam":
        return AdamWMSAM(params, lr=1e-3, rho=0.3)
    raise AssertionError(name)


def train(name, with_probes, steps=4):
    d = load_digits(train_size=256)
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer(name, model.parameters())
    probe = MechanismProbe(model, "cross_entropy", opt, layer="body.4") if with_probes else None
    model.train()
    for step in range(steps):
        x, y = d.x_train[32 * step: 32 * step + 32], d.y_train[32 * step: 32 * step + 32]
        if probe is not None and step > 0:
            probe.log(step, (x, y), probes=("cosine", "msam_loss", "angles", "curvature", "profiles",
                                            "feature_rank"),
                      angles={"rhos": [0.0, 0.5, 2.0], "refine": 2}, profiles={"radii": [-0.5, 0.5]})
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if probe is not None:  # also after the step, while the .grad fields are populated
            probe.log(step, (x, y), probes=("cosine",))
    return model, opt, probe


@pytest.mark.parametrize("name", ["sgd", "msam", "adamw", "adamw_msam"])
def test_probes_leave_the_training_trajectory_unchanged(name):
    rng = torch.get_rng_state()
    a_model, a_opt, _ = train(name, with_probes=False)
    torch.set_rng_state(rng)
    b_model, b_opt, probe = train(name, with_probes=True)
    for (ka, va), (kb, vb) in zip(a_model.state_dict().items(), b_model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    for pa, pb in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(pa.grad, pb.grad)
    sa, sb = a_opt.state_dict(), b_opt.state_dict()
    for key in sa["state"]:
        for k, t in sa["state"][key].items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(sb["state"][key][k])), (key, k)
    assert len(probe.history) == 7
    assert all(math.isfinite(r["cos_v_g"]) for r in probe.history)
    assert probe.counts["forward"] > 0 and probe.counts["hvp"] == 9


def test_history_export(tmp_path):
    model, opt, batch = trained_sgd()
    probe = MechanismProbe(model, "cross_entropy", opt)
    probe.log(3, batch)
    probe.log(4, batch, probes=("cosine", "profiles"), profiles={"radii": [-1.0, 1.0]})
    probe.to_json(tmp_path / "h.json")
    rows = json.loads((tmp_path / "h.json").read_text())
    assert [r["step"] for r in rows] == [3, 4] and "loss_msam" in rows[0]
    probe.to_csv(tmp_path / "h.csv")
    with open(tmp_path / "h.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and float(table[1]["cos_v_g"]) == pytest.approx(rows[1]["cos_v_g"])
    assert json.loads(table[1]["profile_momentum"]) == pytest.approx(rows[1]["profile_momentum"])
    assert table[1]["loss_msam"] == ""
    probe.clear()
    assert probe.history == []


def test_probe_errors():
    model, opt, batch = trained_sgd()
    probe = MechanismProbe(model, "cross_entropy", opt)
    with pytest.raises(ValueError, match="unknown probe"):
        probe.log(0, batch, probes=("sharpest",))
    with pytest.raises(ValueError, match="not run"):
        probe.log(0, batch, probes=("cosine",), angles={"rhos": [1.0]})
    with pytest.raises(ValueError, match="layer"):
        probe.feature_rank(batch)
    with pytest.raises(ValueError, match="rho"):
        MechanismProbe(model, "cross_entropy", opt, rho=0.0)
    fresh = mlp()
    with pytest.raises(ValueError, match="momentum"):
        MechanismProbe(fresh, "cross_entropy", torch.optim.SGD(fresh.parameters(), lr=0.1,
                                                               momentum=0.9)).cosine(batch)
    # a SAM wrapper between first_step and second_step: refuse rather than guess the weights
    sam = SAM(model.parameters(), rho=0.05, lr=0.1, momentum=0.9)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    sam.first_step()
    with pytest.raises(RuntimeError, match="first_step"):
        MechanismProbe(model, "cross_entropy", sam).cosine(batch)
    sam.second_step()
    assert MechanismProbe(model, "cross_entropy", sam).rho_sam == 0.05
    assert math.isfinite(MechanismProbe(model, "cross_entropy", sam).cosine(batch)["cos_v_g"])


def test_default_radius_only_from_a_normalized_msam():
    from analysis import MechanismProbe
    from msam import MSAM, NAG

    model = mlp()
    assert MechanismProbe(model, "cross_entropy", MSAM(model.parameters(), rho=1.5)).rho == 1.5
    # NAG's rho is the momentum coefficient (0.9), not a radius; unnormalized MSAM likewise
    assert MechanismProbe(model, "cross_entropy", NAG(model.parameters(), lr=0.1, momentum=0.9)).rho == 3.0
    unnorm = MSAM(model.parameters(), rho=0.5, normalize=False)
    assert MechanismProbe(model, "cross_entropy", unnorm).rho == 3.0


def test_probe_checks_layer_and_seed_at_construction():
    # issue 15 item 14: MechanismProbe(layer='nope') used to be accepted and fail at the first
    # feature_rank call, long after construction
    model, opt, batch = trained_sgd()
    with pytest.raises(ValueError, match=r"unknown layer 'nope'; the model has \['0', '1', '2'\]"):
        MechanismProbe(model, "cross_entropy", opt, layer="nope")
    with pytest.raises(TypeError, match="layer must be a module name or a module, got int"):
        MechanismProbe(model, "cross_entropy", opt, layer=3)
    with pytest.raises(ValueError, match="not part of the model"):
        MechanismProbe(model, "cross_entropy", opt, layer=nn.Linear(2, 2))
    with pytest.raises(TypeError, match="seed must be an integer, got str 'a'"):
        MechanismProbe(model, "cross_entropy", opt, seed="a")
    probe = MechanismProbe(model, "cross_entropy", opt, layer="1")
    assert probe.feature_rank(batch)["feature_rank"] >= 1


def test_rank_for_variance_types():
    f = torch.randn(10, 4, dtype=torch.float64)
    assert rank_for_variance(f.numpy()) == rank_for_variance(f)  # numpy accepted as a tensor
    with pytest.raises(TypeError, match="features must be a tensor, got list"):
        rank_for_variance([[1.0]])
    with pytest.raises(ValueError, match=r"\(N, D\).*shape \(4,\)"):
        rank_for_variance(torch.ones(4))
    with pytest.raises(TypeError, match="threshold must be a number"):
        rank_for_variance(f, threshold="0.9")
