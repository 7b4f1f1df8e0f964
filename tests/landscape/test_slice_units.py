"""The units inside landscape.slices: evaluate_line (the loss at the points of a line) and
ResumableGrid (the store coordination of slice_2d), each against an independent reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from analysis import ParameterSpace, evaluate, random_direction
from landscape.slices._grid import ResumableGrid
from landscape.slices._points import Mover, Session, evaluate_line
from landscape.store import StoreMismatchError, tensors_hash
from tests.models import Quadratic, classification_data, mlp, quadratic_loss, random_spd


def _session(model, data, **kw):
    opts = dict(metrics=("loss", "accuracy"), mode="eval", batch_size=None, cache="auto",
                recalibrate_bn=False, bn_data=None, params=None)
    opts.update(kw)
    return Session(model, "cross_entropy", data, **opts)


def _moved(model, w, ds, coeffs):
    """An independent copy of ``model`` with weights ``w + sum c_k d_k`` (float64 arithmetic)."""
    m = copy.deepcopy(model)
    v = w.double().clone()
    for c, d in zip(coeffs, ds):
        v += c * d.double()
    torch.nn.utils.vector_to_parameters(v.to(w.dtype), m.parameters())
    return m


def test_evaluate_line_matches_evaluate_at_each_point():
    model = mlp(seed=0)
    data = classification_data(n=30, seed=1)
    d = random_direction(model, seed=0)
    s = _session(model, data)
    alphas = [-1.0, -0.25, 0.0, 0.5, 2.0]

    def body(w):
        return w.clone(), evaluate_line(s, Mover(s.space, w, [d]), [(a,) for a in alphas]).cpu().numpy()

    w, stats = s.run(body)
    loss, acc = s.finish(stats)
    assert stats.shape == (len(alphas), 3) and np.all(stats[:, 2] == 30)
    for k, a in enumerate(alphas):
        ref = evaluate(_moved(model, w, [d], [a]), "cross_entropy", data)
        assert loss[k] == pytest.approx(ref.loss, rel=1e-12)
        assert acc[k] == pytest.approx(ref.accuracy, abs=1e-15)
    assert torch.equal(ParameterSpace(model).vector(), w)  # restored bit for bit


def test_evaluate_line_on_a_plane_row_is_the_closed_form_quadratic():
    n = 5
    A = random_spd(n, seed=3)
    g = torch.Generator().manual_seed(4)
    c, w0 = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    model = Quadratic(A, c, w0)
    data = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    s = Session(model, quadratic_loss, data, metrics=("loss",), mode="eval", batch_size=None,
                cache="auto", recalibrate_bn=False, bn_data=None, params=None)
    d1, d2 = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    x, ys = 0.7, [-1.0, 0.0, 1.5]
    stats = s.run(lambda w: evaluate_line(s, Mover(s.space, w, [d1, d2]), [(x, y) for y in ys]).numpy())
    loss, acc = s.finish(stats)
    assert acc is None
    for k, y in enumerate(ys):
        r = w0 + x * d1 + y * d2 - c
        assert loss[k] == pytest.approx(0.5 * float(r @ A @ r), rel=1e-12)


def _grid_inputs():
    model = mlp(seed=0)
    data = classification_data(n=20, seed=2)
    s = _session(model, data)
    d1 = random_direction(model, seed=0)
    d2 = random_direction(model, seed=1, orthogonal_to=d1)
    xs, ys = np.linspace(-1, 1, 4), np.array([-0.5, 0.5, 1.0])
    return model, s, (d1, d2), xs, ys


def _open(path, s, dirs, xs, ys, model, **kw):
    buffers = tensors_hash(list(model.buffers())) if path is not None else None
    w = s.space.vector()
    origin = np.array([[20 * 1.25, 10.0, 20.0]])
    opts = dict(resume=True, overwrite=False, row_shard=False)
    opts.update(kw)
    return ResumableGrid.open(path, s, xs, ys, dirs, w, buffers, origin, **opts)


def _row(i, ny):
    """Fake sums of row i: loss (i + j + 1) / 4, accuracy j / 4 on N = 4."""
    return np.array([[i + j + 1.0, float(j), 4.0] for j in range(ny)])


def test_grid_in_memory_keeps_every_row():
    model, s, dirs, xs, ys = _grid_inputs()
    grid = _open(None, s, dirs, xs, ys, model)
    assert grid.pending == [0, 1, 2, 3] and grid.resumed == 0 and grid.path is None
    for i in grid.pending:
        grid.record(i, _row(i, len(ys)))
    loss, acc = grid.values(has_accuracy=True)
    expect = np.array([[(i + j + 1) / 4 for j in range(len(ys))] for i in range(len(xs))])
    np.testing.assert_array_equal(loss, expect)
    np.testing.assert_array_equal(acc, np.tile(np.arange(len(ys)) / 4, (len(xs), 1)))


def test_grid_store_resumes_after_the_recorded_rows(tmp_path):
    model, s, dirs, xs, ys = _grid_inputs()
    path = tmp_path / "g.npz"
    first = _open(path, s, dirs, xs, ys, model)
    assert first.pending == [0, 1, 2, 3]
    for i in (0, 1):
        first.record(i, _row(i, len(ys)))
    again = _open(path, s, dirs, xs, ys, model)
    assert again.pending == [2, 3] and again.resumed == 2 and again.path == str(path)
    for i in again.pending:
        again.record(i, _row(i, len(ys)))
    loss, acc = again.values(has_accuracy=True)
    expect = np.array([[(i + j + 1) / 4 for j in range(len(ys))] for i in range(len(xs))])
    np.testing.assert_array_equal(loss, expect)  # rows 0, 1 read back from the file
    assert again.values(has_accuracy=False)[1] is None
    done = _open(path, s, dirs, xs, ys, model)
    assert done.pending == [] and done.resumed == len(xs)
    redo = _open(path, s, dirs, xs, ys, model, resume=False)
    assert redo.pending == [0, 1, 2, 3] and redo.resumed == 0


def test_grid_store_refuses_other_arguments(tmp_path):
    model, s, dirs, xs, ys = _grid_inputs()
    path = tmp_path / "g.npz"
    _open(path, s, dirs, xs, ys, model).record(0, _row(0, len(ys)))
    before = path.read_bytes()
    with pytest.raises(StoreMismatchError):
        _open(path, s, dirs[::-1], xs, ys, model)  # directions swapped
    with pytest.raises(StoreMismatchError):
        _open(path, s, dirs, xs, ys[:2], model)  # another grid
    assert path.read_bytes() == before
    fresh = _open(path, s, dirs[::-1], xs, ys, model, overwrite=True)
    assert fresh.pending == [0, 1, 2, 3]


def test_point_sums_are_the_bits_of_the_batch_by_batch_float64_sums():
    """The line's sums formed once (stack, cast, multiply, add the batch columns in order) equal
    the hand-written point-by-point accumulation ``0 + t_0 L_0 + t_1 L_1 + ...`` bit for bit,
    also when the passes have different numbers of batches (a DataLoader) or no accuracy."""
    from landscape.slices._points import PassTerms, point_sums

    g = torch.Generator().manual_seed(0)
    terms = [7, 13, 5]
    passes = [PassTerms([torch.rand((), generator=g) * 3 for _ in terms],
                        [torch.tensor(int(torch.randint(0, t + 1, (), generator=g))) for t in terms],
                        terms) for _ in range(4)]
    passes.append(PassTerms([torch.rand((), generator=g)], [3], [9]))  # one batch only
    ragged = point_sums(passes, torch.device("cpu"))
    even = point_sums(passes[:4], torch.device("cpu"))
    for k, p in enumerate(passes):
        loss = correct = count = 0.0
        for batch_loss, c, t in zip(p.losses, p.counts, p.terms):
            loss += float(batch_loss.double()) * t
            correct += float(c)
            count += t
        assert ragged[k].tolist() == [loss, correct, count]  # exact
        if k < 4:
            assert even[k].tolist() == [loss, correct, count]
    blind = point_sums([PassTerms(p.losses, None, p.terms) for p in passes[:2]], torch.device("cpu"))
    assert blind[:, 1].tolist() == [0.0, 0.0] and torch.equal(blind[:, 0], even[:2, 0])
