"""A Vision Transformer (Dosovitskiy et al., 2021) for small images.

Patch embedding (a strided convolution), a learned class token and learned positions, pre-norm
transformer blocks (``nn.TransformerEncoderLayer(norm_first=True)``: LayerNorm,
``nn.MultiheadAttention``, residual; LayerNorm, MLP, residual), a final LayerNorm and a linear
head on the class token. No dropout, so the loss is a fixed function of the weights. Every
block is initialized on its own (``nn.TransformerEncoder`` would copy one initialization into
all of them).

Reference: A. Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale", ICLR 2021.
"""

from __future__ import annotations

import torch
from torch import nn

from ._args import choice_arg, divisible, float_arg, int_arg


class ViT(nn.Module):
    """Patch embedding + class token + positions + pre-norm encoder blocks + LayerNorm + head.

    With ``N = (image_size / patch_size)^2`` patches, ``d = dim``, ``m = int(mlp_ratio d)``,
    ``C`` input channels and ``K`` classes it has
    ``(C p^2 + 1) d + d + (N + 1) d + depth (4 d^2 + 2 d m + 9 d + m) + 2 d + (d + 1) K``
    parameters.

    Args:
        image_size: height and width of the (square) input images.
        patch_size: side of the square patches; must divide ``image_size``.
        in_channels: channels of the input images.
        num_classes: outputs of the head.
        dim: embedding width ``d``; must be divisible by ``heads``.
        depth: number of transformer blocks.
        heads: attention heads per block.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        activation: ``"gelu"`` (ViT's) or ``"relu"``.

    Raises:
        TypeError / ValueError: a size that is not a positive integer, ``patch_size`` not dividing
            ``image_size``, ``dim`` not divisible by ``heads``, ``mlp_ratio`` not positive, an
            unknown ``activation``.
    """

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3,
                 num_classes: int = 10, dim: int = 192, depth: int = 12, heads: int = 3,
                 mlp_ratio: float = 4.0, activation: str = "gelu"):
        super().__init__()
        image_size = int_arg("image_size", image_size, 1)
        patch_size = int_arg("patch_size", patch_size, 1)
        divisible("image_size", image_size, "patch_size", patch_size)
        dim, heads = int_arg("dim", dim, 1), int_arg("heads", heads, 1)
        divisible("dim", dim, "heads", heads)
        depth = int_arg("depth", depth, 1)
        hidden = max(1, int(float_arg("mlp_ratio", mlp_ratio, 0.0) * dim))
        activation = choice_arg("activation", activation, ("gelu", "relu"))
        self.patch = nn.Conv2d(int_arg("in_channels", in_channels, 1), dim, patch_size,
                               stride=patch_size)
        n = (image_size // patch_size) ** 2
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n + 1, dim))
        self.encoder = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=hidden, dropout=0.0,
                                       activation=activation, batch_first=True, norm_first=True)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, int_arg("num_classes", num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1) + self.pos
        for block in self.encoder:
            t = block(t)
        return self.head(self.norm(t[:, 0]))


def vit(image_size: int = 32, patch_size: int = 4, num_classes: int = 10, *, dim: int = 192,
        depth: int = 12, heads: int = 3, mlp_ratio: float = 4.0, in_channels: int = 3) -> ViT:
    """A ViT for CIFAR-shaped images; the defaults are ViT-Tiny's width (192), depth (12) and
    heads (3) on 4x4 patches of 32x32 images (64 patches): 5,362,762 parameters.

    ``vit(dim=64, depth=2, heads=2)`` has 108,106 parameters; see :class:`ViT` for the
    formula.

    Args:
        image_size: height and width of the input images.
        patch_size: side of the square patches; must divide ``image_size``.
        num_classes: outputs of the head.
        dim: embedding width; must be divisible by ``heads``.
        depth: number of transformer blocks.
        heads: attention heads per block.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        in_channels: channels of the input images.

    Raises:
        TypeError / ValueError: as :class:`ViT`.

    Example:
        >>> net = vit(dim=64, depth=2, heads=2).eval()
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return ViT(image_size, patch_size, in_channels, num_classes, dim, depth, heads, mlp_ratio)
