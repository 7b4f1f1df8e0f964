"""ResNets for CIFAR-shaped images (He et al., 2016), with torchvision's module layout.

The CIFAR variant of the ImageNet network: a 3x3 stride-1 stem convolution without max-pool,
then four stages of residual blocks whose widths double (``w, 2w, 4w, 8w``) while the
resolution halves (strides 1, 2, 2, 2), global average pooling and a linear head. The blocks
are torchvision's :class:`BasicBlock` (depths 10, 18, 34) and :class:`Bottleneck` (50, 101,
152; ResNet v1.5, stride on the 3x3 convolution), with 1x1-convolution + BatchNorm shortcuts
where the shape changes ("option B"). Module names follow torchvision (``conv1``, ``bn1``,
``layer1`` .. ``layer4``, ``downsample``, ``fc``) and PyTorch's default initialization is kept
(as in the common ``pytorch-cifar`` ResNets). Parameter counts with 10 classes and 3 input
channels, width 64: ResNet-18 11,173,962 (torchvision's ``resnet18`` has 11,689,512 with its
7x7 stem and 1000 classes), ResNet-34 21,282,122, ResNet-50 23,520,842.

Reference: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016.
"""

from __future__ import annotations

import torch
from torch import nn

from ._args import bool_arg, choice_arg, int_arg, ints_arg


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv3x3-BN-ReLU-conv3x3-BN plus the (downsampled) input, ReLU.

    ``9 (inplanes + planes) planes + 4 planes`` parameters, plus ``(inplanes + 2) planes`` for a
    ``downsample`` of a 1x1 convolution and BatchNorm.

    Args:
        inplanes: input channels.
        planes: output channels (``expansion = 1``).
        stride: stride of the first convolution (2 halves the resolution).
        downsample: the shortcut's module when the shape changes (``None``: identity).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (v1.5): conv1x1-BN-ReLU, conv3x3 (stride)-BN-ReLU,
    conv1x1 to ``4 planes``-BN, plus the (downsampled) input, ReLU.

    Args:
        inplanes: input channels.
        planes: bottleneck channels; the output has ``expansion * planes = 4 planes``.
        stride: stride of the 3x3 convolution.
        downsample: the shortcut's module when the shape changes (``None``: identity).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem (+BN, ReLU), residual stages, average pool, linear head.

    Stage ``i`` has ``blocks[i]`` blocks of width ``widths[i]`` (a :class:`Bottleneck` stage
    outputs ``4 widths[i]`` channels); the first block of every stage after the first has
    stride 2, and a 1x1 convolution + BatchNorm shortcut wherever the shape changes. Stages are
    the modules ``layer1``, ``layer2``, ... (``nn.Sequential`` of blocks). Any input resolution
    works (global average pooling).

    Args:
        widths: the stages' widths, e.g. ``(64, 128, 256, 512)``.
        blocks: blocks per stage, as many as ``widths``, e.g. ``(2, 2, 2, 2)`` (ResNet-18).
        bottleneck: :class:`Bottleneck` blocks instead of :class:`BasicBlock`.
        num_classes: outputs of the linear head.
        in_channels: channels of the input images.

    Raises:
        TypeError / ValueError: a width, block count, ``num_classes`` or ``in_channels`` that is
            not a positive integer, or ``widths`` and ``blocks`` of different lengths.

    Example:
        >>> net = ResNet(widths=(4, 8), blocks=(1, 1), num_classes=4)   # a tiny two-stage net
        >>> net(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...], *,
                 bottleneck: bool = False, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        widths = ints_arg("widths", widths, 1)
        blocks = ints_arg("blocks", blocks, 1)
        if len(widths) != len(blocks):
            raise ValueError(f"widths {widths} and blocks {blocks} must have the same length")
        num_classes = int_arg("num_classes", num_classes, 1)
        in_channels = int_arg("in_channels", in_channels, 1)
        block = Bottleneck if bool_arg("bottleneck", bottleneck) else BasicBlock
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        for i, (planes, count) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                down = None
                if stride != 1 or inplanes != planes * block.expansion:
                    down = nn.Sequential(
                        nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                        nn.BatchNorm2d(planes * block.expansion))
                stage.append(block(inplanes, planes, stride, down))
                inplanes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


RESNET_DEPTHS: dict[int, tuple[bool, tuple[int, int, int, int]]] = {
    # depth: (bottleneck, blocks per stage), as in torchvision
    10: (False, (1, 1, 1, 1)),
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}


def resnet(depth: int = 18, width: int = 64, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """A CIFAR-style ResNet-``depth`` (3x3 stem, no max-pool, stages of widths
    ``width, 2 width, 4 width, 8 width``), for 32x32 images or any other size.

    Parameters (3 input channels, 10 classes): 11,173,962 for ``resnet(18)`` (torchvision's
    ``resnet18`` with a CIFAR stem), 21,282,122 for ``resnet(34)``, 23,520,842 for
    ``resnet(50)``; ``resnet(18, width=8)`` has 176,402, ``resnet(18, width=2)`` 11,420 (the
    count grows as ``width^2``). The model is in train mode (BatchNorm); analyze it in eval mode
    after training, with :func:`msam.recalibrate_batchnorm` first when MSAM or SAM trained it.

    Args:
        depth: one of 10, 18, 34 (:class:`BasicBlock`) or 50, 101, 152 (:class:`Bottleneck`),
            with torchvision's blocks per stage (:data:`RESNET_DEPTHS`).
        width: channels of the stem and the first stage (64 in the paper).
        num_classes: outputs of the linear head.
        in_channels: channels of the input images.

    Raises:
        TypeError / ValueError: ``depth`` not one of the above, ``width``, ``num_classes`` or
            ``in_channels`` not a positive integer.

    Example:
        >>> net = resnet(18, width=8)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    int_arg("depth", depth, 1)
    bottleneck, blocks = RESNET_DEPTHS[choice_arg("depth", depth, sorted(RESNET_DEPTHS))]
    width = int_arg("width", width, 1)
    return ResNet(tuple(width * 2**i for i in range(4)), blocks, bottleneck=bottleneck,
                  num_classes=num_classes, in_channels=in_channels)
