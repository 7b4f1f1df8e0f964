"""The sharpness package after the split: the shared cost fields, the one
direction validator, the one Gram-Schmidt pass and the one loss-along-a-line loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from analysis import (
    DirectionalSharpnessResult,
    EpsilonSharpnessResult,
    PacBayesResult,
    ParameterSpace,
    SharpnessResult,
    directional_sharpness,
)
from analysis.directions import as_direction, normalize_direction, orthogonalize, project_out
from analysis.results import COST_FIELDS, CostedResult
from analysis.sharpness import loss_along_line
from tests.models import Quadratic, mlp, quadratic_loss, random_spd

DT = torch.float64

# the field order JSON consumers and the tests rely on (written out, not derived)
FIELDS = {
    SharpnessResult: (
        "value", "stderr", "loss", "perturbed_loss", "kind", "rho", "adaptive", "norm", "m",
        "steps", "samples", "seed", "mode", "num_batches", "num_samples", "batch_values",
        "forward_passes", "backward_passes", "forward_samples", "backward_samples", "restarts",
        "lower_bound", "num_terms", "batch_terms", "stderr_reason"),
    EpsilonSharpnessResult: (
        "value", "loss", "max_loss", "epsilon", "method", "steps", "seed", "mode", "num_samples",
        "forward_passes", "backward_passes", "forward_samples", "backward_samples",
        "data_stderr", "data_sampling"),
    PacBayesResult: (
        "flatness", "sigma", "deviation", "accuracy", "magnitude_aware", "target", "draws", "seed",
        "mode", "evaluations", "num_samples", "forward_passes", "backward_passes",
        "forward_samples", "backward_samples", "accuracy_unit", "data_stderr", "data_sampling"),
    DirectionalSharpnessResult: (
        "radii", "values", "losses", "loss", "direction_norm", "mode", "num_samples",
        "forward_passes", "backward_passes", "forward_samples", "backward_samples",
        "data_stderr", "data_sampling"),
}


@pytest.mark.parametrize("cls", list(FIELDS), ids=lambda c: c.__name__)
def test_result_fields_keep_their_order(cls):
    assert tuple(f.name for f in dataclasses.fields(cls)) == FIELDS[cls]
    assert issubclass(cls, CostedResult)


def test_cost_fields_go_after_the_required_fields_and_before_the_defaulted_ones():
    @dataclasses.dataclass(frozen=True, repr=False)
    class Demo(CostedResult):
        a: float
        b: int
        c: bool = False

    assert [f.name for f in dataclasses.fields(Demo)] == ["a", "b", *COST_FIELDS, "c"]
    r = Demo(1.5, 2, forward_passes=3, backward_passes=4, forward_samples=5, backward_samples=6)
    assert list(r.to_dict()) == ["a", "b", *COST_FIELDS, "c"]
    assert r.to_dict()["backward_samples"] == 6 and r.c is False
    with pytest.raises(TypeError):
        Demo(1.5, 2)  # the cost fields are required

    @dataclasses.dataclass(frozen=True, repr=False)
    class Child(Demo):  # inherited once, not added a second time
        d: int = 0

    assert [f.name for f in dataclasses.fields(Child)] == ["a", "b", *COST_FIELDS, "c", "d"]


def test_directional_result_counts_the_passes():
    model = Quadratic(random_spd(4, seed=1), w0=torch.ones(4, dtype=DT))
    res = directional_sharpness(model, quadratic_loss, (torch.zeros(6, 1, dtype=DT),
                                                        torch.zeros(6, dtype=DT)),
                                torch.ones(4, dtype=DT), [0.5, 1.0], batch_size=4,
                                data_stderr=False)
    # (1 + 2 radii) points x 2 batches (4 + 2 samples), no backward pass
    assert (res.forward_passes, res.forward_samples) == (6, 18)
    assert (res.backward_passes, res.backward_samples) == (0, 0)


# ------------------------------------------------------------------------------------------
# the one direction validator
# ------------------------------------------------------------------------------------------
def test_as_direction_accepts_flat_list_dict_and_numpy_forms():
    model = mlp(seed=2)
    space = ParameterSpace(model)
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(space.numel, generator=g, dtype=DT)
    parts = [t.clone() for t in space.unflatten(flat)]
    named = dict(zip(space.names, parts))
    for form in (flat, parts, tuple(parts), named, flat.numpy(), [p.numpy() for p in parts]):
        out = as_direction(form, space)
        assert out.dtype == space.dtype and out.is_contiguous()
        assert torch.equal(out, flat.to(space.dtype))
    assert torch.equal(as_direction(flat[::1], space), flat)


def test_as_direction_refuses_bad_input_with_one_line():
    model = mlp(seed=2)
    space = ParameterSpace(model)
    n = space.numel
    with pytest.raises(TypeError, match="list that is not all tensors"):
        as_direction(torch.ones(n).tolist(), space)
    with pytest.raises(TypeError, match="got str"):
        as_direction("d", space)
    with pytest.raises(TypeError, match="floating point"):
        as_direction(torch.ones(n, dtype=torch.int64), space)
    with pytest.raises(ValueError, match=rf"my_dir has shape \({n + 1},\)"):
        as_direction(torch.ones(n + 1), space, "my_dir")
    with pytest.raises(ValueError, match="missing .*unexpected \\['nope'\\]"):
        as_direction({"nope": torch.ones(3)}, space)
    with pytest.raises(ValueError, match="non-finite"):
        as_direction(torch.full((n,), float("nan")), space)
    zero = torch.zeros(n)
    assert torch.equal(as_direction(zero, space), zero.to(space.dtype))  # allowed by default
    with pytest.raises(ValueError, match="zero vector .*zero norm.*; a slice needs one"):
        as_direction(zero, space, nonzero="a slice needs one")


def test_normalize_direction_now_refuses_non_finite_directions():
    model = mlp(seed=2)
    n = ParameterSpace(model).numel
    with pytest.raises(ValueError, match="non-finite"):
        normalize_direction(torch.full((n,), float("inf"), dtype=DT), model)


# ------------------------------------------------------------------------------------------
# the one Gram-Schmidt pass
# ------------------------------------------------------------------------------------------
def test_project_out_matches_a_qr_projector():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(9, 3, generator=g, dtype=DT)
    q, _ = torch.linalg.qr(a)
    d = torch.randn(9, generator=g, dtype=DT)
    expected = d - q @ (q.T @ d)
    got = project_out(d, list(q.T))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(orthogonalize(d, list(a.T)), expected, rtol=0, atol=1e-13)
    assert torch.equal(project_out(d, []), d)


# ------------------------------------------------------------------------------------------
# the one loss-along-a-line loop
# ------------------------------------------------------------------------------------------
def test_loss_along_line_on_a_quadratic():
    A = random_spd(4, seed=5)
    w0 = torch.tensor([0.3, -0.2, 1.0, 0.5], dtype=DT)
    d = torch.tensor([2.0, 0.0, -1.0, 1.0], dtype=DT)
    calls = []

    def loss_at(delta, where):
        calls.append(where)
        w = w0 if delta is None else w0 + delta
        return float(0.5 * w @ A @ w)

    radii = [-1.0, 0.5, 2.0]
    l0, losses, dn = loss_along_line(loss_at, d, radii)
    u = d / d.norm()
    assert l0 == pytest.approx(float(0.5 * w0 @ A @ w0), abs=1e-15)
    for r, li in zip(radii, losses):
        assert li == pytest.approx(float(0.5 * (w0 + r * u) @ A @ (w0 + r * u)), abs=1e-13)
    assert dn == pytest.approx(float(d.norm()), abs=1e-15)
    assert len(calls) == 4 and "radius 2 along the direction" in calls[-1]
    # unnormalized, with a known origin: no evaluation at w
    calls.clear()
    l0b, raw, _ = loss_along_line(loss_at, d, radii, normalize=False, origin=7.0)
    assert l0b == 7.0 and len(calls) == 3
    for r, li in zip(radii, raw):
        assert li == pytest.approx(float(0.5 * (w0 + r * d) @ A @ (w0 + r * d)), abs=1e-13)
    with pytest.raises(ValueError, match="the momentum direction has zero norm"):
        loss_along_line(loss_at, torch.zeros(4, dtype=DT), radii, what="momentum direction")


def test_directional_sharpness_unnormalized_is_the_plain_slice():
    A = random_spd(5, seed=9)
    w0 = torch.linspace(-1, 1, 5, dtype=DT)
    model = Quadratic(A, w0=w0)
    d = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5], dtype=DT)
    radii = np.array([-0.5, 0.0, 0.3])
    data = (torch.zeros(8, 1, dtype=DT), torch.zeros(8, dtype=DT))
    res = directional_sharpness(model, quadratic_loss, data, d, radii, normalize=False)
    g = A @ w0
    for r, v in zip(radii, res.values):  # r g.d + r^2/2 d.A.d
        assert v == pytest.approx(r * float(g @ d) + 0.5 * r * r * float(d @ A @ d), abs=1e-12)
    with pytest.raises(TypeError, match="normalize"):
        directional_sharpness(model, quadratic_loss, data, d, radii, normalize="no")
    with pytest.raises(ValueError, match=r"zero vector \(zero norm\); directional sharpness is undefined"):
        directional_sharpness(model, quadratic_loss, data, torch.zeros(5, dtype=DT), radii)
