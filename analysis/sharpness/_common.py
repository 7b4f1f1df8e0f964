"""What every sharpness metric shares: argument checks, pass counting, the evaluator that writes
``w0 + delta`` into the model, and the term-weighted loss over a whole data source."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed as dist
from ..data import DataSource, to_device
from ..evaluation import accuracy_per_term, correct_count, forward
from ..losses import LossFn, loss_terms
from ..params import ParameterSpace
from ..results import COST_FIELDS
from ..uncertainty import gather_units, split_samples


class Counter:
    """Counts batch-level forward and backward passes and the samples they covered."""

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0
        self.forward_samples = 0
        self.backward_samples = 0

    def add(self, n: int, backward: bool) -> None:
        self.forward += 1
        self.forward_samples += n
        if backward:
            self.backward += 1
            self.backward_samples += n

    def as_dict(self) -> dict[str, int]:
        """The counts under the result classes' cost field names (:data:`COST_FIELDS`)."""
        counts = (self.forward, self.backward, self.forward_samples, self.backward_samples)
        return dict(zip(COST_FIELDS, counts))


def check_model(model: Any) -> None:
    """Raise ``TypeError`` naming the type unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    """Raise unless ``value`` is a positive number (a positive integer with ``integer=True``):
    ``TypeError`` for a non-number (``bool`` included), ``ValueError`` naming ``name`` and the value
    otherwise."""
    if integer:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_seed(seed: Any) -> None:
    """Raise ``TypeError`` naming the value unless ``seed`` is an integer (not a ``bool``)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__} {seed!r}")


