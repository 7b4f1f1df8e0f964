"""Tiny models and data shared by the tests (float64 by default for reference comparisons)."""

from __future__ import annotations

import torch
from torch import nn


def classification_data(n: int = 48, d: int = 6, classes: int = 3, *, seed: int = 0,
                        dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (X, y) pair with class-index targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def image_data(n: int = 24, channels: int = 2, size: int = 5, classes: int = 3, *, seed: int = 0,
               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def mlp(d: int = 6, hidden: int = 5, classes: int = 3, *, seed: int = 0,
        dtype: torch.dtype = torch.float64, activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """A two-layer MLP (smooth activation by default so Hessians are well defined)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), activation(), nn.Linear(hidden, classes)).to(dtype)


def relu_mlp(d: int = 6, hidden: int = 8, classes: int = 3, *, seed: int = 0,
             dtype: torch.dtype = torch.float64) -> nn.Sequential:
    return mlp(d, hidden, classes, seed=seed, dtype=dtype, activation=nn.ReLU)


def cnn_bn(channels: int = 2, classes: int = 3, *, seed: int = 0,
           dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """A tiny CNN with BatchNorm (put it in eval mode for deterministic curvature)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(channels, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, classes),
    ).to(dtype)
    # non-trivial running statistics
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model


class TiedFrozen(nn.Module):
    """A model with a tied weight (used twice) and a frozen layer."""

    def __init__(self, d: int = 5, classes: int = 3, dtype: torch.dtype = torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(d, d).to(dtype)
        self.frozen = nn.Linear(d, d).to(dtype)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(d, classes).to(dtype)

    def forward(self, x):
        h = torch.tanh(self.shared(x))
        h = torch.tanh(self.shared(h))  # the same weights twice
        h = torch.tanh(self.frozen(h))
        return self.head(h)


class Quadratic(nn.Module):
    """L(w) = 0.5 (w - c)^T A (w - c) exactly, ignoring the data: ``forward`` returns the loss
    as a (1, 1) output; use with ``quadratic_loss``."""

    def __init__(self, A: torch.Tensor, c: torch.Tensor | None = None, w0: torch.Tensor | None = None):
        super().__init__()
        n = A.shape[0]
        self.register_buffer("A", A)
        self.register_buffer("c", torch.zeros(n, dtype=A.dtype) if c is None else c)
        self.w = nn.Parameter(torch.zeros(n, dtype=A.dtype) if w0 is None else w0.clone())

    def forward(self, x):
        d = self.w - self.c
        val = 0.5 * d @ self.A @ d
        return val.expand(x.shape[0], 1)


def quadratic_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return outputs.mean()


def random_spd(n: int, *, seed: int = 0, dtype=torch.float64, eigenvalues=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    if eigenvalues is None:
        eigenvalues = torch.linspace(0.1, 5.0, n, dtype=dtype)
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=dtype)) @ q.T


class Diagonal:
    """A diagonal operator in any dtype: its entries are its eigenvalues (the closed-form
    reference), with a product counter."""

    def __init__(self, d: torch.Tensor):
        self.d, self.shape, self.dtype, self.device = d, (d.numel(), d.numel()), d.dtype, d.device
        self.num_matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += 1
        return self.d * v
