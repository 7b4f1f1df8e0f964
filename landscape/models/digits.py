"""Small reference models for the bundled digits data (8x8 grey images, 10 classes)."""

from __future__ import annotations

from torch import nn

from ._args import bool_arg, int_arg


def digits_cnn(width: int = 32, *, batchnorm: bool = True, num_classes: int = 10) -> nn.Sequential:
    """A small CNN: two 3x3 conv blocks (+BatchNorm, ReLU), max-pool, two linear layers.

    With the default ``width=32`` it has about 151k parameters.

    Raises:
        TypeError / ValueError: ``width`` or ``num_classes`` not a positive integer,
            ``batchnorm`` not a bool.
    """
    width = int_arg("width", width, 1)
    num_classes = int_arg("num_classes", num_classes, 1)
    batchnorm = bool_arg("batchnorm", batchnorm)

    def block(cin: int, cout: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU())
        return layers

    return nn.Sequential(
        *block(1, width),
        *block(width, 2 * width),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def digits_mlp(hidden: int = 64, depth: int = 2, *, num_classes: int = 10) -> nn.Sequential:
    """A ReLU MLP on flattened 8x8 images (input 64 features).

    ``depth`` hidden layers of ``hidden`` units (``depth=0``: a linear model).

    Raises:
        TypeError / ValueError: ``hidden`` or ``num_classes`` not a positive integer, ``depth``
            not a non-negative integer.
    """
    hidden = int_arg("hidden", hidden, 1)
    depth = int_arg("depth", depth, 0)
    num_classes = int_arg("num_classes", num_classes, 1)
    layers: list[nn.Module] = [nn.Flatten()]
    d_in = 64
    for _ in range(depth):
        layers += [nn.Linear(d_in, hidden), nn.ReLU()]
        d_in = hidden
    layers.append(nn.Linear(d_in, num_classes))
    return nn.Sequential(*layers)
