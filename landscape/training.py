"""One training step for every optimizer of the toolkit (used by the demo and the reproduction).

SAM and ASAM (:class:`msam.SAM`) step through their own API,
``SAM.step(closure, model=model)``: the closure (forward + backward) runs at ``w``, the
optimizer moves to the ascent point ``w + e``, the closure runs again there with the BatchNorm
running statistics frozen (:func:`msam.frozen_batchnorm_stats`), and the base
optimizer steps from ``w`` with the gradient taken at ``w + e``. Every other optimizer (SGD,
NAG, MSAM, any ``torch.optim.Optimizer``) takes one forward/backward and ``step()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from msam.sam import SAM


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               loss_fn: Callable[[Any, Any], torch.Tensor], inputs: Any, targets: Any, *,
               on_gradient: Callable[[], None] | None = None) -> torch.Tensor:
    """One optimizer step on one batch; returns the batch loss at the step's starting point.

    The gradients are zeroed (``set_to_none``) first. For :class:`msam.SAM` (SAM, ASAM) the
    step is ``optimizer.step(closure, model=model)`` (two forward/backward passes, the second at
    ``w + e`` with BatchNorm statistics frozen); for every other optimizer one
    forward/backward and ``optimizer.step()``. The learning rate is whatever the optimizer's
    param groups hold (set it, or step a scheduler, around this call).

    Args:
        model: the network (in the mode the caller wants; usually ``train()``).
        optimizer: any ``torch.optim.Optimizer``, :class:`msam.SAM` included.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar tensor.
        inputs, targets: the batch (already on the model's device).
        on_gradient: called once, right after the first backward (``.grad`` holds the gradient
            at the point the optimizer evaluates: ``w`` for SGD and SAM, the perturbed point for
            NAG and MSAM) and before any parameter moves, e.g. a probe reading the gradient.

    Returns:
        The loss of the first forward pass (with its autograd graph freed; ``detach()`` it to
        accumulate).
    """
    first = [True]

    def closure() -> torch.Tensor:
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        if first[0]:
            first[0] = False
            if on_gradient is not None:
                on_gradient()
        return loss

    if isinstance(optimizer, SAM):
        return optimizer.step(closure, model=model)
    optimizer.zero_grad(set_to_none=True)
    loss = closure()
    optimizer.step()
    return loss
