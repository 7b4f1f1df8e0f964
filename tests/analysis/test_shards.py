"""VectorShards on one process: its draws are slices of one process's draws, and its layout
helpers (the distributed behaviour is in tests/distributed/test_fsdp_analysis.py)."""

from __future__ import annotations

import pytest
import torch

from analysis.shards import DRAW_CHUNK, VectorShards, has_dtensor_parameters
from tests.models import mlp


def _index(shards: VectorShards) -> torch.Tensor:
    return torch.cat([torch.arange(off, off + length) for off, length in shards.segments])


@pytest.mark.parametrize("n, segments", [
    (73, ((0, 5), (10, 20), (40, 33))),
    (17, ((16, 1),)),
    # several chunks, a segment across a chunk boundary, a short tail merged into the last chunk
    (2 * DRAW_CHUNK + 7, ((3, 10), (DRAW_CHUNK - 4, 9), (2 * DRAW_CHUNK - 2, 9))),
])
def test_draws_are_slices_of_one_process_draws(n, segments):
    shards = VectorShards(segments, n)
    idx = _index(shards)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    full = torch.randn(n, generator=g1, dtype=torch.float64)
    assert torch.equal(shards.randn(g2), full[idx])
    signs = torch.randint(0, 2, (3, n), generator=g1, dtype=torch.int8)
    assert torch.equal(shards.randint(3, g2), signs[:, idx])
    # the generators advanced alike: the next draws agree
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_layout_checks_and_helpers():
    shards = VectorShards(((2, 3), (8, 2)), 10)
    assert shards.local_numel == 5 and shards.world_size == 1
    v = torch.tensor([1.0, -4.0, 2.0, 4.0, 0.5], dtype=torch.float64)
    assert shards.largest_entry_sign(v) == -1.0  # the first entry of largest magnitude
    assert torch.equal(shards.full(v), torch.tensor([0, 0, 1, -4, 2, 0, 0, 0, 4, 0.5],
                                                    dtype=torch.float64))
    assert shards.sum(2.5) == 2.5
    with pytest.raises(ValueError, match="out of order"):
        VectorShards(((5, 3), (2, 1)), 10)
    with pytest.raises(ValueError, match="outside"):
        VectorShards(((8, 3),), 10)


def test_orthonormal_on_one_rank_spans_the_columns():
    Y = torch.randn(30, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Q = VectorShards(((0, 30),), 30).orthonormal(Y)
    torch.testing.assert_close(Q.T @ Q, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(Q @ (Q.T @ Y), Y)


def test_plain_models_are_not_sharded():
    assert not has_dtensor_parameters(mlp())
    assert not has_dtensor_parameters(None)


def test_hessian_operator_keeps_its_signature_and_class_for_plain_models():
    """HessianOperator's __new__ dispatches DTensor models to ShardedHessianOperator; a plain
    model still gets a HessianOperator, and inspect shows __init__'s arguments."""
    import copy
    import inspect

    from analysis import HessianOperator
    from tests.models import classification_data

    params = list(inspect.signature(HessianOperator).parameters)
    assert params[:3] == ["model", "loss_fn", "data"] and "method" in params
    op = HessianOperator(mlp(), "cross_entropy", classification_data(n=8))
    assert type(op) is HessianOperator and type(copy.deepcopy(op)) is HessianOperator
