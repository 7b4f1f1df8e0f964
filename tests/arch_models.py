"""Tiny, seeded instances of the reference architectures of :mod:`landscape.models`.

Small enough for a dense float64 Hessian reference (a few hundred parameters):

- :func:`resnet`: a two-stage :class:`~landscape.models.ResNet` (``BasicBlock``, BatchNorm, a
  strided stage with a 1x1 downsample shortcut) on CIFAR-shaped ``3 x 8 x 8`` images, with the
  BatchNorm statistics of :func:`image_data`;
- :func:`vit`: a one-block :class:`~landscape.models.ViT` on the same images;
- :func:`causal_lm`: a one-block :class:`~landscape.models.GPT` on padded sequences (targets
  ``-100`` at padding);
- :func:`hf_gpt2`: a Hugging Face ``GPT2LMHeadModel`` of the same size (needs ``transformers``).

Named by the CLI tests as ``tests.arch_models:resnet`` and ``tests.arch_models:image_data``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from landscape import models as M
from landscape.models import BasicBlock, ResNet, ViT  # noqa: F401
from landscape.models import GPTBlock as Block  # noqa: F401  (the old names stay importable)

CLASSES = 4
IMAGE = 8  # 3 x 8 x 8 images
VOCAB = 11
SEQ = 6
PAD = 0
IGNORE = M.IGNORE_INDEX
_TINY_LM = {"vocab_size": VOCAB, "max_len": SEQ, "dim": 8, "depth": 1, "heads": 2}


def image_data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` CIFAR-shaped 3 x 8 x 8 images in :data:`CLASSES` classes."""
    return M.image_data(n, num_classes=CLASSES, image_size=IMAGE)


def resnet() -> nn.Module:
    """The tiny ResNet with BatchNorm statistics of :func:`image_data` (eval mode is meaningful)."""
    torch.manual_seed(0)
    net = ResNet(widths=(2, 4), blocks=(1, 1), num_classes=CLASSES)
    x, _ = image_data()
    net.train()
    with torch.no_grad():  # running statistics of the data, as after training
        for _ in range(3):
            net(x)
    return net.eval()


def tiny_vit(dim: int = 8, heads: int = 2, depth: int = 1, patch: int = 4) -> ViT:
    """A ViT on 8 x 8 images (ReLU MLP of width ``2 dim``), unseeded."""
    return ViT(image_size=IMAGE, patch_size=patch, num_classes=CLASSES, dim=dim, depth=depth,
               heads=heads, mlp_ratio=2, activation="relu")


def vit() -> nn.Module:
    torch.manual_seed(0)
    return tiny_vit().eval()


def TinyGPT() -> M.GPT:  # noqa: N802  (the old class name)
    """A one-block GPT of width 8 over :data:`VOCAB` tokens (MLP width 16), unseeded."""
    return M.GPT(**_TINY_LM, mlp_ratio=2)


def causal_lm() -> nn.Module:
    torch.manual_seed(0)
    return TinyGPT().eval()


def lm_sequences(n: int = 12, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded sequences of lengths 2..:data:`SEQ` over :data:`VOCAB` tokens, and the mask."""
    return M.lm_sequences(n, vocab_size=VOCAB, max_len=SEQ, seed=seed)


def lm_data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, targets)``: targets are the next token, ``-100`` at padding and the last position."""
    return M.lm_data(n, vocab_size=VOCAB, max_len=SEQ)


def hf_batches(sizes: tuple[int, ...] = (5, 3, 4)) -> list[dict[str, torch.Tensor]]:
    """The :func:`lm_sequences` as batch dicts of uneven sizes (``input_ids``,
    ``attention_mask``, ``labels``)."""
    return M.lm_batches(sizes, vocab_size=VOCAB, max_len=SEQ)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-padding targets (a user-written LM loss)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE)


def hf_gpt2(attn_implementation: str = "sdpa") -> nn.Module:
    """A 1-layer ``GPT2LMHeadModel`` with 8-dim embeddings over :data:`VOCAB` tokens."""
    torch.manual_seed(0)
    return M.hf_gpt2(**_TINY_LM, attn_implementation=attn_implementation)


class LogitsOf(nn.Module):
    """``model(ids).logits``: the user glue a Hugging Face model needs without built-in adapters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def hf_gpt2_logits() -> nn.Module:
    return LogitsOf(hf_gpt2())


def hf_gpt2_eager_logits() -> nn.Module:
    """The same with ``attn_implementation="eager"`` (matmul + softmax attention)."""
    return LogitsOf(hf_gpt2("eager"))
