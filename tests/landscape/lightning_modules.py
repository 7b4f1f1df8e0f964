"""A LightningModule on the digits CNN (BatchNorm) trained by MSAM, shared by the Lightning tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F

from landscape.models import digits_cnn
from msam import MSAM


def digits_module(pl: Any, on_validation: Callable[[Any], None] | None = None) -> Any:
    """A ``LightningModule`` wrapping ``digits_cnn(4)`` (as ``net``) with MSAM(lr 0.1, momentum
    0.9, rho 1); ``val_loss`` is logged, ``on_validation(module)`` called at every validation
    batch."""

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = digits_cnn(4)

        def forward(self, inp):
            return self.net(inp)

        def training_step(self, batch, _):
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, _):
            if on_validation is not None:
                on_validation(self)
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]), prog_bar=False)

        def configure_optimizers(self):
            return MSAM(self.parameters(), lr=0.1, momentum=0.9, rho=1.0)

    return Module()
