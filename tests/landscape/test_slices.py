"""Slices: closed forms on a quadratic, the origin, exact restore, resume, BN, bad input."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from analysis import ParameterSpace, evaluate, random_direction
from landscape import Slice1D, Slice2D, interpolate, slice_1d, slice_2d
from landscape import slices as slices_mod
from landscape.store import StoreMismatchError
from tests.models import Quadratic, cnn_bn, image_data, mlp, quadratic_loss, random_spd


def _quadratic(n=6):
    A = random_spd(n, seed=1)
    g = torch.Generator().manual_seed(2)
    c = torch.randn(n, generator=g, dtype=torch.float64)
    w0 = torch.randn(n, generator=g, dtype=torch.float64)
    model = Quadratic(A, c, w0)
    data = (torch.zeros(5, 1, dtype=torch.float64), torch.zeros(5, dtype=torch.float64))
    return model, A, c, w0, data


def _q(A, c, w):
    r = w - c
    return 0.5 * float(r @ A @ r)


def _state(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def _same(model, saved):
    now = list(model.parameters()) + list(model.buffers())
    return all(torch.equal(a, b) for a, b in zip(now, saved))


def test_slice_1d_quadratic_closed_form():
    model, A, c, w0, data = _quadratic()
    g = torch.Generator().manual_seed(3)
    d = torch.randn(6, generator=g, dtype=torch.float64)
    alphas = np.linspace(-2, 2, 9)
    s = slice_1d(model, quadratic_loss, data, d, alphas, progress=False)
    assert isinstance(s, Slice1D)
    ref = [_q(A, c, w0 + a * d) for a in alphas]
    np.testing.assert_allclose(s.loss, ref, rtol=1e-13, atol=1e-14)
    # closed form as a polynomial in alpha: L(w) + alpha g.d + alpha^2/2 d.A.d
    gd, dad = float((A @ (w0 - c)) @ d), float(d @ A @ d)
    np.testing.assert_allclose(s.loss, _q(A, c, w0) + alphas * gd + 0.5 * alphas**2 * dad, rtol=1e-12)
    assert s.accuracy is None  # float targets: not a classification problem
    assert s.loss_at_origin == pytest.approx(_q(A, c, w0), rel=1e-14)
    assert s.direction["norm"] == pytest.approx(float(d.norm()))


def test_slice_2d_quadratic_closed_form():
    model, A, c, w0, data = _quadratic()
    g = torch.Generator().manual_seed(4)
    d1, d2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    xs, ys = np.linspace(-1, 1, 4), np.array([-0.5, 0.25, 1.0])
    s = slice_2d(model, quadratic_loss, data, d1, d2, xs, ys, progress=False, names=("u", "v"))
    assert isinstance(s, Slice2D) and s.loss.shape == (4, 3)
    ref = np.array([[_q(A, c, w0 + x * d1 + y * d2) for y in ys] for x in xs])
    np.testing.assert_allclose(s.loss, ref, rtol=1e-13, atol=1e-14)
    assert [d["name"] for d in s.directions] == ["u", "v"]
    expected_cos = float(d1 @ d2 / (d1.norm() * d2.norm()))
    assert s.cosine == pytest.approx(expected_cos)


def test_origin_and_points_match_evaluate_and_parameters_restored_bitwise():
    model = cnn_bn()
    x, y = image_data(n=23)
    model.train()  # the caller's mode must survive
    saved = _state(model)
    d1 = random_direction(model, seed=0)
    d2 = random_direction(model, seed=1, orthogonal_to=d1)
    xs, ys = [-0.5, 0.0, 0.7], [0.0, 0.3]
    s = slice_2d(model, "cross_entropy", (x, y), d1, d2, xs, ys, batch_size=5, progress=False)
    assert _same(model, saved) and model.training and model[1].training
    ref0 = evaluate(model, "cross_entropy", (x, y))
    assert s.loss_at_origin == pytest.approx(ref0.loss, rel=1e-12)
    assert s.accuracy_at_origin == pytest.approx(ref0.accuracy)
    assert s.loss[1, 0] == pytest.approx(ref0.loss, rel=1e-12)
    assert s.num_samples == 23
    # an independent evaluation of another point on a moved copy
    other = copy.deepcopy(model)
    ParameterSpace(other).add_(0.7 * d1 + 0.3 * d2)
    ref = evaluate(other, "cross_entropy", (x, y))
    assert s.loss[2, 1] == pytest.approx(ref.loss, rel=1e-10)
    assert s.accuracy[2, 1] == pytest.approx(ref.accuracy)


def test_dataloader_and_list_give_the_same_slice():
    model = mlp()
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 3, (30,))
    d = random_direction(model, seed=0)
    alphas = [-1.0, 0.0, 1.0]
    a = slice_1d(model, "cross_entropy", (x, y), d, alphas, progress=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    b = slice_1d(model, "cross_entropy", loader, d, alphas, progress=False)
    c = slice_1d(model, "cross_entropy", [(x[:11], y[:11]), (x[11:], y[11:])], d, alphas,
                 progress=False, cache=False)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-12)
    np.testing.assert_allclose(a.loss, c.loss, rtol=1e-12)
    np.testing.assert_allclose(a.accuracy, b.accuracy)


def test_restore_on_error_and_keyboard_interrupt():
    model = cnn_bn()
    x, y = image_data()
    saved = _state(model)
    d = random_direction(model, seed=0)

    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        calls = {"n": 0}

        def bad_loss(out, t, exc=exc, calls=calls):
            calls["n"] += 1
            if calls["n"] == 3:
                raise exc
            return F.cross_entropy(out, t)

        with pytest.raises(type(exc)):
            slice_1d(model, bad_loss, (x, y), d, [0.5, 1.0, 2.0], progress=False)
        assert _same(model, saved)


def test_train_mode_and_bn_recalibration_restore_buffers():
    model = cnn_bn()
    x, y = image_data()
    saved = _state(model)
    d = random_direction(model, seed=0)
    s = slice_1d(model, "cross_entropy", (x, y), d, [0.0, 0.5], mode="train", progress=False)
    assert _same(model, saved)
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        assert s.loss[0] == pytest.approx(float(F.cross_entropy(ref(x), y)), rel=1e-12)

    # recalibration: running statistics recomputed at each point from the data
    r = slice_1d(model, "cross_entropy", (x, y), d, [0.0, 0.5], recalibrate_bn=True, progress=False)
    assert _same(model, saved)
    assert r.recalibrate_bn
    for k, a in enumerate([0.0, 0.5]):
        m = copy.deepcopy(model)
        ParameterSpace(m).add_(d, alpha=a)
        bn = m[1]
        bn.reset_running_stats()
        bn.momentum = None
        m.train()
        with torch.no_grad():
            m(x)
        m.eval()
        assert r.loss[k] == pytest.approx(evaluate(m, "cross_entropy", (x, y)).loss, rel=1e-10)
    # the eval-mode default differs (running statistics of w were not the data's)
    e = slice_1d(model, "cross_entropy", (x, y), d, [0.0, 0.5], progress=False)
    assert abs(e.loss[0] - r.loss[0]) > 1e-6


class CountingLoss:
    """Cross-entropy that can fail at a given call (simulates a crash or Ctrl-C)."""

    def __init__(self, fail_at=None):
        self.calls = 0
        self.fail_at = fail_at

    def __call__(self, out, t):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return F.cross_entropy(out, t)


@pytest.mark.parametrize("where", ["row_boundary", "mid_row"])
def test_resume_gives_the_uninterrupted_grid(tmp_path, where):
    model = cnn_bn()
    x, y = image_data()
    saved = _state(model)
    d1 = random_direction(model, seed=0)
    d2 = random_direction(model, seed=1, orthogonal_to=d1)
    xs, ys = np.linspace(-1, 1, 5), np.linspace(-1, 1, 4)
    ny = len(ys)
    full = slice_2d(model, CountingLoss(), (x, y), d1, d2, xs, ys, progress=False)

    store = tmp_path / "grid.npz"
    # one call for the input check of the first batch, one for the origin, then ny per row
    # (one batch): fail at the start / middle of row 2
    fail_at = 2 + 2 * ny + (1 if where == "row_boundary" else 3)
    with pytest.raises(KeyboardInterrupt):
        slice_2d(model, CountingLoss(fail_at), (x, y), d1, d2, xs, ys, store=store, progress=False)
    assert _same(model, saved)
    assert store.exists()

    loss = CountingLoss()
    resumed = slice_2d(model, loss, (x, y), d1, d2, xs, ys, store=store, progress=False)
    assert resumed.resumed_rows == 2
    assert loss.calls == 2 + (len(xs) - 2) * ny  # check + origin + only the missing rows
    np.testing.assert_array_equal(resumed.loss, full.loss)
    np.testing.assert_array_equal(resumed.accuracy, full.accuracy)
    assert resumed.loss_at_origin == full.loss_at_origin
    assert _same(model, saved)

    # a finished store is read back without evaluating any grid point
    again = CountingLoss()
    done = slice_2d(model, again, (x, y), d1, d2, xs, ys, store=store, progress=False)
    assert again.calls == 2 and done.resumed_rows == len(xs)  # input check + origin
    np.testing.assert_array_equal(done.loss, full.loss)
    # resume=False recomputes every row
    fresh = CountingLoss()
    redo = slice_2d(model, fresh, (x, y), d1, d2, xs, ys, store=store, resume=False, progress=False)
    assert fresh.calls == 2 + len(xs) * ny and redo.resumed_rows == 0
    np.testing.assert_array_equal(redo.loss, full.loss)


def test_store_mismatch_is_an_error_and_leaves_the_file(tmp_path):
    model = mlp()
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    d1 = random_direction(model, seed=0)
    d2 = random_direction(model, seed=1, orthogonal_to=d1)
    store = tmp_path / "grid.npz"
    slice_2d(model, "cross_entropy", (x, y), d1, d2, [0, 1], [0, 1], store=store, progress=False)
    before = store.read_bytes()
    cases = {
        "xs": dict(xs=[0, 2]),
        "d1": dict(d1=random_direction(model, seed=5)),
        "data": dict(data=(x + 1, y)),
        "loss_fn": dict(loss_fn="mse_not_a_loss"),
    }
    for key, change in cases.items():
        args = dict(loss_fn="cross_entropy", data=(x, y), d1=d1, d2=d2, xs=[0, 1], ys=[0, 1])
        args.update(change)
        if key == "loss_fn":
            args["loss_fn"] = lambda o, t: F.cross_entropy(o, t)
        with pytest.raises(StoreMismatchError, match=key):
            slice_2d(model, args["loss_fn"], args["data"], args["d1"], args["d2"], args["xs"],
                     args["ys"], store=store, progress=False)
        assert store.read_bytes() == before
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-12
    with pytest.raises(StoreMismatchError, match="weights"):
        slice_2d(other, "cross_entropy", (x, y), d1, d2, [0, 1], [0, 1], store=store, progress=False)
    with pytest.raises(StoreMismatchError):
        slice_2d(model, "cross_entropy", (x, y), d1, d2, [0, 1], [0, 1], store=store,
                 resume=False, progress=False, mode="train")
    assert store.read_bytes() == before

    # a directory store keeps one file per fingerprint
    folder = tmp_path / "stores"
    folder.mkdir()
    a = slice_2d(model, "cross_entropy", (x, y), d1, d2, [0, 1], [0], store=folder, progress=False)
    b = slice_2d(model, "cross_entropy", (x, y), d1, d2, [0, 2], [0], store=folder, progress=False)
    assert a.store != b.store and len(list(folder.glob("*.npz"))) == 2


def test_bad_directions_and_coordinates():
    model = mlp()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    n = ParameterSpace(model).numel
    d = random_direction(model, seed=0)
    saved = _state(model)
    with pytest.raises(ValueError, match=rf"shape \({n - 1},\)"):
        slice_1d(model, "cross_entropy", (x, y), d[:-1], [0, 1], progress=False)
    with pytest.raises(ValueError, match="zero vector"):
        slice_1d(model, "cross_entropy", (x, y), torch.zeros(n, dtype=torch.float64), [0, 1], progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        slice_1d(model, "cross_entropy", (x, y), d * float("nan"), [0, 1], progress=False)
    with pytest.raises(TypeError):
        slice_1d(model, "cross_entropy", (x, y), d.tolist(), [0, 1], progress=False)
    with pytest.raises(ValueError, match="alphas is empty"):
        slice_1d(model, "cross_entropy", (x, y), d, [], progress=False)
    with pytest.raises(ValueError, match="ys is empty"):
        slice_2d(model, "cross_entropy", (x, y), d, random_direction(model, seed=1), [0], np.array([]), progress=False)
    with pytest.raises(ValueError, match="1-D"):
        slice_1d(model, "cross_entropy", (x, y), d, [[0, 1]], progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        slice_1d(model, "cross_entropy", (x, y), d, [0, float("inf")], progress=False)
    with pytest.raises(ValueError, match="parallel"):
        slice_2d(model, "cross_entropy", (x, y), d, -2 * d, [0], [0], progress=False)
    with pytest.raises(ValueError, match="metrics"):
        slice_1d(model, "cross_entropy", (x, y), d, [0], metrics=("loss", "sharpness"), progress=False)
    with pytest.raises(ValueError, match="mode"):
        slice_1d(model, "cross_entropy", (x, y), d, [0], mode="test", progress=False)
    assert _same(model, saved)


def test_nonfinite_losses_are_nan_and_reported():
    model, A, c, w0, data = _quadratic()
    d = torch.ones(6, dtype=torch.float64)

    def capped(out, t):
        v = out.mean()
        return torch.where(v > 50.0, torch.full_like(v, float("inf")), v)

    with pytest.warns(RuntimeWarning, match="non-finite"):
        s = slice_1d(model, capped, data, d, np.linspace(-30, 30, 7), progress=False)
    expected = np.array([_q(A, c, w0 + a * d) for a in np.linspace(-30, 30, 7)])
    assert s.nonfinite == int((expected > 50).sum()) > 0
    assert np.all(np.isnan(s.loss[expected > 50]))
    np.testing.assert_allclose(s.loss[expected <= 50], expected[expected <= 50])


def test_metrics_loss_only_and_progress_bar(capsys):
    model = mlp()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    d = random_direction(model, seed=0)
    s = slice_1d(model, "cross_entropy", (x, y), d, [0, 1], metrics=("loss",), progress=True)
    assert s.accuracy is None and s.accuracy_at_origin is None
    assert "pt" in capsys.readouterr().err


def test_interpolate_endpoints():
    a, b = mlp(seed=0), mlp(seed=1)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    saved_a, saved_b = _state(a), _state(b)
    s = interpolate(a, b, "cross_entropy", (x, y), progress=False)
    assert s.alphas[0] == -0.5 and s.alphas[-1] == 1.5 and len(s.alphas) == 41
    i0, i1 = int(np.argmin(abs(s.alphas))), int(np.argmin(abs(s.alphas - 1)))
    assert s.loss[i0] == pytest.approx(evaluate(a, "cross_entropy", (x, y)).loss, rel=1e-12)
    assert s.loss[i1] == pytest.approx(evaluate(b, "cross_entropy", (x, y)).loss, rel=1e-10)
    assert s.direction["name"] == "interpolation"
    assert _same(a, saved_a) and _same(b, saved_b)


def test_sharded_sums_and_counts_are_all_reduced(monkeypatch):
    """Simulate two identical ranks: the reduced loss is unchanged, N doubles."""
    model = mlp()
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    plain = slice_2d(model, "cross_entropy", (x, y), d1, d2, [0, 1], [0, 1, 2], progress=False)
    calls = []

    def fake_all_reduce(t):
        calls.append(tuple(t.shape))
        return t.mul_(2)

    monkeypatch.setattr(slices_mod.dist, "all_reduce_sum", fake_all_reduce)
    from analysis.data import as_data

    sharded = slice_2d(model, "cross_entropy", as_data((x, y), shard=True), d1, d2, [0, 1], [0, 1, 2],
                       progress=False)
    assert calls == [(1, 3), (3, 3), (3, 3), (1,)]  # origin, once per row, the sample count
    np.testing.assert_allclose(sharded.loss, plain.loss, rtol=1e-14)
    assert sharded.num_samples == 24 and sharded.num_terms == 24


def test_result_dicts_are_json():
    import json

    model = mlp()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = slice_2d(model, "cross_entropy", (x, y), d1, d2, [0, 1], [0, 1], progress=False)
    out = json.loads(json.dumps(s.to_dict()))
    assert out["loss"][0][0] == pytest.approx(s.loss_at_origin)
    assert "Slice2D" in repr(s) and "<table>" in s._repr_html_()


def test_bn_recalibration_weights_batches_by_size_and_keeps_dropout_off():
    from msam import recalibrate_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.Tanh(),
        torch.nn.Dropout(0.5), torch.nn.Flatten(), torch.nn.Linear(75, 3),
    ).double()
    x, y = image_data(n=24)
    d = random_direction(model, seed=1)
    alphas = [0.0, 0.7]
    s = slice_1d(model, "cross_entropy", (x, y), d, alphas, recalibrate_bn=True, batch_size=10,
                 progress=False)  # batches of 10, 10 and 4 samples
    for k, a in enumerate(alphas):
        m = copy.deepcopy(model)
        ParameterSpace(m).add_(d, alpha=a)
        recalibrate_batchnorm(m, (x, y), batch_size=10)  # sample-weighted, dropout off
        m.eval()
        with torch.no_grad():
            ref = float(F.cross_entropy(m(x), y))
        assert s.loss[k] == pytest.approx(ref, rel=1e-10)


# --------------------------------------------------------------------------------------------
# issue 15: random forwards refused, the first batch checked, store paths checked up front
# --------------------------------------------------------------------------------------------
class _FunctionalDropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 3).double()

    def forward(self, x):
        return self.lin(F.dropout(x, 0.5, training=True))


@pytest.mark.parametrize("case", ["functional", "module"])
def test_slices_refuse_a_random_forward_and_allow_opting_out(tmp_path, case):
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    if case == "functional":
        model, mode, match = _FunctionalDropout(), "eval", "forward is random"
    else:
        model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Dropout(0.5),
                                    torch.nn.Linear(4, 3)).double().train()
        mode, match = None, "active dropout under mode=None in '1'"
    saved = _state(model)
    d1 = random_direction(model, seed=0)
    d2 = random_direction(model, seed=1, orthogonal_to=d1)
    store = tmp_path / "s.npz"
    other = _perturbed(model)  # interpolate needs two different models
    calls = [
        lambda **k: slice_1d(model, "cross_entropy", (x, y), d1, [0.0, 1.0], mode=mode,
                             progress=False, **k),
        lambda **k: slice_2d(model, "cross_entropy", (x, y), d1, d2, [0, 1], [0, 1],
                             mode=mode, store=store, progress=False, **k),
        lambda **k: interpolate(model, other, "cross_entropy", (x, y), [0.0, 1.0],
                                mode=mode, progress=False, **k),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()
        assert _same(model, saved) and not store.exists()
    s = slice_1d(model, "cross_entropy", (x, y), d1, [0.0, 1.0], mode=mode, progress=False,
                 check_deterministic=False)
    assert s.loss.shape == (2,)
    assert _same(model, saved)


def _perturbed(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    return other


def test_slice_first_batch_is_checked_against_the_loss():
    model = mlp()
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    d = random_direction(model, seed=0)
    saved = _state(model)
    cases = [
        ("cross_entropy", (x, y.double()), TypeError, r"integer class indices .*float64 \(20,\)"),
        ("mse", (x, y), TypeError, "mse needs floating targets.*class labels"),
        ("cross_entropy", (x, y + 3), ValueError, r"class indices in \[0, 3\).*got 3 \.\.\. 5"),
        ("cross_entropy", (x[:, :4], y), ValueError,
         r"forward pass failed on batch 0 \(inputs float64 \(20, 4\)"),
        ("cross_entropy", (x.long(), y), ValueError, r"forward pass failed on batch 0 \(inputs int64"),
    ]
    for loss, data, exc, match in cases:
        with pytest.raises(exc, match=match) as err:
            slice_1d(model, loss, data, d, [0.0, 1.0], progress=False)
        assert "\n" not in str(err.value) and str(err.value).startswith("slice_1d()")
        assert _same(model, saved)


def test_slice_2d_store_path_is_checked_before_computing(tmp_path):
    model = mlp()
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    d1 = random_direction(model, seed=0)
    d2 = random_direction(model, seed=1, orthogonal_to=d1)
    afile = tmp_path / "plain.txt"
    afile.write_text("x")
    calls = {"n": 0}

    def counting(out, t):
        calls["n"] += 1
        return F.cross_entropy(out, t)

    with pytest.raises(ValueError, match="plain.txt is a file, not a directory"):
        slice_2d(model, counting, (x, y), d1, d2, [0, 1], [0, 1], store=afile / "grid.npz",
                 progress=False)
    (tmp_path / "grid.npz").mkdir()  # store="grid" means the file grid.npz
    with pytest.raises(ValueError, match="not a writable regular file"):
        slice_2d(model, counting, (x, y), d1, d2, [0, 1], [0, 1], store=tmp_path / "grid",
                 progress=False)
    with pytest.raises(TypeError, match="store must be a path"):
        slice_2d(model, counting, (x, y), d1, d2, [0, 1], [0, 1], store=3, progress=False)
    assert calls["n"] == 0  # nothing was evaluated


def test_flags_and_labels_are_type_checked():
    # recalibrate_bn="no" and resume="no" used to be truthy, i.e. silently the opposite
    model = mlp()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    d1 = random_direction(model, seed=0)
    d2 = random_direction(model, seed=1, orthogonal_to=d1)
    with pytest.raises(TypeError, match="recalibrate_bn must be True or False, got str 'no'"):
        slice_1d(model, "cross_entropy", (x, y), d1, [0.0], recalibrate_bn="no", progress=False)
    with pytest.raises(TypeError, match="name must be a string, got int 3"):
        slice_1d(model, "cross_entropy", (x, y), d1, [0.0], name=3, progress=False)
    with pytest.raises(TypeError, match="resume must be True or False, got str 'no'"):
        slice_2d(model, "cross_entropy", (x, y), d1, d2, [0], [0], resume="no", progress=False)
    with pytest.raises(TypeError, match="names must be a string, got int 1"):
        slice_2d(model, "cross_entropy", (x, y), d1, d2, [0], [0], names=(1, 2), progress=False)
    with pytest.raises(TypeError, match="check_deterministic must be True or False"):
        slice_1d(model, "cross_entropy", (x, y), d1, [0.0], check_deterministic=None,
                 progress=False)
