"""CurvatureTracker: warm-started values against cold starts and dense Hessians, restoration bit
for bit, an unchanged training trajectory, MSAM measured at w, CSV/JSON round trips."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
import torch.nn.functional as F

from analysis import (
    CurvatureTracker,
    HessianOperator,
    TrackerHistory,
    TrackerRecord,
    top_eigenpairs,
)
from analysis.reference import dense_hessian
from landscape.datasets import load_digits
from landscape.models import digits_cnn
from msam import MSAM, SAM
from tests.models import classification_data, mlp


def _digits(n=384):
    d = load_digits(seed=0, label_noise=0.2, train_size=n)
    return d.train


def _train(model, opt, x, y, steps, tracker=None, bs=32, seed=3):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, len(y), (bs,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if tracker is not None:
            tracker.maybe_measure(step)
    return losses


@pytest.mark.parametrize("k, budget, method", [(1, 5, None), (2, 10, None),
                                               (1, 5, "double-backward")])
def test_warm_checks_match_cold_lanczos_and_cost_few_hvps(k, budget, method):
    """At every check the warm-started top-k equals a fresh cold-start Lanczos (tol 1e-8, random
    start, exact products) at the same unperturbed weights within rtol 1e-2; a warm lambda_max
    check costs <= 5 HVPs (median; top-2: <= 10); also with another product method."""
    x, y = _digits()
    torch.manual_seed(0)
    model = digits_cnn(4)
    opt = MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=1.0)
    probe = (x[:64], y[:64])
    tracker = CurvatureTracker(model, "cross_entropy", probe, optimizer=opt, every=10, k=k,
                               method=method)
    gen = torch.Generator().manual_seed(3)
    refs = []
    for step in range(1, 61):
        model.train()
        idx = torch.randint(0, len(y), (32,), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if tracker.maybe_measure(step) is not None:
            twin = copy.deepcopy(model)  # reference at w on an independent copy
            twin_opt = MSAM(twin.parameters(), lr=0.1, momentum=0.9, rho=1.0)
            twin_opt.load_state_dict(opt.state_dict())
            twin_opt.eval()
            twin.eval()
            ref = top_eigenpairs(HessianOperator(twin, "cross_entropy", [probe]), k=k, tol=1e-8,
                                 v0="random", seed=99)
            refs.append(ref.eigenvalues.tolist())
    recs = list(tracker.history)
    assert [r.step for r in recs] == [10, 20, 30, 40, 50, 60]
    assert [r.warm for r in recs] == [False] + [True] * 5
    for r, ref in zip(recs, refs):
        assert r.eigenvalues == pytest.approx(ref, rel=1e-2)
        assert r.lambda_max == r.eigenvalues[0] and r.converged
        assert r.lr == pytest.approx(0.1)
    warm = [r.lanczos_hvps for r in recs if r.warm]
    assert statistics.median(warm) <= budget, warm
    assert tracker._op.method == (method or "cached-graph")


def test_lambda_max_and_extras_against_dense_reference():
    """Tiny float64 MLP: lambda_max and top-2 from eigvalsh of the dense Hessian; v^T H v/||v||^2,
    cos(v, g) and the MSAM-point loss from hand-written formulas at w."""
    x, y = classification_data(40)
    model = mlp()
    opt = MSAM(model.parameters(), lr=0.05, momentum=0.9, rho=0.3)
    _train(model, opt, x, y, 5)
    tracker = CurvatureTracker(model, "cross_entropy", (x, y), optimizer=opt, k=2, tol=1e-6,
                               cosine=True, momentum_curvature=True, msam_loss=True,
                               trace_probes=4)
    rec = tracker.measure(5)
    twin = copy.deepcopy(model)
    t_opt = MSAM(twin.parameters(), lr=0.05, momentum=0.9, rho=0.3)
    t_opt.load_state_dict(opt.state_dict())
    t_opt.eval()
    H = dense_hessian(twin, "cross_entropy", (x, y))
    ev = torch.linalg.eigvalsh(H).flip(0)
    assert rec.eigenvalues == pytest.approx(ev[:2].tolist(), rel=1e-5)
    v = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    assert rec.momentum_curvature == pytest.approx(float(v @ H @ v / (v @ v)), rel=1e-6)
    twin.zero_grad()
    loss = F.cross_entropy(twin(x), y)
    loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in twin.parameters()])
    assert rec.cos_v_g == pytest.approx(float(v @ g / (v.norm() * g.norm())), rel=1e-6)
    assert rec.loss == pytest.approx(loss.item(), rel=1e-9)
    with torch.no_grad():
        for p, vp in zip(twin.parameters(), torch.split(v, [p.numel() for p in twin.parameters()])):
            p.sub_(0.3 * vp.view_as(p) / v.norm())
        assert rec.loss_msam == pytest.approx(F.cross_entropy(twin(x), y).item(), rel=1e-9)
    assert rec.trace is not None and rec.hvps == rec.lanczos_hvps + 4 + 1


def test_forward_difference_tracker_against_dense_reference():
    """``method="forward-difference"`` on a smooth (tanh) float64 MLP: lambda_max within its
    ``tol`` of eigvalsh of the dense Hessian at w, warm checks too; the operator's method is
    the one asked."""
    x, y = classification_data(40)
    model = mlp()
    opt = MSAM(model.parameters(), lr=0.05, momentum=0.9, rho=0.3)
    tracker = CurvatureTracker(model, "cross_entropy", (x, y), optimizer=opt, tol=1e-6,
                               method="forward-difference")
    for steps in (3, 6):
        _train(model, opt, x, y, 3)
        rec = tracker.measure(steps)
        twin = copy.deepcopy(model)
        t_opt = MSAM(twin.parameters(), lr=0.05, momentum=0.9, rho=0.3)
        t_opt.load_state_dict(opt.state_dict())
        t_opt.eval()
        top = float(torch.linalg.eigvalsh(dense_hessian(twin, "cross_entropy", (x, y)))[-1])
        assert rec.lambda_max == pytest.approx(top, rel=1e-5) and rec.warm == (steps == 6)
    assert tracker._op.method == "forward-difference"


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [b.clone() for b in model.buffers()],
            [m.training for m in model.modules()],
            torch.get_rng_state().clone(),
            copy.deepcopy(opt.state_dict()), opt.is_perturbed)


def _equal_snapshots(a, b):
    for xa, xb in zip(a[0] + a[2], b[0] + b[2]):
        assert torch.equal(xa, xb)
    for ga, gb in zip(a[1], b[1]):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    assert a[3] == b[3] and torch.equal(a[4], b[4]) and a[6] == b[6]
    sa, sb = a[5], b[5]
    assert sa["perturbed"] == sb["perturbed"]
    for ka in sa["state"]:
        for key, va in sa["state"][ka].items():
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(sb["state"][ka][key]))
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        assert ga.keys() == gb.keys()
        for key in ga:
            va, vb = ga[key], gb[key]
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)) if isinstance(
                va, torch.Tensor) else va == vb


@pytest.mark.parametrize("mode, method", [("eval", None), ("train", None),
                                          ("eval", "double-backward")])
def test_measure_restores_everything_bit_for_bit(mode, method):
    x, y = _digits(256)
    torch.manual_seed(0)
    model = digits_cnn(4)
    opt = MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=1.0)
    _train(model, opt, x, y, 4)
    model.train()
    F.cross_entropy(model(x[:16]), y[:16]).backward()  # leave gradients in place
    before = _snapshot(model, opt)
    tracker = CurvatureTracker(model, "cross_entropy", (x[:48], y[:48]), optimizer=opt, mode=mode,
                               k=2, cosine=True, momentum_curvature=True, msam_loss=True,
                               trace_probes=2, method=method)
    tracker.measure(4)
    tracker.measure(5)
    _equal_snapshots(before, _snapshot(model, opt))


def test_training_trajectory_unchanged_by_the_tracker():
    """Same losses and final weights, bit for bit, with and without the tracker (MSAM + BN)."""
    x, y = _digits(256)
    runs = []
    for tracked in (False, True):
        torch.manual_seed(0)
        model = digits_cnn(4)
        opt = MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=1.0)
        tracker = CurvatureTracker(model, "cross_entropy", (x[:48], y[:48]), optimizer=opt,
                                   every=3, cosine=True, momentum_curvature=True,
                                   msam_loss=True, trace_probes=2) if tracked else None
        torch.manual_seed(5)  # the global RNG is used by the loop below (dropout-like draws)
        losses = _train(model, opt, x, y, 12, tracker)
        noise = torch.rand(3)  # the RNG stream after training is also untouched
        runs.append((losses, [p.detach().clone() for p in model.parameters()],
                     [b.clone() for b in model.buffers()], noise))
        if tracked:
            assert len(tracker.history) == 4
    (l0, p0, b0, n0), (l1, p1, b1, n1) = runs
    assert l0 == l1 and torch.equal(n0, n1)
    assert all(torch.equal(a, b) for a, b in zip(p0 + b0, p1 + b1))


def test_msam_is_measured_at_w_not_at_the_perturbed_point():
    x, y = classification_data(40)
    model = mlp()
    opt = MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.5)
    _train(model, opt, x, y, 6)
    assert opt.is_perturbed
    rec = CurvatureTracker(model, "cross_entropy", (x, y), optimizer=opt, tol=1e-6).measure(6)
    at_w_tilde = torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", (x, y)))[-1]
    with opt.unperturbed():
        at_w = torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", (x, y)))[-1]
    assert rec.lambda_max == pytest.approx(float(at_w), rel=1e-5)
    assert abs(float(at_w) - float(at_w_tilde)) > 1e-3 * abs(float(at_w))  # the test can fail
    # without the optimizer the tracker sees the live (perturbed) parameters
    rec2 = CurvatureTracker(model, "cross_entropy", (x, y), tol=1e-6).measure(6)
    assert rec2.lambda_max == pytest.approx(float(at_w_tilde), rel=1e-5)


def test_sam_between_steps_is_fine_but_inside_first_step_is_refused():
    x, y = classification_data(40)
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    tracker = CurvatureTracker(model, "cross_entropy", (x, y), optimizer=opt, cosine=True)
    with pytest.raises(RuntimeError, match="perturbed point"):
        tracker.measure(1)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    rec = tracker.measure(1)
    assert rec.cos_v_g is not None and rec.lambda_max > 0


def test_history_csv_json_round_trip(tmp_path):
    x, y = classification_data(40)
    model = mlp()
    opt = MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.5)
    tracker = CurvatureTracker(model, "cross_entropy", (x, y), optimizer=opt, every=2, k=3,
                               cosine=True, msam_loss=True)
    _train(model, opt, x, y, 6, tracker)
    hist = tracker.history
    assert len(hist) == 3 and hist.column("step") == [2, 4, 6]
    assert hist[0].momentum_curvature is None and hist[0].cos_v_g is not None
    assert TrackerHistory.read_json(hist.to_json(tmp_path / "h.json")) == hist
    assert TrackerHistory.read_csv(hist.to_csv(tmp_path / "h.csv")) == hist
    header = (tmp_path / "h.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["step", "lambda_max", "eigenvalues"]
    empty = TrackerHistory()
    assert TrackerHistory.read_csv(empty.to_csv(tmp_path / "e.csv")) == empty
    assert isinstance(hist[0], TrackerRecord) and hist.to_dict()["records"][0]["step"] == 2
    # resume: the Ritz vectors carry over, so the next check is warm
    t2 = CurvatureTracker(model, "cross_entropy", (x, y), optimizer=opt, every=2, k=3)
    t2.load_state_dict(tracker.state_dict())
    assert t2.measure(8).warm and len(t2.history) == 4
    with pytest.raises(ValueError, match="unknown column 'nope'"):
        hist.column("nope")


@pytest.mark.parametrize("kwargs, match", [
    ({"every": 0}, "every must be an integer >= 1, got 0"),
    ({"k": 1.5}, "k must be an integer"),
    ({"tol": 2.0}, "tol must be a number in"),
    ({"mode": "none"}, "mode must be 'eval' or 'train'"),
    ({"trace_probes": 1}, "trace_probes must be 0"),
    ({"cosine": True}, "cosine need the optimizer"),
    ({"look_ahead": -1}, "look_ahead must be None or a non-negative integer, got -1"),
    ({"method": "exact"}, "method must be None or one of .*, got 'exact'"),
])
def test_bad_arguments(kwargs, match):
    x, y = classification_data(8)
    with pytest.raises(ValueError, match=match):
        CurvatureTracker(mlp(), "cross_entropy", (x, y), **kwargs)


def test_cached_graph_needs_a_probe_in_memory():
    """Refused when the tracker is made, not at its first check in the middle of training."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = classification_data(8)
    with pytest.raises(ValueError, match="method='cached-graph' .* not a DataLoader"):
        CurvatureTracker(mlp(), "cross_entropy", DataLoader(TensorDataset(x, y), batch_size=4),
                         method="cached-graph")


