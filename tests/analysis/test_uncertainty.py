"""Data-sampling standard errors (issue 26 item 14): hand-computed references on tiny cases and
calibration over random data subsets of a population with a known full-data value."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from analysis import HessianOperator, hessian_trace, top_eigenpairs
from analysis.reference import dense_hessian
from analysis.uncertainty import (
    data_stderr_from_units,
    groups_per_batch,
    split_samples,
    weighted_mean_stderr,
)
from tests.models import classification_data, mlp


def _se_by_hand(x, w):
    """``sqrt(U / (U - 1) * sum_u (w_u / W)^2 (x_u - xbar)^2)`` in numpy."""
    x, w = np.asarray(x, dtype=np.float64), np.asarray(w, dtype=np.float64)
    p = w / w.sum()
    mean = (p * x).sum()
    return math.sqrt(len(x) / (len(x) - 1) * (p * p * (x - mean) ** 2).sum())


def test_weighted_mean_stderr_formula_and_equal_weights():
    x = [1.0, 2.0, 4.0, 7.0]
    # equal weights: the textbook s / sqrt(U)
    assert float(weighted_mean_stderr(x, [3, 3, 3, 3])) == pytest.approx(np.std(x, ddof=1) / 2)
    w = [1, 5, 2, 9]
    assert float(weighted_mean_stderr(x, w)) == pytest.approx(_se_by_hand(x, w), rel=1e-12)
    cols = weighted_mean_stderr(torch.tensor([x, [2 * v for v in x]]).T, w)
    assert cols.shape == (2,) and float(cols[1]) == pytest.approx(2 * _se_by_hand(x, w))
    assert math.isnan(float(weighted_mean_stderr([1.0], [4])))


@pytest.mark.parametrize("values, weights, match", [
    ([1.0, 2.0], [1.0], "2 values but 1 weights"),
    ([1.0, 2.0], [1.0, -1.0], "weights must be"),
    ([1.0, 2.0], [0.0, 0.0], "weights must be"),
])
def test_weighted_mean_stderr_refuses_bad_weights(values, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_mean_stderr(values, weights)


def test_split_samples_contiguous_near_equal_groups():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    parts = split_samples(x, y, 10, 4)
    assert [n for _, _, n in parts] == [3, 3, 2, 2]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert len(split_samples(x, y, 3, 16)) == 3  # at most one group per sample
    d = {"input_ids": torch.zeros(6, 2)}
    assert all(xg is yg for xg, yg, _ in split_samples(d, d, 6, 3))  # a dict batch stays its own target
    assert groups_per_batch(1) == 16 and groups_per_batch(20) == 1 and groups_per_batch(5, 16) == 4
    with pytest.raises(ValueError, match="min_units must be an integer >= 2, got 1"):
        groups_per_batch(3, 1)


def test_one_unit_is_undefined_with_the_reason():
    se = data_stderr_from_units([5], [[1.0]], groups=16)
    assert math.isnan(se.stderr[0]) and "at least 2" in se.reason and se.units == 1
    se = data_stderr_from_units([5, 0, 4], [[1.0], [math.nan], [2.0]], groups=1)
    assert se.units == 2 and se.reason is None  # a unit without loss terms weighs nothing
    se = data_stderr_from_units([5, 3, 4], [[1.0], [math.inf], [2.0]], groups=1)
    assert math.isnan(se.stderr[0]) and "1 of the 3 sampling units is not finite" in se.reason


def _batches(x, y, sizes):
    out, start = [], 0
    for s in sizes:
        out.append((x[start:start + s], y[start:start + s]))
        start += s
    return out


@pytest.mark.parametrize("case", ["three batches", "one batch split in groups"])
def test_eigenvalue_stderr_matches_dense_per_unit_rayleigh_quotients(case):
    # the SE by hand: float64 dense Hessians of each unit, Rayleigh quotients of the returned
    # eigenvectors, the weighted-mean SE formula with the units' sample counts
    model = mlp(d=4, hidden=3, classes=3, seed=1)
    x, y = classification_data(n=16, d=4, seed=3)
    if case == "three batches":
        data, min_units = _batches(x, y, [5, 7, 4]), 3
        units = data
    else:
        data, min_units = (x, y), 5
        units = [(xg, yg) for xg, yg, _ in split_samples(x, y, 16, 5)]  # 4, 3, 3, 3, 3
    res = top_eigenpairs(model, "cross_entropy", data, k=2, tol=1e-8, min_units=min_units)
    V = res.eigenvectors.double()
    quotients = np.array([[float(V[i] @ dense_hessian(model, "cross_entropy", u) @ V[i])
                           for i in range(2)] for u in units])
    weights = [len(u[1]) for u in units]
    assert res.data_sampling.units == len(units)
    assert res.data_sampling.unit == ("batch" if case == "three batches" else "group")
    np.testing.assert_allclose(np.array(res.data_sampling.unit_values), quotients, rtol=1e-9,
                               atol=1e-12)
    for i in range(2):
        expected = _se_by_hand(quotients[:, i], weights)
        assert float(res.data_stderr[i]) == pytest.approx(expected, rel=1e-8)
        # the weighted mean of the unit quotients is the eigenvalue
        p = np.array(weights) / sum(weights)
        assert (p * quotients[:, i]).sum() == pytest.approx(float(res.eigenvalues[i]), rel=1e-7)
    assert res.data_sampling.matvecs == 2
    assert "data_stderr" in res.to_dict() and res.to_dict()["data_sampling"]["units"] == len(units)


def test_eigenvalue_stderr_off_costs_nothing_and_counts_its_products():
    model = mlp(seed=2)
    x, y = classification_data(n=40, seed=2)
    op = HessianOperator(model, "cross_entropy", (x, y))
    on = top_eigenpairs(op, k=2)
    before = op.num_matvecs
    off = top_eigenpairs(op, k=2, data_stderr=False)
    assert off.data_stderr is None and off.data_sampling is None
    assert torch.equal(on.eigenvalues, off.eigenvalues)
    assert on.num_matvecs == off.num_matvecs + 2 == op.num_matvecs - before + 2
    with pytest.raises(ValueError, match="min_units must be an integer >= 2, got 0"):
        top_eigenpairs(op, k=1, min_units=0)
    with pytest.raises(TypeError, match="data_stderr must be True or False, got 'yes'"):
        top_eigenpairs(op, k=1, data_stderr="yes")
    assert op.num_matvecs == before + off.num_matvecs  # refused before any product


def test_eigenvalue_stderr_undefined_without_data():
    res = top_eigenpairs(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)), k=1)
    assert math.isnan(float(res.data_stderr[0])) and "no data" in res.data_sampling.reason


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
@pytest.mark.parametrize("batch_size", [None, 5, 2])
def test_trace_stderr_is_the_per_unit_estimator_at_no_extra_product(method, batch_size):
    model = mlp(d=4, hidden=3, classes=3, seed=1)
    x, y = classification_data(n=40, d=4, seed=3)
    op = HessianOperator(model, "cross_entropy", (x, y), batch_size=batch_size)
    res = hessian_trace(op, num_matvecs=12, method=method, data_stderr=True)
    off = hessian_trace(op, num_matvecs=12, method=method, data_stderr=False)
    assert res.num_matvecs == off.num_matvecs and res.estimate == pytest.approx(off.estimate, rel=1e-12)
    ds = res.data_sampling
    # one batch: 16 groups; 8 batches: 2 groups each; 20 batches: the batches
    assert (ds.units, ds.unit, ds.groups_per_batch) == {None: (16, "group", 16), 5: (16, "group", 2),
                                                        2: (20, "batch", 1)}[batch_size]
    t, v = np.array(ds.unit_terms), np.array(ds.unit_values)[:, 0]
    assert (t * v).sum() / t.sum() == pytest.approx(res.estimate, rel=1e-10)
    assert res.data_stderr == pytest.approx(_se_by_hand(v, t), rel=1e-12)


def test_trace_stderr_by_default_only_where_the_batches_are_the_units():
    model = mlp(d=4, hidden=3, classes=3, seed=1)
    x, y = classification_data(n=40, d=4, seed=3)
    one = hessian_trace(HessianOperator(model, "cross_entropy", (x, y)), num_matvecs=12)
    assert math.isnan(one.data_stderr) and "pass data_stderr=True" in one.data_sampling.reason
    many = hessian_trace(HessianOperator(model, "cross_entropy", (x, y), batch_size=2),
                         num_matvecs=12)
    assert many.data_sampling.units == 20 and many.data_stderr > 0
    with pytest.raises(TypeError, match="data_stderr must be True or False, got 1"):
        hessian_trace(model, "cross_entropy", (x, y), data_stderr=1)


def test_trace_stderr_of_an_exact_trace_matches_dense_per_unit_traces():
    # Hutch++ with a budget of 3n is exact: T_u = tr(H_u), by dense float64 Hessians
    model = mlp(d=3, hidden=2, classes=2, seed=4)
    x, y = classification_data(n=12, d=3, classes=2, seed=5)
    data = _batches(x, y, [4, 5, 3])
    n = sum(p.numel() for p in model.parameters())
    res = hessian_trace(model, "cross_entropy", data, num_matvecs=3 * n, min_units=3)
    traces = [float(torch.trace(dense_hessian(model, "cross_entropy", b))) for b in data]
    np.testing.assert_allclose(np.array(res.data_sampling.unit_values)[:, 0], traces, rtol=1e-9)
    assert res.std_error == 0 and res.data_stderr == pytest.approx(_se_by_hand(traces, [4, 5, 3]),
                                                                   rel=1e-8)


# --------------------------------------------------------------------------------------------
# calibration: value +- 2 SE covers the full-data value at the nominal rate


def _population(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with one dominant direction (a well separated top eigenvalue) and noisy targets."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([2.0, 1.0, 0.8, 0.6], dtype=torch.float64)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64) * scale
    y = torch.tanh(x @ torch.tensor([0.5, -0.3, 0.2, 0.1], dtype=torch.float64))[:, None]
    return x, y + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)


def _tanh_model(hidden: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()


def _calibration(estimate, population, *, subsets: int, n: int, seed: int = 0) -> tuple[float, float]:
    """Over ``subsets`` random subsets of ``n`` samples (without replacement): the fraction of
    intervals ``value +- 2 SE`` that cover the full-data value, and the ratio of the root mean
    square SE to the observed root mean square error of the values."""
    x, y = population
    full, _ = estimate(population, False)
    g = torch.Generator().manual_seed(seed)
    hits, errors, ses = 0, [], []
    for _ in range(subsets):
        idx = torch.randperm(x.shape[0], generator=g)[:n]
        value, se = estimate((x[idx], y[idx]), True)
        assert se > 0 and math.isfinite(se)
        hits += abs(value - full) <= 2 * se
        errors.append(value - full)
        ses.append(se)
    return hits / subsets, math.sqrt(np.mean(np.square(ses)) / np.mean(np.square(errors)))


def _lambda_max(data, with_se: bool):
    res = top_eigenpairs(_tanh_model(), "mse", data, k=1, tol=1e-6, data_stderr=with_se)
    return float(res.eigenvalues[0]), float(res.data_stderr[0]) if with_se else None


def _trace(data, with_se: bool):
    # Hutch++ with a budget of 3n is exact (13 parameters): only the data vary
    res = hessian_trace(_tanh_model(hidden=2), "mse", data, num_matvecs=3 * 13, data_stderr=with_se)
    return res.estimate, res.data_stderr


@pytest.mark.parametrize("estimate", [_lambda_max, _trace], ids=["lambda_max", "trace"])
def test_calibration_two_se_cover_the_full_data_value(estimate):
    # one batch of 192 samples, split into 16 groups of 12: nominal coverage P(|t_15| < 2) = 0.94
    coverage, ratio = _calibration(estimate, _population(20000, seed=1), subsets=60, n=192)
    assert coverage >= 0.9
    assert 0.7 < ratio < 1.4  # the SE is the size of the actual error, not just large


# --------------------------------------------------------------------------------------------
# sharpness metrics: per-unit values at the found perturbation


def _unit_losses_by_hand(model, units, delta=None):
    """Mean cross-entropy of each unit at ``w + delta`` (float64, plain torch)."""
    from analysis import ParameterSpace

    space = ParameterSpace(model)
    w0 = space.vector()
    try:
        if delta is not None:
            space.copy_(w0 + delta)
        with torch.no_grad():
            return [float(torch.nn.functional.cross_entropy(model(xu), yu)) for xu, yu in units]
    finally:
        space.copy_(w0)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_directional_stderr_matches_per_unit_loss_differences(batch_size):
    from analysis import directional_sharpness

    model = mlp(d=4, hidden=3, classes=3, seed=1)
    x, y = classification_data(n=24, d=4, seed=3)
    d = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    radii = [0.2, -0.5]
    res = directional_sharpness(model, "cross_entropy", (x, y), d, radii, batch_size=batch_size,
                                min_units=6)
    off = directional_sharpness(model, "cross_entropy", (x, y), d, radii, batch_size=batch_size,
                                data_stderr=False)
    if batch_size is None:  # one batch: 6 groups of 4
        units = [(xg, yg) for xg, yg, _ in split_samples(x, y, 24, 6)]
        assert res.values == pytest.approx(off.values, rel=1e-10)
    else:  # 8 batches of 3: the batches are the units, the numbers bit for bit those without SE
        units = [(x[i:i + 3], y[i:i + 3]) for i in range(0, 24, 3)]
        assert res.values == off.values
    assert off.data_stderr is None and off.data_sampling is None
    base = _unit_losses_by_hand(model, units)
    for j, r in enumerate(radii):
        moved = _unit_losses_by_hand(model, units, r * d / d.norm())
        diffs = [m - b for m, b in zip(moved, base)]
        assert res.data_stderr[j] == pytest.approx(_se_by_hand(diffs, [len(u[1]) for u in units]),
                                                   rel=1e-8)
    assert res.forward_samples == off.forward_samples  # no extra pass


@pytest.mark.parametrize("method", ["lbfgsb", "apgd"])
def test_epsilon_stderr_is_the_linearized_ratio_of_unit_losses(method):
    from analysis import epsilon_sharpness

    model = mlp(d=4, hidden=3, classes=3, seed=1)
    x, y = classification_data(n=30, d=4, seed=3)
    res = epsilon_sharpness(model, "cross_entropy", (x, y), method=method, epsilon=1e-2,
                            min_units=5)
    off = epsilon_sharpness(model, "cross_entropy", (x, y), method=method, epsilon=1e-2,
                            data_stderr=False)
    assert res.value == off.value and res.value > 0
    assert res.forward_samples == off.forward_samples + 2 * 30  # two passes
    ds = res.data_sampling
    assert ds.units == 5 and ds.forward_passes == 2 and ds.unit_terms == (6,) * 5
    # the pseudo-values average to the value and the SE is the formula's (the losses at the
    # found box point are checked through the value: the weighted mean of b_u is max_loss)
    a, b = res.loss, res.max_loss
    base = _unit_losses_by_hand(model, [(xg, yg) for xg, yg, _ in split_samples(x, y, 30, 5)])
    xs = np.array(ds.unit_values)[:, 0]
    b_u = np.array(base) + (xs + 100 * (b - a) * (np.array(base) - a) / (1 + a) ** 2) * (1 + a) / 100
    assert b_u.mean() == pytest.approx(b, rel=1e-10) and xs.mean() == pytest.approx(res.value, rel=1e-9)
    assert (b_u >= np.array(base) - 1e-12).sum() >= 3  # the box point raises most units' losses
    assert res.data_stderr == pytest.approx(float(np.std(xs, ddof=1) / math.sqrt(5)), rel=1e-10)


def test_pac_bayes_stderr_from_per_unit_accuracy_drops():
    from analysis import pac_bayes_flatness

    model = mlp(d=4, hidden=8, classes=3, seed=1)
    x, y = classification_data(n=64, d=4, seed=3)
    y = model(x).argmax(1).detach()  # accuracy 1 at w
    res = pac_bayes_flatness(model, "cross_entropy", (x, y), draws=4, min_units=8)
    off = pac_bayes_flatness(model, "cross_entropy", (x, y), draws=4, data_stderr=False)
    assert res.flatness == off.flatness and off.data_stderr is None
    # the units' accuracy drops at sigma with the same seeded draws, by hand
    from analysis import ParameterSpace

    space = ParameterSpace(model)
    w0 = space.vector()
    units = [(xg, yg) for xg, yg, _ in split_samples(x, y, 64, 8)]
    drops = np.zeros(8)
    with torch.no_grad():
        for k in range(4):
            g = torch.Generator().manual_seed(k)
            space.copy_(w0 + res.sigma * torch.randn(space.numel, generator=g, dtype=torch.float64))
            drops += [1 - float((model(xu).argmax(1) == yu).double().mean()) for xu, yu in units]
        space.copy_(w0)
    drops /= 4
    assert drops.mean() == pytest.approx(res.deviation, abs=1e-12)
    xs = np.array(res.data_sampling.unit_values)[:, 0]
    factor = xs[drops != 0][0] / drops[drops != 0][0]  # d flatness / dD, negative
    np.testing.assert_allclose(xs, factor * drops, rtol=1e-12, atol=1e-12)
    assert factor < 0 and len(set(drops.tolist())) > 1
    assert res.data_stderr == pytest.approx(abs(factor) * np.std(drops, ddof=1) / math.sqrt(8))
    assert res.data_sampling.forward_passes == 5


def _directional(data, with_se: bool):
    from analysis import directional_sharpness

    model = _tanh_model()
    d = torch.ones(19, dtype=torch.float64)
    res = directional_sharpness(model, "mse", data, d, [0.5], data_stderr=with_se)
    return res.values[0], res.data_stderr[0] if with_se else None


def _epsilon(data, with_se: bool):
    from analysis import epsilon_sharpness

    res = epsilon_sharpness(_tanh_model(), "mse", data, epsilon=0.05, steps=5,
                            data_stderr=with_se)
    return res.value, res.data_stderr


@pytest.mark.parametrize("estimate", [_directional, _epsilon], ids=["directional", "epsilon"])
def test_calibration_of_sharpness_stderr(estimate):
    coverage, ratio = _calibration(estimate, _population(20000, seed=1), subsets=60, n=192)
    assert coverage >= 0.9
    assert 0.7 < ratio < 1.4


# --------------------------------------------------------------------------------------------
# units of other data forms


def test_language_model_units_are_weighted_by_their_tokens():
    from tests import lm_models as lm

    model = lm.lm_model()
    # batches of 2 right-padded sequences holding 8, 2 and 5 next-token targets
    batches = lm.padded_batches(lm.token_sequences((5, 5, 2, 2, 4, 3)), (2, 2, 2))
    res = top_eigenpairs(model, "lm", batches, k=1, tol=1e-6, min_units=3)
    assert res.data_sampling.unit_terms == (8, 2, 5) and res.data_sampling.unit == "batch"
    split = top_eigenpairs(model, "lm", batches, k=1, tol=1e-6, min_units=6)
    assert split.data_sampling.unit_terms == (4, 4, 1, 1, 3, 2)  # one sequence per group
    for r in (res, split):
        t = np.array(r.data_sampling.unit_terms)
        v = np.array(r.data_sampling.unit_values)[:, 0]
        assert (t * v).sum() / t.sum() == pytest.approx(float(r.eigenvalues[0]), rel=1e-6)
        assert float(r.data_stderr[0]) == pytest.approx(_se_by_hand(v, t), rel=1e-10)


def test_a_dataloader_is_split_like_a_list_of_batches():
    from torch.utils.data import DataLoader, TensorDataset

    model = mlp(seed=5)
    x, y = classification_data(n=32, seed=5)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    res = top_eigenpairs(model, "cross_entropy", loader, k=1, tol=1e-8)
    listed = top_eigenpairs(model, "cross_entropy", [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)],
                            k=1, tol=1e-8)
    assert res.data_sampling.units == 16 and res.data_sampling.groups_per_batch == 4
    assert float(res.data_stderr[0]) == pytest.approx(float(listed.data_stderr[0]), rel=1e-8)


def test_ggn_eigenvalue_units_match_dense_per_batch_ggns():
    from analysis import GGNOperator
    from analysis.reference import dense_ggn

    model = mlp(seed=6)
    x, y = classification_data(n=32, seed=6)
    res = top_eigenpairs(GGNOperator(model, "cross_entropy", (x, y), batch_size=8), k=1, tol=1e-8,
                         min_units=4)
    v = res.eigenvectors[0].double()
    want = [float(v @ dense_ggn(model, "cross_entropy", (x[i:i + 8], y[i:i + 8])) @ v)
            for i in range(0, 32, 8)]
    np.testing.assert_allclose(np.array(res.data_sampling.unit_values)[:, 0], want, rtol=1e-9)
    assert float(res.data_stderr[0]) == pytest.approx(_se_by_hand(want, [8] * 4), rel=1e-8)


@pytest.mark.parametrize("metric", ["directional", "epsilon", "pac_bayes"])
@pytest.mark.parametrize("kw, error, match", [
    ({"min_units": 1}, ValueError, "min_units must be an integer >= 2, got 1"),
    ({"min_units": 2.5}, ValueError, "min_units must be an integer >= 2, got 2.5"),
    ({"data_stderr": "no"}, TypeError, "data_stderr must be True or False, got 'no'"),
])
def test_sharpness_stderr_arguments_are_checked_before_any_pass(metric, kw, error, match):
    from analysis import directional_sharpness, epsilon_sharpness, pac_bayes_flatness

    model = mlp(seed=7)
    x, y = classification_data(n=16, seed=7)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    run = {"directional": lambda: directional_sharpness(
        model, "cross_entropy", (x, y), torch.ones(sum(p.numel() for p in model.parameters()),
                                                   dtype=torch.float64), [0.1], **kw),
           "epsilon": lambda: epsilon_sharpness(model, "cross_entropy", (x, y), **kw),
           "pac_bayes": lambda: pac_bayes_flatness(model, "cross_entropy", (x, y), **kw)}[metric]
    with pytest.raises(error, match=match):
        run()
    assert calls == []


@pytest.mark.slow
@pytest.mark.parametrize("estimate", [_lambda_max, _trace, _directional, _epsilon],
                         ids=["lambda_max", "trace", "directional", "epsilon"])
def test_calibration_over_more_subsets_and_populations(estimate):
    # 3 populations x 100 subsets: coverage and SE size pooled (fast variants above)
    hits, ratios = [], []
    for seed in (2, 3, 4):
        coverage, ratio = _calibration(estimate, _population(20000, seed=seed), subsets=100,
                                       n=192, seed=seed)
        hits.append(coverage)
        ratios.append(ratio)
    assert np.mean(hits) >= 0.9 and min(hits) >= 0.85
    assert all(0.75 < r < 1.3 for r in ratios)
