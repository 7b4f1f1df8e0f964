"""Dense float64 references for small models: the full Hessian and Gauss-Newton matrices.

These build the whole ``n x n`` matrix (``O(n^2)`` memory, about ``n`` backward passes), so they
are meant for models with at most a few thousand parameters: tests of every curvature routine
and users checking a setup. The model is copied and cast to float64 (the caller's model is not
touched); the data are cast too. The dataset loss is weighted exactly as everywhere else,
``L(w) = sum_b (N_b / N) L_b(w)`` with ``N_b`` the loss terms of batch ``b`` (samples, or tokens
for a language-model loss; :func:`analysis.losses.loss_terms`). The references differentiate
inside :func:`analysis.second_order_attention`, so attention models work.

Example:
    >>> import torch
    >>> from analysis.reference import dense_hessian
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> H = dense_hessian(model, "cross_entropy", (x, y))
    >>> H.shape, H.dtype
    (torch.Size([8, 8]), torch.float64)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian

from .attention import second_order_attention
from .data import Data, as_data, to_device
from .evaluation import model_mode, resolve_loss
from .losses import LossSpec, logits_of, loss_terms
from .operators.empirical_risk import functional_forward
from .params import ParameterSpace

__all__ = ["dense_hessian", "dense_ggn", "dense_loss_function"]

_MAX_DENSE = 20_000


def _setup(model: nn.Module, params, data, batch_size, loss_fn):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    space = ParameterSpace(model, params)  # validates the selection on the caller's model
    if space.numel > _MAX_DENSE:
        raise ValueError(
            f"the model has {space.numel} selected parameters; a dense reference needs an "
            f"n x n matrix and is limited to {_MAX_DENSE}"
        )
    model64 = copy.deepcopy(model).to(torch.float64)
    space64 = ParameterSpace(model64, list(space.names))
    source = as_data(data, batch_size=batch_size)
    device = space64.device
    batches = []
    for b in source:
        x = to_device(b.inputs, device, torch.float64)
        y = to_device(b.targets, device, torch.float64)
        batches.append((x, y, loss_terms(loss_fn, x, y, b.size)))
    total = sum(b[2] for b in batches)
    return model64, space64, batches, total


def dense_loss_function(model: nn.Module, loss_fn: LossSpec, data: Data,
                        *, params: Sequence[str | nn.Parameter] | None = None,
                        batch_size: int | None = None):
    """The dataset loss as a function of a flat float64 vector, and the current point.

    Returns:
        ``(f, w0)``: ``f(w) = sum_b (N_b / N) loss_fn(model_w(x_b), y_b)`` evaluated on a float64
        copy of the model (in its current train/eval flags), and ``w0`` the current parameters.
    """
    loss_fn = resolve_loss(loss_fn)
    model64, space64, batches, total = _setup(model, params, data, batch_size, loss_fn)
    names = list(space64.names)
    buffers = dict(model64.named_buffers())

    def f(w):
        state = {**buffers, **dict(zip(names, space64.unflatten(w)))}
        loss = 0.0
        for x, y, n in batches:
            lb = loss_fn(functional_forward(model64, state, x), y)
            if lb.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(lb.shape)}")
            loss = loss + lb * (n / total)
        return loss

    return f, space64.vector()


def dense_hessian(model: nn.Module, loss_fn: LossSpec, data: Data, *,
                  params: Sequence[str | nn.Parameter] | None = None, mode: str | None = "eval",
                  batch_size: int | None = None) -> torch.Tensor:
    """The full Hessian of the dataset loss in float64, ``H = sum_b (N_b / N) d^2 L_b / dw^2``.

    Computed by ``torch.autograd.functional.hessian`` over the flat parameter vector of a float64
    copy of the model (the independent reference for :class:`analysis.HessianOperator`).

    Args:
        model: the network (not modified).
        loss_fn: ``"cross_entropy"``, ``"mse"`` or a callable returning the batch mean.
        data: see :mod:`analysis.data`.
        params: parameter subset (names or parameters), ``None`` for all trainable ones.
        mode: ``"eval"`` (default), ``"train"`` or ``None``.
        batch_size: batch size for a tensor pair.

    Returns:
        A symmetric ``(n, n)`` float64 tensor on the model's device.
    """
    with model_mode(model, mode), second_order_attention():
        f, w0 = dense_loss_function(model, loss_fn, data, params=params, batch_size=batch_size)
        H = hessian(f, w0)
    return 0.5 * (H + H.T)


def dense_ggn(model: nn.Module, loss_fn: LossSpec, data: Data, *,
              params: Sequence[str | nn.Parameter] | None = None, mode: str | None = "eval",
              batch_size: int | None = None) -> torch.Tensor:
    """The full generalized Gauss-Newton matrix in float64, ``G = sum_b (N_b/N) J_b^T H_b J_b``.

    ``J_b`` is the Jacobian of the flattened outputs of batch ``b`` in the parameters (by
    ``torch.autograd.functional.jacobian``), ``H_b`` the Hessian of the batch-mean loss in the
    flattened outputs (by ``torch.autograd.functional.hessian``).

    Returns:
        A symmetric ``(n, n)`` float64 tensor.
    """
    loss_fn = resolve_loss(loss_fn)
    with model_mode(model, mode), second_order_attention():
        model64, space64, batches, total = _setup(model, params, data, batch_size, loss_fn)
        names = list(space64.names)
        buffers = dict(model64.named_buffers())
        w0 = space64.vector()
        G = torch.zeros(space64.numel, space64.numel, dtype=torch.float64, device=w0.device)
        for x, y, n in batches:
            def outputs(w, x=x):
                state = {**buffers, **dict(zip(names, space64.unflatten(w)))}
                return logits_of(functional_forward(model64, state, x))

            out = outputs(w0).detach()
            J = jacobian(lambda w: outputs(w).reshape(-1), w0)  # (m, n)
            Hout = hessian(lambda o, y=y, shape=out.shape: loss_fn(o.reshape(shape), y),
                           out.reshape(-1))
            G += (n / total) * (J.T @ Hout @ J)
    return 0.5 * (G + G.T)