def test_bad_types():
    x, y = classification_data(8)
    with pytest.raises(TypeError, match="probe batch"):
        CurvatureTracker(mlp(), "cross_entropy", x)
    with pytest.raises(TypeError, match="nn.Module"):
        CurvatureTracker("model", "cross_entropy", (x, y))


def test_a_random_forward_is_refused_at_the_first_check():
    """The determinism check (two evaluations of the probe batch) runs once, at the first check."""
    from torch import nn

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return F.dropout(self.lin(x), 0.5, training=True)

    torch.manual_seed(0)
    data = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    tracker = CurvatureTracker(Noisy(), "cross_entropy", data, every=1)
    with pytest.raises(ValueError, match="random"):
        tracker.measure(1)
    assert len(tracker.history) == 0


def test_the_product_method_is_timed_once_and_kept(monkeypatch):
    """A probe held in memory gets the cached graph without a calibration; a DataLoader gets
    ``method="auto"``, calibrated at the first check only and kept for the later ones. The
    operator is built once and reused (its first-batch checks run once), and each record counts
    its own products; every check agrees with the dense Hessian."""
    from torch.utils.data import DataLoader, TensorDataset

    import analysis.operators.hessian as hessian_ops

    calls, built = [], []
    real, real_init = hessian_ops.choose_method, hessian_ops.HessianOperator.__init__

    def counting(op, **kw):
        calls.append(op)
        return real(op, **kw)

    def counting_init(self, *a, **kw):
        built.append(self)
        real_init(self, *a, **kw)

    monkeypatch.setattr(hessian_ops, "choose_method", counting)
    monkeypatch.setattr(hessian_ops.HessianOperator, "__init__", counting_init)
    model = mlp()
    x, y = classification_data()
    lam = float(torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", (x, y)))[-1])
    tracker = CurvatureTracker(model, "cross_entropy", (x, y), every=1, tol=1e-6)
    recs = [tracker.measure(0), tracker.measure(1)]
    assert calls == [] and len(built) == 1 and built[0].method == "cached-graph"
    assert [r.hvps for r in recs] == [r.lanczos_hvps for r in recs]  # per check, not cumulative
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    tracker = CurvatureTracker(model, "cross_entropy", loader, every=1, tol=1e-6)
    recs += [tracker.measure(0), tracker.measure(1)]
    assert len(calls) == 1 and tracker._method == calls[0].auto_choice.method
    assert len(built) == 2
    for rec in recs:
        assert rec.lambda_max == pytest.approx(lam, rel=1e-5)


def test_the_operator_is_rebuilt_when_the_parameters_change_dtype():
    """The kept operator is rebuilt when the trainable tensors change (here ``model.double()``):
    the next check is the float64 Hessian's top eigenvalue, against the dense reference."""
    model = mlp()
    x, y = classification_data()
    tracker = CurvatureTracker(model, "cross_entropy", (x, y), every=1, tol=1e-8)
    tracker.measure(0)
    model.double()
    rec = tracker.measure(1)
    assert tracker._op.dtype == torch.float64
    lam = float(torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", (x.double(), y)))[-1])
    assert rec.lambda_max == pytest.approx(lam, rel=1e-8)


def test_look_ahead_cold_by_default_and_passed_through(monkeypatch):
    """Cold checks take top_eigenpairs' look-ahead (3 products), warm ones none; an explicit
    ``look_ahead`` applies to both."""
    import analysis.tracker as tracker_module

    x, y = classification_data(40)
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("look_ahead", "default"))
        return top_eigenpairs(*args, **kwargs)

    monkeypatch.setattr(tracker_module, "top_eigenpairs", recording)

    def run(**kw):
        seen.clear()
        torch.manual_seed(0)
        tracker = CurvatureTracker(mlp(), "cross_entropy", (x, y), tol=1e-3, **kw)
        hvps = [tracker.measure(s).lanczos_hvps for s in (1, 2)]
        return hvps, list(seen)

    (default, la_default), (none, la_none), (two, la_two) = run(), run(look_ahead=0), \
        run(look_ahead=2)
    assert la_default == ["default", 0] and la_none == [0, 0] and la_two == [2, 2]
    # the cold checks start alike: the look-ahead's products are counted in the record
    assert default[0] == none[0] + 3 and two[0] == none[0] + 2
