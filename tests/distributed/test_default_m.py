"""Under sharding, sharpness's default m is the same on every rank (the smallest shard's size,
capped at 128), so the all-reduced batch statistics combine batches of one size."""

from __future__ import annotations

import pytest

from tests.distributed.launcher import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def default_m_worker(rank: int, world: int) -> tuple[int, int, int]:
    import torch
    from torch import nn

    from analysis import sharpness
    from analysis.data import as_data

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 3, generator=g), torch.randint(0, 2, (50,), generator=g)
    source = as_data((x, y), batch_size=8, shard=True)  # batch i -> rank i % 2: 26 and 24
    res = sharpness(model, "cross_entropy", source, rho=0.05, kind="average", samples=2,
                    progress=False)
    return source.num_samples(), res.m, res.num_batches


def test_default_m_is_the_smallest_shard():
    out = [o.value for o in run_ranks(default_m_worker, 2, deadline=100)]
    assert [o[0] for o in out] == [26, 24]
    assert [o[1] for o in out] == [24, 24]
    assert [o[2] for o in out] == [2, 2]  # one batch of 24 per rank, all-reduced: 2 in total
