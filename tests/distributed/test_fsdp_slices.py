"""Random directions and loss slices of an FSDP2-sharded model on 2 gloo ranks: the one-process
directions (gathered) and losses, filter norms equal to the weights', the loss by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.distributed import fsdp_cli_workers as W
from tests.distributed.launcher import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_sharded_directions_and_slices_equal_one_process():
    from analysis import ParameterSpace
    from tests.distributed.fsdp_workers import make_model
    from tests.models import classification_data

    one = W.slice_checks(0, 1)
    two = [o.value for o in run_ranks(W.slice_checks, 2, deadline=220)]
    n = one["full_numel"]
    assert [t["full_numel"] for t in two] == [n, n]
    assert sum(t["local_numel"] for t in two) == n and two[0]["local_numel"] < n
    for key in ("filter", "layer", "model", "d1", "d2"):
        for r in (0, 1):  # every rank gathers the one-process direction
            torch.testing.assert_close(two[r][key], one[key], rtol=0, atol=1e-15)
    for key in ("filter-slice", "layer-slice", "model-slice", "plane"):
        for r in (0, 1):
            np.testing.assert_allclose(two[r][key], one[key], rtol=1e-12)
    cos = float(one["d1"] @ one["d2"]) / float(one["d1"].norm() * one["d2"].norm())
    assert abs(cos) < 1e-12  # orthogonal_to, over all shards
    # filter normalization, closed form: every row of d has the norm of the row of w
    model = make_model()
    space = ParameterSpace(model)
    for d, w in zip(space.unflatten(one["filter"]), space.params):
        if w.dim() > 1:
            torch.testing.assert_close(d.norm(dim=1), w.detach().norm(dim=1), rtol=1e-12, atol=0)
        else:
            assert not d.any()  # biases ignored (biasbn)
    # the slice's loss by hand at alpha = 0.5: w + 0.5 d in a plain copy
    x, y = classification_data(n=16, d=6, classes=3, seed=4)
    with torch.no_grad():
        space.add_(one["filter"], alpha=0.5)
        assert one["filter-slice"][2] == pytest.approx(F.cross_entropy(model(x), y).item(),
                                                       rel=1e-12)
    for r in (0, 1):  # the sharded weights are restored bit for bit
        assert all(torch.equal(a, b) for a, b in zip(two[r]["after"], _local(two[r], r)))


def _local(row, rank):
    """This rank's rows of the initial weights (torch.chunk over 2 ranks)."""
    from analysis import ParameterSpace
    from tests.distributed.fsdp_workers import make_model

    out = []
    for w in ParameterSpace(make_model()).params:
        out.append(w.detach().chunk(2, dim=0)[rank])
    return out
