"""Models and data of the scale benchmark (``benchmarks/scale.py``): the project's reference
models (:mod:`landscape.models`), saved once so every tool runs on exactly the same weights and
batches (no torchvision, no downloads).

* :func:`resnet18`: :func:`landscape.models.resnet` at depth 18, the CIFAR variant (3x3 stem,
  no max-pool, BasicBlocks [2, 2, 2, 2] of 64-512 channels, BatchNorm, global average pool,
  linear head): 11.17M parameters at ``width=64``; ``width`` scales every channel count.
* :func:`gpt`: :func:`landscape.models.gpt`, a small GPT-style causal LM (token + position
  embeddings, pre-norm causal blocks, tied head).
* :class:`ShiftedCE`: next-token cross-entropy, the mean over the ``B * (T - 1)`` shifted tokens,
  as an ``nn.Module`` with ``reduction = "mean"`` (curvlinops reads that attribute). The
  benchmark's sequences have no padding, so it equals ``analysis``' ``"lm"`` loss and every
  tool's batch weighting (samples, tokens or equal per batch) gives the same matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from landscape.models import gpt as landscape_gpt
from landscape.models import resnet


def resnet18(width: int = 64, classes: int = 10) -> nn.Module:
    """The CIFAR ResNet-18 of :func:`landscape.models.resnet` (11,173,962 parameters at
    ``width=64``, 10 classes)."""
    return resnet(18, width=width, num_classes=classes)


def gpt(vocab: int = 512, d: int = 128, layers: int = 4, heads: int = 4, max_len: int = 64) -> nn.Module:
    """The GPT-style causal LM of :func:`landscape.models.gpt` (``forward(input_ids)`` -> logits)."""
    return landscape_gpt(vocab, max_len, d, layers, heads)


class ShiftedCE(nn.Module):
    """Next-token cross-entropy ``(logits (B, T, V), labels (B, T)) -> mean over B (T - 1)``."""

    reduction = "mean"

    def forward(self, logits, labels):
        v = logits.shape[-1]
        return F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1))


def cifar_like(samples: int, classes: int = 10, seed: int = 0):
    """CIFAR-shaped ``(samples, 3, 32, 32)`` inputs with class structure (class-dependent mean
    images plus noise, so a few SGD steps give the usual outlier spectrum) and labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(samples) % classes
    means = torch.randn(classes, 3, 32, 32, generator=g)
    x = 0.5 * means[y] + torch.randn(samples, 3, 32, 32, generator=g)
    return x, y


def token_data(samples: int, t: int, vocab: int, seed: int = 0):
    """Sequences from a random sparse bigram chain (learnable, unpadded): ``(ids, ids)``."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(0, vocab, (vocab, 4), generator=g)
    ids = torch.empty(samples, t, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (samples,), generator=g)
    for j in range(1, t):
        pick = torch.randint(0, 4, (samples,), generator=g)
        ids[:, j] = nxt[ids[:, j - 1], pick]
    return ids, ids.clone()
