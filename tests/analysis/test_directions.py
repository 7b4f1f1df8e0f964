"""Directions: filter/layer/model normalization, orthogonality, gradient, momentum, PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis import (
    ParameterSpace,
    PCADirections,
    gradient_direction,
    interpolation_direction,
    momentum_direction,
    pca_directions,
    random_direction,
)
from analysis.directions import normalize_direction, orthogonalize
from tests.models import TiedFrozen, classification_data, cnn_bn, image_data, mlp


def _filters(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)


@pytest.mark.parametrize("make", [cnn_bn, mlp], ids=["cnn_bn", "mlp"])
def test_filter_normalization_property(make):
    model = make()
    space = ParameterSpace(model)
    d = random_direction(model, seed=3)
    assert d.shape == (space.numel,) and d.dtype == space.dtype
    for name, dv, w in zip(space.names, space.unflatten(d), space.params):
        if w.dim() <= 1:
            assert torch.count_nonzero(dv) == 0, f"{name} (1-D) must be zero with ignore='biasbn'"
        else:
            torch.testing.assert_close(_filters(dv), _filters(w.detach()), rtol=1e-12, atol=0)


def test_filter_normalization_zero_filters_do_not_divide_by_zero():
    model = cnn_bn()
    with torch.no_grad():
        model[0].weight[1].zero_()  # a pruned output channel
        model[1].bias.zero_()  # BatchNorm shift at initialization
    d = random_direction(model, seed=0, ignore=None)
    assert torch.isfinite(d).all()
    views = ParameterSpace(model).as_dict(d)
    assert torch.count_nonzero(views["0.weight"][1]) == 0
    assert torch.count_nonzero(views["1.bias"]) == 0
    # ignore=None: each entry of a 1-D tensor is its own filter: |d_i| == |w_i|
    torch.testing.assert_close(views["1.weight"].abs(), model[1].weight.detach().abs())
    # and a zero direction filter stays zero too
    raw = torch.zeros(ParameterSpace(model).numel, dtype=torch.float64)
    assert torch.count_nonzero(normalize_direction(raw, model, "filter", None)) == 0


def test_layer_model_and_no_normalization():
    model = mlp()
    space = ParameterSpace(model)
    gen = torch.Generator().manual_seed(5)
    raw = torch.randn(space.numel, generator=gen, dtype=torch.float64)
    # None: the raw Gaussian of the seed (an independent draw with the same generator)
    torch.testing.assert_close(random_direction(model, seed=5, normalization=None, ignore=None), raw)
    d = random_direction(model, seed=5, normalization="layer", ignore=None)
    for dv, rv, w in zip(space.unflatten(d), space.unflatten(raw), space.params):
        torch.testing.assert_close(dv.norm(), w.detach().norm())
        # same direction as the raw draw within each tensor
        torch.testing.assert_close(dv / dv.norm(), rv / rv.norm())
    d = random_direction(model, seed=5, normalization="model", ignore="biasbn")
    kept = torch.cat([w.detach().reshape(-1) for w in space.params if w.dim() > 1])
    torch.testing.assert_close(d.norm(), kept.norm())


def test_random_direction_is_seeded_and_leaves_global_rng_alone():
    model = cnn_bn()
    state = torch.get_rng_state()
    a = random_direction(model, seed=1)
    b = random_direction(model, seed=1)
    c = random_direction(model, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the same seed gives (up to rounding) the same direction in float32
    d32 = random_direction(cnn_bn(dtype=torch.float32), seed=1)
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32.double(), a, rtol=1e-5, atol=1e-6)


def test_zero_mean_gaussian():
    model = nn.Linear(400, 50, dtype=torch.float64)
    d = random_direction(model, normalization=None, ignore=None, seed=0)
    # mean of n standard normals has std 1/sqrt(n) ~ 0.0045; uniform[0,1] would give 0.5
    assert abs(float(d.mean())) < 0.03 and abs(float(d.std()) - 1) < 0.03


def test_orthogonal_directions():
    model = cnn_bn()
    d1 = random_direction(model, seed=0)
    d2 = random_direction(model, seed=1, orthogonal_to=d1)
    plain = random_direction(model, seed=1)
    assert abs(float(d1 @ d2)) < 1e-12 * float(d1.norm() * d2.norm())
    torch.testing.assert_close(d2.norm(), plain.norm())  # keep_norm
    # against several directions
    d3 = random_direction(model, seed=2, orthogonal_to=[d1, d2])
    assert abs(float(d3 @ d1)) < 1e-10 and abs(float(d3 @ d2)) < 1e-10
    # orthogonalize against a non-orthogonal pair spans the same plane
    u = orthogonalize(random_direction(model, seed=7), [d1, d1 + 0.5 * d2])
    assert abs(float(u @ d1)) < 1e-10 and abs(float(u @ d2)) < 1e-10


def test_orthogonalize_errors():
    a = torch.randn(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="zero"):
        orthogonalize(a, torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="span"):
        orthogonalize(2 * a, a)
    with pytest.raises(ValueError, match="shape"):
        orthogonalize(a, torch.ones(9, dtype=torch.float64))


def test_bad_arguments():
    model = mlp()
    n = ParameterSpace(model).numel
    with pytest.raises(ValueError, match="normalization"):
        random_direction(model, normalization="filters")
    with pytest.raises(ValueError, match="ignore"):
        random_direction(model, ignore="bias")
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        normalize_direction(torch.ones(5, dtype=torch.float64), model)
    with pytest.raises(ValueError, match="orthogonal_to"):
        random_direction(model, orthogonal_to=torch.ones(n + 1, dtype=torch.float64))
    with pytest.raises(TypeError):
        normalize_direction([1.0] * n, model)


def test_params_subset_and_tied():
    model = TiedFrozen()
    space = ParameterSpace(model)
    assert "frozen.weight" not in space.names
    d = random_direction(model, seed=0)
    assert d.numel() == space.numel
    sub = random_direction(model, seed=0, params=["head.weight"])
    assert sub.numel() == model.head.weight.numel()
    torch.testing.assert_close(_filters(sub.view_as(model.head.weight)), _filters(model.head.weight.detach()))


def test_gradient_direction_matches_full_batch_autograd():
    model = TiedFrozen()
    x, y = classification_data(n=23, d=5)
    model.train()
    model.shared.weight.grad = torch.full_like(model.shared.weight, 7.0)
    g = gradient_direction(model, "cross_entropy", (x, y), batch_size=5)  # uneven batches
    space = ParameterSpace(model)
    ref = torch.autograd.grad(F.cross_entropy(model(x), y), space.params)
    torch.testing.assert_close(g, torch.cat([r.reshape(-1) for r in ref]), rtol=1e-12, atol=1e-14)
    assert model.training  # mode restored
    assert torch.all(model.shared.weight.grad == 7.0) and model.head.weight.grad is None


def test_gradient_direction_eval_mode_uses_running_stats():
    model = cnn_bn()
    x, y = image_data()
    g = gradient_direction(model, "cross_entropy", [(x[:10], y[:10]), (x[10:], y[10:])])
    model.eval()
    ref = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    torch.testing.assert_close(g, torch.cat([r.reshape(-1) for r in ref]))


def _step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = ParameterSpace(model).grad_vector()
    opt.step()
    return g


def test_momentum_direction_sgd_and_adamw():
    x, y = classification_data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g1 = _step(model, opt, x, y)
    torch.testing.assert_close(momentum_direction(opt, model), g1)  # v_1 = g_1
    g2 = _step(model, opt, x, y)
    torch.testing.assert_close(momentum_direction(opt, model), 0.9 * g1 + g2)
    torch.testing.assert_close(momentum_direction(opt), 0.9 * g1 + g2)  # optimizer order

    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.99))
    g1 = _step(model, opt, x, y)
    torch.testing.assert_close(momentum_direction(opt, model), 0.2 * g1)  # exp_avg = (1-b1) g


def test_momentum_direction_wrapper_missing_state_and_errors():
    x, y = classification_data()
    model = mlp()
    # an optimizer over the first layer only: the rest gets zeros
    base = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.5)

    class Wrapper(torch.optim.Optimizer):  # SAM-style: state lives in base_optimizer
        def __init__(self, base):
            self.base_optimizer = base
            super().__init__(base.param_groups, {})

        def step(self, closure=None):
            return self.base_optimizer.step(closure)

    opt = Wrapper(base)
    g = _step(model, opt, x, y)
    v = momentum_direction(opt, model)
    space = ParameterSpace(model)
    mask = torch.cat([torch.full((p.numel(),), float(i < 2), dtype=torch.float64)
                      for i, p in enumerate(space.params)])
    torch.testing.assert_close(v, g * mask)

    with pytest.raises(ValueError, match="no momentum"):
        momentum_direction(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    opt0 = torch.optim.SGD(model.parameters(), lr=0.1)  # momentum=0: buffer stays None
    _step(model, opt0, x, y)
    with pytest.raises(ValueError, match="no momentum"):
        momentum_direction(opt0, model)
    with pytest.raises(TypeError):
        momentum_direction(object())


def test_interpolation_direction():
    a, b = mlp(seed=0), mlp(seed=1)
    d = interpolation_direction(a, b)
    torch.testing.assert_close(d, ParameterSpace(b).vector() - ParameterSpace(a).vector())
    torch.testing.assert_close(interpolation_direction(a, b.state_dict()), d)
    with pytest.raises(ValueError, match="shape"):
        interpolation_direction(a, mlp(hidden=4))
    with pytest.raises(ValueError, match="no parameter"):
        interpolation_direction(a, {"0.weight": a[0].weight})


def test_pca_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.decomposition")
    base = ParameterSpace(mlp()).vector()
    g = torch.Generator().manual_seed(0)
    # a trajectory with a dominant direction
    u = torch.randn(base.numel(), generator=g, dtype=torch.float64)
    ckpts = []
    for t in range(8):
        m = mlp()
        ParameterSpace(m).copy_(base + t * 0.5 * u + 0.1 * torch.randn(base.numel(), generator=g, dtype=torch.float64))
        ckpts.append(m)
    res = pca_directions(ckpts, k=2)
    assert isinstance(res, PCADirections)
    rows = np.stack([ParameterSpace(m).vector().numpy() for m in ckpts])
    rows = rows - rows[-1]
    ref = sklearn.PCA(n_components=2).fit(rows)
    np.testing.assert_allclose(res.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-8)
    for j in range(2):
        dj = res.directions[j].numpy()
        np.testing.assert_allclose(abs(dj @ ref.components_[j]), 1.0, rtol=1e-8)
        assert abs(np.linalg.norm(dj) - 1) < 1e-12
    assert abs(float(res.directions[0] @ res.directions[1])) < 1e-10
    np.testing.assert_allclose(res.coordinates, rows @ res.directions.numpy().T, atol=1e-10)
    assert res.explained_variance_ratio[0] > 0.9
    # state_dicts with a model template give the same directions
    res2 = pca_directions([m.state_dict() for m in ckpts], k=2, model=ckpts[0])
    torch.testing.assert_close(res2.directions, res.directions)
    d = res.to_dict()
    assert d["directions"][0]["numel"] == base.numel()


def test_pca_errors():
    with pytest.raises(ValueError, match="at least 2"):
        pca_directions([mlp()])
    with pytest.raises(ValueError, match="exceeds"):
        pca_directions([mlp(seed=0), mlp(seed=1)], k=2)
    with pytest.raises(ValueError, match="identical"):
        pca_directions([mlp(seed=0), mlp(seed=0), mlp(seed=0)], k=1)
    with pytest.raises(ValueError, match="k must"):
        pca_directions([mlp(seed=0), mlp(seed=1)], k=0)


def test_momentum_direction_of_the_msam_optimizers():
    msam_mod = pytest.importorskip("msam.msam")
    sam_mod = pytest.importorskip("msam.sam")
    x, y = classification_data()

    model = mlp()
    opt = msam_mod.MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.0)  # rho=0: plain SGD
    g1 = _step(model, opt, x, y)
    torch.testing.assert_close(momentum_direction(opt, model), g1)

    model = mlp()
    sam = sam_mod.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    F.cross_entropy(model(x), y).backward()
    sam.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    g_adv = ParameterSpace(model).grad_vector()  # the gradient at the ascent point
    sam.second_step(zero_grad=True)
    torch.testing.assert_close(momentum_direction(sam, model), g_adv)  # base SGD: v_1 = g

    adamw_mod = pytest.importorskip("msam.adamw_msam")
    model = mlp()
    opt = adamw_mod.AdamWMSAM(model.parameters(), lr=0.01, betas=(0.8, 0.99), rho=0.0)
    g1 = _step(model, opt, x, y)
    torch.testing.assert_close(momentum_direction(opt, model), 0.2 * g1)  # exp_avg = (1-b1) g


def test_gradient_direction_in_train_mode_leaves_batchnorm_statistics_alone():
    from analysis import gradient_direction
    from tests.models import cnn_bn, image_data

    model = cnn_bn()
    x, y = image_data()
    before = {k: v.clone() for k, v in model.named_buffers()}
    gradient_direction(model, "cross_entropy", (x, y), mode="train")
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k


def test_gradient_direction_checks_the_first_batch_and_orthogonalize_types():
    # issue 15 items 13/14: float class targets failed deep inside cross_entropy
    model = mlp()
    x, y = classification_data(n=12)
    snap = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"gradient_direction\(\): cross_entropy needs integer class"):
        gradient_direction(model, "cross_entropy", (x, y.double()))
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\).*got 9"):
        gradient_direction(model, "cross_entropy", (x, y + 9))
    with pytest.raises(ValueError, match=r"forward pass failed on batch 0 \(inputs float64 \(12, 2\)"):
        gradient_direction(model, "cross_entropy", (x[:, :2], y))
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snap))
    with pytest.raises(TypeError, match="against must be a flat tensor or a list of them, got NoneType"):
        orthogonalize(torch.ones(3, dtype=torch.float64), None)
