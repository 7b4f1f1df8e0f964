"""BatchNorm helpers for perturbed-point optimizers (MSAM, SAM). Imports torch only."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["BATCHNORM_BUFFERS"]

#: The buffer names of a BatchNorm layer (state-dict keys end in one of these; not parameters).
BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Keep BatchNorm running statistics (and ``num_batches_tracked``) untouched inside.

    Modules in training mode still normalize with the batch statistics, so an extra forward
    pass (SAM's second pass, a probe) computes exactly what a normal training pass computes,
    without moving the running averages. Implemented by switching ``track_running_stats`` off
    for the duration (no copies); instance norms with running statistics are snapshotted and
    restored. Restores everything on exit, also on exceptions.

    Example:
        >>> with frozen_batchnorm_stats(model):
        ...     loss_fn(model(x), y).backward()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"frozen_batchnorm_stats expects an nn.Module, got {type(model).__name__}")
    bns = _batchnorms(model)
    instance = [m for m in model.modules()
                if isinstance(m, _InstanceNorm) and m.track_running_stats]
    snapshots = [{k: b.detach().clone() for k, b in m.named_buffers(recurse=False)
                  if b is not None} for m in instance]
    for m in bns:
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m in bns:
            m.track_running_stats = True
        with torch.no_grad():
            for m, snap in zip(instance, snapshots):
                for k, v in snap.items():
                    getattr(m, k).copy_(v)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _input_batches(data: Any, batch_size: int) -> Iterator[Any]:
    """Inputs of each batch: from an (X, y) pair, a tensor X, or an iterable of batches."""
    if isinstance(data, Tensor):
        data = (data, None)
    if (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)
            and (data[1] is None or isinstance(data[1], Tensor))):
        x = data[0]
        if x.ndim == 0:
            raise ValueError(f"inputs must have a batch dimension, got shape {tuple(x.shape)}")
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size]
        return
    if not isinstance(data, Iterable):
        raise TypeError("data must be an (X, y) pair, a list of (inputs, targets) batches or a "
                        f"DataLoader, got {type(data).__name__}")
    for batch in data:
        if isinstance(batch, (tuple, list)) and batch:
            yield batch[0]
        elif isinstance(batch, Tensor):
            yield batch
        else:
            raise TypeError("each batch must be (inputs, targets) or an inputs tensor, got "
                            f"{type(batch).__name__}")


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Any, *, batch_size: int = 256,
                          max_batches: int | None = None) -> nn.Module:
    """Recompute BatchNorm running statistics at the current weights (forward passes only).

    What the MSAM authors do at the end of training: the statistics collected during training
    were taken at the perturbed point ``w~``; call this after ``optimizer.eval()`` to get
    statistics for ``w``. Running statistics are reset and then set to the sample-size-weighted
    average of the per-batch statistics, ``mean = sum_b n_b mean_b / N`` (and likewise the
    unbiased per-batch variances), by setting each BatchNorm's momentum to ``n_b / (N_seen +
    n_b)`` for the batch. Only the BatchNorm layers are in training mode during the passes
    (dropout etc. are in eval mode); every module's mode and momentum are restored afterwards.

    Args:
        model: the network (its device and dtype are used for the inputs).
        data: an ``(X, y)`` tensor pair (or a tensor ``X``), split into batches of
            ``batch_size``; or an iterable of ``(inputs, targets)`` batches, e.g. a DataLoader.
        batch_size: batch size used to split an ``(X, y)`` pair (default 256). Use the training
            batch size: the statistics are per-batch statistics.
        max_batches: stop after this many batches (default: all).

    Returns:
        The model, for chaining.

    Raises:
        ValueError: no data, or a batch of one sample that a BatchNorm layer cannot take
            (``BatchNorm1d`` on ``(1, C)``: it names the batch and the fix, ``drop_last=True``).
            On this or any other exception (``KeyboardInterrupt`` included) the running
            statistics are restored to those from before the call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate_batchnorm expects an nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size!r} (expected a positive int)")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"Invalid max_batches: {max_batches!r} (expected a positive int)")
    bns = _batchnorms(model)
    if not bns:
        return model
    device, dtype = _model_device_dtype(model)
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in bns]
    done = False
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.train()
        seen = 0
        for i, inputs in enumerate(_input_batches(data, batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            if not isinstance(inputs, Tensor):
                raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
            inputs = inputs.to(device, dtype=dtype if inputs.is_floating_point() else None)
            n = int(inputs.shape[0])
            if n == 0:
                continue
            for m in bns:
                m.momentum = n / (seen + n)
            try:
                model(inputs)
            except ValueError as exc:
                if n == 1 and "more than 1 value per channel" in str(exc):
                    raise ValueError(
                        f"recalibrate_batchnorm: batch {i} has 1 sample, and a BatchNorm layer "
                        "cannot take a variance from one value per channel; drop the last "
                        "incomplete batch (DataLoader(..., drop_last=True)) or choose a batch "
                        "size that does not leave one sample; the running statistics were "
                        "left as they were") from None
                raise
            seen += n
        if seen == 0:
            raise ValueError("recalibrate_batchnorm got no data (empty data source)")
        done = True
    finally:
        if not done:  # any failure (Ctrl-C included): the statistics from before the call
            for m, buffers in zip(bns, saved):
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)
        for m, mom in momenta.items():
            m.momentum = mom
        for m, mode in modes.items():
            m.training = mode
    return model
