"""Models and data of the scale benchmark (``benchmarks/scale.py``), written here so every tool
runs on exactly the same weights and batches (no torchvision, no downloads).

* :func:`resnet18`: the CIFAR variant of ResNet-18 (3x3 stem, no max-pool, BasicBlocks
  [2, 2, 2, 2] of 64-512 channels, BatchNorm, global average pool, linear head): 11.17M
  parameters at ``width=64``; ``width`` scales every channel count (for quick runs).
* :func:`gpt`: a small GPT-style causal LM (token + position embeddings, pre-norm blocks with
  causal ``F.scaled_dot_product_attention`` and a GELU MLP, final LayerNorm, tied head).
* :class:`ShiftedCE`: next-token cross-entropy, the mean over the ``B * (T - 1)`` shifted tokens,
  as an ``nn.Module`` with ``reduction = "mean"`` (curvlinops reads that attribute). The
  benchmark's sequences have no padding, so it equals ``analysis``' ``"lm"`` loss and every
  tool's batch weighting (samples, tokens or equal per batch) gives the same matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNet18(nn.Module):
    def __init__(self, width: int = 64, classes: int = 10):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]),
                                  nn.ReLU())
        layers, cin = [], w[0]
        for i, c in enumerate(w):
            layers += [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
            cin = c
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(w[3], classes)

    def forward(self, x):
        h = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def resnet18(width: int = 64, classes: int = 10) -> ResNet18:
    """The CIFAR ResNet-18 (11,173,962 parameters at ``width=64``, 10 classes)."""
    return ResNet18(width, classes)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h):
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.ln2(h))


class GPT(nn.Module):
    """``forward(input_ids) -> (B, T, vocab)`` logits."""

    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 4, heads: int = 4,
                 max_len: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)

    def forward(self, input_ids):
        t = input_ids.shape[1]
        h = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        h = self.ln(self.blocks(h))
        return h @ self.tok.weight.T / math.sqrt(h.shape[-1])


def gpt(vocab: int = 512, d: int = 128, layers: int = 4, heads: int = 4, max_len: int = 64) -> GPT:
    """A small GPT-style causal LM (about 0.9M parameters with the defaults)."""
    return GPT(vocab, d, layers, heads, max_len)


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
