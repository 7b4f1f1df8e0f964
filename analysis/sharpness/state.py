"""``preserved_state``: restore a model bit for bit after a metric (also on error)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Context manager: on exit (also on error) restore the model bit for bit.

    Restores every parameter's values (trainable or not), every buffer (BatchNorm running
    statistics and ``num_batches_tracked``), every ``.grad`` (the same tensor object), every
    ``requires_grad`` flag and every submodule's ``training`` flag.
    """
    params = list(model.parameters())
    saved_p = [p.detach().clone() for p in params]
    saved_g = [p.grad for p in params]
    saved_rg = [p.requires_grad for p in params]
    buffers = [b for b in model.buffers() if b is not None]
    saved_b = [b.detach().clone() for b in buffers]
    saved_modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v, g, rg in zip(params, saved_p, saved_g, saved_rg):
                p.copy_(v)
                p.grad = g
                p.requires_grad_(rg)
            for b, v in zip(buffers, saved_b):
                b.copy_(v)
        for m, flag in saved_modes:
            m.training = flag
