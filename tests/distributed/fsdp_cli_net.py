"""Models and data named on the command line by tests/distributed/test_fsdp_cli.py: a net with
a stack of two identical blocks (``--fsdp`` shards each block, then the root), float64, and one
that ``fully_shard`` refuses (a scalar parameter)."""

from __future__ import annotations

import torch
from torch import nn

N_SAMPLES, BATCH = 48, 6  # 8 batches: 4 per rank on 2 ranks


class BlockNet(nn.Module):
    """``Linear(6, 5)``, two ``Linear(5, 5) + tanh`` blocks, ``Linear(5, 3)`` (float64); every
    tensor splits unevenly over 2 ranks (5 and 3 rows)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.inp = nn.Linear(6, 5)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(5, 5), nn.Tanh()) for _ in range(2))
        self.out = nn.Linear(5, 3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class ScalarNet(BlockNet):
    """:class:`BlockNet` with a scalar temperature, a 0-d parameter ``fully_shard`` cannot shard."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / self.temperature


def build() -> nn.Module:
    return BlockNet()


def build_scalar() -> nn.Module:
    return ScalarNet()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    from tests.models import classification_data

    return classification_data(n=N_SAMPLES, d=6, classes=3, seed=7)