def check_flag(name: str, value: Any) -> None:
    """Raise ``TypeError`` naming ``name`` and the value unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_mode(mode: Any) -> None:
    """Raise ``ValueError`` naming the value unless ``mode`` is ``"eval"``, ``"train"`` or ``None``."""
    if mode not in (None, "eval", "train"):
        raise ValueError(f"mode must be 'eval', 'train' or None, got {mode!r}")


def _scalar_loss(loss: Any, where: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor (the batch mean), got {shape} {where}")
    return loss


def nonfinite(value: float, where: str) -> FloatingPointError:
    """The ``FloatingPointError`` for a non-finite loss ``value`` seen ``where`` (returned, not raised)."""
    return FloatingPointError(
        f"the loss is {value} {where}; the model or loss_fn produced a non-finite value "
        "(check the weights, the inputs and the perturbation radius)"
    )


class Evaluator:
    """Loss (and gradient) of a batch at ``w0 + delta``, written into the model in place."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, space: ParameterSpace, w0: torch.Tensor,
                 counter: Counter):
        self.model = model
        self.loss_fn = loss_fn
        self.space = space
        self.w0 = w0
        self.counter = counter

    def set(self, delta: torch.Tensor | None) -> None:
        if delta is None:
            self.space.copy_(self.w0)
        else:
            self.space.copy_(self.w0 + delta)

    def loss(self, x: Any, y: Any, n: int, where: str) -> torch.Tensor:
        with torch.no_grad():
            loss = _scalar_loss(self.loss_fn(forward(self.model, x), y), where)
        self.counter.add(n, backward=False)
        return loss.detach()

    def loss_grad(self, x: Any, y: Any, n: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            loss = _scalar_loss(self.loss_fn(forward(self.model, x), y), where)
            if not loss.requires_grad:
                raise ValueError(f"the loss does not depend on the trainable parameters {where}")
            grads = torch.autograd.grad(loss, self.space.params, allow_unused=True)
        self.counter.add(n, backward=True)
        return loss.detach(), self.space.flatten(list(grads))


def global_num_samples(source: DataSource, device: torch.device) -> int:
    """The data set's sample count ``N``, summed over ranks when the source is sharded."""
    n = source.num_samples()
    if source.shard:
        t = torch.tensor([float(n)], dtype=torch.float64, device=device)
        n = int(dist.all_reduce_sum(t).item())
    return n


def _loss_and_correct(ev: Evaluator, x: Any, y: Any, samples: int, where: str,
                      index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of a batch: its loss and its count of correct predictions."""
    with torch.no_grad():
        out = forward(ev.model, x)
        loss = _scalar_loss(ev.loss_fn(out, y), where)
        corr = correct_count(out, y, ev.loss_fn)
    ev.counter.add(samples, backward=False)
    if corr is None:
        raise ValueError(
            "pac_bayes_flatness needs class-index targets and (N, classes) outputs, or a "
            f"language-model loss, to measure accuracy; batch {index} has outputs of shape "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    return loss, corr


def global_num_batches(source: DataSource, device: torch.device) -> int:
    """The number of batches of ``source`` over all ranks (one pass of loading, no forward)."""
    n = sum(1 for _ in source)
    if source.shard:
        t = torch.tensor([float(n)], dtype=torch.float64, device=device)
        n = int(dist.all_reduce_sum(t).item())
    return n


def unit_losses(ev: Evaluator, source: DataSource, delta: torch.Tensor | None, groups: int,
                where: str, accuracy: bool = False) -> list[tuple[int, float, float, float]]:
    """Per sampling unit (each batch split into ``groups`` contiguous groups,
    :func:`analysis.uncertainty.split_samples`), over all ranks: ``(N_u, L_u, correct_u,
    count_u)`` at ``w0 + delta``, ``N_u`` the unit's loss terms, ``L_u`` its mean loss and, with
    ``accuracy``, its correct predictions and their count (samples or terms, as in
    :func:`full_loss`; zeros otherwise). Units without loss terms are left out. One forward
    pass over the data."""
    ev.set(delta)
    space = ev.space
    per_term = accuracy_per_term(ev.loss_fn)
    rows = []
    for batch in source:
        x = to_device(batch.inputs, space.device, space.dtype)
        y = to_device(batch.targets, space.device, space.dtype)
        w = f"{where} on batch {batch.index}"
        for xu, yu, nu in split_samples(x, y, batch.size, groups):
            terms = loss_terms(ev.loss_fn, xu, yu, nu)
            if accuracy:
                loss, corr = _loss_and_correct(ev, xu, yu, nu, w, batch.index)
                row = (terms, float(loss), float(corr), float(terms if per_term else nu))
            else:
                row = (terms, float(ev.loss(xu, yu, nu, w)), 0.0, 0.0)
            if terms > 0 and not math.isfinite(row[1]):
                raise nonfinite(row[1], w)
            if terms > 0:
                rows.append(row)
    return gather_units([r[0] for r in rows], rows, source.shard)[1]


def full_loss(ev: Evaluator, source: DataSource, delta: torch.Tensor | None, where: str,
               need_grad: bool = False, accuracy: bool = False):
    """Term-weighted loss (and gradient, or accuracy) over the whole source at ``w0 + delta``:
    ``sum_b N_b L_b / N`` with ``N_b`` the loss terms of batch ``b`` (samples, or counted tokens,
    :func:`analysis.losses.loss_terms`); the accuracy counts per sample for classification, per
    term for a loss that counts its correct terms (token accuracy of a language model)."""
    ev.set(delta)
    space = ev.space
    # sum N_b L_b, sum correct, N, and the accuracy's denominator (N, or the samples)
    stats = torch.zeros(4, dtype=torch.float64, device=space.device)
    per_term = accuracy_per_term(ev.loss_fn)
    grad = torch.zeros(space.numel, dtype=torch.float64, device=space.device) if need_grad else None
    for batch in source:
        x = to_device(batch.inputs, space.device, space.dtype)
        y = to_device(batch.targets, space.device, space.dtype)
        w = f"{where} on batch {batch.index}"
        terms = loss_terms(ev.loss_fn, x, y, batch.size)  # samples, or tokens for an LM loss
        if need_grad:
            loss, g = ev.loss_grad(x, y, batch.size, w)
            grad += g.double() * terms
        elif accuracy:
            loss, corr = _loss_and_correct(ev, x, y, batch.size, w, batch.index)
            stats[1] += corr
            stats[3] += terms if per_term else batch.size
        else:
            loss = ev.loss(x, y, batch.size, w)
        stats[0] += loss.double() * terms
        stats[2] += terms
    if source.shard:
        packed = stats if grad is None else torch.cat([stats, grad])
        dist.all_reduce_sum(packed)
        stats = packed[:4]
        if grad is not None:
            grad = packed[4:]
    n = stats[2]
    loss = float(stats[0] / n)
    if not math.isfinite(loss):
        raise nonfinite(loss, where)
    if need_grad:
        return loss, (grad / n).to(space.dtype)
    if accuracy:
        return loss, float(stats[1] / stats[3])
    return loss
