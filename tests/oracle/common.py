"""Models, data and helpers of the cross-library tests (float64)."""

from __future__ import annotations

import torch
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(),
                         nn.Linear(6, 3)).double().eval()


class SmallCNN(nn.Module):
    """Conv -> BatchNorm (eval mode, non-trivial running statistics) -> ReLU -> linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def cnn() -> nn.Module:
    torch.manual_seed(1)
    m = SmallCNN().double()
    with torch.no_grad():
        m.bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
        m.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
        m.bn.weight.copy_(torch.tensor([1.2, 0.8, -0.9]))
        m.bn.bias.copy_(torch.tensor([0.1, 0.0, -0.2]))
    return m.eval()


def batches(shape, sizes=(5, 3, 2), classes=3, seed=0):
    """Uneven classification batches (sizes 5, 3, 2), float64 inputs."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return list(zip(x.split(list(sizes)), y.split(list(sizes))))


def counted_tokens(labels: torch.Tensor) -> int:
    """Next-token targets of a ``(B, T)`` label tensor that count (not -100)."""
    return int((labels[:, 1:] != -100).sum())


def shifted_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum (not the mean) of the next-token cross-entropy over counted tokens."""
    v = logits.shape[-1]
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1),
                                       ignore_index=-100, reduction="sum")


def flat_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return float((a - b).norm() / b.norm())
